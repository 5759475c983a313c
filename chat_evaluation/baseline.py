"""The model before fine-tuning, served here for the run in the form the fine-tuned one is served in.

Like against like: the fine-tuned model is deployed in its int4 form by default, so the base is
compared in its int4 form too, made by the same quantize_model.py and served by the same scoring
script; the difference then is the fine-tuning's alone, not fine-tuning plus quantization.
"""

import contextlib
import hashlib
import subprocess
import sys
from pathlib import Path

from chat_evaluation import EvaluationStopped
from chat_evaluation.collect import display
from config import ROOT
from serving import local_endpoint, processes
from serving.forms import FORMS

# The untrained model as fine_tune.py saves a fine-tuned one: the same MLflow flavour, signature and template.
WRITE_MLFLOW_MODEL = """
import sys, fine_tune
name, out = sys.argv[1], sys.argv[2]
model, tokenizer = fine_tune.initialize_model_and_tokenizer(name, {"dtype": fine_tune.saved_dtype(name)}, 2048)
fine_tune.save_mlflow_model(model, tokenizer, out)
"""


def mlflow_model(model: str, cache: Path) -> Path:
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
    # In a process of its own: fine_tune.py's imports (torch, transformers, TRL) stay out of this one.
    result = subprocess.run([sys.executable, "-c", WRITE_MLFLOW_MODEL, model, str(folder)], cwd=ROOT / "finetuning_dir",
                            capture_output=True, text=True)
    if result.returncode:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()] or ["no output"]
        raise EvaluationStopped(f"--baseline {model}: could not load it ({lines[-1].strip()})")
    return folder


def in_form(model_dir: Path, form: str, cache: Path) -> Path:
    """The MLflow model folder of `model_dir` in `form`: itself for transformers; for int4, its conversion by
    quantize_model.py (as the fine-tuned model's job converts it), made once into `cache`."""
    if form == "transformers":
        return model_dir
    digest = hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:8]
    int4_dir = cache / f"{model_dir.name}-{digest}-{FORMS['int4'].local_folder}"
    if (int4_dir / "MLmodel").is_file():
        return int4_dir
    log = int4_dir.with_name(int4_dir.name + ".log")
    cache.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "quantize_model.py", "--model-dir", str(model_dir), "--output-dir", str(int4_dir)]
    print(f"Writing the baseline's int4 form into {display(int4_dir)} (once), with quantize_model.py, as the job "
          f"writes the fine-tuned model's (log: {display(log)}) ...", flush=True)
    with open(log, "w", encoding="utf-8") as out:
        result = subprocess.run(command, cwd=ROOT / "finetuning_dir", stdout=out, stderr=subprocess.STDOUT)
    if result.returncode:
        last = (log.read_text(encoding="utf-8").strip().splitlines() or ["no output"])[-1]
        raise EvaluationStopped(f"the baseline's int4 conversion failed: {last}; see {display(log)}")
    return int4_dir


@contextlib.contextmanager
def served(model_dir: Path, form: str, run_dir: Path):
    """`deploy_model.py --local` on the baseline, on a free port, for the length of the block; yields (url, key).

    It writes its URI and key to a .env of its own in the run folder: the learner's .env keeps pointing at the
    fine-tuned endpoint. The server is stopped however the block ends: an error, Ctrl-C, or SIGTERM (main() turns
    it into KeyboardInterrupt)."""
    port, env_file, log = processes.free_port(), run_dir / "baseline.env", run_dir / "baseline-endpoint.log"
    print(f"Serving the baseline {display(model_dir)} ({form}) at http://127.0.0.1:{port}/score (log: {display(log)}) ...",
          flush=True)
    try:
        server = local_endpoint.start_in_background(port, form, model_dir, log, env_file)
    except processes.NotLive as e:
        raise EvaluationStopped(f"the baseline's local endpoint {str(e).splitlines()[0]}; see {display(log)}")
    with server:
        print(f"The baseline is live after {server.live_s:.0f} s.", flush=True)
        yield server.url, server.key
