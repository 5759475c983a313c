"""Fine-tuning throughput: fine_tune.py's trainer against a bare TRL SFTTrainer, the tutorial's settings
against the project's defaults, full fine-tune against LoRA, one precision against another.

Every run trains the same model on the same data (fine_tune.py's data preparation, done once) with a
runner: `fine_tune` (fine_tune.load_model + build_trainer: its SFTConfig, LoRA config, collator, MLflow
callback, token counting) or `bare` (the same model, hyperparameters and collator in a plain TRL
SFTTrainer). A setting is an attention kernel and a packing strategy: `tutorial` (eager, and TRL 0.8's
concatenate-and-cut packing, today's "wrapped"), `default` (FineTuneArguments': sdpa, bfd with the
packed rows kept apart, packed_rows.py) or ATTN:STRATEGY with a TRL strategy (bfd, bfd_split, wrapped)
or bfd_flat (TRL's own padding-free batch: bfd's rows flattened into one). Runs interleave, repeated
in rotating order, so that a busy machine slows all alike. Over the measured steps (after warm-up):

  tokens_per_s   non-padding tokens / wall time (data loading, callbacks, logging count); _med: per
                 median step_s, robust to bursts on a shared CPU (the ratios use it)
  peak_rss_mb    the process's peak resident set (on a GPU also gpu_max_alloc_gb)
  mfu_pct        model FLOPs / time / the device's bf16 peak. Per token 6N, or 4N + 6N_lora with LoRA
                 (frozen weights get no weight gradients), N = matmul parameters (all but the input
                 embedding); plus causal attention, 6 x layers x width x sum(s^2) over the attention
                 spans s (conversations with bfd, packed rows with wrapped); no recomputation counted.
                 Peak: a known GPU's data-sheet dense bf16 figure, else the best 2048x2048 matmul rate
                 torch reaches here (in bf16 where native)
  loss, learned  mean training loss; fine_tune runner: eval loss before minus after training at
                 fine_tune.py's lr 5e-6 (how much of AdamW's steps the weights kept)

It trains on the GPU when torch sees one, else on the CPU.

    python benchmarks/bench_finetune.py       # CPU: tiny Phi-3; GPU: Phi-3.5-mini-sized, random weights
    python benchmarks/bench_finetune.py --settings default --runners fine_tune --precisions bf16,bf16-mixed,fp32
"""

import argparse
import dataclasses
import gc
import os
import re
import statistics
import sys
import tempfile
import time
from collections import namedtuple
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402  (first: it keeps tool state under .scratch/bench)

import mlflow  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer, TrainerCallback, set_seed  # noqa: E402
from trl import SFTTrainer  # noqa: E402
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling  # noqa: E402

import fine_tune as ft  # noqa: E402  (finetuning_dir/fine_tune.py)
from local import mlflow_store  # noqa: E402
from stand_ins import tiny_phi3  # noqa: E402
from stand_ins.sample_chats import write_jsonl  # noqa: E402

# Dense bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s, most specific name first.
GPU_BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0,
                        "L40S": 362.0, "A10": 125.0}
Setting = namedtuple("Setting", "name attn strategy precision")


def parse_args(argv=None):
    """The command line; every flag's help says what it changes."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flag = parser.add_argument
    flag("--model", help="tiny (stand_ins/tiny_phi3.py), phi35-mini or phi4-mini (that model's config, random "
                         "weights) or a model folder (default: tiny on a CPU, phi35-mini on a GPU)")
    flag("--layers", type=int, help="with --model phi35-mini or phi4-mini: only this many layers (a quick check)")
    flag("--settings", default="tutorial,default", help="comma-separated: tutorial, default, ATTN:STRATEGY (above)")
    flag("--precisions", default="auto", help="comma-separated fine_tune.py --precision values: bf16 (the "
                                              "tutorial's), bf16-mixed, fp32, auto (what fine_tune.py picks here)")
    flag("--modes", default="full,lora", help="comma-separated: full, lora")
    flag("--runners", default="fine_tune,bare", help="comma-separated: fine_tune, bare")
    flag("--max-length", type=int, help="tokens per packed row (default: the tutorial's 2048 on a GPU, 512 on a CPU)")
    flag("--batch-size", type=int, default=4, help="per-device batch size (the tutorial's: 4)")
    flag("--warmup-steps", type=int, help="steps trained before measuring (default: 5 on a GPU, 3 on a CPU)")
    flag("--steps", type=int, help="steps measured (default: 30 on a GPU, 12 on a CPU)")
    flag("--repeats", type=int, help="times each run is repeated (default: 1 on a GPU, 2 on a CPU)")
    flag("--rows", type=int, default=2000, help="synthetic conversations to train on (the 1%% subset's ~2,000)")
    flag("--threads", type=int, help="torch threads (default: one per core); 1 steadies figures on a shared CPU")
    return parser.parse_args(argv)


def parse_settings(settings: str, precisions: str) -> list[Setting]:
    """Each setting in each precision; names carry the precision when there are several."""
    defaults = ft.FineTuneArguments()
    named = {"tutorial": ("eager", "wrapped"), "default": (defaults.attn_implementation, defaults.packing_strategy)}
    chosen = precisions.split(",")
    if set(chosen) - {"auto", "bf16-mixed", "fp32", "bf16"}:
        raise SystemExit(f"bench_finetune.py: unknown precision in {precisions!r}; use auto, bf16-mixed, fp32, bf16")
    out = []
    for item in settings.split(","):
        attn, _, strategy = item.partition(":")
        attn, strategy = named.get(item, (attn, strategy))
        if not strategy:
            raise SystemExit(f"bench_finetune.py: unknown setting {item!r}; use tutorial, default or ATTN:STRATEGY")
        out += [Setting(item if len(chosen) == 1 else f"{item}/{p}", attn, strategy, p) for p in chosen]
    return out


def peak_tflops(cuda: bool) -> tuple[float, str]:
    """The device's bf16 peak for MFU, and where the figure comes from."""
    name = torch.cuda.get_device_name(0) if cuda else ""
    for key, peak in GPU_BF16_PEAK_TFLOPS.items():
        if key.lower() in name.lower():
            return peak, "data sheet, dense bf16"
    # Else an achievable peak, measured: a CPU has no one figure across AVX2/AVX-512/AMX and thread
    # counts, and emulated bf16 runs far below the fp32 rate.
    dtype = torch.bfloat16 if ft.native_bf16() else torch.float32
    a = torch.randn(2048, 2048, dtype=dtype, device="cuda" if cuda else "cpu")
    rates = []
    for _ in range(4):  # the first round warms up
        start = time.perf_counter()
        for _ in range(5):
            a @ a
        if cuda:
            torch.cuda.synchronize()
        rates.append(2 * 2048**3 * 5 / (time.perf_counter() - start) / 1e12)
    return max(rates), f"measured: best torch {dtype} 2048x2048 matmul rate here"


class StepClock(TrainerCallback):
    """When training began and each optimizer step ended (after a CUDA sync: GPU work is asynchronous)."""

    def __init__(self):
        self.times = []

    def on_train_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    on_step_end = on_train_begin


class BatchMeter:
    """Wraps the trainer's collator: records each batch's non-padding tokens and sum of squared attention spans."""

    def __init__(self, collator):
        self.collator = collator
        self.batches = []

    def __call__(self, examples):
        batch = self.collator(examples)
        if getattr(self.collator, "last_spans", None) is not None:  # PerRowPackedCollator knows its conversations
            spans = self.collator.last_spans
        elif "attention_mask" in batch:  # padded rows: attention spans each whole row
            spans = batch["attention_mask"].sum(-1).tolist()
        else:  # padding-free: one flattened row, a conversation starts where position_ids is 0
            positions = batch["position_ids"].reshape(-1)
            starts = (positions == 0).nonzero().flatten().tolist() + [positions.numel()]
            spans = [b - a for a, b in zip(starts, starts[1:]) if b > a]
        self.batches.append((int(sum(spans)), int(sum(s * s for s in spans))))
        return batch


def train(setting: Setting, mode: str, runner: str, data, opts, work: Path) -> dict:
    """Train one run for warm-up + measured steps; return its figures over the measured steps."""
    args = ft.resolved(ft.FineTuneArguments(
        train_file=str(work / "train.jsonl"), eval_file=str(work / "test.jsonl"), model_name=str(opts.model),
        checkpoint_dir=str(work / "checkpoints"), save_steps=0, batch_size=opts.batch_size,
        max_length=opts.max_length, max_steps=opts.warmup_steps + opts.steps, lora=mode == "lora",
        attn_implementation=setting.attn, precision=setting.precision,
        packing_strategy="bfd" if setting.strategy == "bfd_flat" else setting.strategy,
    ))
    set_seed(args.seed)  # the same LoRA initialisation in every run
    model, tokenizer = ft.load_model(args)
    if runner == "fine_tune":
        trainer = ft.build_trainer(args, model, tokenizer, *data)
    else:
        config = dataclasses.replace(ft.training_config(args), do_eval=False, eval_strategy="no",
                                     include_num_input_tokens_seen="no")
        trainer = SFTTrainer(model=model, args=config, train_dataset=data[0], processing_class=tokenizer,
                             peft_config=ft.lora_config(args))
        trainer.data_collator = ft.batch_collator(args, tokenizer) or trainer.data_collator
    if setting.strategy == "bfd_flat":
        trainer.data_collator = DataCollatorForLanguageModeling(tokenizer.pad_token_id, padding_free=True)
    if len(trainer.train_dataset) < args.batch_size * args.max_steps:  # an epoch boundary would cost a step
        raise SystemExit(f"bench_finetune.py: {len(trainer.train_dataset)} packed rows cannot fill "
                         f"{args.max_steps} steps of batch {args.batch_size}; raise --rows")

    eval_before = trainer.evaluate()["eval_loss"] if runner == "fine_tune" else None
    clock, meter = StepClock(), BatchMeter(trainer.data_collator)
    trainer.add_callback(clock)
    trainer.data_collator = meter
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak resident set (VmHWM) restarts from here
    with mlflow.start_run() if runner == "fine_tune" else nullcontext():  # fine_tune.py logs inside its run
        loss = trainer.train().training_loss
    rss_mb = int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) / 1024

    w, s, t = opts.warmup_steps, args.max_steps, clock.times
    assert len(t) == s + 1, f"expected {s} steps, saw {len(t) - 1}"
    steps = [b - a for a, b in zip(t[w:s], t[w + 1:s + 1])]
    tokens, squares = map(sum, zip(*meter.batches[w:s]))
    config = model.config
    width = config.num_attention_heads * (getattr(config, "head_dim", None)
                                          or config.hidden_size // config.num_attention_heads)
    params = dict(trainer.model.named_parameters())
    n_lora = sum(p.numel() for name, p in params.items() if "lora_" in name)
    n = sum(p.numel() for name, p in params.items() if p.dim() >= 2 and "embed_tokens" not in name) - n_lora
    n += model.get_output_embeddings().weight.numel() if config.tie_word_embeddings else 0  # Phi-4-mini's, listed once
    flops = (6 * n if mode == "full" else 4 * n + 6 * n_lora) * tokens + 6 * config.num_hidden_layers * width * squares
    row = {
        "setting": setting.name, "attn": setting.attn, "packing": setting.strategy, "mode": mode, "runner": runner,
        "precision": args.precision,
        "weights": str(next(model.parameters()).dtype).replace("torch.", ""),
        "tokens_per_s": tokens / (t[s] - t[w]), "tokens_per_s_med": tokens / len(steps) / statistics.median(steps),
        "step_s": statistics.median(steps), "tokens_per_step": tokens / len(steps), "peak_rss_mb": rss_mb,
        "mfu_pct": 100 * flops / (t[s] - t[w]) / 1e12 / opts.peak_tflops, "loss": loss,
    }
    if eval_before is not None:
        row["learned"] = eval_before - trainer.evaluate()["eval_loss"]
    if torch.cuda.is_available():
        row["gpu_max_alloc_gb"] = torch.cuda.max_memory_allocated() / 2**30
    del trainer, model
    gc.collect()  # the trainer, its optimizer and callbacks form cycles: free them before the next run
    return row


def summarise(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Medians over repeats per (setting, mode, runner), and the ratios of their tokens/s."""
    groups = {}
    for row in rows:
        groups.setdefault((row["setting"], row["mode"], row["runner"]), []).append(row)
    table, ratios = [], []
    for (setting, mode, runner), runs in groups.items():
        medians = {k: statistics.median(r[k] for r in runs) for k, v in runs[0].items() if isinstance(v, float)}
        table.append({**{k: v for k, v in runs[0].items() if k != "repeat"}, **medians, "runs": len(runs)})
        if runner == "fine_tune" and (setting, mode, "bare") in groups:
            # Paired: the two runners of one repeat ran back to back, under the same load.
            bare = {r["repeat"]: r["tokens_per_s_med"] for r in groups[(setting, mode, "bare")]}
            paired = [r["tokens_per_s_med"] / bare[r["repeat"]] for r in runs if r["repeat"] in bare]
            ratios.append({"what": f"fine_tune / bare, {setting}, {mode}", "ratio": statistics.median(paired),
                           "per_repeat": [round(x, 3) for x in paired]})
    medians = {(e["setting"], e["mode"], e["runner"]): e["tokens_per_s_med"] for e in table}
    for (setting, mode, runner), value in medians.items():
        if setting != "tutorial" and ("tutorial", mode, runner) in medians:
            ratios.append({"what": f"{setting} / tutorial, {mode}, {runner}",
                           "ratio": value / medians[("tutorial", mode, runner)]})
    return table, ratios


def main(argv=None):
    """Build the model and data, train every run, print the tables and the RESULT line."""
    opts = parse_args(argv)
    cuda = torch.cuda.is_available()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    opts.model = opts.model or ("phi35-mini" if cuda else "tiny")
    opts.max_length = opts.max_length or (2048 if cuda else 512)
    opts.warmup_steps = (5 if cuda else 3) if opts.warmup_steps is None else opts.warmup_steps
    opts.steps = opts.steps or (30 if cuda else 12)
    opts.repeats = opts.repeats or (1 if cuda else 2)
    opts.peak_tflops, peak_source = peak_tflops(cuda)
    settings = parse_settings(opts.settings, opts.precisions)
    pairs = [(setting, mode) for setting in settings for mode in opts.modes.split(",")]
    runners = opts.runners.split(",")

    with tempfile.TemporaryDirectory(dir=common.SCRATCH) as tmp:
        work = Path(tmp)
        if opts.model == "tiny":
            opts.model = tiny_phi3.build(work / "tiny-phi3")
        elif opts.model in common.BIG_MODELS:
            opts.model = common.phi35_mini_mlflow(opts.layers, opts.model)
        common.print_header("Fine-tuning throughput", {
            **vars(opts), "device": "cuda" if cuda else "cpu", "torch_threads": torch.get_num_threads(),
            "peak_source": peak_source, "learning_rate": ft.FineTuneArguments().learning_rate,
            "gradient_checkpointing": True, "settings": [s._asdict() for s in settings],
        })
        # A store of this run's own: fine_tune.py's metrics logging is timed, and nothing else writes there.
        os.environ.update(mlflow_store.prepare(work / "mlflow.db", work / "mlartifacts"))
        write_jsonl(common.synthetic_chats(opts.rows, seed=0), work / "train.jsonl")
        write_jsonl(common.synthetic_chats(16, seed=1), work / "test.jsonl")
        tokenizer = AutoTokenizer.from_pretrained(ft.model_folders(str(opts.model))[1])
        data = ft.load_and_preprocess_data(str(work / "train.jsonl"), str(work / "test.jsonl"), tokenizer)
        rows = []
        for repeat in range(opts.repeats):
            # Each repeat starts one (setting, mode) later and flips the runners, so that a burst of
            # load from elsewhere does not always land on the same candidate.
            shift = repeat % len(pairs)
            for setting, mode in pairs[shift:] + pairs[:shift]:
                for runner in runners if repeat % 2 == 0 else runners[::-1]:
                    rows.append({**train(setting, mode, runner, data, opts, work), "repeat": repeat})
                    print(f"run {len(rows)}: {setting.name} {mode} {runner}: {rows[-1]['tokens_per_s']:,.0f} "
                          f"tokens/s, loss {rows[-1]['loss']:.4f}, load {os.getloadavg()[0]:.2f}", flush=True)

    table, ratios = summarise(rows)
    print("\nMedians over repeats:")
    common.print_table(table, ["setting", "attn", "packing", "precision", "weights", "mode", "runner", "tokens_per_s",
                               "tokens_per_s_med", "step_s", "tokens_per_step", "peak_rss_mb", "mfu_pct", "loss",
                               "learned"] + (["gpu_max_alloc_gb"] if cuda else []))
    print("\nRatios of tokens_per_s_med (fine_tune / bare: the median of per-repeat pairs run back to back):")
    common.print_table(ratios, ["what", "ratio", "per_repeat"])
    common.emit_json("finetune", {"runs": rows, "summary": table, "ratios": ratios})


if __name__ == "__main__":
    main()
