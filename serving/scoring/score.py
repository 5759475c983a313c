"""Scoring script for fine_tune.py's models: Azure ML's init()/run() contract, as azmlinfsrv runs it.

The tutorial deploys the transformers model with no scoring script: Azure ML then serves it with
its own MLflow scoring script inside azmlinfsrv. This script answers the same requests the same
way, so the local endpoint (`deploy_model.py --local`) behaves as the managed endpoint does:

    {"input_data": ["Who founded Microsoft?", ...], "params": {"max_new_tokens": 64, ...}}

and a JSON list of strings back, one per question. A question may also be a whole chat, a list of
{"role", "content"} messages ending with the user's, as Azure's chat-completion models take one: it
is rendered with the model's own chat template (in its MLmodel metadata, which fine_tune.py writes
and the int4 form carries on), so that a follow-up reaches any model in the format it was trained
on (docs/models.md). As in Azure's script, `run()` is declared with
inference-schema's decorators: azmlinfsrv itself parses the body and answers 415 for a content
type other than JSON and 400 (with its own messages) for a body that is not JSON or not an object,
or has no input_data; input_data is a list and params an object with the model signature's params;
MLflow enforces the params' types and ignores unknown ones with a logged warning. Where Azure's
script fails with a 500 ("An unexpected error occurred in scoring script"), this one answers 400
with a message naming the problem: input_data not a list (a bare string, the pandas split form),
an empty list, a question that is not a string, a param of the wrong type, max_new_tokens below 1,
a temperature of 0 or less with sampling.

The int4 form of the model (quantize_model.py) is an MLflow pyfunc model; Azure's own script would
expect the pandas split form for it, so deploy_model.py deploys the int4 form with this script,
and the endpoint answers exactly as for the transformers model, on Azure and here alike.

Requests are answered together: each worker runs threaded (GUNICORN_CMD_ARGS="--threads N") and
keeps one Batcher (batching.py, beside this file), which answers the questions of requests that
arrive together, with the same params, in one model call. Since azmlinfsrv cannot time out a request
on a worker's thread (its timer is a signal, which only the main thread receives), run() gives up
itself after SCORING_TIMEOUT_MS and answers as azmlinfsrv does: 500, "Scoring timeout after N ms".

The key is not checked here: Azure's gateway checks it before a request reaches the container
(locally, serving/gateway.py does). The script imports nothing of the project's but batching.py.
"""

import logging
import os
import time
from pathlib import Path

import jinja2.ext
import jinja2.sandbox
import mlflow
from azureml_inference_server_http.api.aml_response import AMLResponse
from inference_schema.parameter_types.abstract_parameter_type import AbstractParameterType
from inference_schema.parameter_types.standard_py_parameter_type import StandardPythonParameterType
from inference_schema.schema_decorators import _deserialize_input_argument, input_schema
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from batching import Batcher  # azmlinfsrv puts this folder (AML_APP_ROOT) on sys.path

# Under azmlinfsrv's logger, so that its handler prints these lines in the deployment's log.
logger = logging.getLogger("azmlinfsrv.score")

USAGE = 'send {"input_data": ["your question"], "params": {"max_new_tokens": 128}}'
ROLES = ("system", "user", "assistant")


def find_mlflow_model(root: Path) -> Path:
    """The MLflow model folder at or under `root` (Azure puts it one or two levels down)."""
    root = Path(root)
    if (root / "MLmodel").is_file():
        return root
    found = sorted({p.parent for pattern in ("*/MLmodel", "*/*/MLmodel") for p in root.glob(pattern)})
    if len(found) != 1:
        raise FileNotFoundError(f"{root}: expected one MLflow model folder (with an MLmodel file), found {len(found)}")
    # resolve(): MLflow refuses a model reached through a symlink (serving/local_endpoint.py stages one).
    return found[0].resolve()


class Rejected(str):
    """An input inference-schema refused, kept for run() to answer 400 with, rather than raised (a 500)."""


class Checked(AbstractParameterType):
    """The check Azure's script declares (a list of questions; an object of params), made by inference-schema
    itself, with a refusal handed to run() to answer 400 rather than raised (azmlinfsrv's 500)."""

    def __init__(self, sample):
        self.declared = StandardPythonParameterType(sample)  # what Azure's script declares
        super().__init__(sample)
        # Not list or dict: inference-schema's decorator then passes every value to deserialize_input.
        self.sample_data_type = Checked

    def deserialize_input(self, input_data):
        try:
            return _deserialize_input_argument(input_data, self.declared, "")
        except ValueError as e:
            return Rejected(str(e))

    def input_to_swagger(self):
        return self.declared.input_to_swagger()


# As Azure's script does, the declared types come from the model's signature, read when azmlinfsrv
# imports this file; the weights are loaded later, in init().
MODEL_DIR = find_mlflow_model(os.environ["AZUREML_MODEL_DIR"])
MODEL_META = Model.load(str(MODEL_DIR))
PARAM_DEFAULTS = {p.name: p.default for p in MODEL_META.signature.params.params}
CHAT = MODEL_META.metadata or {}  # prompt_template, and fine_tune.py's chat_template, bos_token, eos_token

# azmlinfsrv's own setting (its default: an hour); deploy_model.py and the local endpoint set the deployment's limit.
TIMEOUT_MS = int(os.environ.get("SCORING_TIMEOUT_MS", 3_600_000))
# How long an idle worker waits, once a request arrives, for others sent at the same moment.
GATHER_MS = int(os.environ.get("BATCH_GATHER_MS", 50))

model = None
batcher = None


def init():
    global model, batcher
    model = mlflow.pyfunc.load_model(str(MODEL_DIR))
    batcher = Batcher(lambda texts, params: model.predict(texts, params=params or None), GATHER_MS / 1000).start()
    logger.info("Loaded %s (params: %s)", MODEL_DIR, ", ".join(PARAM_DEFAULTS))


def chat_problem(chat) -> str | None:
    """Why `chat` is not a list of messages this model can take, or None."""
    if "chat_template" not in CHAT:
        return "this model has no chat template in its MLmodel metadata (saved by an older fine_tune.py): send one question"
    for message in chat:
        if not (isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)):
            return f"each message must be {{'role': one of {', '.join(ROLES)}, 'content': text}}, got {str(message)[:60]!r}"
    if not chat or chat[-1]["role"] != "user" or not chat[-1]["content"].strip():
        return "a chat must end with the user's question"
    return None


def chat_text(chat: list) -> str:
    """The chat as the text the model's prompt template completes: rendered with the model's own chat template, as
    transformers' apply_chat_template renders it (after an empty system message, as fine_tune.py trains), less what
    the prompt template (the same template around one question) puts before and after that question."""
    if chat[0]["role"] != "system":
        chat = [{"role": "system", "content": ""}, *chat]
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                               extensions=[jinja2.ext.loopcontrols])
    rendered = environment.from_string(CHAT["chat_template"]).render(
        messages=chat, add_generation_prompt=True, bos_token=CHAT.get("bos_token"), eos_token=CHAT.get("eos_token"))
    before, after = (part.replace("{{", "{").replace("}}", "}") for part in CHAT["prompt_template"].split("{prompt}"))
    if not (rendered.startswith(before) and rendered.endswith(after)):
        raise ValueError("the model's chat template and prompt template disagree")
    return rendered[len(before):len(rendered) - len(after)]


def problem_with(input_data, params) -> str | None:
    """Why the request cannot be answered (a 400), or None."""
    for name, value in (("input_data", input_data), ("params", params)):
        if isinstance(value, Rejected):
            return f"'{name}': {value}"
    if not input_data:
        return "'input_data' is empty; send at least one question"
    for i, text in enumerate(input_data):
        if isinstance(text, list) and chat_problem(text):
            return f"input_data[{i}]: {chat_problem(text)}"
        if not isinstance(text, (str, list)) or not text or isinstance(text, str) and not text.strip():
            return f"input_data[{i}] must be a question (a non-empty string), got {str(text)[:60]!r}"
    params = params or {}
    # Values the model would fail on deep inside generation, refused here.
    tokens, temperature = params.get("max_new_tokens"), params.get("temperature")
    if isinstance(tokens, (int, float)) and not isinstance(tokens, bool) and tokens < 1:
        return f"param 'max_new_tokens' must be at least 1, got {tokens}"
    sampling = params.get("do_sample", PARAM_DEFAULTS.get("do_sample", True))
    if sampling and isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature <= 0:
        return f"param 'temperature' must be above 0 when sampling, got {temperature}"
    return None


def bad_request(message: str) -> AMLResponse:
    return AMLResponse({"message": f"{message}; {USAGE}"}, 400, json_str=True)


@input_schema("input_data", Checked(["Who founded Microsoft?"]))
@input_schema("params", Checked(PARAM_DEFAULTS), optional=True)
def run(input_data, params=None):
    started = time.monotonic()
    problem = problem_with(input_data, params)
    if problem:
        return bad_request(problem)
    try:
        texts = [chat_text(text) if isinstance(text, list) else text for text in input_data]
    except (ValueError, jinja2.TemplateError) as e:
        return bad_request(f"the chat cannot be rendered with the model's chat template ({e})")
    try:
        answers = batcher.ask(texts, params, TIMEOUT_MS / 1000 - (time.monotonic() - started))
    except MlflowException as e:  # MLflow's own check of the params against the signature
        return bad_request(e.message.splitlines()[0])
    except TimeoutError:
        logger.error("Scoring timeout after %d ms", TIMEOUT_MS)
        return AMLResponse({"message": f"Scoring timeout after {TIMEOUT_MS} ms"}, 500, json_str=True,
                           run_function_failed=True)
    return [str(answer) for answer in answers]
