"""Peak tensor memory of one full fine-tuning step of Phi-3.5-mini, traced without a GPU.

A model of Phi-3.5-mini-instruct's architecture and size (3.8B parameters) is built on fake tensors
(FakeTensorMode: shapes and dtypes, no storage) and runs what fine_tune.py runs per step: forward with
gradient checkpointing and sdpa, loss, backward, fused AdamW, in each --precision of fine_tune.py (its
weight dtype, its bf16 autocast). torch's MemTracker reports the peak of the second step (AdamW's
moments exist from then on) per parameters, gradients, optimizer state, activations, temporaries.

It is the exact sum of live tensor bytes, CPU kernels standing in for CUDA ones, not a GPU figure: it
leaves out the CUDA context, cuBLAS/NCCL workspaces (~1 GiB on an A100), the allocator's rounding and
fragmentation, and several GPUs' DDP buffers (fine_tune.py keeps gradients as bucket views).

    python benchmarks/trace_memory.py                                   # batch 4 x 2048, all precisions
    python benchmarks/trace_memory.py --precisions bf16-mixed --layers 2 --max-length 256   # a quick look
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402  (first: it keeps tool state under .scratch/bench)

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.distributed._tools.mem_tracker import MemTracker  # noqa: E402

import fine_tune as ft  # noqa: E402  (finetuning_dir/fine_tune.py)

CATEGORIES = {"PARAM": "params", "GRAD": "grads", "OPT": "optimizer", "ACT": "activations", "TEMP": "temporary",
              "BUFFER": "buffers", "OTH": "other"}


def parse_args(argv=None):
    """The command line; every flag's help says what it changes."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flag = parser.add_argument
    flag("--precisions", default="bf16-mixed,bf16,fp32", help="comma-separated fine_tune.py --precision values")
    flag("--batch-size", type=int, default=4, help="per-device batch size (the tutorial's: 4)")
    flag("--max-length", type=int, default=2048, help="tokens per row (the tutorial's: 2048)")
    flag("--layers", type=int, help="decoder layers (default: Phi-3.5-mini's 32)")
    flag("--model", default="phi35-mini", choices=common.BIG_MODELS, help="whose config: phi35-mini or phi4-mini")
    return parser.parse_args(argv)


def trace(precision: str, opts) -> dict:
    """Peak live tensor bytes per category during the second of two training steps."""
    dtype = ft.weights_dtype(precision, trained_weights=True)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = common.random_phi35_mini(dtype, opts.layers, opts.model)
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        # Fused, as the trainer's default optim adamw_torch_fused: no full-size temporaries in the step.
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-6, fused=True)
        ids = torch.randint(0, model.config.vocab_size - 64, (opts.batch_size, opts.max_length))
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
    (device_peak,) = tracker.get_tracker_snapshot("peak").values()
    row = {"precision": precision, "weights": str(dtype).replace("torch.", "")}
    for key, value in device_peak.items():
        name = "total" if key == "Total" else CATEGORIES.get(str(key).rsplit(".", 1)[-1], str(key))
        row[f"{name}_gib"] = value / 2**30
    return row


def main(argv=None):
    """Trace each precision; print the table and the RESULT line."""
    opts = parse_args(argv)
    common.print_header("Peak tensor memory of a fine-tuning step, traced on fake tensors", {
        **vars(opts), "weights": "fake", "layers": opts.layers or 32,
        "full fine-tune": True, "gradient_checkpointing": True, "attention": "sdpa", "optimizer": "AdamW (fused)"})
    rows = []
    for precision in opts.precisions.split(","):
        start = time.perf_counter()
        rows.append(trace(precision, opts))
        print(f"{precision}: peak {rows[-1]['total_gib']:.2f} GiB (traced in {time.perf_counter() - start:.0f} s)",
              flush=True)
    common.print_table(rows, ["precision", "weights", "params_gib", "grads_gib", "optimizer_gib", "activations_gib",
                              "temporary_gib", "total_gib"])
    print("Traced tensor bytes, CPU kernels standing in for CUDA ones; not measured on a GPU.")
    common.emit_json("trace_memory", {"rows": rows})


if __name__ == "__main__":
    main()
