"""A local stand-in for the Azure ML managed online endpoint: the fine-tuned model at /score.

It speaks what the tutorial's endpoint speaks: POST /score with `Authorization: Bearer <key>`
and {"input_data": [...], "params": {...}}, answered with a JSON list of strings; GET / is the
liveness probe. The server is azmlinfsrv (azureml-inference-server-http), the one Azure runs in
every managed online deployment, started from its own virtualenv .venv-azmlinfsrv (`make
setup` builds it; see requirements-azmlinfsrv.txt). Without that virtualenv, uvicorn serves the
same scoring module (local/score.py) from the main .venv. Both bind 127.0.0.1 only: the key
travels in plain HTTP here, unlike Azure's HTTPS.

The key is AZURE_ML_API_KEY when it is set (environment or .env), otherwise a fresh random one;
the scoring URI and the key are written to .env as AZURE_ML_ENDPOINT / AZURE_ML_API_KEY, where
the Prompt flow reads them.

    python deploy_model.py --local                        # the learner's command
    python -m local.endpoint --model-dir outputs/models/<run>/model --port 5001
"""

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

import config

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "outputs" / "models"
SCORE_SCRIPT = Path(__file__).resolve().with_name("score.py")
AZMLINFSRV_VENV = ROOT / ".venv-azmlinfsrv"
# The deployment's request_timeout_ms in deploy_model.py: azmlinfsrv gives up on run() after it.
SCORING_TIMEOUT_MS = 180_000
# azmlinfsrv binds 0.0.0.0 with no option to change it; this launcher narrows it to our host.
AZMLINFSRV_LAUNCHER = (
    "import os, azureml_inference_server_http.amlserver as server; "
    "server.DEFAULT_HOST = os.environ['LOCAL_ENDPOINT_HOST']; server.run()"
)


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


def endpoint_key() -> str:
    """AZURE_ML_API_KEY when it is set, so a restarted endpoint keeps its key; else a new one."""
    if config.is_placeholder(config.AZURE_ML_API_KEY) or not config.AZURE_ML_API_KEY.strip():
        return secrets.token_urlsafe(32)
    return config.AZURE_ML_API_KEY


def check_port_free(host: str, port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            sys.exit(
                f"local endpoint: port {port} on {host} is in use (is an endpoint already running?); "
                "stop it or pass --port with another port"
            )


def azmlinfsrv_python() -> Path | None:
    """The interpreter of .venv-azmlinfsrv when that virtualenv is built, else None."""
    python = AZMLINFSRV_VENV / "bin" / "python"
    return python if (AZMLINFSRV_VENV / ".installed").exists() and python.exists() else None


def choose_server(server: str) -> str:
    if server == "auto":
        return "azmlinfsrv" if azmlinfsrv_python() else "uvicorn"
    if server == "azmlinfsrv" and not azmlinfsrv_python():
        sys.exit(f"local endpoint: {AZMLINFSRV_VENV.name} is not built; run `make setup`, or pass --server uvicorn")
    return server


def server_command(server: str, model_dir: Path, host: str, port: int) -> list[str]:
    if server == "azmlinfsrv":
        return [str(azmlinfsrv_python()), "-c", AZMLINFSRV_LAUNCHER, "--entry_script", str(SCORE_SCRIPT),
                "--model_dir", str(model_dir), "--port", str(port)]
    return [sys.executable, "-m", "uvicorn", "--factory", "local.endpoint:create_fastapi_app",
            "--host", host, "--port", str(port), "--no-access-log"]


def stage_model(model_dir: Path, staging: Path) -> Path:
    """Azure's layout, azureml-models/<name>/<version>/<model folder>, linking to `model_dir`.

    A deployment's AZUREML_MODEL_DIR is such a <version> folder; azmlinfsrv reads model ids
    from it, and score.py finds the MLflow model inside it, as on Azure.
    """
    version_dir = staging / "azureml-models" / "finetune-phi-local" / "1"
    version_dir.mkdir(parents=True)
    (version_dir / model_dir.name).symlink_to(model_dir, target_is_directory=True)
    return version_dir


def server_environment(azureml_model_dir: Path, host: str, key: str) -> dict:
    return {
        **os.environ,
        "AZUREML_MODEL_DIR": str(azureml_model_dir),
        "LOCAL_ENDPOINT_KEY": key,
        "LOCAL_ENDPOINT_HOST": host,
        "AML_APP_ROOT": str(SCORE_SCRIPT.parent),
        "SCORING_TIMEOUT_MS": str(SCORING_TIMEOUT_MS),
        # gunicorn 27 would open a control socket in ~/.gunicorn, shared by every endpoint here.
        "GUNICORN_CMD_ARGS": "--no-control-socket",
        "PYTHONPATH": str(ROOT),  # for the uvicorn fallback's `local.endpoint` import
    }


def _die_with_parent():
    """Ask Linux to stop the server when this process dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: Ctrl-C and SIGTERM still stop the server
        pass


def start_server(model_dir: Path, host: str, port: int, key: str, staging: Path, server: str):
    """Start the server process on `model_dir`, staged under `staging`; it loads the model next."""
    print(f"Starting {server} with {model_dir} ...", flush=True)
    azureml_model_dir = stage_model(model_dir, staging)
    return subprocess.Popen(
        server_command(server, azureml_model_dir, host, port),
        cwd=ROOT,
        env=server_environment(azureml_model_dir, host, key),
        preexec_fn=_die_with_parent,
    )


def wait_until_live(process: subprocess.Popen, base_url: str) -> None:
    """Poll the liveness route until it answers 200; the model loads in between."""
    while process.poll() is None:
        try:
            if requests.get(base_url + "/", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    sys.exit(f"local endpoint: the server exited with code {process.returncode} while starting; see its output above")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def serve_local(model_dir: Path | None, port: int = 5001, host: str = "127.0.0.1", server: str = "auto",
                folder: str = "model") -> None:
    """Serve an MLflow model folder (default: the newest local <run>/<folder>) until Ctrl-C or SIGTERM."""
    model_dir = check_model_dir(model_dir) if model_dir else latest_local_model(folder)
    server = choose_server(server)
    check_port_free(host, port)
    key = endpoint_key()
    base_url = f"http://{host}:{port}"
    env_file = config.save_settings(AZURE_ML_ENDPOINT=f"{base_url}/score", AZURE_ML_API_KEY=key)

    staging = tempfile.TemporaryDirectory(prefix="finetune-phi-endpoint-")
    process = start_server(model_dir, host, port, key, Path(staging.name), server)
    # SIGTERM (a service manager, the pipeline, a test) stops the server like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        wait_until_live(process, base_url)
        print(
            f"\nLocal endpoint ready: {base_url}/score (liveness: GET {base_url}/)\n"
            f"Its URI and key are in {env_file} (AZURE_ML_ENDPOINT, AZURE_ML_API_KEY).\n"
            "Chat with it: pf flow serve --source ./ --port 8080 --host localhost --engine fastapi\n"
            "Ctrl-C stops it.",
            flush=True,
        )
        process.wait()
        sys.exit(f"local endpoint: the server stopped with code {process.returncode}")
    except KeyboardInterrupt:
        print("\nStopping the local endpoint.", flush=True)
    finally:
        stop(process)
        staging.cleanup()


def create_fastapi_app():
    """The uvicorn fallback: local/score.py behind FastAPI, as azmlinfsrv would serve it."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse
    from starlette.concurrency import run_in_threadpool

    from local import score

    score.init()
    app = FastAPI(title="finetune-phi local endpoint", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/", response_class=PlainTextResponse)
    def liveness():
        return "Healthy"

    @app.post("/score")
    async def handle_score(request: Request):
        body = await request.body()
        try:
            # Generation is CPU-bound: run it off the event loop (score.py serializes it).
            status, payload = await run_in_threadpool(score.respond, request.headers.get("Authorization"), body)
        except Exception:
            score.logger.exception("scoring failed")
            status, payload = 500, {"message": "An unexpected error occurred in scoring script. Check the logs for more info."}
        return JSONResponse(payload, status_code=status)

    return app


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="the MLflow model folder to serve (default: the newest outputs/models/<run>/model)")
    parser.add_argument("--port", type=int, default=5001, help="port to serve on (default: 5001, azmlinfsrv's)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--server", choices=["auto", "azmlinfsrv", "uvicorn"], default="auto",
                        help="azmlinfsrv (Azure's server, from .venv-azmlinfsrv), uvicorn (from .venv), or auto: "
                             "azmlinfsrv when its virtualenv is built (default)")
    args = parser.parse_args(argv)
    serve_local(args.model_dir, args.port, args.host, args.server)


if __name__ == "__main__":
    main()
