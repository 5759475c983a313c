"""Step 5: evaluate the chat's answers: is the fine-tuned model better than its base, and still safe?

The Cookbook's follow-up tutorial ("Evaluate the fine-tuned Phi-3 / Phi-3.5 model in Azure AI Foundry")
scores the model's answers with Microsoft's evaluators. This script does it with the same library,
azure-ai-evaluation, from this machine:
  1. it reads the first --questions conversations of the test data (TEST_DATA_PATH): the first user
     turn of each is the question, the first assistant turn its reference answer;
  2. it asks them of the endpoint in .env (AZURE_ML_ENDPOINT, AZURE_ML_API_KEY; local or Azure) through
     the Prompt flow's own call (chat/endpoint_client.py: the same prompt, params, timeout, retries and error
     messages), or with --chat agent through the Agent Framework chat (served for the run, asked with
     openai), as many at once as the deployment of its form admits;
  3. it asks the same of the model before fine-tuning, like against like: --baseline MODEL is served
     here for the run in the form the fine-tuned model is served in (int4 by default: made by
     quantize_model.py, served by the same scoring script), with the same params, greedy by default;
     or --baseline-endpoint URL;
  4. it scores each set of answers with azure-ai-evaluation's evaluate() (chat_evaluation/scoring.py);
     with an Azure AI project, both models also answer --adversarial questions made by the project's
     safety service (azure-ai-evaluation's AdversarialSimulator), scored for safety alone;
  5. it prints one table, the --primary metric first: per metric, each model's mean over the questions
     both were scored on (paired by question), the paired difference with its 95% bootstrap interval,
     the p-value of an exact paired test and the verdict it gives (the secondary metrics' adjusted by
     Holm's method; "too few questions to tell" below 6 questions), the questions won, tied and lost;
     under it, the spread of the primary metric's differences and the questions a clear answer would
     take; then the answers that differ most. Everything goes to outputs/evaluations/<time>/ and to an
     MLflow run.

Answers are appended to answers-<name>.jsonl as they arrive. A run stopped by an error, Ctrl-C or SIGTERM
keeps them (and stops a served baseline); the same command continues it (--fresh starts over).

    python evaluate_chat.py                                          # the endpoint in .env, alone
    python evaluate_chat.py --baseline microsoft/Phi-3.5-mini-instruct   # against the base, served here
    python evaluate_chat.py --baseline-endpoint https://<base>.<region>.inference.ml.azure.com/score
    python evaluate_chat.py --questions all                          # the whole test file

What it costs on Azure (endpoint time, Azure OpenAI tokens) and how to read the table: docs/evaluation.md.
"""

import argparse
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

import config
from chat_evaluation import EvaluationStopped, adversarial, baseline, collect, report, scoring
from chat_evaluation.collect import ChatUnderTest, display
from config import ROOT
from finetuning_dir.paired import MIN_QUESTIONS
from serving.forms import FORMS

OUTPUTS = ROOT / "outputs"
# Enough to tell an F1 difference of about 0.03 (at a per-question SD of 0.08, 8 times in 10), in about 6 minutes
# of answers per model in the int4 form: docs/evaluation.md, "How many questions".
DEFAULT_QUESTIONS = 50
SHOW_DIFFERENCES = 3
DEFAULT_ADVERSARIAL = 20


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", default=str(DEFAULT_QUESTIONS),
                        help=f"how many questions of the test data to ask, from the first, or 'all' (default: "
                             f"{DEFAULT_QUESTIONS}; fewer when the data has fewer)")
    parser.add_argument("--primary", default="f1_score",
                        help="the metric the verdict rests on, named before the run and shown first; the others are "
                             "secondary, their p-values adjusted by Holm's method (default: f1_score; e.g. similarity, "
                             "with a judge)")
    parser.add_argument("--smallest-difference", type=float, default=None,
                        help="the smallest difference in the primary metric that matters to you: the table then says "
                             "how many questions would tell it (default: the difference observed)")
    parser.add_argument("--test-data", default=config.TEST_DATA_PATH,
                        help=f"the chat JSONL file the questions and reference answers come from (default: "
                             f"TEST_DATA_PATH, {config.TEST_DATA_PATH})")
    parser.add_argument("--baseline", metavar="MODEL",
                        help="the model to compare with, served here for the run with `deploy_model.py --local` in "
                             "--baseline-form: an MLflow model folder, a Hugging Face model folder or a Hub id (e.g. "
                             "microsoft/Phi-3.5-mini-instruct, the base the tutorial fine-tunes), written as an MLflow "
                             "model (and its int4 form) once under outputs/evaluations/baseline-models/")
    parser.add_argument("--baseline-endpoint", metavar="URL",
                        help="the model to compare with, at another endpoint with the same /score contract; its key is "
                             "AZURE_ML_BASELINE_API_KEY (environment or .env)")
    parser.add_argument("--form", choices=sorted(FORMS), default=None,
                        help="the form the fine-tuned endpoint serves; questions go to it as many at a time as that form "
                             "answers best (serving/forms.py: int4 6, answered together; transformers 1, answered in "
                             "turn) (default: AZURE_ML_ENDPOINT_FORM, which deploy_model.py writes to .env, else int4)")
    parser.add_argument("--baseline-form", choices=sorted(FORMS), default=None,
                        help="the form the baseline is served or deployed in (default: --form's, like against like; "
                             "another is named as such in the table)")
    parser.add_argument("--chat", choices=("flow", "agent"), default="flow",
                        help="how the questions are asked: flow, the Prompt flow tool's call, in this process; agent, "
                             "through step 4b's Agent Framework chat, served from .venv-agent for the run and asked "
                             "through its OpenAI-compatible API (default: flow)")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="questions sent at once to the fine-tuned endpoint, instead of its form's figure")
    parser.add_argument("--baseline-concurrency", type=int, default=None,
                        help="questions sent at once to the baseline, instead of its form's figure")
    parser.add_argument("--temperature", type=float, default=None,
                        help="sampling temperature of the answers; 0 means greedy (default: 0 when comparing with a "
                             "baseline, so that a rerun gives the same answers; the chat's AZURE_ML_TEMPERATURE alone)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="longest answer, in tokens, instead of the chat's AZURE_ML_MAX_NEW_TOKENS (default 128)")
    parser.add_argument("--safety-threshold", choices=sorted(scoring.SAFETY_LEVELS), default="medium",
                        help="the harm severity from which an answer counts as a defect in the safety metrics, as Azure "
                             "AI Foundry's evaluation names it (low: 2+, medium: 4+, high: 6+ on 0-7; default: medium, "
                             "the Cookbook's)")
    parser.add_argument("--adversarial", type=int, default=DEFAULT_ADVERSARIAL,
                        help=f"with an Azure AI project in .env: adversarial questions from azure-ai-evaluation's "
                             f"AdversarialSimulator asked of both models, their answers scored for safety (default: "
                             f"{DEFAULT_ADVERSARIAL}; 0: none)")
    parser.add_argument("--show", type=int, default=SHOW_DIFFERENCES,
                        help=f"how many of the questions on which the two differ most to print (default: {SHOW_DIFFERENCES})")
    parser.add_argument("--caption", default=None, help="a line printed under the table's heading (what it shows)")
    parser.add_argument("--out", type=Path, default=OUTPUTS / "evaluations",
                        help="folder of the run folders <time>/ (answers, results, table) (default: outputs/evaluations)")
    parser.add_argument("--fresh", action="store_true",
                        help="start a new run even when an unfinished one with the same settings could be continued")
    args = parser.parse_args(argv)
    if args.baseline and args.baseline_endpoint:
        parser.error("--baseline and --baseline-endpoint: choose one")
    if args.questions != "all" and not (args.questions.isdigit() and int(args.questions) >= 1):
        parser.error(f"--questions must be a number, 1 or more, or 'all', got '{args.questions}'")
    for flag, value in (("--concurrency", args.concurrency), ("--baseline-concurrency", args.baseline_concurrency),
                        ("--show", args.show + 1)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be 1 or more")
    if args.adversarial < 0:
        parser.error("--adversarial must be 0 or more")
    if args.smallest_difference is not None and args.smallest_difference == 0:
        parser.error("--smallest-difference must not be 0")
    args.form = args.form or recorded_form(parser)
    args.baseline_form = args.baseline_form or args.form
    return args


def recorded_form(parser) -> str:
    """The form deploy_model.py recorded for the endpoint in .env (AZURE_ML_ENDPOINT_FORM), else int4."""
    form = config.current_setting("AZURE_ML_ENDPOINT_FORM").strip() or "int4"
    if form not in FORMS:
        parser.error(f"AZURE_ML_ENDPOINT_FORM in .env is '{form}', not one of {', '.join(sorted(FORMS))}: redeploy, or "
                     "pass --form")
    return form


def endpoints_to_ask(args) -> tuple[list[ChatUnderTest], float]:
    """The fine-tuned endpoint and the baseline's, with the same params (a served baseline's URL and key come once
    it is live); the chat's own settings, checked as the chat checks them."""
    from chat.endpoint_client import EndpointError, endpoint_settings

    comparing = bool(args.baseline or args.baseline_endpoint)
    temperature = 0 if args.temperature is None and comparing else args.temperature
    try:
        url, key, timeout, params = endpoint_settings(temperature, args.max_new_tokens)
    except EndpointError as e:
        raise EvaluationStopped(str(e)) from None
    fine_tuned = ChatUnderTest("fine-tuned", url, key, args.concurrency or FORMS[args.form].questions_at_once, url,
                          args.form, "the fine-tuned model at AZURE_ML_ENDPOINT", params)
    endpoints = [fine_tuned]
    concurrency = args.baseline_concurrency or FORMS[args.baseline_form].questions_at_once
    if args.baseline_endpoint:
        key = scoring.configured("AZURE_ML_BASELINE_API_KEY")
        if key is None:
            raise EvaluationStopped("--baseline-endpoint needs its key: set AZURE_ML_BASELINE_API_KEY in .env or export it")
        endpoints.append(ChatUnderTest("baseline", args.baseline_endpoint, key, concurrency, args.baseline_endpoint,
                                  args.baseline_form, f"the model at {args.baseline_endpoint}", params))
    elif args.baseline:
        model = str(Path(args.baseline).resolve()) if Path(args.baseline).exists() else args.baseline
        endpoints.append(ChatUnderTest("baseline", "", "", concurrency, f"served here ({args.baseline_form}): {model}",
                                  args.baseline_form, model, params))
    return endpoints, timeout


@contextlib.contextmanager
def asked_through(chat: str, endpoint: ChatUnderTest, timeout: float, run_dir: Path):
    """For the block, `endpoint` is asked through the Agent Framework chat (served for it) when --chat agent."""
    if chat == "flow":
        yield
        return
    from chat.endpoint_client import EndpointError
    from chat.ask_agent import agent_chat

    try:
        with agent_chat(collect.chat_settings(endpoint, timeout), run_dir / f"agent-chat-{endpoint.name}.log") as served:
            endpoint.through = served.ask
            yield
    except EndpointError as e:
        raise EvaluationStopped(str(e)) from None
    finally:
        endpoint.through = None


def collect_all(args, endpoints, question_sets: dict[str, list], run_dir, timeout) -> dict[str, float]:
    """Every endpoint's answers to each set of questions (by the suffix of its answers files: "" for the test
    questions); a --baseline is served for as long as it is asked, and stopped however that ends."""
    seconds = {}
    for endpoint in endpoints:
        files = {run_dir / f"answers-{endpoint.name}{suffix}.jsonl": asked for suffix, asked in question_sets.items() if asked}
        answered = all(len(collect.kept_answers(path)) == len(asked) for path, asked in files.items())
        with contextlib.ExitStack() as serving:
            if not answered and not endpoint.url:
                cache = args.out / "baseline-models"
                model_dir = baseline.in_form(baseline.mlflow_model(args.baseline, cache), endpoint.form, cache)
                endpoint.url, endpoint.key = serving.enter_context(baseline.served(model_dir, endpoint.form, run_dir))
            if not answered:
                serving.enter_context(asked_through(args.chat, endpoint, timeout, run_dir))
            seconds[endpoint.name] = sum(collect.collect_answers(endpoint, asked, path, timeout)
                                         for path, asked in files.items())
    return seconds


def evaluate_chat(args) -> Path:
    """Steps 1-5 of the docstring; return the run folder."""
    endpoints, timeout = endpoints_to_ask(args)
    questions = collect.load_questions(args.test_data, None if args.questions == "all" else int(args.questions))
    how = scoring.scoring(args.safety_threshold)  # settings checked before any question is sent
    if args.primary not in how.evaluators:
        raise EvaluationStopped(f"--primary {args.primary}: not among this run's metrics ({', '.join(how.evaluators)}); "
                                "see the notes on what was left out in docs/evaluation.md, or name another")
    if len(endpoints) == 2 and len(questions) < MIN_QUESTIONS:
        print(f"With {len(questions)} questions no paired test can reach p < 0.05 (it takes {MIN_QUESTIONS}): the "
              "verdicts will read 'too few questions to tell'.")
    print(collect.time_estimate(endpoints, len(questions)), flush=True)
    wanted = args.adversarial if how.project else 0  # the safety service makes them: a project is needed
    settings = {**collect.run_settings(args.test_data, questions, endpoints), "chat": args.chat,
                **({"adversarial": wanted} if wanted else {})}
    run_dir = collect.open_run(args.out, settings, args.fresh)
    hostile = adversarial.adversarial_questions(how.project, how.credential, wanted, run_dir) if wanted else []
    seconds = collect_all(args, endpoints, {"": questions, adversarial.SUFFIX: hostile}, run_dir, timeout)
    results = {e.name: scoring.score(e.name, run_dir / f"answers-{e.name}.jsonl", run_dir, how) for e in endpoints}
    safety = scoring.safety_only(how)
    hostile_results = {e.name: scoring.score(e.name + adversarial.SUFFIX, run_dir / f"answers-{e.name}{adversarial.SUFFIX}.jsonl",
                                             run_dir, safety) for e in endpoints} if hostile else {}
    text, found, differences = report.report(results, endpoints, how, seconds, args.show, args.primary,
                                             args.smallest_difference, hostile_results)
    heading = f"== {len(questions)} questions of {args.test_data}" + (f"\n{args.caption}" if args.caption else "")
    print(f"\n{heading}\n{text}")
    (run_dir / "table.txt").write_text(f"{heading}\n{text}\n", encoding="utf-8")
    report.write_results(run_dir, settings, results, found, endpoints, how, seconds, differences, args.primary)
    from local import mlflow_store

    store = mlflow_store.unless_set(OUTPUTS)
    run_id = report.log_to_mlflow(run_dir, settings, found, list(results), report.judge_tokens(results), store)
    print(f"\nResults: {display(run_dir)} (results.json, table.txt, the answers); MLflow run {run_id}")
    failed = report.unscored(found, list(results))
    if failed:
        raise EvaluationStopped(f"no answer was scored by {', '.join(failed)}: see the first errors above and the "
                                f"evaluate-*.log files in {display(run_dir)}")
    return run_dir


def quiet_the_tools() -> None:
    """promptflow (imported with the flow's code, and by azure-ai-evaluation) reports telemetry from its home unless
    told not to, and its batch engine logs every row: both are quieted, unless the learner chose a home."""
    from chat import pf_home

    if "PF_HOME_DIRECTORY" not in os.environ:
        pf_home.use(OUTPUTS / "promptflow")
    os.environ.setdefault("APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED", "true")  # see chat/pf_home.py
    os.environ.setdefault("PF_LOGGING_LEVEL", "WARNING")
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("chat.endpoint_client").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.ERROR)


def stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # so that every `finally` runs: answers kept, a served baseline stopped


def main(argv=None):
    args = parse_args(argv)
    quiet_the_tools()
    previous = signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        return evaluate_chat(args)
    except EvaluationStopped as e:
        sys.exit(f"evaluate_chat.py: {e}")
    except KeyboardInterrupt:
        sys.exit("evaluate_chat.py: stopped; the answers collected so far are kept: run the same command again to continue")
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
