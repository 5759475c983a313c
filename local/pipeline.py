"""The whole tutorial, run in order on this machine: no Azure account, no GPU, no Hub needed.

Each step is the learner's own command, printed before it runs:
  1. download_dataset.py: the real ultrachat subset when the Hub answers (the tutorial's CPU
     tip, train_sft[:10]); otherwise ultrachat-shaped sample chats made on the spot.
  2. setup_ml.py --local: the Azure job's fine_tune.py command, run here, on a tiny Phi-3 model
     built from a config (--model phi4: a tiny Phi-4-mini; --model-name: another model) into
     outputs/models/<run>/model.
     It also writes the model's int4 ONNX serving form beside it (outputs/models/<run>/model-int4).
  3. deploy_model.py --local: each form behind a local endpoint with the Azure managed online
     endpoint's scoring contract, in the background (its URI and key go to .env), the
     transformers model first, then the int4 form that deploy_model.py serves by default;
  4. pf flow test: one question through the tutorial's Prompt flow to each; then 4b, the same
     question to the int4 endpoint through the chat on Microsoft Agent Framework (served from
     .venv-agent, asked through its OpenAI-compatible API, stopped);
  5. evaluate_model.py: each test conversation's loss under the fine-tuned model and its base, one
     paired table (the row that shows learning); evaluate_chat.py: the first questions of the test
     data through the flow's call to the int4 endpoint and to the base model (served for the run),
     scored offline with azure-ai-evaluation, one table of both. Each endpoint is stopped
     afterwards (--keep-endpoint leaves the int4 one running) and the way to the chat page is shown.

    make local            # sets up .venv first
    make local MODEL=phi4 # the same with a tiny Phi-4-mini
    python -m local.pipeline --model-name microsoft/Phi-3.5-mini-instruct
"""

import argparse
import importlib
import os
import shlex
import subprocess
import sys
from pathlib import Path

from config import ROOT
from local import mlflow_store
from chat.ask_agent import ask_the_agent
from chat.ask_flow import ask_the_flow
from serving import local_endpoint, processes

OUTPUTS = ROOT / "outputs"
SAMPLE_CHATS = ROOT / "data" / "sample_chats.jsonl"
QUESTION = "Who founded Microsoft?"
# The tiny models step 2 builds when no --model-name is given (--model), and what the table calls them.
STAND_INS = {"phi3": "stand_ins.tiny_phi3", "phi4": "stand_ins.tiny_phi4"}  # imported when used: they load torch
STAND_IN_NAMES = {"phi3": "Phi-3", "phi4": "Phi-4-mini"}
CHAT_HOW_TO = """
To chat with the model in your browser, in two terminals:
  . .venv/bin/activate
  python deploy_model.py --local                                           # terminal 1: the int4 endpoint (Ctrl-C stops it)
  pf flow serve --source ./ --port 8080 --host localhost --engine fastapi  # terminal 2: the flow and its chat page
then open http://localhost:8080/ (or POST {{"input_data": "..."}} to http://localhost:8080/score).
The same chat on Microsoft Agent Framework, in a terminal of its own:
  .venv-agent/bin/python -m chat.serve_agent                               # page http://localhost:8090/, API /v1{running}"""


def run(step: str, command: list, check: bool = True) -> subprocess.CompletedProcess:
    print(f"\n== {step}\n$ {shlex.join(map(str, command))}", flush=True)
    return subprocess.run([str(c) for c in command], cwd=ROOT, check=check)


def prepare_data(split: str) -> bool:
    """Step 1; whether it fell back on the sample chats."""
    python = sys.executable
    if not run("Step 1: download the data", [python, "download_dataset.py", "--split", split], check=False).returncode:
        return False
    print("The Hugging Face Hub could not be reached: using ultrachat-shaped sample chats instead.")
    run("Step 1b: make sample chats", [python, "-m", "stand_ins.sample_chats", "--out", SAMPLE_CHATS])
    run("Step 1c: split them", [python, "download_dataset.py", "--dataset", SAMPLE_CHATS, "--split", "train"])
    return True


def fine_tune(model_name: str | None, stand_in: str) -> None:
    """Step 2; without `model_name`, on the tiny stand-in `stand_in` (setup_ml.py --local builds the Phi-3 one)."""
    command = [sys.executable, "setup_ml.py", "--local"]
    if not model_name and stand_in != "phi3":
        from stand_ins.tiny_phi3 import TINY_TRAINING_FLAGS

        tiny = importlib.import_module(STAND_INS[stand_in])
        if not (tiny.TINY_MODEL_DIR / "config.json").exists():
            tiny.build(tiny.TINY_MODEL_DIR)
        command += ["--model-name", tiny.TINY_MODEL_DIR, "--", *TINY_TRAINING_FLAGS]
    elif model_name:
        command += ["--model-name", model_name]
    run("Step 2: fine-tune (setup_ml.py --local)", command)


def start_endpoint(port: int, model_dir: Path | None = None, form: str = "int4") -> processes.Server:
    """`deploy_model.py --local` (default: the newest local model of `form`) in the background, once it is live."""
    log = OUTPUTS / f"local-endpoint-{form}.log"
    print(f"\n== Step 3: serve the {form} model at a local endpoint (in the background; log: "
          f"{os.path.relpath(log, ROOT)})\n$ {shlex.join(local_endpoint.learner_command(port, form, model_dir))}",
          flush=True)
    try:
        endpoint = local_endpoint.start_in_background(port, form, model_dir, log, progress=f"Loading the {form} model")
    except processes.NotLive as e:
        sys.exit(f"local pipeline: the local endpoint {str(e).splitlines()[0]}; see {os.path.relpath(log, ROOT)}")
    print(f"The endpoint is live at {endpoint.url} (URI and key written to .env).")
    return endpoint


def serve_and_ask(port: int, keep_endpoint: bool, question: str = QUESTION, model_dir: Path | None = None,
                  form: str = "int4") -> tuple[str, processes.Server]:
    """Steps 3 and 4 for one form of the model; the endpoint is stopped afterwards unless asked to keep it."""
    endpoint = start_endpoint(port, model_dir, form)
    try:
        answer = ask_the_flow(question, outputs=OUTPUTS)
    finally:
        if not keep_endpoint:
            endpoint.stop()  # deploy_model.py --local stops its server on SIGTERM
    print(f"\nQ: {question}\nA ({form}): {answer}")
    return answer, endpoint


def what_the_table_shows(sample_chats: bool, stand_in: str = "phi3") -> str:
    """The caption of make local's step-5 table: what it proves, and what it does not."""
    shared = (" The sample chats' test questions repeat the same facts as the training ones, word for word (both "
              "splits share them)," if sample_chats else " The model was trained until it repeats its training chats,")
    return (f"What this shows: a tiny {STAND_IN_NAMES[stand_in]} fine-tuned here against its untrained base, whose "
            "weights are random."
            + shared + " so the table proves that the steps work together, not that fine-tuning helps; "
            "docs/evaluation.md shows a real comparison.")


def what_the_loss_shows(sample_chats: bool) -> str:
    """The caption of make local's test-loss table: the row that shows learning."""
    return ("What this shows: each test conversation's loss under the fine-tuned model and under its base. A lower "
            "loss on most conversations, at p < 0.05, shows that fine-tuning taught the model something about chats "
            "it was not trained on" + (" (here the sample chats' facts, which both splits share)" if sample_chats else "")
            + "; the answers' table below shows what a user of the chat sees.")


def evaluate_the_chat(base_model: str, questions: int, sample_chats: bool = True, form: str = "int4",
                      fine_tuned: Path | None = None, stand_in: str = "phi3") -> None:
    """Step 5 while the endpoint of `form` is live (.env points at it): the fine-tuned model against its base,
    served in the same form; first, with `fine_tuned` (its MLflow model folder), the test loss of each
    conversation under both."""
    import config

    if fine_tuned is not None:
        command = [sys.executable, "finetuning_dir/evaluate_model.py", "--model", fine_tuned, "--baseline", base_model,
                   "--eval-file", config.current_setting("TEST_DATA_PATH"), "--questions", "0",
                   "--caption", what_the_loss_shows(sample_chats)]
        if run("Step 5: the test loss, conversation by conversation", command, check=False).returncode:
            sys.exit(f"local pipeline: the test-loss comparison failed: {shlex.join(map(str, command))}")
    # Greedy decoding: the tiny model's best answers, and the same table every run.
    command = [sys.executable, "evaluate_chat.py", "--questions", str(questions), "--temperature", "0",
               "--form", form, "--baseline", str(base_model), "--fresh", "--out", OUTPUTS / "evaluations",
               "--caption", what_the_table_shows(sample_chats, stand_in)]
    try:
        run("Step 5: evaluate the chat's answers against the base model's", command)
    except subprocess.CalledProcessError as e:
        sys.exit(f"local pipeline: the evaluation failed with exit code {e.returncode}: {shlex.join(map(str, command))}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model-name", help="model to fine-tune (Hub id or folder); default: the tiny --model built on the spot"
    )
    parser.add_argument("--model", choices=STAND_INS, default="phi3",
                        help="without --model-name, the tiny model built on the spot: phi3 (Phi-3.5-mini's shape) or "
                             "phi4 (Phi-4-mini's); make local MODEL=phi4 (default: phi3)")
    parser.add_argument("--split", default="train_sft[:10]", help="split to take from the Hub (default: the tutorial's CPU tip)")
    parser.add_argument("--port", type=int, default=5001, help="port of the local endpoint (default: 5001)")
    parser.add_argument("--keep-endpoint", action="store_true",
                        help="leave the local endpoint running at the end, ready for `pf flow serve`")
    parser.add_argument("--eval-questions", type=int, default=20,
                        help="questions of the test data step 5 asks both models (default: 20; 0 skips step 5)")
    args = parser.parse_args(argv)
    os.environ.update(mlflow_store.unless_set(OUTPUTS))  # every step's runs in one store
    OUTPUTS.mkdir(exist_ok=True)

    try:
        sample_chats = prepare_data(args.split)
        fine_tune(args.model_name, args.model)
    except subprocess.CalledProcessError as e:
        sys.exit(f"local pipeline: step failed with exit code {e.returncode}: {shlex.join(map(str, e.cmd))}")
    print("\nThe fine-tuned MLflow model is the newest outputs/models/<run>/model, its int4 form .../model-int4")
    serve_and_ask(args.port, keep_endpoint=False, form="transformers")
    _, endpoint = serve_and_ask(args.port, keep_endpoint=True, form="int4")
    try:
        print(f"\nQ: {QUESTION}\nA (int4, Agent Framework): {ask_the_agent(QUESTION, OUTPUTS)}")
        if args.eval_questions:
            base = args.model_name or importlib.import_module(STAND_INS[args.model]).TINY_MODEL_DIR  # step 2's base
            evaluate_the_chat(base, args.eval_questions, sample_chats, stand_in=args.model,
                              fine_tuned=local_endpoint.latest_local_model())
    finally:
        if not args.keep_endpoint:
            endpoint.stop()
    pid = endpoint.process.pid
    running = (f"\n\nThe int4 endpoint is still running (pid {pid}, port {args.port}): skip terminal 1, "
               f"and stop it with `kill {pid}`." if args.keep_endpoint else "")
    print(CHAT_HOW_TO.format(running=running))


if __name__ == "__main__":
    main()
