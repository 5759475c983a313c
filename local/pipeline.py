"""The whole tutorial, run in order on this machine: no Azure account, no GPU, no Hub needed.

Each step is the learner's own command, printed before it runs:
  1. download_dataset.py: the real ultrachat subset when the Hub answers (the tutorial's CPU
     tip, train_sft[:10]); otherwise ultrachat-shaped sample chats made on the spot.
  2. a tiny Phi-3 model built from a config (unless --model-name names another model);
  3. fine-tuning with finetuning_dir/fine_tune.py into outputs/models/<run>/ (an MLflow model).

    make local            # sets up .venv first
    python -m local.pipeline --model-name microsoft/Phi-3.5-mini-instruct
"""

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from config import TEST_DATA_PATH, TRAIN_DATA_PATH
from local.tiny_phi3 import TINY_TRAINING_FLAGS

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ROOT / "outputs"
TINY_MODEL = OUTPUTS / "tiny-phi3"
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


def prepare_model(model_name: str | None) -> tuple[str, list[str]]:
    """The model to fine-tune and the training flags that suit it."""
    if model_name:
        return model_name, []
    if not (TINY_MODEL / "config.json").exists():
        run("Step 2: build a tiny Phi-3 model", [sys.executable, "-m", "local.tiny_phi3", "--out", TINY_MODEL])
    return str(TINY_MODEL), TINY_TRAINING_FLAGS


def fine_tune(model_name: str, flags: list[str]) -> Path:
    run_dir = OUTPUTS / "models" / time.strftime("%Y%m%d-%H%M%S")
    run(
        "Step 3: fine-tune",
        [sys.executable, "finetuning_dir/fine_tune.py", "--model-name", model_name,
         "--train-file", TRAIN_DATA_PATH, "--eval-file", TEST_DATA_PATH,
         "--model_output_dir", run_dir / "model", "--checkpoint_dir", run_dir / "checkpoints", *flags],
    )
    return run_dir / "model"


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
        model_dir = fine_tune(*prepare_model(args.model_name))
    except subprocess.CalledProcessError as e:
        sys.exit(f"local pipeline: step failed with exit code {e.returncode}: {shlex.join(map(str, e.cmd))}")
    print(f"\nDone. The fine-tuned MLflow model is in {model_dir.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
