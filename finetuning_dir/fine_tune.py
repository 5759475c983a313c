"""Supervised fine-tuning of Phi-3.5-mini-instruct on ultrachat conversations, with TRL.

The tutorial's fine_tune.py, ported to today's TRL / transformers / MLflow with the fewest
changes. It runs as the Azure ML command job that setup_ml.py submits (GPU, bf16), on this
machine for `setup_ml.py --local`, and in the tests with a tiny Phi-3 model on the CPU.

Contract: when it ends, --model_output_dir *is* an MLflow transformers model folder (MLmodel at
its root, task text-generation) that `mlflow.pyfunc.load_model(dir)` loads. It wraps a plain
question in the Phi-3 chat format the model was trained on and honours max_new_tokens,
temperature, do_sample and return_full_text as predict-time params. Losses and tokens/s go to
the active MLflow tracking store (Azure ML's in a job, a local one elsewhere). Trainer
checkpoints go to --checkpoint_dir, never into the model folder.

    python finetuning_dir/fine_tune.py --train-file data/train_data.jsonl \\
        --eval-file data/test_data.jsonl --model_output_dir outputs/model
"""

import argparse
import logging
import os
from contextlib import nullcontext
import sys
from dataclasses import asdict, dataclass, field
from importlib.metadata import version

import mlflow
import torch
from datasets import load_dataset
from mlflow.models import infer_signature
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, TrainerCallback
from trl import SFTConfig, SFTTrainer

from chat_data import ChatDataError, check_jsonl_file
from packed_rows import PerRowPackedCollator

logging.basicConfig(
    format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
    datefmt="%Y-%m-%d %H:%M:%S",
    handlers=[logging.StreamHandler(sys.stdout)],
    level=logging.WARNING,
)
logger = logging.getLogger("fine_tune")
logger.setLevel(logging.INFO)

# What the served model accepts as predict-time params, with the defaults the flow sends.
PREDICT_PARAMS = {"max_new_tokens": 128, "temperature": 0.7, "do_sample": True, "return_full_text": False}


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
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (PEFT), merged into the model before saving."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (with --lora)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (with --lora)."})
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "Attention kernel: sdpa, eager (the tutorial's) or flash_attention_2."}
    )
    packing: bool = field(default=True, metadata={"help": "Pack several conversations into one sequence (as the tutorial)."})
    packing_strategy: str = field(default="bfd", metadata={"help": "TRL packing strategy: bfd or wrapped."})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "Recompute activations to save memory."})
    num_proc: int | None = field(default=None, metadata={"help": "Processes for the chat-template map (default: none)."})
    logging_steps: int = field(default=20, metadata={"help": "Log losses every this many steps."})
    checkpoint_dir: str = field(
        default="outputs/checkpoints", metadata={"help": "Trainer checkpoints (every 500 steps); kept out of the model."}
    )
    seed: int = field(default=0, metadata={"help": "Random seed."})


def is_main_process() -> bool:
    # Under torchrun/accelerate every rank runs this script; only rank 0 logs and saves.
    return int(os.environ.get("RANK", "0")) == 0


def initialize_model_and_tokenizer(model_name, model_kwargs, max_length):
    """
    Initialize the model and tokenizer with the given pretrained model name and arguments.
    """
    model = AutoModelForCausalLM.from_pretrained(model_name, **model_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    tokenizer.model_max_length = max_length
    tokenizer.pad_token = tokenizer.unk_token
    tokenizer.pad_token_id = tokenizer.convert_tokens_to_ids(tokenizer.pad_token)
    tokenizer.padding_side = "right"
    return model, tokenizer


def apply_chat_template(example, tokenizer):
    """
    Apply a chat template to tokenize messages in the example.
    """
    messages = example["messages"]
    if messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": ""})
    example["text"] = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    return example


def load_and_preprocess_data(train_filepath, test_filepath, tokenizer, num_proc=None):
    """
    Load and preprocess the dataset.
    """
    train_dataset = load_dataset("json", data_files=train_filepath, split="train")
    test_dataset = load_dataset("json", data_files=test_filepath, split="train")
    column_names = list(train_dataset.features)

    train_dataset = train_dataset.map(
        apply_chat_template,
        fn_kwargs={"tokenizer": tokenizer},
        num_proc=num_proc,
        remove_columns=column_names,
        desc="Applying chat template to train dataset",
    )

    test_dataset = test_dataset.map(
        apply_chat_template,
        fn_kwargs={"tokenizer": tokenizer},
        num_proc=num_proc,
        remove_columns=list(test_dataset.features),
        desc="Applying chat template to test dataset",
    )

    return train_dataset, test_dataset


class LogMetricsToMlflow(TrainerCallback):
    """Send the trainer's logged numbers to the active MLflow run.

    transformers' own MLflowCallback also logs every TrainingArguments field as a param, which
    Azure ML rejected (the tutorial's INVALID_PARAMETER_VALUE); metrics are all we need.
    """

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            metrics = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}
            mlflow.log_metrics(metrics, step=state.global_step)


def training_config(args: FineTuneArguments) -> SFTConfig:
    on_gpu = torch.cuda.is_available()
    return SFTConfig(
        bf16=True,
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
        save_steps=500,
        seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_accumulation_steps=1,
        warmup_steps=args.warmup,
        report_to="none",
        include_num_input_tokens_seen="non_padding",  # adds train_tokens_per_second to the metrics
        max_length=args.max_length,
        dataset_text_field="text",
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
    """The model's own chat template around a single user turn, as an MLflow prompt template."""
    marker = "PROMPT_MARKER"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
    )
    return rendered.replace("{", "{{").replace("}", "}}").replace(marker, "{prompt}")


def serving_requirements() -> list[str]:
    """Pinned packages the deployed model needs, as installed here (MLflow's guess asks for torchvision)."""
    packages = ["mlflow", "transformers", "torch", "accelerate", "tokenizers", "safetensors"]
    return [f"{name}=={version(name).split('+')[0]}" for name in packages]


def save_mlflow_model(model, tokenizer, output_dir):
    """Write the fine-tuned model as an MLflow transformers model folder."""
    tokenizer.padding_side = "left"  # generation pads on the left
    signature = infer_signature(["Who founded Microsoft?"], ["Bill Gates and Paul Allen."], params=PREDICT_PARAMS)
    mlflow.transformers.save_model(
        transformers_model={"model": model, "tokenizer": tokenizer},
        path=output_dir,
        task="text-generation",
        signature=signature,
        prompt_template=chat_prompt_template(tokenizer),
        pip_requirements=serving_requirements(),
    )


def train_and_evaluate_model(args, train_dataset, test_dataset, model, tokenizer):
    """
    Train and evaluate the model.
    """
    trainer = SFTTrainer(
        model=model,
        args=training_config(args),
        train_dataset=train_dataset,
        eval_dataset=test_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(args),
        callbacks=[LogMetricsToMlflow()],
    )
    collator = batch_collator(args, tokenizer)
    if collator is not None:  # set afterwards: TRL refuses a custom collator with bfd's padding-free flag
        trainer.data_collator = collator

    if is_main_process():
        logger.info("Training on %d process(es), device %s", trainer.args.world_size, trainer.args.device)
    train_result = trainer.train()
    trainer.log_metrics("train", train_result.metrics)

    tokenizer.padding_side = "left"
    eval_metrics = trainer.evaluate()
    eval_metrics["eval_samples"] = len(test_dataset)
    trainer.log_metrics("eval", eval_metrics)

    if is_main_process():
        mlflow.log_metrics({k: v for k, v in {**train_result.metrics, **eval_metrics}.items() if isinstance(v, (int, float))})
        model = trainer.model.merge_and_unload() if args.lora else trainer.model
        save_mlflow_model(model, tokenizer, args.model_output_dir)
        mlflow.set_tag("model_output_dir", os.path.abspath(args.model_output_dir))
        logger.info("Saved the fine-tuned MLflow model to %s", args.model_output_dir)


def check_inputs(args: FineTuneArguments):
    """Fail before loading anything when an input or the output folder is wrong."""
    try:
        for path in (args.train_file, args.eval_file):
            rows = check_jsonl_file(path)
            logger.info("%s: %d conversations", path, rows)
    except ChatDataError as e:
        sys.exit(f"fine_tune.py: {e}")
    if os.path.isdir(args.model_output_dir) and os.listdir(args.model_output_dir):
        sys.exit(
            f"fine_tune.py: --model_output_dir {args.model_output_dir} is not empty; "
            "pass a new folder (nothing in it was touched)"
        )


def main(args: FineTuneArguments):
    """
    Main function to fine-tune the model.
    """
    check_inputs(args)
    model_kwargs = {
        "use_cache": False,
        "dtype": torch.bfloat16,
        "device_map": None,
        "attn_implementation": args.attn_implementation,
    }

    with mlflow.start_run() if is_main_process() else nullcontext():
        if is_main_process():
            mlflow.log_params(asdict(args))
        try:
            model, tokenizer = initialize_model_and_tokenizer(args.model_name, model_kwargs, args.max_length)
        except OSError as e:  # transformers' word for an unreachable Hub or a folder without a model
            sys.exit(
                f"fine_tune.py: could not load model '{args.model_name}' ({str(e).strip().splitlines()[0]}); "
                "check your connection, or pass --model-name with a local model folder"
            )
        train_dataset, test_dataset = load_and_preprocess_data(args.train_file, args.eval_file, tokenizer, args.num_proc)
        train_and_evaluate_model(args, train_dataset, test_dataset, model, tokenizer)


if __name__ == "__main__":
    parser = HfArgumentParser(FineTuneArguments, description=__doc__, formatter_class=HelpFormatter)
    (arguments,) = parser.parse_args_into_dataclasses()
    main(arguments)
