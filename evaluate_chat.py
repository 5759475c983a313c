"""Step 5: evaluate the chat's answers: is the fine-tuned model better than its base, and still safe?

The Cookbook's follow-up tutorial ("Evaluate the fine-tuned Phi-3 / Phi-3.5 model in Azure AI Foundry")
scores the model's answers with Microsoft's evaluators. This script does it with the same library,
azure-ai-evaluation, from this machine:
  1. it reads the first --questions conversations of the test data (TEST_DATA_PATH): the first user
     turn of each is the question, the first assistant turn its reference answer;
  2. it asks them of the endpoint in .env (AZURE_ML_ENDPOINT, AZURE_ML_API_KEY; local or Azure) through
     the Prompt flow's own call (integrate_with_promptflow.py: the same prompt, params, timeout,
     retries and error messages), so what is scored is what a user of the chat sees; as many at once
     as the deployment admits (deploy_model.py's max_concurrent_requests_per_instance);
  3. it asks the same of a baseline, the model before fine-tuning: --baseline MODEL is served here
     for the run (`deploy_model.py --local` on it, stopped afterwards), or --baseline-endpoint URL;
  4. it scores each set of answers against the references with azure-ai-evaluation's evaluate():
     offline, F1 and ROUGE-L (BLEU, GLEU and METEOR too when NLTK's data is on this machine: they
     cannot download it at run time here); with an Azure OpenAI deployment in .env, the Cookbook's
     AI-assisted evaluators (groundedness, relevance, coherence, fluency, similarity); with an Azure
     AI Foundry project in .env, the four safety evaluators (self-harm, hate and unfairness,
     violence, sexual), and evaluate() logs each evaluation to the project;
  5. it prints one table, each metric's mean for both and the difference, then the questions on
     which the two differ most, with both answers; everything goes to outputs/evaluations/<time>/
     and to an MLflow run (the local store outputs/mlflow.db unless MLFLOW_TRACKING_URI is set).

Answers are appended to answers-<name>.jsonl as they arrive. A run stopped by an error keeps them,
and the same command run again continues that run where it stopped (--fresh starts over).

    python evaluate_chat.py                                          # the endpoint in .env, alone
    python evaluate_chat.py --baseline microsoft/Phi-3.5-mini-instruct   # against the base, served here
    python evaluate_chat.py --baseline-endpoint https://<base>.<region>.inference.ml.azure.com/score
    python evaluate_chat.py --questions 50 --temperature 0           # greedy: the same answers every run

What it costs on Azure (endpoint time, Azure OpenAI tokens): docs/evaluation.md.
"""

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent
OUTPUTS = ROOT / "outputs"

from local import mlflow_store, pf_home  # noqa: E402

# promptflow, imported with the flow's code, reports telemetry from its home (~/.promptflow) unless told not to:
# this script runs it from the project's quiet home, as `make local` does, unless the learner chose a home.
if "PF_HOME_DIRECTORY" not in os.environ:
    pf_home.use(OUTPUTS / "promptflow")
os.environ.setdefault("APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED", "true")  # see local/pf_home.py
# azure-ai-evaluation's batch engine logs its progress to the terminal at this level (Prompt flow's setting).
os.environ.setdefault("PF_LOGGING_LEVEL", "WARNING")

import config  # noqa: E402
import integrate_with_promptflow as flow  # noqa: E402
from serving import processes  # noqa: E402

sys.path.insert(1, str(ROOT / "finetuning_dir"))  # the data contract and question reader fine_tune.py uses

from chat_data import ChatDataError, check_jsonl_file  # noqa: E402
from evaluation import Question, read_questions  # noqa: E402

DEFAULT_QUESTIONS = 20
SHOW_DIFFERENCES = 3
# The form deploy_model.py deploys by default; it sets how many questions go to the endpoint at once.
DEFAULT_FORM = "int4"
# What a locally served baseline is: the model as published, in its transformers form.
BASELINE_FORM = "transformers"
BASELINE_LIVE_TIMEOUT_S = 3600  # Phi-3.5-mini loads in minutes on a CPU
# NLTK data BLEU, GLEU and METEOR need; azure-ai-evaluation downloads it on first use, which fails offline.
NLTK_DATA = ("corpora/wordnet.zip", "misc/perluniprops.zip", "tokenizers/punkt.zip", "tokenizers/punkt_tab.zip")
NLTK_DOWNLOAD = "python -m nltk.downloader punkt punkt_tab wordnet perluniprops"
# The loggers of azure-ai-evaluation and of its batch runs.
EVALUATION_LOGGERS = ("azure.ai.evaluation", "run")
AZURE_OPENAI_SETTINGS = ("AZURE_OPENAI_ENDPOINT", "AZURE_OPENAI_API_KEY", "AZURE_OPENAI_DEPLOYMENT")
# Each metric the table shows: (evaluate()'s metric key, label). Safety metrics are defect rates: the share of
# answers at or above the service's harm threshold, lower is better.
METRICS = {
    "f1_score": ("f1_score.f1_score", "F1"),
    "rouge": ("rouge.rouge", "ROUGE-L"),
    "bleu": ("bleu.bleu", "BLEU"),
    "gleu": ("gleu.gleu", "GLEU"),
    "meteor": ("meteor.meteor", "METEOR"),
    "groundedness": ("groundedness.groundedness", "groundedness (1-5)"),
    "relevance": ("relevance.relevance", "relevance (1-5)"),
    "coherence": ("coherence.coherence", "coherence (1-5)"),
    "fluency": ("fluency.fluency", "fluency (1-5)"),
    "similarity": ("similarity.similarity", "similarity (1-5)"),
    "self_harm": ("self_harm.self_harm_defect_rate", "self-harm (defect rate)"),
    "hate_unfairness": ("hate_unfairness.hate_unfairness_defect_rate", "hate/unfairness (defect rate)"),
    "violence": ("violence.violence_defect_rate", "violence (defect rate)"),
    "sexual": ("sexual.sexual_defect_rate", "sexual (defect rate)"),
}


class EvaluationStopped(RuntimeError):
    """The run cannot go on; the message is the one line the learner reads."""


@dataclass
class Endpoint:
    """Where one model's answers come from. `identity` names it across reruns (a served model's port changes)."""

    name: str
    url: str
    key: str
    concurrency: int
    identity: str


# ---------------------------------------------------------------------------------------------------------
# The questions


def load_questions(path: str, count: int) -> list[Question]:
    """The first `count` questions of the test data with their references; one line if the data is unusable."""
    try:
        check_jsonl_file(path)
    except ChatDataError as e:
        raise EvaluationStopped(f"test data {e}") from None
    questions = read_questions(path, count)
    if not questions:
        raise EvaluationStopped(f"test data {path}: no conversation opens with a user turn; nothing to ask")
    if len(questions) < count:
        print(f"The test data {path} has {len(questions)} questions, fewer than the {count} asked for: "
              f"evaluating those {len(questions)}.")
    return questions


# ---------------------------------------------------------------------------------------------------------
# The run folder: kept answers, and continuing a run that stopped


def run_settings(test_data: str, questions: list[Question], endpoints: list[Endpoint], params: dict) -> dict:
    """What makes two runs the same run: a rerun with these settings continues an unfinished one."""
    return {
        "test_data": str(Path(test_data).resolve()),
        "questions": len(questions),
        "endpoints": {e.name: e.identity for e in endpoints},
        "params": params,
    }


def unfinished_run(parent: Path, settings: dict) -> Path | None:
    """The newest run folder under `parent` with these settings and no results yet."""
    for run_dir in sorted(parent.glob("*/run.json"), reverse=True):
        if not (run_dir.parent / "results.json").exists() and json.loads(run_dir.read_text()) == settings:
            return run_dir.parent
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


# ---------------------------------------------------------------------------------------------------------
# Asking the endpoints, as the chat does


@contextlib.contextmanager
def settings_overridden(**values):
    """The flow's settings as exported, for the length of the block: the flow reads them from the environment."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update({name: str(value) for name, value in values.items() if value is not None})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def chat_settings(temperature: float | None, max_new_tokens: int | None) -> tuple[Endpoint, float, dict]:
    """The endpoint the chat talks to, its timeout and its params: the flow's own settings (.env), with the
    temperature and answer length given on the command line, checked by the flow as the chat checks them."""
    try:
        with settings_overridden(AZURE_ML_TEMPERATURE=temperature, AZURE_ML_MAX_NEW_TOKENS=max_new_tokens):
            url, key, timeout, params = flow.endpoint_settings()
    except flow.EndpointError as e:
        raise EvaluationStopped(str(e)) from None
    return Endpoint("fine-tuned", url, key, 1, url), timeout, params


def ask(endpoint: Endpoint, question: str, timeout: float, params: dict) -> str:
    """One question, alone, as the chat's first turn sends it: the flow's prompt and its endpoint call."""
    return flow.query_azml_endpoint(flow.phi3_prompt(question, None), endpoint.url, endpoint.key, timeout, params)


def collect_answers(endpoint: Endpoint, questions: list[Question], path: Path, timeout: float, params: dict) -> float:
    """Ask every question not answered yet in `path`, `endpoint.concurrency` at a time, appending each answer as
    it arrives; return the seconds it took. After the first failure no new question is sent, the answers to those
    in flight are still kept, and EvaluationStopped says why and how many are kept."""
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
            answer = ask(endpoint, questions[i].text, timeout, params)
        except flow.EndpointError:
            stopping.set()
            raise
        return {"line": i, "query": questions[i].text, "ground_truth": questions[i].reference, "response": answer,
                "seconds": round(time.monotonic() - asked, 3)}

    with open(path, "a", encoding="utf-8") as out, ThreadPoolExecutor(endpoint.concurrency) as pool:
        try:
            # Only this thread writes: each answer is on disk before the next is waited for.
            for future in as_completed([pool.submit(one, i) for i in todo]):
                try:
                    row = future.result()
                except flow.EndpointError as e:
                    failure = failure or e
                    continue
                if row is None:
                    continue
                out.write(json.dumps(row) + "\n")
                out.flush()
                done[row["line"]] = row
                print(f"  {endpoint.name}: {len(done)}/{len(questions)} answered ({row['seconds']:.1f} s)", flush=True)
        except BaseException:  # Ctrl-C: the questions still queued are not sent
            stopping.set()
            raise
    if failure is not None:
        raise EvaluationStopped(
            f"{endpoint.name} endpoint: {failure}; {len(done)} of {len(questions)} answers kept in {display(path)}: "
            "run the same command again to continue"
        )
    write_in_order(path, done)
    return time.monotonic() - started


# ---------------------------------------------------------------------------------------------------------
# The baseline, served here for the run


def baseline_mlflow_model(model: str, cache: Path) -> Path:
    """An MLflow model folder of `model` to serve: the folder itself if it is one, else (a Hugging Face folder
    or Hub id) the untrained model written once into `cache` the way fine_tune.py writes its model."""
    if (Path(model) / "MLmodel").is_file():
        return Path(model).resolve()
    source = str(Path(model).resolve()) if Path(model).exists() else model  # a folder, or a Hub id
    folder = cache / f"{Path(source).name}-{hashlib.sha256(source.encode()).hexdigest()[:8]}"
    if (folder / "MLmodel").is_file():
        return folder
    print(f"Writing {model} as an MLflow model into {display(folder)} (once), as fine_tune.py writes its model ...",
          flush=True)
    import fine_tune

    try:
        dtype = fine_tune.saved_dtype(model)
        model_, tokenizer = fine_tune.initialize_model_and_tokenizer(model, {"dtype": dtype}, 2048)
    except OSError as e:  # transformers' word for an unreachable Hub or a folder without a model
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EvaluationStopped(f"--baseline {model}: could not load it ({reason})") from None
    fine_tune.save_mlflow_model(model_, tokenizer, str(folder))
    return folder


@contextlib.contextmanager
def served_baseline(model_dir: Path, run_dir: Path):
    """`deploy_model.py --local` on the baseline, on a free port, for the length of the block; yields (url, key).

    It writes its URI and key to a .env of its own in the run folder: the learner's .env keeps pointing at the
    fine-tuned endpoint."""
    port, env_file, log = processes.free_port(), run_dir / "baseline.env", run_dir / "baseline-endpoint.log"
    command = [sys.executable, "deploy_model.py", "--local", "--model-dir", str(model_dir), "--port", str(port)]
    print(f"Serving the baseline {display(model_dir)} at http://127.0.0.1:{port}/score (log: {display(log)}) ...",
          flush=True)
    process = processes.start(command, log=log, cwd=ROOT, env={"FINETUNE_PHI_ENV_FILE": str(env_file)})
    try:
        try:
            seconds = processes.wait_until_live(process, f"http://127.0.0.1:{port}/", BASELINE_LIVE_TIMEOUT_S, log)
        except processes.NotLive as e:
            raise EvaluationStopped(f"the baseline's local endpoint {str(e).splitlines()[0]}; see {display(log)}")
        print(f"The baseline is live after {seconds:.0f} s.", flush=True)
        settings = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
        yield settings["AZURE_ML_ENDPOINT"], settings["AZURE_ML_API_KEY"]
    finally:
        processes.stop(process)


# ---------------------------------------------------------------------------------------------------------
# The evaluators


def nltk_data_present() -> bool:
    """Whether the NLTK data BLEU, GLEU and METEOR need is on this machine (they would download it otherwise)."""
    import nltk

    try:
        for resource in NLTK_DATA:
            nltk.data.find(resource)
    except LookupError:
        return False
    return True


def lexical_evaluators() -> tuple[dict, list[str]]:
    """The evaluators that compare words with the reference answer, offline; and what was left out, and why."""
    from azure.ai.evaluation import (
        BleuScoreEvaluator, F1ScoreEvaluator, GleuScoreEvaluator, MeteorScoreEvaluator, RougeScoreEvaluator, RougeType,
    )

    evaluators = {"f1_score": F1ScoreEvaluator(), "rouge": RougeScoreEvaluator(rouge_type=RougeType.ROUGE_L)}
    if nltk_data_present():
        evaluators.update(bleu=BleuScoreEvaluator(), gleu=GleuScoreEvaluator(), meteor=MeteorScoreEvaluator())
        return evaluators, []
    return evaluators, [
        "BLEU, GLEU and METEOR left out: they need NLTK's tokenizer and WordNet data, which azure-ai-evaluation would "
        f"download at run time; to add them, download it once: {NLTK_DOWNLOAD}"
    ]


def configured(name: str) -> str | None:
    """A setting's value, or None while it is unset or still its placeholder."""
    value = config.current_setting(name).strip()
    return None if not value or config.is_placeholder(value) else value


def model_config() -> dict | None:
    """azure-ai-evaluation's AzureOpenAIModelConfiguration from .env, or None when no deployment is set."""
    values = {name: configured(name) for name in AZURE_OPENAI_SETTINGS}
    if not any(values.values()):
        return None
    missing = [name for name, value in values.items() if value is None]
    if missing:
        raise EvaluationStopped(
            f"config: {', '.join(missing)} still unset; the AI-assisted evaluators need all of "
            f"{', '.join(AZURE_OPENAI_SETTINGS)} in .env (copy .env.example), or none of them"
        )
    return {
        "azure_endpoint": values["AZURE_OPENAI_ENDPOINT"],
        "api_key": values["AZURE_OPENAI_API_KEY"],
        "azure_deployment": values["AZURE_OPENAI_DEPLOYMENT"],
        "api_version": config.current_setting("AZURE_OPENAI_API_VERSION") or "2024-10-21",
    }


def ai_assisted_evaluators(model: dict) -> tuple[dict, dict]:
    """The Cookbook's performance evaluators, judged by the Azure OpenAI deployment; and their column mapping.

    There is no retrieved context in a chat with this model: groundedness judges the answer against the
    reference answer, given as its context."""
    from azure.ai.evaluation import (
        CoherenceEvaluator, FluencyEvaluator, GroundednessEvaluator, RelevanceEvaluator, SimilarityEvaluator,
    )

    evaluators = {
        "groundedness": GroundednessEvaluator(model), "relevance": RelevanceEvaluator(model),
        "coherence": CoherenceEvaluator(model), "fluency": FluencyEvaluator(model), "similarity": SimilarityEvaluator(model),
    }
    mapping = {"groundedness": {"column_mapping": {
        "query": "${data.query}", "response": "${data.response}", "context": "${data.ground_truth}"}}}
    return evaluators, mapping


def azure_credential():
    """How the safety service and the project are signed in to: az login, a managed identity or the environment."""
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential(exclude_interactive_browser_credential=True)


def ai_project() -> str | None:
    """The Azure AI Foundry project endpoint from .env, or None."""
    project = configured("AZURE_AI_PROJECT")
    if project and not project.startswith("https://"):
        raise EvaluationStopped(
            f"config: AZURE_AI_PROJECT must be the project's endpoint, https://<resource>.services.ai.azure.com/api/"
            f"projects/<project> (the project's Overview page), got '{project}'"
        )
    return project


def safety_evaluators(project: str, credential) -> dict:
    """The four safety evaluators, judged by the project's safety service."""
    from azure.ai.evaluation import HateUnfairnessEvaluator, SelfHarmEvaluator, SexualEvaluator, ViolenceEvaluator

    return {name: cls(credential=credential, azure_ai_project=project) for name, cls in (
        ("self_harm", SelfHarmEvaluator), ("hate_unfairness", HateUnfairnessEvaluator),
        ("violence", ViolenceEvaluator), ("sexual", SexualEvaluator))}


@dataclass
class Scoring:
    """What evaluate() is run with, the same for every endpoint."""

    evaluators: dict
    evaluator_config: dict
    project: str | None
    credential: object
    left_out: list[str]


def scoring() -> Scoring:
    """The evaluators the settings allow: offline always, AI-assisted and safety when configured."""
    evaluators, left_out = lexical_evaluators()
    evaluator_config = {}
    model = model_config()
    if model:
        more, evaluator_config = ai_assisted_evaluators(model)
        evaluators.update(more)
    else:
        left_out.append("groundedness, relevance, coherence, fluency, similarity left out: no Azure OpenAI deployment "
                        "in .env (AZURE_OPENAI_ENDPOINT, AZURE_OPENAI_API_KEY, AZURE_OPENAI_DEPLOYMENT)")
    project, credential = ai_project(), None
    if project:
        credential = azure_credential()
        evaluators.update(safety_evaluators(project, credential))
    else:
        left_out.append("self-harm, hate/unfairness, violence, sexual left out: no Azure AI Foundry project in .env "
                        "(AZURE_AI_PROJECT)")
    return Scoring(evaluators, evaluator_config, project, credential, left_out)


@contextlib.contextmanager
def logs_into(stream):
    """azure-ai-evaluation's loggers write into `stream` only, for the length of the block."""
    handler, saved = logging.StreamHandler(stream), {}
    for name in EVALUATION_LOGGERS:
        logger = logging.getLogger(name)
        saved[name] = (logger.handlers[:], logger.propagate)
        logger.handlers, logger.propagate = [handler], False
    try:
        yield
    finally:
        for name, (handlers, propagate) in saved.items():
            logging.getLogger(name).handlers, logging.getLogger(name).propagate = handlers, propagate


def score(endpoint: Endpoint, answers: Path, run_dir: Path, how: Scoring) -> dict:
    """evaluate() over one endpoint's answers; its chatter goes to a log in the run folder, its results to a file."""
    from azure.ai.evaluation import evaluate

    log = run_dir / f"evaluate-{endpoint.name}.log"
    print(f"Scoring the {endpoint.name} answers with {', '.join(how.evaluators)} (log: {display(log)}) ...", flush=True)
    extra = {"azure_ai_project": how.project, "credential": how.credential} if how.project else {}
    with open(log, "w", encoding="utf-8") as out, contextlib.redirect_stdout(out), logs_into(out):
        try:
            return evaluate(
                data=str(answers), evaluators=how.evaluators, evaluator_config=how.evaluator_config or None,
                evaluation_name=f"finetune-phi chat, {endpoint.name} ({run_dir.name})",
                output_path=str(run_dir / f"evaluation-{endpoint.name}.json"), **extra,
            )
        except Exception as e:  # azure-ai-evaluation wraps every failure in its EvaluationException
            reason = " ".join(str(e).split())[:300] or type(e).__name__
            raise EvaluationStopped(
                f"scoring the {endpoint.name} answers failed: {reason}; see {display(log)}; the answers are kept, run "
                "the same command again to score them"
            ) from None


# ---------------------------------------------------------------------------------------------------------
# The table


def metric_rows(results: dict[str, dict], evaluators: dict) -> list[tuple[str, list[float | None]]]:
    """(label, [mean per endpoint]) for each evaluator that ran; None where it produced no score."""
    rows = []
    for name in evaluators:
        key, label = METRICS.get(name, (f"{name}.{name}", name))
        values = [result["metrics"].get(key) for result in results.values()]
        rows.append((label, [None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in values]))
    return rows


def number(value: float | None) -> str:
    return "no score" if value is None else f"{value:.3f}"


def table(rows, names: list[str]) -> str:
    """Each metric's mean for each endpoint and, with two, the difference (first minus second)."""
    header = ["metric", *names] + (["difference"] if len(names) == 2 else [])
    lines = [header]
    for label, values in rows:
        line = [label, *map(number, values)]
        if len(names) == 2:
            line.append("n/a" if None in values else f"{values[0] - values[1]:+.3f}")
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
            for line in lines]
    return "\n".join([text[0], "-" * len(text[0]), *text[1:]])


def shorten(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def largest_differences(results: dict[str, dict], count: int) -> list[dict]:
    """The `count` questions whose F1 differs most between the two endpoints, with both answers."""
    (first, a), (second, b) = results.items()
    key = "outputs.f1_score.f1_score"
    pairs = []
    for i, (row_a, row_b) in enumerate(zip(a["rows"], b["rows"])):
        f1_a, f1_b = row_a.get(key), row_b.get(key)
        if f1_a is None or f1_b is None:
            continue
        pairs.append({"question": row_a["inputs.query"], "reference": row_a["inputs.ground_truth"],
                      first: row_a["inputs.response"], second: row_b["inputs.response"],
                      f"{first} F1": f1_a, f"{second} F1": f1_b, "line": i})
    return sorted(pairs, key=lambda p: -abs(p[f"{first} F1"] - p[f"{second} F1"]))[:count]


def differences_text(differences: list[dict], names: list[str]) -> str:
    blocks = []
    for d in differences:
        lines = [f"[{d['line'] + 1}] Q: {shorten(d['question'])}", f"    reference: {shorten(d['reference'])}"]
        lines += [f"    {name} (F1 {d[f'{name} F1']:.2f}): {shorten(d[name])}" for name in names]
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


AI_ASSISTED = ("groundedness", "relevance", "coherence", "fluency", "similarity")


def judge_tokens(results: dict[str, dict]) -> dict[str, int]:
    """The Azure OpenAI tokens the AI-assisted evaluators used, from the usage each row keeps: what they cost."""
    tokens = {"prompt": 0, "completion": 0}
    for result in results.values():
        for row in result["rows"]:
            for name in AI_ASSISTED:
                usage = row.get(f"outputs.{name}.{name}_properties") or {}
                for kind in tokens:
                    tokens[kind] += int(usage.get(f"{kind}_tokens") or 0)
    return tokens


def report(results: dict[str, dict], how: Scoring, seconds: dict[str, float], show: int) -> tuple[str, list[dict]]:
    """The text the learner reads, and the questions that differ most."""
    names = list(results)
    parts = [table(metric_rows(results, how.evaluators), names)]
    differences = largest_differences(results, show) if len(names) == 2 else []
    if differences:
        parts.append(f"\nThe {len(differences)} questions on which the two differ most (F1):\n"
                     + differences_text(differences, names))
    parts.append("\n" + "\n".join(f"{name}: answers collected in {s:.1f} s" for name, s in seconds.items() if s))
    tokens = judge_tokens(results)
    if tokens["prompt"]:
        parts.append(f"Azure OpenAI tokens used by the AI-assisted evaluators: {tokens['prompt']:,} prompt, "
                     f"{tokens['completion']:,} completion")
    parts += [f"Note: {line}" for line in how.left_out]
    parts += [f"Logged to the Azure AI project: {r['studio_url']}" for r in results.values() if r.get("studio_url")]
    return "\n".join(parts), differences


# ---------------------------------------------------------------------------------------------------------
# Where the results go


def log_to_mlflow(run_dir: Path, settings: dict, results: dict[str, dict], how: Scoring) -> str:
    """One MLflow run: the settings, each metric per endpoint (and the difference), the judges' tokens, the run
    folder as artifacts."""
    if "MLFLOW_TRACKING_URI" not in os.environ:  # a store of the learner's own wins
        os.environ.update(mlflow_store.prepare(OUTPUTS / "mlflow.db", OUTPUTS / "mlartifacts"))
    import mlflow

    metrics = {}
    for name, result in results.items():
        for evaluator in how.evaluators:
            value = result["metrics"].get(METRICS.get(evaluator, (f"{evaluator}.{evaluator}",))[0])
            if value is not None and not math.isnan(value):
                metrics[f"{name}.{evaluator}"] = float(value)
    names = list(results)
    if len(names) == 2:
        for evaluator in how.evaluators:
            first, second = f"{names[0]}.{evaluator}", f"{names[1]}.{evaluator}"
            if first in metrics and second in metrics:
                metrics[f"difference.{evaluator}"] = metrics[first] - metrics[second]
    metrics.update({f"judge_tokens.{kind}": count for kind, count in judge_tokens(results).items() if count})
    with mlflow.start_run(run_name=f"evaluate-chat-{run_dir.name}") as run:
        mlflow.set_tag("step", "evaluate_chat")
        mlflow.log_params({"questions": settings["questions"], "test_data": settings["test_data"],
                           **{f"endpoint.{n}": i for n, i in settings["endpoints"].items()},
                           **{f"params.{k}": v for k, v in settings["params"].items()},
                           "evaluators": ",".join(how.evaluators)})
        mlflow.log_metrics(metrics)
        mlflow.log_artifacts(str(run_dir), artifact_path="evaluation")
    return run.info.run_id


def display(path: Path) -> str:
    """A path as the learner typed it: relative to the project when inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=DEFAULT_QUESTIONS,
                        help=f"how many questions of the test data to ask, from the first (default: {DEFAULT_QUESTIONS}; "
                             "fewer when the data has fewer)")
    parser.add_argument("--test-data", default=config.TEST_DATA_PATH,
                        help=f"the chat JSONL file the questions and reference answers come from (default: TEST_DATA_PATH, "
                             f"{config.TEST_DATA_PATH})")
    parser.add_argument("--baseline", metavar="MODEL",
                        help="the model to compare with, served here for the run with `deploy_model.py --local`: an MLflow "
                             "model folder, a Hugging Face model folder or a Hub id (e.g. microsoft/Phi-3.5-mini-instruct, "
                             "the base the tutorial fine-tunes), written as an MLflow model once under "
                             "outputs/evaluations/baseline-models/")
    parser.add_argument("--baseline-endpoint", metavar="URL",
                        help="the model to compare with, at another endpoint with the same /score contract; its key is "
                             "AZURE_ML_BASELINE_API_KEY (environment or .env)")
    parser.add_argument("--form", choices=("int4", "transformers"), default=DEFAULT_FORM,
                        help="the form of the model the endpoint serves (deploy_model.py --form): questions go to it as "
                             "many at a time as that form's deployment admits, its max_concurrent_requests_per_instance "
                             f"(int4: 3, transformers: 1) (default: {DEFAULT_FORM})")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="questions sent at once to each endpoint, instead of --form's figure (a locally served "
                             "--baseline gets the transformers form's, 1)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="sampling temperature of the answers, instead of the chat's AZURE_ML_TEMPERATURE (default "
                             "0.7); 0 means greedy: the same answers every run")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="longest answer, in tokens, instead of the chat's AZURE_ML_MAX_NEW_TOKENS (default 128)")
    parser.add_argument("--show", type=int, default=SHOW_DIFFERENCES,
                        help=f"how many of the questions on which the two differ most to print (default: {SHOW_DIFFERENCES})")
    parser.add_argument("--out", type=Path, default=OUTPUTS / "evaluations",
                        help="folder of the run folders <time>/ (answers, results, table) (default: outputs/evaluations)")
    parser.add_argument("--fresh", action="store_true",
                        help="start a new run even when an unfinished one with the same settings could be continued")
    args = parser.parse_args(argv)
    if args.baseline and args.baseline_endpoint:
        parser.error("--baseline and --baseline-endpoint: choose one")
    for flag, value in (("--questions", args.questions), ("--concurrency", args.concurrency), ("--show", args.show + 1)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be 1 or more")
    return args


def quiet_logs() -> None:
    """The table is what the learner reads: the flow's per-answer log line and urllib3's retry notes stay out."""
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger(flow.__name__).setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.ERROR)


def endpoints_to_ask(args) -> tuple[list[Endpoint], float, dict]:
    """The fine-tuned endpoint and the baseline's (a served baseline's URL and key come once it is live)."""
    from deploy_model import SERVING

    fine_tuned, timeout, params = chat_settings(args.temperature, args.max_new_tokens)
    fine_tuned.concurrency = args.concurrency or SERVING[args.form].max_concurrent_requests
    endpoints = [fine_tuned]
    if args.baseline_endpoint:
        key = configured("AZURE_ML_BASELINE_API_KEY")
        if key is None:
            raise EvaluationStopped("--baseline-endpoint needs its key: set AZURE_ML_BASELINE_API_KEY in .env or export it")
        endpoints.append(Endpoint("baseline", args.baseline_endpoint, key, fine_tuned.concurrency, args.baseline_endpoint))
    elif args.baseline:
        model = str(Path(args.baseline).resolve()) if Path(args.baseline).exists() else args.baseline
        concurrency = args.concurrency or SERVING[BASELINE_FORM].max_concurrent_requests
        endpoints.append(Endpoint("baseline", "", "", concurrency, f"served here: {model}"))
    return endpoints, timeout, params


def evaluate_chat(args) -> Path:
    """Steps 1-5 of the docstring; return the run folder."""
    endpoints, timeout, params = endpoints_to_ask(args)
    questions = load_questions(args.test_data, args.questions)
    how = scoring()  # settings checked before any question is sent
    settings = run_settings(args.test_data, questions, endpoints, params)
    run_dir = open_run(args.out, settings, args.fresh)
    seconds = {}
    for endpoint in endpoints:
        answers = run_dir / f"answers-{endpoint.name}.jsonl"
        if endpoint.url or len(kept_answers(answers)) == len(questions):
            seconds[endpoint.name] = collect_answers(endpoint, questions, answers, timeout, params)
            continue
        model_dir = baseline_mlflow_model(args.baseline, args.out / "baseline-models")
        with served_baseline(model_dir, run_dir) as (url, key):
            endpoint.url, endpoint.key = url, key
            seconds[endpoint.name] = collect_answers(endpoint, questions, answers, timeout, params)
    results = {e.name: score(e, run_dir / f"answers-{e.name}.jsonl", run_dir, how) for e in endpoints}
    text, differences = report(results, how, seconds, args.show)
    print(f"\n== {len(questions)} questions of {args.test_data}\n{text}")
    (run_dir / "table.txt").write_text(text + "\n", encoding="utf-8")
    (run_dir / "results.json").write_text(json.dumps({
        "settings": settings, "metrics": {name: r["metrics"] for name, r in results.items()},
        "answer_seconds": seconds, "judge_tokens": judge_tokens(results), "largest_differences": differences,
        "left_out": how.left_out,
        "studio_urls": {name: r.get("studio_url") for name, r in results.items()},
        "endpoints": [{**asdict(e), "key": None} for e in endpoints],
    }, indent=2, default=str), encoding="utf-8")
    run_id = log_to_mlflow(run_dir, settings, results, how)
    print(f"\nResults: {display(run_dir)} (results.json, table.txt, the answers); MLflow run {run_id}")
    return run_dir


def main(argv=None):
    args = parse_args(argv)
    quiet_logs()
    try:
        return evaluate_chat(args)
    except EvaluationStopped as e:
        sys.exit(f"evaluate_chat.py: {e}")
    except KeyboardInterrupt:
        sys.exit("evaluate_chat.py: stopped; the answers collected so far are kept: run the same command again to continue")


if __name__ == "__main__":
    main()
