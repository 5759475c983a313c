"""The chat contract shared by download_dataset.py, fine_tune.py and the flow.

A row is ultrachat-shaped when it holds `messages`: a non-empty list of {role, content} with a
known role and text content. A chat request to the served model takes PREDICT_PARAMS. This module
sits in finetuning_dir so that it travels with fine_tune.py into the Azure ML job.
"""

import json
import os
import sys
from dataclasses import dataclass

# One module under both of its names: fine_tune.py, run from this folder as the Azure ML job runs it, imports
# `chat_data`; the project's scripts import `finetuning_dir.chat_data`. Where both meet in one process (the
# tests, the benchmarks), two copies would each raise a ChatDataError the other's `except` does not catch.
sys.modules.setdefault("chat_data", sys.modules[__name__])
sys.modules.setdefault("finetuning_dir.chat_data", sys.modules[__name__])

ROLES = ("system", "user", "assistant")

# The predict-time params the served model accepts, with their defaults: the tutorial's. fine_tune.py
# writes them into the model's signature; the flow sends them unless AZURE_ML_* settings say otherwise.
PREDICT_PARAMS = {"max_new_tokens": 128, "temperature": 0.7, "do_sample": True, "return_full_text": False}


def as_trained(messages: list) -> list:
    """The messages as fine_tune.py renders them: after an empty system message when they have none (the
    tutorial's), so that a served prompt is rendered as the training chats were (Phi-3.5's template drops an
    empty system message; Phi-4-mini's renders it)."""
    return messages if messages and messages[0]["role"] == "system" else [{"role": "system", "content": ""}, *messages]


class ChatDataError(ValueError):
    """Data that does not hold ultrachat-shaped rows; the message names where and how to fix it."""


def messages_problem(row) -> str | None:
    """Why `row` is not an ultrachat-shaped row, or None when it is."""
    if not isinstance(row, dict):
        return f"is a {type(row).__name__}, not a JSON object"
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return "has no 'messages' list"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not {"role", "content"} <= message.keys():
            return f"message {i} is not a {{role, content}} object"
        if message["role"] not in ROLES:
            return f"message {i} has role {message['role']!r}, not one of {', '.join(ROLES)}"
        if not isinstance(message["content"], str):
            return f"message {i} has content that is not text"
    return None


def check_rows(rows, source: str) -> int:
    """Raise ChatDataError naming the first bad row; return the count.

    `rows` yields (where, row) pairs, `where` naming the row for the message ("row 3", "line 4").
    """
    count = 0
    for where, row in rows:
        problem = messages_problem(row)
        if problem:
            raise ChatDataError(
                f"{source}: {where} {problem}; each row needs 'messages': [{{'role': ..., 'content': ...}}, ...]"
            )
        count += 1
    if count == 0:
        raise ChatDataError(f"{source}: has no rows")
    return count


def check_jsonl_file(path: str) -> int:
    """Check that `path` is a JSONL file of ultrachat-shaped rows; return its row count."""
    if not os.path.isfile(path):
        raise ChatDataError(f"{path}: no such file; run download_dataset.py first or pass the right path")

    def rows():
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"line {number}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise ChatDataError(f"{path}: line {number} is not valid JSON ({e.msg}); each line must be one JSON object") from None

    return check_rows(rows(), path)


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
