"""How much a fine-tune learned: test loss and a few greedy answers, of the base model and the tuned one.

fine_tune.py runs this in every run, before and after training; evaluate_model.py runs it on its
own. It works on a trainer it is given and imports of the project's only chat_data.py (the
questions) and paired.py (the comparison): the test loss is the trainer's own eval_loss over the
eval file (with its perplexity), and the answers are greedy answers to the first few questions of
the eval file. Each test conversation's own loss is taken too, under both models, and compared
conversation by conversation as step 5 compares answers: means, difference, interval, p-value,
won/tied/lost. report() logs all of it to MLflow (base_eval_loss / eval_loss, base_eval_perplexity /
eval_perplexity, test_loss_difference with its interval and test_loss_p_value, the table
eval_answers.json) and returns the line a person reads, e.g.

    test loss 1.421 → 1.183 (perplexity 4.14 → 3.26)

A model without torch weights (the int4 form) is measured over the very batches the trainer
builds, averaged as the trainer averages (eval_loss_of).
"""

import json
import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import mlflow
import torch

import paired
from chat_data import Question, read_questions  # noqa: F401  (fine_tune.py and evaluate_model.py read them here)

logger = logging.getLogger("fine_tune")

DEFAULT_QUESTIONS = 3
DEFAULT_MAX_NEW_TOKENS = 48


@dataclass
class Evaluation:
    """One model's figures on the eval file. `answers` is empty on every process but the first."""

    loss: float
    answers: list[str] = field(default_factory=list)
    losses: list[float | None] = field(default_factory=list)  # each test conversation's own (conversation_losses)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf


def answer_questions(model, tokenizer, questions: list[Question], max_new_tokens: int, autocast=None) -> list[str]:
    """Greedy answers of `model` to `questions`, each asked alone in the model's chat format."""
    if not questions:
        return []
    from chat_data import as_trained  # fine_tune.py's neighbour; step 5 imports this module as finetuning_dir's

    prompts = [
        tokenizer.apply_chat_template(as_trained([{"role": "user", "content": q.text}]), tokenize=False,
                                      add_generation_prompt=True)
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


def evaluate(trainer, questions: list[Question], max_new_tokens: int, prefix: str = "eval",
             conversations: list[list[int]] = ()) -> Evaluation:
    """The model in `trainer` on its eval dataset: the trainer's loss; on the first process, the answers and
    each of `conversations`' own loss (conversation_ids).

    Every process must call this (the loss is computed across all of them); metrics are logged
    under `prefix` (base_eval_loss for prefix "base_eval").
    """
    metrics = trainer.evaluate(metric_key_prefix=prefix)
    answers, losses = [], []
    if trainer.is_world_process_zero():
        answers = answer_questions(
            trainer.model, trainer.processing_class, questions, max_new_tokens, trainer.accelerator.autocast()
        )
        losses = conversation_losses(torch_logits(trainer.model, trainer.accelerator.autocast), conversations)
    return Evaluation(loss=float(metrics[f"{prefix}_loss"]), answers=answers, losses=losses)


def conversation_ids(texts: list[str], tokenizer, max_length: int) -> list[list[int]]:
    """Each conversation (rendered with the chat template) as token ids, as the trainer makes them (TRL: the
    tokenizer's own special tokens, EOS appended when missing), cut at `max_length`."""
    eos = tokenizer.eos_token or ""
    return [tokenizer(text=t if t.endswith(eos) else t + eos)["input_ids"][:max_length] for t in texts]


def torch_logits(model, autocast=nullcontext):
    """A function giving a torch model's logits ([tokens, vocabulary]) of one conversation, in eval mode."""
    def logits_of(ids: list[int]):
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), autocast():
                return model(input_ids=torch.tensor([ids], device=model.device)).logits[0]
        finally:
            model.train(was_training)

    return logits_of


def conversation_losses(logits_of, conversations: list[list[int]]) -> list[float | None]:
    """Each conversation's mean next-token loss, alone (None for one with nothing to predict), from a function
    giving its logits: what fine-tuning changed, conversation by conversation, for a paired comparison."""
    losses = []
    for ids in conversations:
        if len(ids) < 2:
            losses.append(None)
            continue
        logits = torch.as_tensor(logits_of(ids), dtype=torch.float32)[:-1]
        wanted = torch.tensor(ids[1:], device=logits.device)
        losses.append(torch.nn.functional.cross_entropy(logits, wanted).item())
    return losses


def loss_comparison(base: Evaluation, tuned: Evaluation, names=("fine-tuned", "base model")) -> tuple[str, dict]:
    """Each conversation's test loss under both models, compared as step 5 compares answers (paired.py): the
    table a person reads, and its figures for MLflow. Lower is better: "won" counts the conversations whose
    loss fine-tuning lowered."""
    c = paired.paired(tuned.losses, base.losses)
    names = list(names)
    text = paired.aligned([paired.columns(names), paired.row("test loss, per conversation", c, names, c.p_value,
                                                             lower_is_better=True)])
    text += "\n" + "\n".join(paired.power_lines(c, "test loss", unit="conversations"))
    figures = {} if c.difference is None else {
        "test_loss_difference": c.difference, "test_loss_difference_low": c.interval[0],
        "test_loss_difference_high": c.interval[1], "test_loss_p_value": c.p_value,
        "test_loss_conversations_lowered": c.losses,
    }
    return text, figures


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
    losses, figures = loss_comparison(base, tuned)
    if figures:
        logger.info("The test loss, conversation by conversation:\n%s", losses)
    logger.info(line)
    mlflow.log_metrics({
        "base_eval_loss": base.loss, "eval_loss": tuned.loss,
        "base_eval_perplexity": base.perplexity, "eval_perplexity": tuned.perplexity, **figures,
    }, step=step)
    if questions:
        mlflow.log_table(data=table, artifact_file="eval_answers.json")
    mlflow.set_tag("evaluation", line)
    return line
