"""Shared fixtures: an isolated environment, a tiny Phi-3 model, sample chats, a fine-tuned model.

Everything is made offline here: the model from a config, the tokenizer trained locally, the
data from stand_ins/sample_chats.py. Tools keep their state under a per-session scratch folder,
never in `~` or the working tree.
"""

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "finetuning_dir"))  # fine_tune.py's own imports (evaluation, chat_data)

from stand_ins import sample_chats, tiny_phi3  # noqa: E402
from stand_ins.tiny_phi3 import TINY_TRAINING_FLAGS  # noqa: E402,F401


def is_a_setting(name: str) -> bool:
    """Whether config.py or the flow may read this environment variable: every AZURE_* name (the flow's
    AZURE_ML_TEMPERATURE and AZURE_ML_MAX_NEW_TOKENS too), the data paths, and step 4b's token and trace
    collector (DEVUI_*, OTEL_*). The tests start from the tutorial's placeholders, never from a developer's
    shell or .env."""
    return name.startswith(("AZURE_", "DEVUI_", "OTEL_")) or name in ("TRAIN_DATA_PATH", "TEST_DATA_PATH")



# Every process the tests start carries this in its environment; the session ends by checking
# that none of them is still running.
RUN_MARKER = "FINETUNE_PHI_TEST_RUN"


def pytest_configure(config):
    scratch = Path(os.environ.get("FINETUNE_PHI_TEST_SCRATCH", ROOT / ".scratch" / "tests"))
    if "PYTEST_XDIST_WORKER" in os.environ:  # each worker process keeps its own stores (SQLite, caches)
        scratch = scratch / os.environ["PYTEST_XDIST_WORKER"]
        os.environ["FINETUNE_PHI_TEST_SCRATCH"] = str(scratch)
        # One torch thread per worker and per process it starts: the workers share the cores, and two
        # workers' thread pools, each as wide as the machine, spin against each other.
        threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        os.environ.setdefault("MKL_NUM_THREADS", str(threads))
        import torch  # already imported (stand_ins), so the variable came too late for this process

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    scratch.mkdir(parents=True, exist_ok=True)
    for name in [name for name in os.environ if is_a_setting(name)]:
        os.environ.pop(name)
    os.environ.update(
        {RUN_MARKER: uuid.uuid4().hex},
        FINETUNE_PHI_ENV_FILE=str(scratch / "absent.env"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(scratch / "hf"),
        PF_HOME_DIRECTORY=str(scratch / "promptflow"),
        MLFLOW_DISABLE_TELEMETRY="true",
        APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED="true",  # before promptflow is imported: see chat/pf_home.py
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    # Each run of the suite starts from an empty env file and MLflow store, with artifacts in scratch.
    for stale in (scratch / "absent.env", scratch / "mlflow.db"):
        stale.unlink(missing_ok=True)
    shutil.rmtree(scratch / "mlartifacts", ignore_errors=True)
    from local import mlflow_store

    os.environ.update(mlflow_store.prepare(scratch / "mlflow.db", scratch / "mlartifacts"))


def pytest_sessionfinish(session, exitstatus):
    """Fail the run, and stop them, if processes the tests started outlived it."""
    import psutil

    marker = os.environ.get(RUN_MARKER)
    left = []
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and process.environ().get(RUN_MARKER) == marker:
                left.append(process)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    if left:
        names = "; ".join(" ".join(p.cmdline())[:120] for p in left if p.is_running())
        for process in left:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        print(f"\nProcesses started by the tests were still running (stopped now): {names}", file=sys.stderr)
        session.exitstatus = 1


def run_script(args, cwd, env=None, timeout=600):
    """Run a project script with the test interpreter; return the CompletedProcess."""
    return subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_main(main, args, cwd) -> subprocess.CompletedProcess:
    """A script's main(argv) in this process, answering as run_script would (exit status, stdout,
    stderr): for its error paths, where a new process would spend seconds importing torch or datasets.
    The settings it changes end with it, as its process would (a benchmark points MLflow at a store it
    deletes on the way out)."""
    out, err = io.StringIO(), io.StringIO()
    here, environment = os.getcwd(), dict(os.environ)
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([str(arg) for arg in args])
                code = 0
            except SystemExit as stop:  # sys.exit("message") prints it and exits 1, as Python does
                if isinstance(stop.code, str):
                    print(stop.code, file=sys.stderr)
                code = 1 if isinstance(stop.code, str) else stop.code or 0
    finally:
        os.chdir(here)
        os.environ.clear()
        os.environ.update(environment)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def options_without_help(parse) -> list[str]:
    """The arguments, -h/--help aside, of the ArgumentParser that `parse(argv)` builds (a script's
    parse_args or main) that have no help text: [] when `--help` explains every one. The parser is
    caught when it starts parsing, so nothing after it runs."""
    caught = []

    def catch(self, args=None, namespace=None):  # parse_args and HfArgumentParser's dataclasses both call it
        caught.append(self)
        raise SystemExit(0)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_known_args", catch)
        with pytest.raises(SystemExit):
            parse([])
    assert caught, f"{parse} built no ArgumentParser"
    return [action.option_strings[0] if action.option_strings else action.dest
            for action in caught[0]._actions if action.dest != "help" and not action.help]


def one_line_naming(message: str, *facts: str) -> None:
    """An error as the learner meets it: one line that names each of `facts` (a file, a number, a command)."""
    lines = message.strip().splitlines()
    assert len(lines) == 1, message
    assert [fact for fact in facts if fact not in lines[0]] == [], lines[0]


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny, untrained Phi-3 model and tokenizer folder."""
    return built_once(tmp_path_factory, "tiny-phi3", tiny_phi3.build)


@pytest.fixture(scope="session")
def chat_files(tmp_path_factory) -> tuple[Path, Path]:
    """Ultrachat-shaped train (160 rows) and test (40 rows) JSONL files."""
    def write(folder):
        rows = sample_chats.make_rows(200, seed=0)
        write_jsonl(folder / "train.jsonl", rows[:160]), write_jsonl(folder / "test.jsonl", rows[160:])

    folder = built_once(tmp_path_factory, "chats", write)
    return folder / "train.jsonl", folder / "test.jsonl"


def fine_tune(model_dir, train, test, out, *flags, cwd=None, env=None):
    """Run finetuning_dir/fine_tune.py as the Azure job would; return the CompletedProcess."""
    cwd = cwd or out.parent
    return run_script(
        [ROOT / "finetuning_dir" / "fine_tune.py", "--model-name", model_dir, "--train-file", train,
         "--eval-file", test, "--model_output_dir", out, "--checkpoint_dir", cwd / "checkpoints", *flags],
        cwd=cwd, env=env,
    )


def built_once(tmp_path_factory, name: str, build) -> Path:
    """`build(folder)` once for the whole run, by whichever worker process asks first (the others wait
    for it): the suite runs on two xdist workers, and a fine-tune done twice would cost both cores."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        root = root.parent  # the run's folder, above each worker's own
    folder = root / name
    with FileLock(str(root / f"{name}.lock")):
        if not (root / f"{name}.built").exists():
            build(folder)
            (root / f"{name}.built").touch()
    return folder


@pytest.fixture(scope="session")
def learning_setup(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(model, train, test) for runs at the tutorial's learning rate: a wider tiny Phi-3 (hidden 256,
    2 layers; AdamW's lr-sized steps move its outputs enough to see in ~120 steps) and 800/200 chats."""
    folder = tmp_path_factory.mktemp("learning")
    model = tiny_phi3.build(folder / "model", hidden_size=256, layers=2)
    rows = sample_chats.make_rows(1000, seed=1)
    return model, write_jsonl(folder / "train.jsonl", rows[:800]), write_jsonl(folder / "test.jsonl", rows[800:])


@pytest.fixture(scope="session")
def fine_tuned_model(tmp_path_factory, tiny_model_dir, chat_files) -> Path:
    """An MLflow model folder written by a full fine_tune.py run on the tiny model, once for the run.
    Its MLflow run is in its own store beside it (tracking_uri_of)."""
    from local import mlflow_store

    def train(folder):
        folder.mkdir()
        store = mlflow_store.prepare(folder / "mlflow.db", folder / "mlartifacts")
        result = fine_tune(tiny_model_dir, *chat_files, folder / "model", *TINY_TRAINING_FLAGS, env=store)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    return built_once(tmp_path_factory, "fine-tuned", train) / "model"


def tracking_uri_of(model_dir: Path) -> str:
    """The MLflow store of the run that wrote a model (the fine_tuned_model fixture's own, or the session's)."""
    own = model_dir.parent / "mlflow.db"
    return f"sqlite:///{own}" if own.exists() else os.environ["MLFLOW_TRACKING_URI"]


# The files that take longest, started first: the workers then end together, on the short files.
LONGEST_FIRST = ("test_requirements.py", "test_fine_tune.py", "test_phi4.py", "test_benchmarks.py",
                 "test_endpoint.py", "test_evaluate_chat_baseline.py", "test_setup_ml.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: each file keeps its order
