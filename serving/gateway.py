"""Starts azmlinfsrv for the local endpoint, with what Azure's endpoint gateway does in front of it.

On Azure a managed online endpoint's gateway checks `Authorization: Bearer <key>` before a request
reaches the container (401 otherwise), and the container's azmlinfsrv listens on every address
inside it. Here azmlinfsrv is bound to this machine only (127.0.0.1 by default; it has no option
for that) and the key check runs in the server, before azmlinfsrv's own route parses the body. The
liveness route `GET /` stays open, as Azure's probes reach it without a key.

    .venv-azmlinfsrv/bin/python -m serving.gateway --entry_script serving/scoring/score.py --model_dir ... --port 5001

LOCAL_ENDPOINT_KEY (required) and LOCAL_ENDPOINT_HOST come from the environment
(serving/local_endpoint.py sets them). This file runs inside .venv-azmlinfsrv.
"""

import hmac
import json
import os

import azureml_inference_server_http.amlserver as amlserver
import azureml_inference_server_http.amlserver_linux as amlserver_linux

KEY_HELP = "the key is `AZURE_ML_API_KEY` in `.env` (written when the endpoint started)"


def key_problem(authorization: str | None, key: str) -> str | None:
    """Why a request may not pass (a 401), or None."""
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return f"missing 'Authorization: Bearer <key>' header; {KEY_HELP}"
    if not hmac.compare_digest(given.strip().encode(), key.encode()):
        return f"invalid key; {KEY_HELP}"
    return None


class KeyCheck:
    """WSGI middleware in front of azmlinfsrv's app: 401 for any request but liveness without the key."""

    def __init__(self, app, key: str):
        self.app = app
        self.key = key

    def __call__(self, environ, start_response):
        from werkzeug.wrappers import Request, Response

        request = Request(environ)
        if request.path != "/":
            problem = key_problem(request.headers.get("Authorization"), self.key)
            if problem:
                response = Response(json.dumps({"message": problem}), status=401, mimetype="application/json")
                return response(environ, start_response)
        return self.app(environ, start_response)


def add_key_check(app, key: str):
    app.wsgi_app = KeyCheck(app.wsgi_app, key)
    return app


def serve_with_key_check(*args, **kwargs):
    """amlserver_linux.run, once azmlinfsrv's settings are in the environment: gunicorn's workers then
    fork from this process and build their app with the check added."""
    import azureml_inference_server_http.server.create_app as create_app

    key = os.environ["LOCAL_ENDPOINT_KEY"]
    create = create_app.create
    create_app.create = lambda: add_key_check(create(), key)
    return real_run(*args, **kwargs)


real_run = amlserver_linux.run

if __name__ == "__main__":
    amlserver.DEFAULT_HOST = os.environ.get("LOCAL_ENDPOINT_HOST", "127.0.0.1")
    amlserver_linux.run = serve_with_key_check
    amlserver.run()
