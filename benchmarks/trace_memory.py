"""Peak tensor memory of one full fine-tuning step of Phi-3.5-mini, traced without a GPU.

It builds a model of Phi-3.5-mini-instruct's architecture and size (3.8B parameters) on *fake*
tensors (torch's FakeTensorMode: shapes and dtypes, no storage), and runs what fine_tune.py runs
per optimizer step: the forward pass with gradient checkpointing and sdpa, the loss, the backward
pass and a fused AdamW step, in each precision of fine_tune.py's --precision (weights in the dtype
fine_tune.load_model picks, bf16 autocast where fine_tune.py turns it on). torch's MemTracker
records every tensor allocated and freed and reports the peak, split into parameters, gradients,
optimizer state, activations and temporaries. The second step is the one measured: AdamW's two
moments exist from then on.

What it is: the exact sum of live tensor bytes at the peak, with CPU kernels standing in for CUDA
ones. What it is not: a GPU measurement. It leaves out the CUDA context and cuBLAS/NCCL workspaces
(about 1 GiB on an A100) and the allocator's rounding and fragmentation, which count towards
torch.cuda.max_memory_reserved rather than max_memory_allocated. Several GPUs add DDP's
communication buffers (fine_tune.py keeps gradients as bucket views, so no second gradient copy).

    python benchmarks/trace_memory.py                                   # batch 4 x 2048, all precisions
    python benchmarks/trace_memory.py --precisions bf16-mixed --layers 2 --max-length 256   # a quick look
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402

CATEGORIES = {"PARAM": "params", "GRAD": "grads", "OPT": "optimizer", "ACT": "activations", "TEMP": "temporary",
              "BUFFER": "buffers", "OTH": "other"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", default="bf16-mixed,bf16,fp32",
                        help="comma-separated fine_tune.py --precision values to trace (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4, help="per-device batch size (the tutorial's: 4)")
    parser.add_argument("--max-length", type=int, default=2048, help="tokens per row (the tutorial's: 2048)")
    parser.add_argument("--layers", type=int, help="decoder layers (default: Phi-3.5-mini's 32)")
    return parser.parse_args(argv)


def trace(precision: str, opts) -> dict:
    """Peak live tensor bytes per category during the second of two training steps."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers import AutoModelForCausalLM, Phi3Config

    import fine_tune as ft

    values = dict(common.PHI35_MINI_CONFIG)
    if opts.layers:
        values["num_hidden_layers"] = opts.layers
    dtype = ft.weights_dtype(precision, trained_weights=True)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = AutoModelForCausalLM.from_config(Phi3Config(**values), dtype=dtype, attn_implementation="sdpa")
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        # Fused, as the trainer's default optim adamw_torch_fused: no full-size temporaries in the step.
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-6, fused=True)
        ids = torch.randint(0, values["vocab_size"] - 64, (opts.batch_size, opts.max_length))
        positions = torch.arange(opts.max_length).repeat(opts.batch_size, 1)
        tracker = MemTracker()
        tracker.track_external(model, optimizer, ids)
        with tracker:
            for _ in range(2):
                tracker.reset_mod_stats()  # the peak kept is the last step's
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision in ("bf16-mixed", "bf16")):
                    loss = model(input_ids=ids, labels=ids, position_ids=positions).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    peak = tracker.get_tracker_snapshot("peak")
    (device_peak,) = peak.values()
    row = {"precision": precision, "weights": str(dtype).replace("torch.", "")}
    for key, value in device_peak.items():
        name = "total" if key == "Total" else CATEGORIES.get(str(key).rsplit(".", 1)[-1], str(key))
        row[f"{name}_gib"] = value / 2**30
    return row


def main(argv=None):
    opts = parse_args(argv)
    common.setup_env()
    import transformers

    transformers.logging.set_verbosity_error()
    precisions = [p.strip() for p in opts.precisions.split(",") if p.strip()]
    common.print_header("Peak tensor memory of a fine-tuning step, traced on fake tensors", {
        "model": "Phi-3.5-mini-instruct's config, random (fake) weights", "layers": opts.layers or 32,
        "batch_size": opts.batch_size, "max_length": opts.max_length, "full fine-tune": True,
        "gradient_checkpointing": True, "attention": "sdpa", "optimizer": "AdamW", "precisions": precisions,
    })
    rows = []
    for precision in precisions:
        with common.timed() as took:
            rows.append(trace(precision, opts))
        print(f"{precision}: peak {rows[-1]['total_gib']:.2f} GiB (traced in {took():.0f} s)", flush=True)
    common.print_table(rows, ["precision", "weights", "params_gib", "grads_gib", "optimizer_gib", "activations_gib",
                              "temporary_gib", "total_gib"])
    print("Traced tensor bytes, CPU kernels standing in for CUDA ones; not measured on a GPU.")
    common.emit_json("trace_memory", {"rows": rows})
    return rows


if __name__ == "__main__":
    main()
