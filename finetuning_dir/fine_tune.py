"""Supervised fine-tuning of Phi-3.5-mini-instruct on ultrachat conversations, with TRL.

The tutorial's fine_tune.py, ported to today's TRL / transformers / MLflow with the fewest
changes. It runs as the Azure ML command job that setup_ml.py submits (GPU, bf16), on this
machine for `setup_ml.py --local`, and in the tests with a tiny Phi-3 model on the CPU.

Contract: when it ends, --model_output_dir *is* an MLflow transformers model folder (MLmodel at
its root, task text-generation) that `mlflow.pyfunc.load_model(dir)` loads. It wraps a plain
question in the chat format the model was trained on (its own template) and honours max_new_tokens,
temperature, do_sample and return_full_text as predict-time params. Losses and tokens/s go to
the active MLflow tracking store (Azure ML's in a job, a local one elsewhere). Trainer
checkpoints go to --checkpoint_dir, never into the model folder.

Every run says how much it learned: the base model is evaluated on the eval file before training
and the fine-tuned one after (evaluation.py), as it is saved (LoRA merged, weights rounded to
the saved dtype), logged to MLflow as base_eval_loss / eval_loss, and the run ends with a line
such as `test loss 1.421 → 1.183 (perplexity 4.14 → 3.26)`. `evaluate_model.py` on the saved
folder gives the same figure.

In an Azure ML job the output folders are mount points: models are written into them as
model_folder.py says, never by replacing the folder. On a GPU cluster the job passes
--require_gpu, so a torch that cannot see the GPU stops the job at once instead of training on
the CPU for days.

Precision: fp32 weights, bf16 matmuls where bf16 is native; saved in the base model's dtype
(--precision; why: docs/fixes.md).

    python finetuning_dir/fine_tune.py --train-file data/train_data.jsonl \\
        --eval-file data/test_data.jsonl --model_output_dir outputs/model
"""

import argparse
import logging
import os
import sys
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import version

import mlflow
import torch
from datasets import load_dataset
from mlflow.models import infer_signature
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, TrainerCallback
from trl import SFTConfig, SFTTrainer

import evaluation
import model_folder
from chat_data import PREDICT_PARAMS, ChatDataError, as_trained, check_jsonl_file
from chat_templates import training_template
from packed_rows import PerRowPackedCollator

logging.basicConfig(
    format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
    datefmt="%Y-%m-%d %H:%M:%S",
    handlers=[logging.StreamHandler(sys.stdout)],
    level=logging.WARNING,
)
logger = logging.getLogger("fine_tune")
logger.setLevel(logging.INFO)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the docstring's line breaks and show each flag's default."""


@dataclass
class FineTuneArguments:
    train_file: str = field(default="data/train_data.jsonl", metadata={"help": "Path to the training data (JSONL)."})
    eval_file: str = field(default="data/test_data.jsonl", metadata={"help": "Path to the evaluation data (JSONL)."})
    model_output_dir: str = field(
        default="outputs/model",
        metadata={"help": "Folder to save the fine-tuned MLflow model to; must be empty or absent."},
    )
    quantized_output_dir: str = field(
        default="",
        metadata={"help": "Also write the model's int4 ONNX serving form here (quantize_model.py), an MLflow model "
                          "with the same contract, for CPU endpoints; must be empty or absent. Empty: don't."},
    )
    model_name: str = field(
        default="microsoft/Phi-3.5-mini-instruct",
        metadata={"help": "Model to fine-tune: a Hugging Face Hub id or a local folder."},
    )
    epochs: float = field(default=3, metadata={"help": "Number of training epochs."})
    learning_rate: float = field(default=5.0e-6, metadata={"help": "Peak learning rate (cosine schedule)."})
    batch_size: int = field(default=4, metadata={"help": "Per-device train and eval batch size."})
    max_length: int = field(default=2048, metadata={"help": "Longest sequence, in tokens, the trainer builds."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimizer steps (-1: run all epochs)."})
    warmup: float = field(default=0.2, metadata={"help": "Warm-up: a fraction of the steps if < 1, else a step count."})
    assistant_only_loss: bool = field(
        default=False, metadata={"help": "Train on the assistant's words only (TRL's assistant_only_loss), not on the "
                                         "whole chat text as the tutorial does; the test loss is then theirs too."}
    )
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (PEFT), merged into the model before saving."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (with --lora)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (with --lora)."})
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "Attention kernel: sdpa, eager (the tutorial's) or flash_attention_2."}
    )
    packing: bool = field(default=True, metadata={"help": "Pack several conversations into one sequence (as the tutorial)."})
    packing_strategy: str = field(default="bfd", metadata={"help": "TRL packing strategy: bfd or wrapped."})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "Recompute activations to save memory."})
    precision: str = field(
        default="auto",
        metadata={
            "help": "bf16-mixed: fp32 weights, bf16 matmuls (autocast); fp32: no bf16 at all; bf16: the tutorial's bf16 "
                    "weights (small updates round away); auto: bf16-mixed where the GPU or CPU computes bf16 natively "
                    "(A100, H100, CPUs with AVX512-BF16/AMX), else fp32. With --lora the frozen base stays bf16 under "
                    "bf16-mixed; the adapters are fp32.",
            "choices": ["auto", "bf16-mixed", "fp32", "bf16"],
        },
    )
    num_proc: int | None = field(default=None, metadata={"help": "Processes for the chat-template map (default: none)."})
    logging_steps: int = field(default=20, metadata={"help": "Log losses every this many steps."})
    eval_questions: int = field(
        default=evaluation.DEFAULT_QUESTIONS,
        metadata={"help": "Questions of the eval file answered by the base and the fine-tuned model (0: none)."},
    )
    eval_max_new_tokens: int = field(
        default=evaluation.DEFAULT_MAX_NEW_TOKENS, metadata={"help": "Longest of those answers, in tokens."}
    )
    save_steps: int = field(
        default=500, metadata={"help": "Save a trainer checkpoint every this many steps, keeping the newest (0: none)."}
    )
    checkpoint_dir: str = field(
        default="checkpoints",
        metadata={"help": "Folder of trainer checkpoints; kept out of the model folder and of ./outputs, which an "
                          "Azure ML job uploads."},
    )
    seed: int = field(default=0, metadata={"help": "Random seed."})
    require_gpu: bool = field(
        default=False,
        metadata={"help": "Stop at once, before loading anything, unless torch sees a CUDA GPU (setup_ml.py passes "
                          "it on GPU clusters: a torch that cannot use the node's driver would train on the CPU)."},
    )


class ModelNotLoaded(OSError):
    """The model could not be loaded (an unreachable Hub, a folder without a model); says which and why."""


def is_main_process() -> bool:
    # Under torchrun/accelerate every rank runs this script; only rank 0 logs and saves.
    return int(os.environ.get("RANK", "0")) == 0


def native_bf16() -> bool:
    """Whether this machine's training device computes bf16 in hardware (emulated bf16 is many times slower)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported(including_emulation=False)
    try:  # oneDNN's own check: AVX512-BF16 or AMX
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_gpu() -> None:
    """Stop with one line unless torch can use a CUDA GPU; say which CUDA torch was built for and what torch said."""
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        if torch.cuda.is_available():
            return check_gpu_computes()
        count = torch.cuda.device_count()
    why = "; ".join(" ".join(str(w.message).split())[:300] for w in said)
    sys.exit(
        f"fine_tune.py: --require_gpu, but torch sees no usable GPU: torch {torch.__version__}, "
        f"torch.version.cuda = {torch.version.cuda}, torch.cuda.device_count() = {count}"
        + (f" (torch says: {why})" if why else "")
        + "; run on a GPU cluster with a driver for that CUDA version (nvidia-smi in the job's log shows the "
        "driver's), pin a torch built for an older CUDA in conda.yml, or drop --require_gpu to train on the CPU"
    )


def check_gpu_computes() -> None:
    """Stop with one line unless a bf16 matmul runs on the GPU: a CUDA library that does not match torch's
    (cuBLAS from the image before the wheel's) fails only here, at the first matmul."""
    try:
        x = torch.ones(16, 16, device="cuda", dtype=torch.bfloat16)
        (x @ x).sum().item()
    except (RuntimeError, AssertionError) as e:
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        sys.exit(
            f"fine_tune.py: --require_gpu, but a matmul on the GPU failed: {reason} (torch {torch.__version__}, "
            f"torch.version.cuda = {torch.version.cuda}); check that the image's CUDA libraries are not older than "
            "torch's, or drop --require_gpu to train on the CPU"
        )


PRECISIONS = ("bf16-mixed", "fp32", "bf16")  # what --precision auto resolves to, and the others


def resolve_precision(requested: str) -> str:
    if requested != "auto":
        return requested
    return "bf16-mixed" if native_bf16() else "fp32"


def resolved(args: "FineTuneArguments") -> "FineTuneArguments":
    """`args` with --precision auto decided for this machine. main() resolves once; the functions below
    take resolved args (load_model, training_config, ...) and refuse "auto"."""
    return replace(args, precision=resolve_precision(args.precision))


def checked_precision(precision: str) -> str:
    """`precision`, unless it is not one of PRECISIONS ("auto" must be resolved first, by resolved())."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not resolved: pass fine_tune.resolved(args)")
    return precision


def weights_dtype(precision: str, trained_weights: bool) -> torch.dtype:
    """The dtype to train in. `trained_weights`: the optimizer updates the model's own weights (not LoRA's)."""
    if checked_precision(precision) == "bf16":
        return torch.bfloat16
    if precision == "bf16-mixed" and not trained_weights:
        return torch.bfloat16  # LoRA's frozen base: autocast computes in bf16 anyway
    return torch.float32  # AdamW's steps of ~lr must not round away: keep an fp32 copy of what it updates


def evaluation_dtype(precision: str) -> torch.dtype:
    """The dtype a model is evaluated in: the training dtype of a full fine-tune, so that a saved model's
    figure is the same whether it is taken at the end of a run or later by evaluate_model.py."""
    return torch.bfloat16 if checked_precision(precision) == "bf16" else torch.float32


# Where an MLflow model folder keeps the weights and the tokenizer, in the order they are looked for:
# MLflow's transformers flavour (what fine_tune.py saves: model/, components/tokenizer/), then Azure ML's
# hftransformersv2 flavour (the `azureml` registry's Phi-3.5-mini-instruct: data/model/, data/tokenizer/),
# as azureml-assets' model_selector.py FLAVOR_MAP and model_prediction.py read them.
MLFLOW_WEIGHTS = ("model", "data/model")
MLFLOW_TOKENIZER = ("components/tokenizer", "data/tokenizer")


def model_folders(model_name: str) -> tuple[str, str]:
    """(weights, tokenizer) of a model: an MLflow model folder keeps them apart; a Hub id or HF folder does not."""
    if not os.path.isfile(os.path.join(model_name, "MLmodel")):
        return model_name, model_name
    inside = [os.path.join(model_name, folder) for folder in MLFLOW_WEIGHTS]
    weights = next((f for f in inside if os.path.isfile(os.path.join(f, "config.json"))), inside[0])
    tokenizers = [os.path.join(model_name, folder) for folder in MLFLOW_TOKENIZER] + [weights]
    tokenizer = next((f for f in tokenizers if os.path.isfile(os.path.join(f, "tokenizer_config.json"))), tokenizers[0])
    return weights, tokenizer


def initialize_model_and_tokenizer(model_name, model_kwargs, max_length):
    """
    Initialize the model and tokenizer with the given pretrained model name and arguments.
    """
    weights, tokenizer_folder = model_folders(model_name)
    model = AutoModelForCausalLM.from_pretrained(weights, **model_kwargs)
    tokenizer = configure_tokenizer(AutoTokenizer.from_pretrained(tokenizer_folder), max_length)
    return model, tokenizer


def configure_tokenizer(tokenizer, max_length):
    """The tutorial's tokenizer settings: its length, padding with the unknown token, on the right."""
    tokenizer.model_max_length = max_length
    tokenizer.pad_token = tokenizer.unk_token
    tokenizer.pad_token_id = tokenizer.convert_tokens_to_ids(tokenizer.pad_token)
    tokenizer.padding_side = "right"
    return tokenizer


def apply_chat_template(example, tokenizer):
    """
    Apply a chat template to tokenize messages in the example.
    """
    example["text"] = tokenizer.apply_chat_template(as_trained(example["messages"]), tokenize=False,
                                                    add_generation_prompt=False)
    return example


def keep_messages(example):
    """The conversation as messages, for TRL to render and mask itself (--assistant-only-loss)."""
    return {"messages": as_trained(example["messages"])}


def load_model(args, for_training: bool = True):
    """The model and tokenizer of args.model_name, in the dtype args.precision (resolved) asks for; one line if
    unreachable."""
    if for_training:
        dtype = weights_dtype(args.precision, trained_weights=not args.lora)
    else:
        dtype = evaluation_dtype(args.precision)
    model_kwargs = {
        "use_cache": False,
        "dtype": dtype,
        "device_map": None,
        "attn_implementation": args.attn_implementation,
    }
    try:
        return initialize_model_and_tokenizer(args.model_name, model_kwargs, args.max_length)
    except OSError as e:  # transformers' word for an unreachable Hub or a folder without a model
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelNotLoaded(f"could not load model '{args.model_name}' ({reason})") from e


def saved_dtype(model_name) -> torch.dtype | None:
    """The dtype the base model is stored in (bf16 for Phi-3.5-mini): the fine-tuned one is saved the same way."""
    return AutoConfig.from_pretrained(model_folders(model_name)[0]).dtype


def prepare_dataset(filepath, tokenizer, num_proc=None, name="dataset", conversational=False):
    """One chat JSONL file, each conversation rendered with the model's chat template into `text` (conversational:
    kept as `messages`)."""
    dataset = load_dataset("json", data_files=filepath, split="train")
    return dataset.map(
        keep_messages if conversational else apply_chat_template,
        fn_kwargs={} if conversational else {"tokenizer": tokenizer},
        num_proc=num_proc,
        remove_columns=list(dataset.features),
        desc=f"Applying chat template to {name}",
    )


def load_and_preprocess_data(train_filepath, test_filepath, tokenizer, num_proc=None, conversational=False):
    """
    Load and preprocess the dataset.
    """
    train_dataset = prepare_dataset(train_filepath, tokenizer, num_proc, "train dataset", conversational)
    test_dataset = prepare_dataset(test_filepath, tokenizer, num_proc, "test dataset", conversational)
    return train_dataset, test_dataset


class LogMetricsToMlflow(TrainerCallback):
    """Send the trainer's logged numbers to the active MLflow run.

    transformers' own MLflowCallback also logs every TrainingArguments field as a param, which
    Azure ML rejected (the tutorial's INVALID_PARAMETER_VALUE); metrics are all we need.
    """

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Only inside fine_tune.py's run: a standalone evaluation must not start one.
        if state.is_world_process_zero and logs and mlflow.active_run() is not None:
            metrics = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}
            mlflow.log_metrics(metrics, step=state.global_step)


def training_config(args: FineTuneArguments) -> SFTConfig:
    """The trainer's settings for resolved `args`."""
    on_gpu = torch.cuda.is_available()
    return SFTConfig(
        bf16=checked_precision(args.precision) in ("bf16-mixed", "bf16"),
        use_cpu=not on_gpu,
        do_eval=True,
        output_dir=args.checkpoint_dir,
        eval_strategy="epoch",
        learning_rate=args.learning_rate,
        logging_steps=args.logging_steps,
        lr_scheduler_type="cosine",
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_eval_batch_size=args.batch_size,
        per_device_train_batch_size=args.batch_size,
        remove_unused_columns=True,
        save_strategy="steps" if args.save_steps > 0 else "no",
        save_steps=args.save_steps or 500,
        save_total_limit=1,  # a full fine-tune's checkpoint is weights + AdamW moments: ~46 GB for Phi-3.5-mini
        seed=args.seed,
        activation_checkpointing=args.gradient_checkpointing,  # the tutorial's gradient_checkpointing, renamed
        gradient_accumulation_steps=1,
        warmup_steps=args.warmup,
        report_to="none",
        include_num_input_tokens_seen="non_padding",  # adds train_tokens_per_second to the metrics
        max_length=args.max_length,
        dataset_text_field="text",
        assistant_only_loss=args.assistant_only_loss,
        packing=args.packing,
        packing_strategy=args.packing_strategy,
    )


def lora_config(args: FineTuneArguments):
    if not args.lora:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
    )


def batch_collator(args: FineTuneArguments, tokenizer):
    """Packed rows kept apart for sdpa/eager (see packed_rows.py); None leaves TRL's own collator."""
    if args.packing and args.packing_strategy == "bfd" and args.attn_implementation != "flash_attention_2":
        return PerRowPackedCollator(tokenizer.pad_token_id)
    return None


def chat_prompt_template(tokenizer) -> str:
    """The model's own chat template around a single user turn, rendered as in training, as an MLflow prompt template."""
    marker = "PROMPT_MARKER"
    rendered = tokenizer.apply_chat_template(
        as_trained([{"role": "user", "content": marker}]), tokenize=False, add_generation_prompt=True
    )
    return rendered.replace("{", "{{").replace("}", "}}").replace(marker, "{prompt}")


# Azure's generated scoring script for MLflow models imports azureml.ai.monitoring (docs/azure-runtime.md).
AZURE_SCORING_REQUIREMENTS = ["azureml-ai-monitoring==1.0.0"]


def chat_metadata(tokenizer) -> dict:
    """The model's own chat template and the special tokens it names, for the endpoint to render a chat with
    (serving/scoring/score.py); the int4 form carries them on."""
    return {"chat_template": tokenizer.chat_template, "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token}


def serving_requirements() -> list[str]:
    """Pinned packages the deployed model needs, as installed here (MLflow's guess asks for torchvision), and
    those Azure's own scoring script imports."""
    packages = ["mlflow", "transformers", "torch", "accelerate", "tokenizers", "safetensors"]
    return [f"{name}=={version(name).split('+')[0]}" for name in packages] + AZURE_SCORING_REQUIREMENTS


def save_mlflow_model(model, tokenizer, output_dir):
    """Write the fine-tuned model as an MLflow transformers model folder."""
    tokenizer.padding_side = "left"  # generation pads on the left
    signature = infer_signature(["Who founded Microsoft?"], ["Bill Gates and Paul Allen."], params=PREDICT_PARAMS)
    with model_folder.staged(output_dir, "--model_output_dir") as path:
        mlflow.transformers.save_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            path=str(path),
            task="text-generation",
            signature=signature,
            prompt_template=chat_prompt_template(tokenizer),
            metadata=chat_metadata(tokenizer),
            pip_requirements=serving_requirements(),
        )


def build_trainer(args, model, tokenizer, train_dataset, eval_dataset):
    """The SFTTrainer of this script: fine-tuning, the evaluation and the benchmark all use this one."""
    own_template = tokenizer.chat_template
    if args.assistant_only_loss and training_template(own_template):  # TRL marks Phi-3's and Phi-3.5's itself
        tokenizer.chat_template = training_template(own_template)
    trainer = SFTTrainer(
        model=model,
        args=training_config(args),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(args),
        callbacks=[LogMetricsToMlflow()],
    )
    tokenizer.chat_template = own_template  # the data is rendered: the model keeps its own template
    collator = batch_collator(args, tokenizer)
    if collator is not None:  # set afterwards: TRL refuses a custom collator with bfd's padding-free flag
        trainer.data_collator = collator
    # With several GPUs, DDP would otherwise copy the fp32 gradients into buckets of their own:
    # 13.5 GiB more per GPU for Phi-3.5-mini, past what an 80 GB A100 holds with margin.
    trainer.accelerator.ddp_handler.gradient_as_bucket_view = True
    return trainer


def train_and_evaluate_model(args, trainer, questions, saved_as, conversations=()):
    """
    Evaluate the base model, train, and evaluate the fine-tuned model as it is saved; return both evaluations.
    """
    base = evaluation.evaluate(trainer, questions, args.eval_max_new_tokens, "base_eval", conversations)
    if is_main_process():
        logger.info(
            "Training on %d process(es), device %s, precision %s (weights %s)", trainer.args.world_size,
            trainer.args.device, args.precision, next(trainer.model.parameters()).dtype,
        )
    train_result = trainer.train()
    trainer.log_metrics("train", train_result.metrics)
    as_saved(args, trainer, saved_as)
    tuned = evaluation.evaluate(trainer, questions, args.eval_max_new_tokens, "eval", conversations)
    tuned_metrics = {"eval_loss": tuned.loss, "eval_samples": len(trainer.eval_dataset)}
    trainer.log_metrics("eval", tuned_metrics)
    if is_main_process():
        mlflow.log_metrics({k: v for k, v in train_result.metrics.items() if isinstance(v, (int, float))})
    return base, tuned


def as_saved(args, trainer, saved_as: torch.dtype | None) -> None:
    """Make the trainer's model the one that is saved: LoRA merged, weights rounded to `saved_as` (the
    base model's dtype), held in the evaluation dtype. The closing figures are then the shipped model's."""
    model = trainer.model.merge_and_unload() if args.lora else trainer.model
    if saved_as is not None:
        model = model.to(saved_as)
    model = model.to(evaluation_dtype(args.precision))
    trainer.model = trainer.model_wrapped = model
    if is_main_process():
        logger.info("Evaluating the fine-tuned model as it is saved (%s weights)", saved_as or "unchanged")


def save_fine_tuned_model(args, trainer, tokenizer, dtype):
    """Write the trainer's model (see as_saved) in the base model's dtype as the MLflow model folder."""
    model = trainer.model.to(dtype) if dtype is not None else trainer.model
    save_mlflow_model(model, tokenizer, args.model_output_dir)
    mlflow.set_tag("model_output_dir", os.path.abspath(args.model_output_dir))
    logger.info("Saved the fine-tuned MLflow model to %s (%s)", args.model_output_dir, next(model.parameters()).dtype)


def check_assistant_only_loss(args: FineTuneArguments, tokenizer) -> None:
    """Stop with one line when --assistant-only-loss meets a chat template that neither TRL nor chat_templates.py
    marks with {% generation %} (TRL would stop with a traceback)."""
    if not args.assistant_only_loss or training_template(tokenizer.chat_template):
        return
    from trl.chat_template_utils import get_training_chat_template

    try:
        get_training_chat_template(tokenizer)
    except ValueError:
        sys.exit(f"fine_tune.py: --assistant-only-loss: the chat template of {args.model_name} has no {{% generation %}} "
                 "markers, and neither TRL nor finetuning_dir/chat_templates.py has a marked twin of it; add one "
                 "there, or drop --assistant-only-loss")


def check_eval_file(path):
    """ChatDataError unless `path` is a chat JSONL file."""
    logger.info("%s: %d conversations", path, check_jsonl_file(path))


def check_inputs(args: FineTuneArguments):
    """Fail before loading anything when an input or the output folder is wrong."""
    for path in (args.train_file, args.eval_file):
        try:
            check_eval_file(path)
        except ChatDataError as e:
            sys.exit(f"fine_tune.py: {e}")
    for flag, folder in (("--model_output_dir", args.model_output_dir), ("--quantized_output_dir", args.quantized_output_dir)):
        try:
            if folder:
                model_folder.check_empty(folder, flag)
        except model_folder.OutputFolderError as e:
            sys.exit(f"fine_tune.py: {e}")


def main(args: FineTuneArguments):
    """
    Main function to fine-tune the model.
    """
    if args.require_gpu:
        check_gpu()
    check_inputs(args)
    requested = args.precision
    args = resolved(args)  # once: every function below uses this precision
    with mlflow.start_run() if is_main_process() else nullcontext():
        if is_main_process():
            mlflow.log_params({**asdict(args), "precision": requested, "resolved_precision": args.precision})
        try:
            model, tokenizer = load_model(args)
        except ModelNotLoaded as e:
            sys.exit(f"fine_tune.py: {e}; check your connection, or pass --model-name with a local model folder")
        check_assistant_only_loss(args, tokenizer)
        train_dataset, test_dataset = load_and_preprocess_data(args.train_file, args.eval_file, tokenizer, args.num_proc,
                                                               conversational=args.assistant_only_loss)
        questions = evaluation.read_questions(args.eval_file, args.eval_questions)
        trainer = build_trainer(args, model, tokenizer, train_dataset, test_dataset)
        saved_as = saved_dtype(args.model_name)
        conversations = evaluation.conversation_ids(test_dataset["text"], tokenizer, args.max_length)
        base, tuned = train_and_evaluate_model(args, trainer, questions, saved_as, conversations)
        if is_main_process():
            save_fine_tuned_model(args, trainer, tokenizer, saved_as)
            if args.quantized_output_dir:
                import quantize_model

                quantize_model.quantize(args.model_output_dir, args.quantized_output_dir)
                mlflow.set_tag("quantized_output_dir", os.path.abspath(args.quantized_output_dir))
            # Last: the run ends with how much it learned.
            evaluation.report(questions, base, tuned, step=trainer.state.global_step)


def parse_args(argv=None) -> FineTuneArguments:
    """The command line (sys.argv, or argv) as FineTuneArguments."""
    parser = HfArgumentParser(FineTuneArguments, description=__doc__, formatter_class=HelpFormatter)
    (arguments,) = parser.parse_args_into_dataclasses(args=argv)
    return arguments


if __name__ == "__main__":
    main(parse_args())
