"""The whole tutorial, run in order on this machine: no Azure account, no GPU, no Hub needed.

Each step is the learner's own command, printed before it runs:
  1. download_dataset.py: the real ultrachat subset when the Hub answers (the tutorial's CPU
     tip, train_sft[:10]); otherwise ultrachat-shaped sample chats made on the spot.
  2. setup_ml.py --local: the Azure job's fine_tune.py command, run here, on a tiny Phi-3 model
     built from a config (unless --model-name names another) into outputs/models/<run>/model.

    make local            # sets up .venv first
    python -m local.pipeline --model-name microsoft/Phi-3.5-mini-instruct
"""

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ROOT / "outputs"
SAMPLE_CHATS = ROOT / "data" / "sample_chats.jsonl"


def run(step: str, command: list, check: bool = True) -> subprocess.CompletedProcess:
    print(f"\n== {step}\n$ {shlex.join(map(str, command))}", flush=True)
    return subprocess.run([str(c) for c in command], cwd=ROOT, check=check)


def prepare_data(split: str) -> None:
    python = sys.executable
    if run("Step 1: download the data", [python, "download_dataset.py", "--split", split], check=False).returncode:
        print("The Hugging Face Hub could not be reached: using ultrachat-shaped sample chats instead.")
        run("Step 1b: make sample chats", [python, "-m", "local.sample_chats", "--out", SAMPLE_CHATS])
        run("Step 1c: split them", [python, "download_dataset.py", "--dataset", SAMPLE_CHATS, "--split", "train"])


def fine_tune(model_name: str | None) -> None:
    command = [sys.executable, "setup_ml.py", "--local"]
    run("Step 2: fine-tune (setup_ml.py --local)", command + (["--model-name", model_name] if model_name else []))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model-name", help="model to fine-tune (Hub id or folder); default: a tiny Phi-3 built on the spot"
    )
    parser.add_argument("--split", default="train_sft[:10]", help="split to take from the Hub (default: the tutorial's CPU tip)")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{OUTPUTS / 'mlflow.db'}")
    OUTPUTS.mkdir(exist_ok=True)

    try:
        prepare_data(args.split)
        fine_tune(args.model_name)
    except subprocess.CalledProcessError as e:
        sys.exit(f"local pipeline: step failed with exit code {e.returncode}: {shlex.join(map(str, e.cmd))}")
    print("\nDone. The fine-tuned MLflow model is the newest outputs/models/<run>/model")


if __name__ == "__main__":
    main()
