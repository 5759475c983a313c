"""The questions, the run folder, and the answers: asked as the chat asks, kept as they arrive."""

import json
import math
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from tqdm import tqdm

from chat.endpoint_client import EndpointError
from chat_evaluation import EvaluationStopped
from finetuning_dir.chat_data import ChatDataError, check_jsonl_file, read_questions
from serving.processes import LogLines

# Seconds an answer of MEASURED_TOKENS new tokens takes, by form, on 2 vCPUs (BENCHMARKS.md section 8, the
# Phi-3.5-mini-sized model): int4 answers the 6 it admits together in 43.4 s, transformers (bf16) one in 72.1 s.
ANSWER_SECONDS = {"int4": 43.4 / 6, "transformers": 72.1}
MEASURED_TOKENS = 128


@dataclass
class ChatUnderTest:
    """One model whose answers are evaluated, and where they come from: `url` is its scoring endpoint; `identity`
    names it across reruns (a served model's port changes); `form` and `model` say what answers, for the table
    and the results."""

    name: str
    url: str
    key: str
    concurrency: int
    identity: str
    form: str
    model: str
    params: dict = field(default_factory=dict)
    through: object = None  # a served chat's ask(question), when the questions go through one


def chat_settings(endpoint: ChatUnderTest, timeout: float) -> dict:
    """The chat's settings (.env's names) that make a chat server ask `endpoint` as the flow's call does."""
    greedy = not endpoint.params.get("do_sample", True)
    return {"AZURE_ML_ENDPOINT": endpoint.url, "AZURE_ML_API_KEY": endpoint.key, "AZURE_ML_REQUEST_TIMEOUT": str(timeout),
            "AZURE_ML_TEMPERATURE": "0" if greedy else str(endpoint.params["temperature"]),
            "AZURE_ML_MAX_NEW_TOKENS": str(endpoint.params["max_new_tokens"])}


def display(path: Path) -> str:
    """A path as the learner typed it: relative to the working folder when inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def load_questions(path: str, count: int | None):
    """The first `count` questions of the test data (all with None) with their references; one line if unusable."""
    try:
        check_jsonl_file(path)
    except ChatDataError as e:
        raise EvaluationStopped(f"test data {e}") from None
    questions = read_questions(path, count if count is not None else 10**9)
    if not questions:
        raise EvaluationStopped(f"test data {path}: no conversation opens with a user turn; nothing to ask")
    if count is not None and len(questions) < count:
        print(f"The test data {path} has {len(questions)} questions, fewer than the {count} asked for: "
              f"evaluating those {len(questions)}.")
    return questions


def estimated_seconds(chat: ChatUnderTest, count: int) -> float:
    """About how long `count` answers take from `chat`, at the speed its form was measured at (2 vCPUs)."""
    return count * ANSWER_SECONDS[chat.form] * chat.params.get("max_new_tokens", MEASURED_TOKENS) / MEASURED_TOKENS


def time_estimate(chats: list[ChatUnderTest], count: int) -> str:
    """The line printed before any question is sent: how long the answers will take, per model."""
    each = [f"{c.name} {math.ceil(estimated_seconds(c, count) / 60)} min ({c.form}, {c.concurrency} at a time)"
            for c in chats]
    return (f"Asking {count} questions of each model: about {' and '.join(each)}, at the speed measured on 2 vCPUs "
            "(BENCHMARKS.md section 8; a GPU or Azure's VM is faster).")


def run_settings(test_data: str, questions, endpoints: list[ChatUnderTest]) -> dict:
    """What makes two runs the same run: a rerun with these settings continues an unfinished one."""
    return {
        "test_data": str(Path(test_data).resolve()),
        "questions": len(questions),
        "endpoints": {e.name: e.identity for e in endpoints},
        "params": {e.name: e.params for e in endpoints},
    }


def unfinished_run(parent: Path, settings: dict) -> Path | None:
    """The newest run folder under `parent` with these settings and no results yet."""
    for run_file in sorted(parent.glob("*/run.json"), reverse=True):
        if not (run_file.parent / "results.json").exists() and json.loads(run_file.read_text()) == settings:
            return run_file.parent
    return None


def open_run(parent: Path, settings: dict, fresh: bool) -> Path:
    """Continue the unfinished run with these settings, or start a new folder <parent>/<time>."""
    run_dir = None if fresh else unfinished_run(parent, settings)
    if run_dir is not None:
        print(f"Continuing the unfinished evaluation in {display(run_dir)} (--fresh starts over).")
        return run_dir
    run_dir = parent / datetime.now().strftime("%Y%m%d-%H%M%S")
    while run_dir.exists():  # two runs within a second
        run_dir = run_dir.with_name(run_dir.name + "-1")
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps(settings, indent=2))
    return run_dir


def kept_answers(path: Path) -> dict[int, dict]:
    """The answers already collected in `path`, by question number; a line cut short by a crash is dropped."""
    answers = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                answers[row["line"]] = row
            except (ValueError, KeyError, TypeError):
                continue
    return answers


def write_in_order(path: Path, answers: dict[int, dict]) -> None:
    """Rewrite the answers file in question order (evaluate() scores it row by row), atomically."""
    staging = path.with_suffix(".tmp")
    staging.write_text("".join(json.dumps(answers[i]) + "\n" for i in sorted(answers)), encoding="utf-8")
    os.replace(staging, path)


def ask(endpoint: ChatUnderTest, question: str, timeout: float) -> str:
    """One question, alone, as the chat's first turn sends it: through a served chat, or with the call the Prompt
    flow's tool makes (chat/endpoint_client.py)."""
    from chat.endpoint_client import chat_input, query_azml_endpoint

    if endpoint.through is not None:
        return endpoint.through(question)
    return query_azml_endpoint(chat_input(question), endpoint.url, endpoint.key, timeout, endpoint.params)


def progress_bar(name: str, total: int, done: int) -> tqdm:
    """One bar for a model's answers: redrawn in place on a terminal; in a log, a line at most every 15 s."""
    terminal = sys.stdout.isatty()
    return tqdm(total=total, initial=done, desc=f"{name} answers", unit="answer", file=sys.stdout if terminal
                else LogLines(sys.stdout), mininterval=0.1 if terminal else 15, dynamic_ncols=terminal, ascii=not terminal)


def collect_answers(endpoint: ChatUnderTest, questions, path: Path, timeout: float) -> float:
    """Ask every question not answered yet in `path`, `endpoint.concurrency` at a time, appending each answer as
    it arrives; return the seconds it took.

    After the first failure no new question is sent, the answers to those in flight are still kept, and
    EvaluationStopped says why and how many are kept. On Ctrl-C (or SIGTERM, which main() turns into one) the
    questions still queued are dropped and the answers of those in flight are kept as they come."""
    # Kept answers count only for the same question (the file may have changed since); a clean copy of them
    # drops any line a crash cut short, so that new answers are appended on lines of their own.
    done = {i: row for i, row in kept_answers(path).items() if i < len(questions) and row["query"] == questions[i].text}
    write_in_order(path, done)
    todo = [i for i in range(len(questions)) if i not in done]
    if not todo:
        print(f"{endpoint.name}: all {len(questions)} answers were collected before ({display(path)}).")
        return 0.0
    print(f"{endpoint.name}: asking {len(todo)} questions of {endpoint.url}, {endpoint.concurrency} at a time"
          + (f" ({len(done)} kept from before)" if done else ""), flush=True)
    stopping, failure = threading.Event(), None
    started = time.monotonic()

    def one(i: int) -> dict | None:
        if stopping.is_set():  # an earlier question failed: send no new one
            return None
        asked = time.monotonic()
        try:
            answer = ask(endpoint, questions[i].text, timeout)
        except EndpointError:
            stopping.set()
            raise
        return {"line": i, "query": questions[i].text, "ground_truth": questions[i].reference, "response": answer,
                "seconds": round(time.monotonic() - asked, 3)}

    def keep(future, out, bar) -> None:
        nonlocal failure
        try:
            row = future.result()
        except EndpointError as e:
            failure = failure or e
            return
        if row is None:
            return
        out.write(json.dumps(row) + "\n")
        out.flush()
        done[row["line"]] = row
        bar.update()

    with (open(path, "a", encoding="utf-8") as out, ThreadPoolExecutor(endpoint.concurrency) as pool,
          progress_bar(endpoint.name, len(questions), len(done)) as bar):
        futures, handled = [pool.submit(one, i) for i in todo], set()
        try:
            for future in as_completed(futures):  # only this thread writes: each answer is on disk at once
                handled.add(future)
                keep(future, out, bar)
        except BaseException:  # Ctrl-C or SIGTERM: nothing new is sent, what is in flight is kept
            stopping.set()
            left = [f for f in futures if f not in handled and not f.cancel()]
            if any(not f.done() for f in left):
                bar.write(f"{endpoint.name}: stopping; keeping the answers in flight as they come")
            for future in as_completed(left):
                keep(future, out, bar)
            raise
    if failure is not None:
        raise EvaluationStopped(
            f"{endpoint.name} endpoint: {failure}; {len(done)} of {len(questions)} answers kept in {display(path)}: "
            "run the same command again to continue"
        )
    write_in_order(path, done)
    return time.monotonic() - started
