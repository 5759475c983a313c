"""The local endpoint's scoring script: Azure ML's init()/run() contract around the fine-tuned model.

azmlinfsrv (azureml-inference-server-http, the server Azure ML runs inside every managed online
deployment) loads this file as its entry script: `init()` once per worker, `run(request)` for
each request to /score. The uvicorn fallback in local/endpoint.py calls the same `init()` and
`respond()`, so both servers answer the same way. The file imports nothing of the project's, so
it can also be handed to an Azure deployment as its scoring script.

The request is what an MLflow model on a managed online endpoint accepts:

    {"input_data": ["Who founded Microsoft?", ...], "params": {"max_new_tokens": 64, ...}}
    {"input_data": {"columns": ["prompt"], "index": [0], "data": [["Who founded Microsoft?"]]}, ...}

and the answer is a JSON list of strings, one per input. The params allowed, and their types,
are those of the model's MLflow signature (max_new_tokens, temperature, do_sample,
return_full_text for fine_tune.py's models). A body that breaks this gets HTTP 400 and
{"message": "..."} naming the problem. On Azure the endpoint's gateway checks the key before a
request reaches the server; here, when LOCAL_ENDPOINT_KEY is set, `respond()` checks
`Authorization: Bearer <key>` itself and answers 401 otherwise.
"""

import hmac
import json
import logging
import os
import threading
from pathlib import Path

import mlflow

try:  # present when azmlinfsrv loads this file; absent under the uvicorn fallback
    from azureml_inference_server_http.api.aml_request import rawhttp
    from azureml_inference_server_http.api.aml_response import AMLResponse
except ImportError:  # pragma: no cover - depends on the server
    rawhttp = None
    AMLResponse = None

logger = logging.getLogger("score")

KEY_VARIABLE = "LOCAL_ENDPOINT_KEY"
USAGE = 'send {"input_data": ["your question"], "params": {"max_new_tokens": 128}}'
# Python types a JSON value may have for each MLflow param dtype (bool is an int in Python, so
# it is excluded from the numeric types by hand in check_params).
PARAM_TYPES = {
    "boolean": (bool,),
    "integer": (int,),
    "long": (int,),
    "float": (int, float),
    "double": (int, float),
    "string": (str,),
}
JSON_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}

_model = None
_param_types: dict[str, str] = {}
# One generation at a time: the uvicorn fallback runs requests on a thread pool, and a
# transformers pipeline is not safe to call from several threads at once.
_predict_lock = threading.Lock()


class BadRequest(ValueError):
    """The request breaks the contract; the message says how, and how to fix it."""


def find_mlflow_model(root: Path) -> Path:
    """The MLflow model folder at or under `root` (Azure puts it one or two levels down)."""
    root = Path(root)
    if (root / "MLmodel").is_file():
        return root
    found = sorted({p.parent for pattern in ("*/MLmodel", "*/*/MLmodel") for p in root.glob(pattern)})
    if len(found) != 1:
        raise FileNotFoundError(
            f"{root}: expected one MLflow model folder (with an MLmodel file) there, found {len(found)}"
        )
    return found[0]


def init(model_dir=None):
    """Load the model once: from `model_dir`, else from AZUREML_MODEL_DIR as on Azure."""
    global _model, _param_types
    root = model_dir or os.environ.get("AZUREML_MODEL_DIR")
    if not root:
        raise RuntimeError("score.init: no model folder; set AZUREML_MODEL_DIR (azmlinfsrv --model_dir does)")
    # resolve(): MLflow refuses a model reached through a symlink (local/endpoint.py stages one).
    path = find_mlflow_model(Path(root)).resolve()
    _model = mlflow.pyfunc.load_model(str(path))
    schema = _model.metadata.get_params_schema()
    _param_types = {p.name: p.dtype.name for p in schema.params} if schema else {}
    logger.info("Loaded %s (params: %s)", path, ", ".join(_param_types) or "none")


def parse_body(raw) -> tuple[list[str], dict]:
    """The questions and params of a request body, or BadRequest."""
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("request body is not UTF-8 text; " + USAGE) from None
    if not str(raw).strip():
        raise BadRequest("request body is empty; " + USAGE)
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as e:
        raise BadRequest(f"request body is not valid JSON ({e}); {USAGE}") from None
    if not isinstance(body, dict) or "input_data" not in body:
        raise BadRequest("request body has no 'input_data'; " + USAGE)
    texts = read_input_data(body["input_data"])
    params = body.get("params") or {}
    if not isinstance(params, dict):
        raise BadRequest(f"'params' must be an object, got {type(params).__name__}; " + USAGE)
    return texts, params


def read_input_data(input_data) -> list[str]:
    """A list of strings, or the pandas split form {"columns": [one], "index": [...], "data": [[text], ...]}."""
    if isinstance(input_data, dict):
        columns = input_data.get("columns", [None])
        data = input_data.get("data")
        if not isinstance(data, list) or not isinstance(columns, list) or len(columns) != 1:
            raise BadRequest(
                "'input_data' in the split form needs one column and a 'data' list, as in "
                '{"columns": ["prompt"], "index": [0], "data": [["your question"]]}'
            )
        # Each split row is a one-value list; a bare string row is read as the same.
        input_data = [row[0] if isinstance(row, list) and len(row) == 1 else row for row in data]
    if not isinstance(input_data, list):
        raise BadRequest(f"'input_data' must be a list of strings, got {type(input_data).__name__}; " + USAGE)
    if not input_data:
        raise BadRequest("'input_data' is empty; send at least one question")
    for i, text in enumerate(input_data):
        if not isinstance(text, str):
            raise BadRequest(f"input_data[{i}] must be a string, got {json.dumps(text)[:60]}")
        if not text.strip():
            raise BadRequest(f"input_data[{i}] is empty; send a question")
    return input_data


def check_params(params: dict) -> dict:
    """The params, checked against the model signature's names and types, or BadRequest."""
    for name, value in params.items():
        if name not in _param_types:
            raise BadRequest(f"unknown param '{name}'; this model takes: {', '.join(_param_types)}")
        allowed = PARAM_TYPES.get(_param_types[name], (object,))
        if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
            expected = JSON_NAMES.get(allowed[-1], _param_types[name])
            raise BadRequest(f"param '{name}' must be {expected}, got {json.dumps(value)[:40]}")
    # Values transformers would reject deep inside generate(), refused here with a clear 400.
    if params.get("max_new_tokens", 1) < 1:
        raise BadRequest(f"param 'max_new_tokens' must be at least 1, got {params['max_new_tokens']}")
    if params.get("temperature", 1) <= 0:
        raise BadRequest(f"param 'temperature' must be above 0, got {params['temperature']}")
    return params


def authorize(authorization) -> str | None:
    """None when the request may pass, else why it may not (a 401)."""
    key = os.environ.get(KEY_VARIABLE)
    if not key:
        return None  # on Azure the endpoint's gateway has checked the key already
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        return "missing 'Authorization: Bearer <key>' header; the key is AZURE_ML_API_KEY in .env"
    if not hmac.compare_digest(given.strip().encode(), key.encode()):
        return "invalid key; use AZURE_ML_API_KEY from .env (written when the endpoint started)"
    return None


def predict(texts: list[str], params: dict) -> list[str]:
    with _predict_lock:
        answers = _model.predict(texts, params=params or None)
    return [str(a) for a in answers]


def respond(authorization, raw_body) -> tuple[int, object]:
    """(HTTP status, JSON payload) for one request to /score."""
    denied = authorize(authorization)
    if denied:
        return 401, {"message": denied}
    try:
        texts, params = parse_body(raw_body)
        params = check_params(params)
    except BadRequest as e:
        return 400, {"message": str(e)}
    return 200, predict(texts, params)


def _run(request):
    """azmlinfsrv's entry point: the raw Flask request in, an AMLResponse out."""
    status, payload = respond(request.headers.get("Authorization"), request.get_data())
    return AMLResponse(payload, status, json_str=True)


# rawhttp hands run() the whole request, so it can read the Authorization header and answer
# 400/401 itself; without it azmlinfsrv would pass only the parsed body.
run = rawhttp(_run) if rawhttp else _run
