"""Fine-tuning throughput: fine_tune.py's trainer against a bare TRL SFTTrainer, tutorial vs defaults.

For each attention/packing setting (the tutorial's eager attention with TRL 0.8's concatenate-and-cut
packing, which today's TRL calls "wrapped"; the project's defaults from FineTuneArguments; or any
ATTN:STRATEGY you name), each precision (fine_tune.py's --precision: bf16 is the tutorial's bf16
weights, bf16-mixed fp32 weights with bf16 autocast, fp32, auto what fine_tune.py picks here), for a
full fine-tune and for LoRA, it trains the same model on the same data twice in this one process:

  fine_tune  the trainer fine_tune.py trains with: fine_tune.load_model + fine_tune.build_trainer
             (its SFTConfig, LoRA config, collator, MLflow callback, chat-template data preparation);
  bare       a plain TRL SFTTrainer with the same hyperparameters and precision, and nothing else.

Runs are interleaved (setting x mode x runner, repeated) so that a busy machine slows all alike.
Each run trains warm-up + measured steps; the figures cover the measured steps only:

  tokens/s   non-padding tokens trained per second (wall clock between optimizer steps, so data
             loading, callbacks and logging count);
  step       median seconds per optimizer step;
  peak mem   CPU: the process's peak resident set during training (sampled every 10 ms);
             GPU: torch.cuda.max_memory_allocated;
  MFU        model FLOPs / time / the device's bf16 peak. Model FLOPs per step: 6*N*tokens for a
             full fine-tune (4*N*tokens + 6*N_lora*tokens with LoRA: frozen weights get no weight
             gradients), N = parameters of the matmuls (all but the input embedding), plus causal
             attention 6*L*d*sum(s^2) over the attention spans s (each conversation with the bfd
             strategies, each packed row with "wrapped", where attention crosses conversations).
             Gradient-checkpointing recomputation is not counted (MFU, not HFU). Peak: the GPU's
             data-sheet dense bf16 peak; on a CPU the best matmul rate torch measures here, in bf16 where
             the CPU computes it natively (AVX512-BF16, AMX), else in fp32.
  loss       mean training loss of the run: the same setting trained by both runners, or two
             attention kernels with one packing strategy, should agree (they train the same model).
  learned    fine_tune runner only: eval loss on the test chats before training minus after it, at
             fine_tune.py's learning rate (5e-6 unless --learning-rate): how much of AdamW's steps
             the weights kept.

    python benchmarks/bench_finetune.py                       # tiny Phi-3 on the CPU (~2 min)
    python benchmarks/bench_finetune.py --device cuda         # Phi-3.5-mini-sized, random weights
    python benchmarks/bench_finetune.py --settings tutorial,default,sdpa:wrapped,eager:bfd
    python benchmarks/bench_finetune.py --settings default --runners fine_tune --precisions bf16,bf16-mixed,fp32
"""

import argparse
import gc
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402
from stand_ins.sample_chats import write_jsonl  # noqa: E402

TUTORIAL = ("eager", "wrapped")  # attn_implementation="eager", TRL 0.8 packing=True (ConstantLengthDataset)


@dataclass(frozen=True)
class Setting:
    name: str
    attn: str
    strategy: str
    precision: str = "auto"


def parse_settings(text: str, precisions: str, defaults) -> list[Setting]:
    settings = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        if item == "tutorial":
            settings.append(Setting("tutorial", *TUTORIAL))
        elif item == "default":
            settings.append(Setting("default", defaults.attn_implementation, defaults.packing_strategy))
        elif ":" in item:
            attn, strategy = item.split(":", 1)
            settings.append(Setting(item, attn, strategy))
        else:
            raise SystemExit(f"bench_finetune.py: unknown setting {item!r}; use tutorial, default or ATTN:STRATEGY")
    chosen = [p.strip() for p in precisions.split(",") if p.strip()]
    for precision in chosen:
        if precision not in ("auto", "bf16-mixed", "fp32", "bf16"):
            raise SystemExit(f"bench_finetune.py: unknown precision {precision!r}; use auto, bf16-mixed, fp32 or bf16")
    if len(chosen) == 1:
        return [Setting(s.name, s.attn, s.strategy, chosen[0]) for s in settings]
    return [Setting(f"{s.name}/{p}", s.attn, s.strategy, p) for s in settings for p in chosen]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="cuda: the first GPU (fails without one); cpu: hide any GPU; auto: cuda when present")
    parser.add_argument("--model", choices=["tiny", "phi35-mini"],
                        help="tiny: stand_ins/tiny_phi3.py (2 layers, hidden 64); phi35-mini: Phi-3.5-mini-instruct's "
                             "config with random weights (3.8B parameters). Default: tiny on CPU, phi35-mini on GPU")
    parser.add_argument("--model-dir", type=Path, help="train this model folder instead of building --model")
    parser.add_argument("--layers", type=int,
                        help="with --model phi35-mini: build only this many layers (a quick check; default all 32)")
    parser.add_argument("--settings", default="tutorial,default",
                        help="comma-separated: tutorial (eager + wrapped packing), default (FineTuneArguments' "
                             "attn_implementation + packing_strategy) or ATTN:STRATEGY, e.g. sdpa:bfd_split; "
                             "with bfd, fine_tune.py keeps packed rows apart (finetuning_dir/packed_rows.py; bfd_rows "
                             "is an alias); bfd_flat is TRL's own flattened padding-free batch")
    parser.add_argument("--precisions", default="auto",
                        help="comma-separated fine_tune.py --precision values: bf16 (the tutorial's bf16 weights), "
                             "bf16-mixed (fp32 weights, bf16 autocast), fp32, auto (what fine_tune.py picks here)")
    parser.add_argument("--learning-rate", type=float, help="fine_tune.py's --learning-rate (default: its 5e-6)")
    parser.add_argument("--modes", default="full,lora", help="comma-separated: full, lora")
    parser.add_argument("--runners", default="fine_tune,bare", help="comma-separated: fine_tune, bare")
    parser.add_argument("--max-length", type=int, help="sequence length (default: 2048, the tutorial's, on GPU; 512 on CPU)")
    parser.add_argument("--batch-size", type=int, default=4, help="per-device batch size (the tutorial's: 4)")
    parser.add_argument("--warmup-steps", type=int, help="steps trained before measuring (default: 3 CPU, 5 GPU)")
    parser.add_argument("--steps", type=int, help="steps measured (default: 12 CPU, 30 GPU)")
    parser.add_argument("--repeats", type=int, help="times each run is repeated, interleaved (default: 2 CPU, 1 GPU)")
    parser.add_argument("--rows", type=int, default=2000,
                        help="synthetic ultrachat-shaped conversations to train on (default: the 1%% subset's ~2,000)")
    parser.add_argument("--no-gradient-checkpointing", action="store_true",
                        help="turn gradient checkpointing off (the tutorial and the project keep it on)")
    parser.add_argument("--threads", type=int,
                        help="torch threads (default: torch's, one per core); 1 steadies CPU figures on a machine "
                             "other jobs share, where spinning worker threads stall each other")
    parser.add_argument("--peak-tflops", type=float,
                        help="the device's dense bf16 peak in TFLOP/s for MFU (default: looked up for known GPUs, "
                             "measured with a 2048x2048 matmul on a CPU: bf16 where native, else fp32)")
    return parser.parse_args(argv)


class StepClock:
    """A TrainerCallback recording when each optimizer step ends (after a CUDA sync on GPU)."""

    def __init__(self, cuda: bool):
        from transformers import TrainerCallback

        self.cuda = cuda
        self.start = None
        self.ends = []
        clock = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                clock.start = clock.now()

            def on_step_end(self, args, state, control, **kwargs):
                clock.ends.append(clock.now())

        self.callback = _Callback()

    def now(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()


class BatchMeter:
    """Wraps the trainer's collator: records each batch's non-padding tokens and attention spans."""

    def __init__(self, collator):
        self.collator = collator
        self.batches = []  # (tokens, sum of squared attention spans)

    def __call__(self, examples):
        batch = self.collator(examples)
        if getattr(self.collator, "last_spans", None) is not None:  # PerRowPackedCollator knows its conversations
            spans = self.collator.last_spans
        elif "attention_mask" in batch:  # padded rows; attention spans the whole row
            spans = batch["attention_mask"].sum(-1).tolist()
        else:  # padding-free: one flattened row, a conversation starts where position_ids is 0
            positions = batch["position_ids"].reshape(-1)
            starts = (positions == 0).nonzero().flatten().tolist() + [positions.numel()]
            spans = [b - a for a, b in zip(starts, starts[1:]) if b > a]
        self.batches.append((int(sum(spans)), int(sum(s * s for s in spans))))
        return batch


def matmul_parameters(model) -> int:
    """Parameters that take part in matmuls: all but the input embedding table and norm weights."""
    return sum(p.numel() for name, p in model.named_parameters() if p.dim() >= 2 and "embed_tokens" not in name)


class Bench:
    def __init__(self, opts, ft, work: Path):
        import torch

        self.opts = opts
        self.ft = ft
        self.work = work
        self.cuda = torch.cuda.is_available()

    def fine_tune_args(self, setting: Setting, mode: str):
        o = self.opts
        return self.ft.FineTuneArguments(
            train_file=str(self.work / "train.jsonl"),
            eval_file=str(self.work / "test.jsonl"),
            model_output_dir=str(self.work / "unused-model"),
            model_name=str(o.model_dir),
            batch_size=o.batch_size,
            max_length=o.max_length,
            max_steps=o.warmup_steps + o.steps,
            lora=mode == "lora",
            attn_implementation=setting.attn,
            packing=True,
            packing_strategy="bfd" if setting.strategy in ("bfd_rows", "bfd_flat") else setting.strategy,
            gradient_checkpointing=not o.no_gradient_checkpointing,
            precision=setting.precision,
            save_steps=0,
            checkpoint_dir=str(self.work / "checkpoints"),
            **({"learning_rate": o.learning_rate} if o.learning_rate else {}),
        )

    def fine_tune_trainer(self, args, train, test):
        """The trainer fine_tune.py trains with."""
        model, tokenizer = self.ft.load_model(args)
        return self.ft.build_trainer(args, model, tokenizer, train, test), model

    def bare_trainer(self, args, train):
        """A plain TRL SFTTrainer with the same hyperparameters: no callbacks, eval, token counting."""
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import SFTConfig, SFTTrainer

        precision = self.ft.resolve_precision(args.precision)
        model = AutoModelForCausalLM.from_pretrained(
            args.model_name, dtype=self.ft.weights_dtype(precision, trained_weights=not args.lora),
            attn_implementation=args.attn_implementation, use_cache=False,
        )
        tokenizer = AutoTokenizer.from_pretrained(args.model_name)
        config = SFTConfig(
            output_dir=str(self.work / "bare"), bf16=precision in ("bf16-mixed", "bf16"), use_cpu=not self.cuda,
            learning_rate=args.learning_rate,
            lr_scheduler_type="cosine", warmup_steps=args.warmup, max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size, gradient_checkpointing=args.gradient_checkpointing,
            max_length=args.max_length, packing=args.packing, packing_strategy=args.packing_strategy,
            dataset_text_field="text", seed=args.seed, logging_steps=args.logging_steps, save_strategy="no",
            report_to="none",
        )
        peft_config = None
        if args.lora:
            from peft import LoraConfig

            peft_config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.05,
                                     target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer,
                             peft_config=peft_config)
        return trainer, model

    def run(self, setting: Setting, mode: str, runner: str, data) -> dict:
        import mlflow
        import torch
        from transformers import set_seed

        o = self.opts
        args = self.fine_tune_args(setting, mode)
        set_seed(args.seed)  # the same LoRA initialisation in every run
        if runner == "fine_tune":
            trainer, base = self.fine_tune_trainer(args, *data)
        else:
            trainer, base = self.bare_trainer(args, data[0])
        pad = trainer.processing_class.pad_token_id
        if setting.strategy == "bfd_flat":  # TRL's own padding-free batches: one flattened row per step
            from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

            trainer.data_collator = DataCollatorForLanguageModeling(pad_token_id=pad, padding_free=True)
        elif runner == "bare" and self.ft.batch_collator(args, trainer.processing_class) is not None:
            # fine_tune.build_trainer sets this collator; the bare run gets it too (same configuration).
            trainer.data_collator = self.ft.batch_collator(args, trainer.processing_class)
        needed = o.batch_size * args.max_steps
        if len(trainer.train_dataset) < needed:
            raise SystemExit(
                f"bench_finetune.py: {len(trainer.train_dataset)} packed rows cannot fill {args.max_steps} steps "
                f"of batch {o.batch_size} without an epoch boundary; raise --rows"
            )
        config = trainer.model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        layers, width = config.num_hidden_layers, config.num_attention_heads * head_dim
        n_base = matmul_parameters(base if mode == "full" else trainer.model.get_base_model())
        n_lora = sum(p.numel() for n, p in trainer.model.named_parameters() if p.requires_grad and "lora_" in n)

        eval_before = trainer.evaluate()["eval_loss"] if runner == "fine_tune" else None
        clock = StepClock(self.cuda)
        trainer.add_callback(clock.callback)
        meter = BatchMeter(trainer.data_collator)
        trainer.data_collator = meter
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        run_ctx = mlflow.start_run() if runner == "fine_tune" else _null()
        with run_ctx, common.PeakRSS() as rss:
            result = trainer.train()

        eval_after = trainer.evaluate()["eval_loss"] if runner == "fine_tune" else None
        w, s = o.warmup_steps, args.max_steps
        assert len(clock.ends) == s, f"expected {s} steps, saw {len(clock.ends)}"
        window = clock.ends[s - 1] - clock.ends[w - 1] if w else clock.ends[s - 1] - clock.start
        tokens = sum(t for t, _ in meter.batches[w:s])
        squares = sum(q for _, q in meter.batches[w:s])
        steps = [b - a for a, b in zip([clock.start, *clock.ends], clock.ends)][w:s]
        per_token = 6 * n_base if mode == "full" else 4 * n_base + 6 * n_lora
        flops = per_token * tokens + 6 * layers * width * squares
        row = {
            "setting": setting.name, "attn": setting.attn, "packing": setting.strategy, "mode": mode, "runner": runner,
            "precision": self.ft.resolve_precision(setting.precision),
            "weights": str(next(p for p in base.parameters()).dtype).replace("torch.", ""),
            "tokens_per_s": tokens / window,
            "tokens_per_s_med": tokens / len(steps) / common.median(steps),
            "step_s": common.median(steps),
            "tokens_per_step": tokens / len(steps),
            "peak_rss_mb": rss.peak / 2**20,
            "tflops": flops / window / 1e12,
            "mfu_pct": 100 * flops / window / (o.peak_tflops * 1e12),
            "loss": result.training_loss,
        }
        if eval_before is not None:
            row.update(eval_before=eval_before, eval_after=eval_after, learned=eval_before - eval_after)
        if self.cuda:
            row["gpu_max_alloc_gb"] = torch.cuda.max_memory_allocated() / 2**30
        del trainer, base, result
        gc.collect()  # the trainer, its optimizer and callbacks form cycles: free them before the next run
        if self.cuda:
            torch.cuda.empty_cache()
        return row


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def summarise(rows, settings, modes, runners):
    """Median over repeats per (setting, mode, runner), then the ratios between them."""
    def pick(setting, mode, runner):
        return [r for r in rows if r["setting"] == setting and r["mode"] == mode and r["runner"] == runner]

    table = []
    for setting in settings:
        for mode in modes:
            for runner in runners:
                runs = pick(setting.name, mode, runner)
                if not runs:
                    continue
                entry = {k: runs[0][k] for k in ("setting", "attn", "packing", "precision", "weights", "mode", "runner")}
                for key in ("tokens_per_s", "tokens_per_s_med", "step_s", "tokens_per_step", "peak_rss_mb", "tflops",
                            "mfu_pct", "loss", "learned", "gpu_max_alloc_gb"):
                    if key in runs[0]:
                        entry[key] = common.median([r[key] for r in runs])
                entry["runs"] = len(runs)
                table.append(entry)

    def tps(setting, mode, runner):
        for e in table:
            if (e["setting"], e["mode"], e["runner"]) == (setting, mode, runner):
                return e["tokens_per_s_med"]
        return None

    ratios = []
    for setting in settings:
        for mode in modes:
            # Paired: the two runners of one repeat run back to back, under the same load.
            paired = []
            for repeat in sorted({r["repeat"] for r in rows}):
                ft_ = [r for r in pick(setting.name, mode, "fine_tune") if r["repeat"] == repeat]
                bare = [r for r in pick(setting.name, mode, "bare") if r["repeat"] == repeat]
                if ft_ and bare:
                    paired.append(ft_[0]["tokens_per_s_med"] / bare[0]["tokens_per_s_med"])
            if paired:
                ratios.append({"what": f"fine_tune / bare, {setting.name}, {mode}", "ratio": common.median(paired),
                               "per_repeat": [round(x, 3) for x in paired]})
    names = [s.name for s in settings]
    if "tutorial" in names:
        for setting in settings:
            if setting.name == "tutorial":
                continue
            for mode in modes:
                for runner in runners:
                    a, b = tps(setting.name, mode, runner), tps("tutorial", mode, runner)
                    if a and b:
                        ratios.append({"what": f"{setting.name} / tutorial, {mode}, {runner}", "ratio": a / b})
    # Same model? Runs that differ only in runner, attention kernel or batch layout (bfd vs bfd_flat)
    # must reach the same loss.
    def family(strategy):
        return "bfd" if strategy in ("bfd_rows", "bfd_flat") else strategy

    same = []
    for mode in modes:
        for precision in sorted({e["precision"] for e in table}):
            for strategy in sorted({family(s.strategy) for s in settings}):
                losses = {f"{e['attn']}/{e['packing']}/{e['runner']}": e["loss"] for e in table
                          if e["mode"] == mode and e["precision"] == precision and family(e["packing"]) == strategy}
                if len(losses) > 1:
                    same.append({"mode": mode, "precision": precision, "packing": strategy, "losses": losses,
                                 "spread": max(losses.values()) - min(losses.values())})
    return table, ratios, same


def main(argv=None):
    opts = parse_args(argv)
    if opts.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    common.setup_env()

    import datasets
    import torch
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import fine_tune as ft  # finetuning_dir/fine_tune.py

    ft.logger.setLevel("WARNING")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    cuda = torch.cuda.is_available()
    if opts.device == "cuda" and not cuda:
        raise SystemExit("bench_finetune.py: --device cuda, but torch sees no GPU")
    opts.model = opts.model or ("phi35-mini" if cuda else "tiny")
    opts.max_length = opts.max_length or (2048 if cuda else 512)
    opts.warmup_steps = 5 if opts.warmup_steps is None and cuda else (3 if opts.warmup_steps is None else opts.warmup_steps)
    opts.steps = opts.steps or (30 if cuda else 12)
    opts.repeats = opts.repeats or (1 if cuda else 2)
    if opts.model_dir is None:
        if opts.model == "tiny":
            opts.model_dir = common.tiny_model()
        else:
            name = f"phi35-mini-random-{opts.layers or 32}l"
            opts.model_dir = common.build_random_phi35_mini(
                common.SCRATCH / name, device="cuda" if cuda else "cpu", layers=opts.layers)
    if opts.peak_tflops is None:
        if cuda:
            opts.peak_tflops = common.gpu_bf16_peak_tflops(torch.cuda.get_device_name(0))
            peak_source = "data sheet, dense bf16"
            if opts.peak_tflops is None:
                raise SystemExit(f"bench_finetune.py: unknown GPU {torch.cuda.get_device_name(0)}; pass --peak-tflops")
        else:
            dtype_name = "bfloat16" if ft.native_bf16() else "float32"
            opts.peak_tflops = common.measure_cpu_peak_tflops(dtype_name)
            peak_source = f"measured: best torch {dtype_name} 2048x2048 matmul rate on this CPU"
    else:
        peak_source = "--peak-tflops"

    settings = parse_settings(opts.settings, opts.precisions, ft.FineTuneArguments())
    modes = [m for m in opts.modes.split(",") if m]
    runners = [r for r in opts.runners.split(",") if r]
    common.print_header("Fine-tuning throughput", {
        "model": opts.model, "model_dir": str(opts.model_dir), "device": "cuda" if cuda else "cpu",
        "max_length": opts.max_length, "batch_size": opts.batch_size, "warmup_steps": opts.warmup_steps,
        "measured_steps": opts.steps, "repeats": opts.repeats, "rows": opts.rows,
        "gradient_checkpointing": not opts.no_gradient_checkpointing,
        "learning_rate": opts.learning_rate or ft.FineTuneArguments().learning_rate,
        "torch_threads": torch.get_num_threads(),
        "settings": [s.__dict__ for s in settings], "modes": modes, "runners": runners,
        "peak_tflops": round(opts.peak_tflops, 3), "peak_source": peak_source,
        "fine_tune_mlflow_store": "a fresh SQLite store per benchmark run",
        "fine_tune_defaults": {"attn_implementation": ft.FineTuneArguments().attn_implementation,
                               "packing_strategy": ft.FineTuneArguments().packing_strategy},
    })

    with tempfile.TemporaryDirectory(dir=common.SCRATCH) as tmp:
        work = Path(tmp)
        # A store of this run's own: fine_tune.py's metrics logging is timed, and nothing else writes here.
        import mlflow

        mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
        mlflow.search_experiments()  # create the store now, not inside the first run
        write_jsonl(common.synthetic_chats(opts.rows, seed=0), work / "train.jsonl")
        write_jsonl(common.synthetic_chats(16, seed=1), work / "test.jsonl")
        bench = Bench(opts, ft, work)
        # fine_tune.py's own data preparation, once: both runners train on the very same text.
        tokenizer = transformers.AutoTokenizer.from_pretrained(opts.model_dir)
        data = ft.load_and_preprocess_data(str(work / "train.jsonl"), str(work / "test.jsonl"), tokenizer)
        rows = []
        pairs = [(setting, mode) for setting in settings for mode in modes]
        for repeat in range(opts.repeats):
            # Each repeat starts one (setting, mode) later and flips the runners, so that a burst of
            # load from elsewhere does not always land on the same candidate.
            shift = repeat % len(pairs)
            for setting, mode in pairs[shift:] + pairs[:shift]:
                order = runners if repeat % 2 == 0 else runners[::-1]
                for runner in order:
                    row = bench.run(setting, mode, runner, data)
                    row["repeat"] = repeat
                    rows.append(row)
                    print(f"run {len(rows)}: {setting.name} ({setting.attn}, {setting.strategy}) {mode} {runner}: "
                          f"{row['tokens_per_s']:,.0f} tokens/s, step {row['step_s']:.3f} s, "
                          f"MFU {row['mfu_pct']:.2f}%, loss {row['loss']:.4f}, load {os.getloadavg()[0]:.2f}",
                          flush=True)

    table, ratios, same = summarise(rows, settings, modes, runners)
    print("\nMedian over repeats:")
    columns = ["setting", "attn", "packing", "precision", "weights", "mode", "runner", "tokens_per_s",
               "tokens_per_s_med", "step_s", "tokens_per_step", "peak_rss_mb", "tflops", "mfu_pct", "loss", "learned"]
    if cuda:
        columns.append("gpu_max_alloc_gb")
    common.print_table(table, columns)
    print("\ntokens_per_s: tokens / wall time of the measured steps; tokens_per_s_med: tokens per step / median "
          "step time (robust to other processes' bursts on a shared CPU; the ratios below use it)")
    print("\nRatios of tokens/s (tokens_per_s_med; fine_tune / bare: median of the per-repeat ratios of runs "
          "made back to back):")
    common.print_table(ratios, ["what", "ratio", "per_repeat"])
    if same:
        print("\nSame model? Mean training loss of runs that differ only in runner, attention kernel or batch layout:")
        common.print_table(same, ["mode", "precision", "packing", "losses", "spread"])
    print(f"loadavg after: {[round(x, 2) for x in os.getloadavg()]}")
    common.emit_json("finetune", {"runs": rows, "summary": table, "ratios": ratios, "same_model": same})
    return table, ratios, same


if __name__ == "__main__":
    main()
