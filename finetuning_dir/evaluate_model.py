"""How much a fine-tune learned: test loss and a few answers, from the base model and the tuned one.

fine_tune.py runs this evaluation on the base model before training and on the fine-tuned model
after it, in every run: the test loss (the trainer's own eval_loss over the eval file) with its
perplexity, and greedy answers to the first few questions of the eval file, side by side. It logs
them to MLflow (base_eval_loss / eval_loss, base_eval_perplexity / eval_perplexity, and the table
eval_answers.json) and ends with one line, e.g.

    test loss 1.421 → 1.183 (perplexity 4.14 → 3.26)

Run on its own, it evaluates any model folder fine_tune.py wrote, its int4 form
(quantize_model.py), a base model (a Hub id or a local folder), or two of them against each
other, on any ultrachat-shaped chat JSONL:

    python finetuning_dir/evaluate_model.py --model outputs/models/<run>/model --eval-file data/test_data.jsonl
    python finetuning_dir/evaluate_model.py --model outputs/models/<run>/model \\
        --baseline microsoft/Phi-3.5-mini-instruct --eval-file data/test_data.jsonl

The loss is computed exactly as fine_tune.py computes eval_loss (the same trainer, built by
fine_tune.build_trainer): pass the --max-length and --batch-size the model was trained with to
reproduce a run's figure. An int4 model has no torch weights to run the trainer with; its loss is
taken over the very batches that trainer builds, averaged as the trainer averages (batch_loss).
"""

import argparse
import json
import logging
import math
import sys
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger("fine_tune")

DEFAULT_QUESTIONS = 3
DEFAULT_MAX_NEW_TOKENS = 48


@dataclass
class Evaluation:
    """One model's figures on the eval file. `answers` is empty on every process but the first."""

    loss: float
    answers: list[str] = field(default_factory=list)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf


@dataclass
class Question:
    text: str
    reference: str


def read_questions(eval_file: str, count: int) -> list[Question]:
    """The first user turn and its reference answer of the first `count` conversations that open with one."""
    questions = []
    with open(eval_file, encoding="utf-8") as f:
        for line in f:
            if len(questions) == count:
                break
            if not line.strip():
                continue
            turns = [m for m in json.loads(line)["messages"] if m["role"] != "system"]
            if turns and turns[0]["role"] == "user" and turns[0]["content"].strip():
                reference = turns[1]["content"] if len(turns) > 1 and turns[1]["role"] == "assistant" else ""
                questions.append(Question(turns[0]["content"].strip(), reference.strip()))
    return questions


def answer_questions(model, tokenizer, questions: list[Question], max_new_tokens: int, autocast=None) -> list[str]:
    """Greedy answers of `model` to `questions`, each asked alone in the model's chat format."""
    if not questions:
        return []
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q.text}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation pads on the left
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    finally:
        tokenizer.padding_side = padding_side
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast or nullcontext():
            output = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
            )
    finally:
        model.train(was_training)
    new_tokens = output[:, batch["input_ids"].shape[1]:]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def evaluate(trainer, questions: list[Question], max_new_tokens: int, prefix: str = "eval") -> Evaluation:
    """The model in `trainer` on its eval dataset: the trainer's loss, and answers on the first process.

    Every process must call this (the loss is computed across all of them); metrics are logged
    under `prefix` (base_eval_loss for prefix "base_eval").
    """
    metrics = trainer.evaluate(metric_key_prefix=prefix)
    answers = []
    if trainer.is_world_process_zero():
        answers = answer_questions(
            trainer.model, trainer.processing_class, questions, max_new_tokens, trainer.accelerator.autocast()
        )
    return Evaluation(loss=float(metrics[f"{prefix}_loss"]), answers=answers)


def batch_loss(logits_of, batch) -> float:
    """A packed batch's loss as the model's own forward computes it, from a function giving the logits
    of one conversation ([tokens, vocabulary]).

    Rows hold whole conversations whose positions restart at 0; attention never crosses them, so
    each conversation is run on its own. Labels are -100 at each conversation's first token and
    on padding: the mean next-token cross-entropy is over the other targets of the whole batch.
    """
    total, targets = 0.0, 0
    for ids, positions, labels in zip(batch["input_ids"], batch["position_ids"], batch["labels"]):
        starts = (positions == 0).nonzero().flatten().tolist() + [len(ids)]
        for start, end in zip(starts, starts[1:]):
            wanted = labels[start + 1:end]
            if end - start < 2 or (wanted == -100).all():
                continue  # padding, or a conversation with nothing to predict
            logits = torch.as_tensor(logits_of(ids[start:end].tolist()), dtype=torch.float32)[:-1]
            total += torch.nn.functional.cross_entropy(logits, wanted, ignore_index=-100, reduction="sum").item()
            targets += int((wanted != -100).sum())
    return total / max(targets, 1)


def eval_loss_of(logits_of, trainer) -> float:
    """trainer.evaluate()'s eval_loss, with another model's logits: batch losses averaged by batch size."""
    weighted, rows = 0.0, 0
    for batch in trainer.get_eval_dataloader():
        size = len(batch["input_ids"])
        weighted += batch_loss(logits_of, batch) * size
        rows += size
    return weighted / rows


def summary_line(base: Evaluation, tuned: Evaluation) -> str:
    """The one line a person reads: how far the test loss fell."""
    return (
        f"test loss {base.loss:.3f} → {tuned.loss:.3f} "
        f"(perplexity {base.perplexity:.4g} → {tuned.perplexity:.4g})"
    )


def answers_table(questions: list[Question], base: Evaluation, tuned: Evaluation,
                  names=("base model", "fine-tuned")) -> dict[str, list[str]]:
    """The answers side by side, as columns (an MLflow table)."""
    return {
        "question": [q.text for q in questions],
        "reference": [q.reference for q in questions],
        names[0]: list(base.answers),
        names[1]: list(tuned.answers),
    }


def answers_text(table: dict[str, list[str]]) -> str:
    """The answers table as text for a log: one block per question."""
    names = [name for name in table if name != "question"]
    width = max(len(name) for name in names)
    blocks = []
    for i, question in enumerate(table["question"]):
        lines = [f"[{i + 1}] Q: {shorten(question)}"]
        lines += [f"    {name + ':':<{width + 1}} {shorten(table[name][i])}" for name in names]
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


def shorten(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def report(questions: list[Question], base: Evaluation, tuned: Evaluation, step: int | None = None) -> str:
    """Log both evaluations to the log and to the active MLflow run (at `step`); return the summary line."""
    line = summary_line(base, tuned)
    table = answers_table(questions, base, tuned)
    if questions:
        logger.info("Answers to %d questions of the eval file (greedy, before and after fine-tuning):\n%s",
                    len(questions), answers_text(table))
    logger.info(line)
    import mlflow

    mlflow.log_metrics({
        "base_eval_loss": base.loss, "eval_loss": tuned.loss,
        "base_eval_perplexity": base.perplexity, "eval_perplexity": tuned.perplexity,
    }, step=step)
    if questions:
        mlflow.log_table(data=table, artifact_file="eval_answers.json")
    mlflow.set_tag("evaluation", line)
    return line


# ---------------------------------------------------------------- the command


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="model to evaluate: a folder fine_tune.py wrote (--model_output_dir), a Hugging Face "
                             "model folder, or a Hub id")
    parser.add_argument("--baseline",
                        help="a second model (same kinds as --model) to compare against, e.g. the base model the "
                             "first was fine-tuned from; the summary line reads 'test loss BASELINE → MODEL'")
    parser.add_argument("--eval-file", default="data/test_data.jsonl",
                        help="ultrachat-shaped chat JSONL to evaluate on (default: %(default)s)")
    parser.add_argument("--questions", type=int, default=DEFAULT_QUESTIONS,
                        help="how many of the eval file's questions to answer (default: %(default)s; 0: none)")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                        help="longest answer, in tokens (default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=2048,
                        help="sequence length of the packed eval rows, as in training (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4, help="eval batch size, as in training (default: %(default)s)")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16-mixed", "fp32", "bf16"],
                        help="as fine_tune.py's --precision (default: auto: bf16 where the device computes it "
                             "natively, else fp32)")
    parser.add_argument("--limit", type=int,
                        help="evaluate only the first LIMIT conversations of the eval file (default: all)")
    return parser.parse_args(argv)


def int4_onnx_dir(name: str) -> Path | None:
    """The ONNX folder of an int4 model folder (quantize_model.py's), or None for any other model."""
    onnx = Path(name) / "artifacts" / "onnx"
    return onnx if (Path(name) / "MLmodel").is_file() and (onnx / "genai_config.json").is_file() else None


def int4_stand_in(ft, onnx_dir: Path, args):
    """The int4 model's tokenizer, and a one-layer torch model for SFTTrainer to hold: the trainer
    needs one to build the packed eval batches; nothing is run through it."""
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(onnx_dir)
    ft.configure_tokenizer(tokenizer, args.max_length)
    config = Phi3Config(vocab_size=len(tokenizer), hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                        num_attention_heads=1, num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return Phi3ForCausalLM(config), tokenizer


def evaluate_one(ft, name: str, options, questions) -> Evaluation:
    """Load `name`, build fine_tune.py's trainer around it, and evaluate it."""
    print(f"Evaluating {name} on {options.eval_file} ...", flush=True)
    onnx_dir = int4_onnx_dir(name)
    with tempfile.TemporaryDirectory(prefix="evaluate-model-") as scratch:  # the trainer wants a folder; nothing is saved
        args = ft.FineTuneArguments(
            eval_file=options.eval_file, model_name=name, max_length=options.max_length,
            batch_size=options.batch_size, precision=options.precision, save_steps=0, checkpoint_dir=scratch,
        )
        if onnx_dir is None:
            model, tokenizer = ft.load_model(args, for_training=False)
        else:
            model, tokenizer = int4_stand_in(ft, onnx_dir, args)
        eval_dataset = ft.prepare_dataset(options.eval_file, tokenizer)
        if options.limit:
            eval_dataset = eval_dataset.select(range(min(options.limit, len(eval_dataset))))
        # SFTTrainer insists on a train dataset; nothing is trained here.
        trainer = ft.build_trainer(args, model, tokenizer, eval_dataset, eval_dataset)
        if onnx_dir is None:
            return evaluate(trainer, questions, options.max_new_tokens)
        return evaluate_int4(name, trainer, questions, options.max_new_tokens)


def evaluate_int4(name: str, trainer, questions, max_new_tokens: int) -> Evaluation:
    """The int4 model's loss over the trainer's eval batches, and its greedy answers."""
    import mlflow

    chat = mlflow.pyfunc.load_model(name).unwrap_python_model()
    loss = eval_loss_of(chat.logits, trainer)
    answers = chat.predict(None, [q.text for q in questions], {"max_new_tokens": max_new_tokens, "do_sample": False})
    return Evaluation(loss=loss, answers=[a.strip() for a in answers])


def main(argv=None):
    options = parse_args(argv)
    import fine_tune as ft  # here, not at the top: fine_tune.py imports this module

    logging.basicConfig(format="%(message)s", level=logging.WARNING, stream=sys.stdout)
    logger.setLevel(logging.INFO)
    ft.check_eval_file(options.eval_file)
    questions = read_questions(options.eval_file, options.questions)
    model = evaluate_one(ft, options.model, options, questions)
    if options.baseline is None:
        if questions:
            table = {"question": [q.text for q in questions], "reference": [q.reference for q in questions],
                     "answer": model.answers}
            print(answers_text(table))
        print(f"test loss {model.loss:.3f} (perplexity {model.perplexity:.4g})")
        return model
    baseline = evaluate_one(ft, options.baseline, options, questions)
    if questions:
        print(answers_text(answers_table(questions, baseline, model, names=("baseline", "model"))))
    print(f"relative change of the test loss: {100 * (model.loss - baseline.loss) / baseline.loss:+.2f}%")
    print(summary_line(baseline, model))
    return baseline, model


if __name__ == "__main__":
    main()
