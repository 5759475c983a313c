"""A local stand-in for the Azure ML managed online endpoint: the fine-tuned model at /score.

It speaks what the tutorial's endpoint speaks: POST /score with `Authorization: Bearer <key>`
and {"input_data": [...], "params": {...}}, answered with a JSON list of strings; GET / is the
liveness probe. The server is azmlinfsrv (azureml-inference-server-http) 1.5.1, the one Azure runs
in every managed online deployment, in its own virtualenv .venv-azmlinfsrv (`make setup` builds
it; see serving/requirements-azmlinfsrv.txt), running serving/scoring/score.py, which answers as Azure's MLflow
scoring does (docs/local-endpoint.md). serving/gateway.py starts it bound
to 127.0.0.1 and checks the key, as Azure's gateway does; the key travels in plain HTTP here.

The key is a fresh random one, or the one in .env when .env already points at a local endpoint
(so a restarted endpoint keeps its key); the scoring URI and the key are written to .env as
AZURE_ML_ENDPOINT / AZURE_ML_API_KEY, where the Prompt flow reads them. An Azure endpoint's values
there are replaced; `python deploy_model.py --connect` writes them back, with no redeploy.

Ctrl-C or SIGTERM stops the server and its workers within seconds, whatever they are doing.

    python deploy_model.py --local                        # the learner's command
    python -m serving.local_endpoint --model-dir outputs/models/<run>/model --port 5001
"""

import argparse
import os
import secrets
import signal
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import config
from config import ROOT
from serving import processes
from serving.forms import FORMS, PROBE_THREADS, scoring_env, worker_threads

MODELS = ROOT / "outputs" / "models"
SCORE_SCRIPT = ROOT / "serving" / "scoring" / "score.py"
AZMLINFSRV_VENV = ROOT / ".venv-azmlinfsrv"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def latest_local_model(folder: str = "model") -> Path:
    """The newest outputs/models/<run>/<folder> that holds an MLflow model (folder: model or model-int4)."""
    found = sorted(p.parent for p in MODELS.glob(f"*/{folder}/MLmodel"))
    if not found:
        sys.exit(
            f"local endpoint: no fine-tuned model in {MODELS.relative_to(ROOT)}/<run>/{folder}; "
            "run `make local` (or python -m local.pipeline) first, or pass --model-dir"
        )
    return found[-1]


def check_model_dir(model_dir: Path) -> Path:
    model_dir = Path(model_dir).resolve()
    if not (model_dir / "MLmodel").is_file():
        sys.exit(
            f"local endpoint: {model_dir} is not an MLflow model folder (no MLmodel file); pass the "
            "folder fine_tune.py wrote as --model_output_dir, e.g. outputs/models/<run>/model"
        )
    return model_dir


def is_local(url: str) -> bool:
    return urlparse(url).hostname in LOCAL_HOSTS


def endpoint_key() -> str:
    """The key of the local endpoint already in .env (a restart keeps it), else a new one; never an Azure key."""
    if is_local(config.current_setting("AZURE_ML_ENDPOINT")):
        key = config.current_setting("AZURE_ML_API_KEY")
        if key.strip() and not config.is_placeholder(key):
            return key
    return secrets.token_urlsafe(32)


def check_port_free(host: str, port: int) -> None:
    if not processes.port_is_free(host, port):
        sys.exit(
            f"local endpoint: port {port} on {host} is in use (is an endpoint already running?); "
            "stop it or pass --port with another port"
        )


def azmlinfsrv_python() -> Path:
    """The interpreter of .venv-azmlinfsrv; one line if that virtualenv is not built."""
    python = AZMLINFSRV_VENV / "bin" / "python"
    if not ((AZMLINFSRV_VENV / ".installed").exists() and python.exists()):
        sys.exit(f"local endpoint: {AZMLINFSRV_VENV.name} (Azure's inference server) is not built; run `make setup`")
    return python


def server_command(model_dir: Path, port: int) -> list[str]:
    return [str(azmlinfsrv_python()), "-m", "serving.gateway", "--entry_script", str(SCORE_SCRIPT),
            "--model_dir", str(model_dir), "--port", str(port)]


def stage_model(model_dir: Path, staging: Path) -> Path:
    """Azure's layout, azureml-models/<name>/<version>/<model folder>, linking to `model_dir`.

    A deployment's AZUREML_MODEL_DIR is such a <version> folder; azmlinfsrv reads model ids
    from it, and score.py finds the MLflow model inside it, as on Azure.
    """
    version_dir = staging / "azureml-models" / "finetune-phi-local" / "1"
    version_dir.mkdir(parents=True)
    (version_dir / model_dir.name).symlink_to(model_dir, target_is_directory=True)
    return version_dir


def server_environment(azureml_model_dir: Path, host: str, key: str, threads: int | None = None) -> dict:
    """The server's environment over ours: the key it checks, and none of the project's AZURE_* settings."""
    scoring = scoring_env(FORMS["int4"], threads)  # the int4 deployment's threads and request limit
    return {
        **{name: None for name in os.environ if name.startswith("AZURE_")},
        "AZUREML_MODEL_DIR": str(azureml_model_dir),
        "LOCAL_ENDPOINT_KEY": key,
        "LOCAL_ENDPOINT_HOST": host,
        "AML_APP_ROOT": str(SCORE_SCRIPT.parent),
        "SCORING_TIMEOUT_MS": scoring["SCORING_TIMEOUT_MS"],
        # gunicorn 27 would open a control socket in ~/.gunicorn, shared by every endpoint here.
        "GUNICORN_CMD_ARGS": "--no-control-socket " + scoring["GUNICORN_CMD_ARGS"],
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PYTHONPATH": str(ROOT),  # for `-m serving.gateway`
    }


def _die_with_parent():
    """Ask Linux to stop the server when this process dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: Ctrl-C and SIGTERM still stop the server
        pass


def start_server(model_dir: Path, host: str, port: int, key: str, staging: Path,
                 threads: int | None = None) -> processes.Server:
    """azmlinfsrv on `model_dir`, staged under `staging`, once it is live; its output goes to ours."""
    print(f"Starting azmlinfsrv with {model_dir} ...", flush=True)
    azureml_model_dir = stage_model(model_dir, staging)
    base_url = f"http://{host}:{port}"
    try:  # the model loads before the liveness route answers
        return processes.serve(server_command(azureml_model_dir, port), base_url + "/", url=base_url + "/score",
                               key=key, cwd=ROOT, env=server_environment(azureml_model_dir, host, key, threads),
                               timeout=3600, stop_signal=signal.SIGINT,  # gunicorn's quick shutdown
                               preexec_fn=_die_with_parent)
    except processes.NotLive as e:
        sys.exit(f"local endpoint: the server {str(e).splitlines()[0]}; see its output above")


def form_of(model_dir: Path) -> str:
    """The form (serving/forms.py) of an MLflow model folder: int4 holds quantize_model.py's ONNX model."""
    return "int4" if (model_dir / "artifacts" / "onnx" / "genai_config.json").is_file() else "transformers"


def write_settings(url: str, key: str, form: str) -> Path:
    """The URI, key and form into .env for the flow and step 5; say so when they replace an Azure endpoint's."""
    previous = config.saved_setting("AZURE_ML_ENDPOINT")
    env_file = config.save_settings(AZURE_ML_ENDPOINT=url, AZURE_ML_API_KEY=key, AZURE_ML_ENDPOINT_FORM=form)
    if previous and not config.is_placeholder(previous) and not is_local(previous):
        print(f"Replaced the Azure endpoint {previous} in {env_file}; `python deploy_model.py --connect` "
              "switches the flow back to it (no redeploy).", flush=True)
    return env_file


def serve_local(model_dir: Path | None, port: int = 5001, host: str = "127.0.0.1", folder: str = "model",
                threads: int | None = None) -> None:
    """Serve an MLflow model folder (default: the newest local <run>/<folder>) until Ctrl-C or SIGTERM;
    `threads`: requests one worker holds at once (default: the int4 deployment's)."""
    model_dir = check_model_dir(model_dir) if model_dir else latest_local_model(folder)
    azmlinfsrv_python()
    check_port_free(host, port)
    key = endpoint_key()
    base_url = f"http://{host}:{port}"
    env_file = write_settings(f"{base_url}/score", key, form_of(model_dir))

    staging = tempfile.TemporaryDirectory(prefix="finetune-phi-endpoint-")
    # SIGTERM (a service manager, the pipeline, a test) stops the server as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = None
    try:
        server = start_server(model_dir, host, port, key, Path(staging.name), threads)
        print(
            f"\nLocal endpoint ready: {server.url} (liveness: GET {base_url}/)\n"
            f"Its URI and key are in {env_file} (AZURE_ML_ENDPOINT, AZURE_ML_API_KEY).\n"
            "Chat with it: pf flow serve --source ./ --port 8080 --host localhost --engine fastapi\n"
            "Ctrl-C stops it.",
            flush=True,
        )
        server.process.wait()
        sys.exit(f"local endpoint: the server stopped with code {server.process.returncode}")
    except KeyboardInterrupt:
        print("\nStopping the local endpoint.", flush=True)
    finally:
        if server is not None:
            server.stop()  # then whatever is left of it
        staging.cleanup()


def learner_command(port: int, form: str = "int4", model_dir: Path | None = None) -> list[str]:
    """`python deploy_model.py --local` on `port`, serving `model_dir` (default: the newest local model of `form`)."""
    command = [sys.executable, "deploy_model.py", "--local", "--port", str(port)]
    return command + (["--model-dir", str(model_dir)] if model_dir else ["--form", form])


def start_in_background(port: int, form: str = "int4", model_dir: Path | None = None, log: Path | None = None,
                        env_file: Path | None = None, progress: str | None = None) -> processes.Server:
    """learner_command() run with a fresh key until it is live (`progress`: a bar's words): its Server, whose
    URL and key it writes to `env_file` (default: .env) for the flow. NotLive if it does not come up."""
    url, key = f"http://127.0.0.1:{port}/score", secrets.token_urlsafe(32)
    # The environment wins over .env: the endpoint finds its own URL there, so keeps this key (endpoint_key()).
    env = {"AZURE_ML_ENDPOINT": url, "AZURE_ML_API_KEY": key}
    if env_file is not None:
        env["FINETUNE_PHI_ENV_FILE"] = str(env_file)
    return processes.serve(learner_command(port, form, model_dir), f"http://127.0.0.1:{port}/", url=url, key=key,
                           log=log, env=env, cwd=ROOT, timeout=3600, progress=progress)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="the MLflow model folder to serve (default: the newest outputs/models/<run>/model)")
    parser.add_argument("--port", type=int, default=5001, help="port to serve on (default: 5001, azmlinfsrv's)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--threads", type=int, default=worker_threads(FORMS["int4"]),
                        help="threads of the server's worker: requests it holds at once, those that arrive together "
                             f"answered together (default: {worker_threads(FORMS['int4'])}, as the int4 deployment: "
                             f"{FORMS['int4'].admitted} requests and {PROBE_THREADS} probes; 1: one request at a time)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    serve_local(args.model_dir, args.port, args.host, threads=args.threads)


if __name__ == "__main__":
    main()
