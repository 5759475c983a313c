"""Step 5: evaluate the chat's answers: is the fine-tuned model better than its base, and still safe?

The Cookbook's follow-up tutorial ("Evaluate the fine-tuned Phi-3 / Phi-3.5 model in Azure AI Foundry")
scores the model's answers with Microsoft's evaluators. This script does it with the same library,
azure-ai-evaluation, from this machine:
  1. it reads the first --questions conversations of the test data (TEST_DATA_PATH): the first user
     turn of each is the question, the first assistant turn its reference answer;
  2. it asks them of the endpoint in .env (AZURE_ML_ENDPOINT, AZURE_ML_API_KEY; local or Azure) through
     the Prompt flow's own call (chat/endpoint.py: the same prompt, params, timeout, retries and error
     messages), or with --chat agent through the Agent Framework chat (served for the run, asked with
     openai), as many at once as the deployment of its form admits;
  3. it asks the same of the model before fine-tuning, like against like: --baseline MODEL is served
     here for the run in the form the fine-tuned model is served in (int4 by default: made by
     quantize_model.py, served by the same scoring script), with the same params, greedy by default;
     or --baseline-endpoint URL;
  4. it scores each set of answers with azure-ai-evaluation's evaluate() (chat_evaluation/scoring.py);
  5. it prints one table: per metric, each model's mean over the questions both were scored on, the
     paired difference with its 95% bootstrap interval ("within noise" when it spans 0), the questions
     won, tied and lost, and how many each model was scored on; then the answers that differ most.
     Everything goes to outputs/evaluations/<time>/ and to an MLflow run.

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
from config import ROOT
from chat_evaluation import EvaluationStopped, baseline, collect, report, scoring
from chat_evaluation.collect import Endpoint, display
from serving.forms import FORMS

OUTPUTS = ROOT / "outputs"
DEFAULT_QUESTIONS = 20
SHOW_DIFFERENCES = 3


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", default=str(DEFAULT_QUESTIONS),
                        help=f"how many questions of the test data to ask, from the first, or 'all' (default: "
                             f"{DEFAULT_QUESTIONS}; fewer when the data has fewer)")
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
    parser.add_argument("--form", choices=sorted(FORMS), default="int4",
                        help="the form the fine-tuned endpoint serves (deploy_model.py --form); questions go to it as "
                             "many at a time as that form answers best (serving/forms.py: int4 6, answered together; "
                             "transformers 1, answered in turn) (default: int4)")
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
    args.baseline_form = args.baseline_form or args.form
    return args


def endpoints_to_ask(args) -> tuple[list[Endpoint], float]:
    """The fine-tuned endpoint and the baseline's, with the same params (a served baseline's URL and key come once
    it is live); the chat's own settings, checked as the chat checks them."""
    from chat.endpoint import EndpointError, endpoint_settings

    comparing = bool(args.baseline or args.baseline_endpoint)
    temperature = 0 if args.temperature is None and comparing else args.temperature
    try:
        url, key, timeout, params = endpoint_settings(temperature, args.max_new_tokens)
    except EndpointError as e:
        raise EvaluationStopped(str(e)) from None
    fine_tuned = Endpoint("fine-tuned", url, key, args.concurrency or FORMS[args.form].questions_at_once, url,
                          args.form, "the fine-tuned model at AZURE_ML_ENDPOINT", params)
    endpoints = [fine_tuned]
    concurrency = args.baseline_concurrency or FORMS[args.baseline_form].questions_at_once
    if args.baseline_endpoint:
        key = scoring.configured("AZURE_ML_BASELINE_API_KEY")
        if key is None:
            raise EvaluationStopped("--baseline-endpoint needs its key: set AZURE_ML_BASELINE_API_KEY in .env or export it")
        endpoints.append(Endpoint("baseline", args.baseline_endpoint, key, concurrency, args.baseline_endpoint,
                                  args.baseline_form, f"the model at {args.baseline_endpoint}", params))
    elif args.baseline:
        model = str(Path(args.baseline).resolve()) if Path(args.baseline).exists() else args.baseline
        endpoints.append(Endpoint("baseline", "", "", concurrency, f"served here ({args.baseline_form}): {model}",
                                  args.baseline_form, model, params))
    return endpoints, timeout


@contextlib.contextmanager
def asked_through(chat: str, endpoint: Endpoint, timeout: float, run_dir: Path):
    """For the block, `endpoint` is asked through the Agent Framework chat (served for it) when --chat agent."""
    if chat == "flow":
        yield
        return
    from chat.endpoint import EndpointError
    from local.ask_agent import agent_chat

    try:
        with agent_chat(collect.chat_settings(endpoint, timeout), run_dir / f"agent-chat-{endpoint.name}.log") as served:
            endpoint.through = served.ask
            yield
    except EndpointError as e:
        raise EvaluationStopped(str(e)) from None
    finally:
        endpoint.through = None


def collect_all(args, endpoints, questions, run_dir, timeout) -> dict[str, float]:
    """Every endpoint's answers; a --baseline is served for as long as it is asked, and stopped however that ends."""
    seconds = {}
    for endpoint in endpoints:
        answers = run_dir / f"answers-{endpoint.name}.jsonl"
        if len(collect.kept_answers(answers)) == len(questions):
            seconds[endpoint.name] = collect.collect_answers(endpoint, questions, answers, timeout)
            continue
        with contextlib.ExitStack() as serving:
            if not endpoint.url:
                cache = args.out / "baseline-models"
                model_dir = baseline.in_form(baseline.mlflow_model(args.baseline, cache), endpoint.form, cache)
                endpoint.url, endpoint.key = serving.enter_context(baseline.served(model_dir, endpoint.form, run_dir))
            serving.enter_context(asked_through(args.chat, endpoint, timeout, run_dir))
            seconds[endpoint.name] = collect.collect_answers(endpoint, questions, answers, timeout)
    return seconds


def evaluate_chat(args) -> Path:
    """Steps 1-5 of the docstring; return the run folder."""
    endpoints, timeout = endpoints_to_ask(args)
    questions = collect.load_questions(args.test_data, None if args.questions == "all" else int(args.questions))
    how = scoring.scoring(args.safety_threshold)  # settings checked before any question is sent
    settings = {**collect.run_settings(args.test_data, questions, endpoints), "chat": args.chat}
    run_dir = collect.open_run(args.out, settings, args.fresh)
    seconds = collect_all(args, endpoints, questions, run_dir, timeout)
    results = {e.name: scoring.score(e.name, run_dir / f"answers-{e.name}.jsonl", run_dir, how) for e in endpoints}
    text, found, differences = report.report(results, endpoints, how, seconds, args.show)
    heading = f"== {len(questions)} questions of {args.test_data}" + (f"\n{args.caption}" if args.caption else "")
    print(f"\n{heading}\n{text}")
    (run_dir / "table.txt").write_text(f"{heading}\n{text}\n", encoding="utf-8")
    report.write_results(run_dir, settings, results, found, endpoints, how, seconds, differences)
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
    from local import pf_home

    if "PF_HOME_DIRECTORY" not in os.environ:
        pf_home.use(OUTPUTS / "promptflow")
    os.environ.setdefault("APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED", "true")  # see local/pf_home.py
    os.environ.setdefault("PF_LOGGING_LEVEL", "WARNING")
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("chat.endpoint").setLevel(logging.WARNING)
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
