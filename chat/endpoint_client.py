"""The chat's one call to the model: the question, with its history, sent to the fine-tuned model's endpoint.

Shared by the tutorial's Prompt flow (integrate_with_promptflow.py) and the same chat on Microsoft Agent
Framework (chat/agent.py), so both send the same request and fail with the same one-line messages. It
posts {"input_data": [prompt], "params": {...}} to AZURE_ML_ENDPOINT with the key AZURE_ML_API_KEY,
exactly as to an Azure ML managed online endpoint (the local endpoint of `python deploy_model.py
--local` speaks the same). Unlike the tutorial:
  * the URI and key are read from the environment or .env at each question, never from a source
    file, so a chat started before the endpoint still finds them;
  * after earlier turns the whole chat is sent as {role, content} messages, which the endpoint renders
    with the model's own chat template, so follow-up questions keep their context with any model, and
    only the new answer comes back (return_full_text false);
  * the sampling temperature and answer length are settings too (AZURE_ML_TEMPERATURE, default the
    tutorial's 0.7, 0 for greedy decoding; AZURE_ML_MAX_NEW_TOKENS, default 128);
  * every request has a timeout (AZURE_ML_REQUEST_TIMEOUT seconds, default 190: a little more than
    the deployment's 180 s request timeout), and a short one for connecting (CONNECT_TIMEOUT_S);
    429, 503 and refused connections are retried with backoff, a connection that timed out is not
    (the question is sent once); any other failure ends with one message naming the HTTP status and
    the likely fix;
  * a failure of the model itself, which Azure's gateway reports as 424 with the model's own
    status in the ms-azureml-model-error-statuscode header, is named with that status.
It needs requests and python-dotenv only (no promptflow), so both chats' environments can import it.
"""

import logging
from urllib.parse import urlparse

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ConnectTimeoutError, MaxRetryError, NewConnectionError
from urllib3.util.retry import Retry

import config
from finetuning_dir.chat_data import PREDICT_PARAMS

SETTINGS = (
    "AZURE_ML_ENDPOINT", "AZURE_ML_API_KEY", "AZURE_ML_REQUEST_TIMEOUT", "AZURE_ML_TEMPERATURE", "AZURE_ML_MAX_NEW_TOKENS"
)

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 190.0
# A live endpoint accepts a connection at once; one that has not within 5 s is down or unreachable.
CONNECT_TIMEOUT_S = 5.0
# Azure's gateway answers 424 when the model's container fails, with the container's status here.
MODEL_STATUS_HEADER = "ms-azureml-model-error-statuscode"
RETRIES = 3
BACKOFF_FACTOR = 1.0  # waits 0 s, 2 s, 4 s between tries (or what a Retry-After header asks)
RETRY_STATUSES = (429, 503)
# Unset, they are the model's own defaults (its signature's, from the same contract).
DEFAULT_TEMPERATURE = PREDICT_PARAMS["temperature"]
DEFAULT_MAX_NEW_TOKENS = PREDICT_PARAMS["max_new_tokens"]
HOW_TO_SET = (
    "start the local endpoint with `python deploy_model.py --local`, or deploy with `python deploy_model.py`; "
    "both write `AZURE_ML_ENDPOINT` and `AZURE_ML_API_KEY` to `.env`"
)
FIXES = {
    401: "the endpoint refused the key: `AZURE_ML_API_KEY` in `.env` is not this endpoint's key; restart the local "
         "endpoint (`python deploy_model.py --local`) or copy the Primary key from the endpoint's Consume tab",
    403: "the key may not call this endpoint: check `AZURE_ML_API_KEY` (the endpoint's Primary key) and that the "
         "endpoint uses key authentication",
    404: "nothing is served at `AZURE_ML_ENDPOINT`: it must be the REST endpoint ending in `/score` (the Consume tab "
         "shows it) of an endpoint whose deployment exists",
    429: f"the endpoint is busy, still after {RETRIES} retries: wait and ask again, or give the deployment more "
         "instances",
    503: f"the endpoint is unavailable (starting, or overloaded), still after {RETRIES} retries: wait until it is "
         "live, then ask again",
}


MODEL_FIXES = {
    "400": "the model refused the request: its message says what to change (a setting such as "
           "`AZURE_ML_MAX_NEW_TOKENS` or `AZURE_ML_TEMPERATURE`, or the question)",
    "408": "the model took longer than the deployment's 180 s request timeout: ask for a shorter answer "
           "(`AZURE_ML_MAX_NEW_TOKENS`), or deploy the int4 form (`python deploy_model.py --form int4`)",
    "500": "the model failed: read the deployment's logs (the studio's endpoint page, Logs tab)",
}


class EndpointError(RuntimeError):
    """The endpoint could not answer; the message says why and what to do. Names of settings, files and
    commands are in backticks: the Agent Framework chat's page renders messages as Markdown, where the
    underscores of a bare AZURE_ML_API_KEY would vanish."""


def read_settings() -> dict:
    """Each setting as it is now: exported, else in .env (read again at each question), else config's."""
    return {name: config.current_setting(name) for name in SETTINGS}


def number_setting(settings: dict, name: str, default, kind, is_valid, rule: str):
    raw = settings[name] or default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not is_valid(value):
        raise EndpointError(f"`{name}` must be {rule}, got '{raw}'")
    return value


def endpoint_settings(temperature: float | None = None, max_new_tokens: int | None = None) -> tuple[str, str, float, dict]:
    """URI, key, timeout and generation params for the next question; `temperature` and `max_new_tokens`, when
    given, stand for their settings (checked the same way)."""
    settings = read_settings()
    for name, value in (("AZURE_ML_TEMPERATURE", temperature), ("AZURE_ML_MAX_NEW_TOKENS", max_new_tokens)):
        if value is not None:
            settings[name] = str(value)
    url, key = settings["AZURE_ML_ENDPOINT"], settings["AZURE_ML_API_KEY"]
    for name, value in (("AZURE_ML_ENDPOINT", url), ("AZURE_ML_API_KEY", key)):
        if not value or config.is_placeholder(value):
            raise EndpointError(f"`{name}` is not set: {HOW_TO_SET}")
    timeout = number_setting(
        settings, "AZURE_ML_REQUEST_TIMEOUT", DEFAULT_TIMEOUT_S, float, lambda v: v > 0, "a number of seconds above 0"
    )
    temperature = number_setting(
        settings, "AZURE_ML_TEMPERATURE", DEFAULT_TEMPERATURE, float, lambda v: v >= 0, "a number, 0 or more (0: greedy)"
    )
    max_new_tokens = number_setting(
        settings, "AZURE_ML_MAX_NEW_TOKENS", DEFAULT_MAX_NEW_TOKENS, int, lambda v: v >= 1, "a whole number, 1 or more"
    )
    # The tutorial's params, but only the new answer back (return_full_text would echo the whole
    # chat); temperature 0 means greedy decoding, which takes no temperature.
    params = {**PREDICT_PARAMS, "temperature": temperature, "max_new_tokens": max_new_tokens}
    if temperature == 0:
        params.update(do_sample=False)
        del params["temperature"]
    return url, key, timeout, params


def chat_input(question: str, turns: list[tuple[str, str]] = (), text_only: bool = False) -> str | list[dict]:
    """What the chat sends as its input_data: the question alone, or after the earlier (question, answer) turns the
    whole chat as messages, which the endpoint renders with the model's own template (serving/scoring/score.py).
    `text_only`: for a scoring script that takes one text (takes_text_only), the turns in Phi-3's tags inside it,
    between the `<|user|>` and `<|end|>` its prompt template adds."""
    if not turns:
        return question
    if text_only:
        return "".join(f"{q}<|end|>\n<|assistant|>\n{a}<|end|>\n<|user|>\n" for q, a in turns) + question
    earlier = [{"role": role, "content": text} for turn in turns for role, text in zip(("user", "assistant"), turn)]
    return [*earlier, {"role": "user", "content": question}]


def takes_text_only(url: str) -> bool:
    """Whether `url` is Azure's own scoring script for MLflow models, the transformers form deployed without code
    (deploy_model.py records the form): it takes one text a question, not a chat's messages."""
    local = urlparse(url).hostname in ("127.0.0.1", "localhost", "::1")
    return not local and config.current_setting("AZURE_ML_ENDPOINT_FORM") == "transformers"


class RetryUnlessTimedOut(Retry):
    """urllib3's Retry, except that a connection that timed out is not tried again: a host that did not
    answer within CONNECT_TIMEOUT_S will not in the next seconds either, and each try would add that wait."""

    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):
        # (a refused connection is a NewConnectionError, which urllib3 derives from ConnectTimeoutError)
        if isinstance(error, ConnectTimeoutError) and not isinstance(error, NewConnectionError):
            raise MaxRetryError(_pool, url, error) from error
        return super().increment(method, url, response, error, _pool, _stacktrace)


def retrying_session() -> requests.Session:
    """A session that retries refused connections, 429 and 503 with backoff, never a timed-out connection or read."""
    retry = RetryUnlessTimedOut(
        total=RETRIES,
        connect=RETRIES,
        read=False,  # re-raise a read timeout as itself (0 would turn it into a ConnectionError)
        status=RETRIES,
        other=0,
        status_forcelist=RETRY_STATUSES,
        allowed_methods=frozenset({"POST"}),  # 429 and 503 mean the request was not processed
        backoff_factor=BACKOFF_FACTOR,
        raise_on_status=False,  # hand back the last 429/503, for a message naming it
    )
    session = requests.Session()
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))
    return session


def server_message(response: requests.Response) -> str:
    try:
        body = response.json()
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"])
    except ValueError:
        pass
    return response.text.strip()[:300] or "(empty body)"


def read_answer(response: requests.Response) -> str:
    """The first answer of the two shapes Azure endpoints give: ["..."] or {"output": ...}."""
    try:
        body = response.json()
    except ValueError:
        raise EndpointError(f"the endpoint answered HTTP {response.status_code} but not with JSON: {response.text[:200]!r}")
    if isinstance(body, dict) and "output" in body:
        body = body["output"]
    if isinstance(body, list) and body:
        body = body[0]
    if isinstance(body, str):
        return body.strip()
    raise EndpointError(
        f"the endpoint's answer has an unexpected shape ({str(response.text)[:200]}); expected a list of strings "
        "or an object with 'output'"
    )


def query_azml_endpoint(input_data: str, endpoint_url: str, api_key: str, timeout: float, params: dict) -> str:
    """Send a request to the Azure ML endpoint with the given input data (the tutorial's function)."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"}
    data = {"input_data": [input_data], "params": params}
    connect_timeout = min(CONNECT_TIMEOUT_S, timeout)
    try:
        with retrying_session() as session:
            response = session.post(endpoint_url, json=data, headers=headers, timeout=(connect_timeout, timeout))
    except requests.exceptions.ConnectTimeout:
        raise EndpointError(
            f"could not connect to {endpoint_url} within {connect_timeout:g} s: the host does not answer; check "
            f"`AZURE_ML_ENDPOINT` and your network, or {HOW_TO_SET}"
        ) from None
    except requests.exceptions.Timeout:
        raise EndpointError(
            f"no answer from {endpoint_url} within {timeout:g} s: the model may be overloaded or stuck; check the "
            "endpoint's logs, or raise `AZURE_ML_REQUEST_TIMEOUT`"
        ) from None
    except requests.exceptions.ConnectionError as e:
        raise EndpointError(
            f"could not connect to {endpoint_url} (after {RETRIES} retries): is the endpoint running? "
            f"{HOW_TO_SET} ({type(e).__name__})"
        ) from None
    except requests.exceptions.RequestException as e:
        raise EndpointError(f"the request to {endpoint_url} failed: {e}") from None
    if response.status_code == 424:
        model_status = response.headers.get(MODEL_STATUS_HEADER, "unknown")
        fix = MODEL_FIXES.get(model_status, MODEL_FIXES["500"])
        raise EndpointError(
            f"the model behind {endpoint_url} failed with HTTP {model_status} ({server_message(response)}): {fix}"
        )
    if response.status_code != 200:
        fix = FIXES.get(response.status_code) or "check the deployment's logs (or the local endpoint's console)"
        raise EndpointError(
            f"the endpoint {endpoint_url} answered HTTP {response.status_code} {response.reason} "
            f"({server_message(response)}): {fix}"
        )
    logger.info("Successfully received response from Azure ML Endpoint.")
    return read_answer(response)


def ask(question: str, turns: list[tuple[str, str]] = (), temperature: float | None = None,
        max_new_tokens: int | None = None) -> str:
    """The model's answer to `question` after the earlier turns, with the settings as they are now (`temperature`
    and `max_new_tokens`, when given, stand for theirs)."""
    if not question or not question.strip():
        raise EndpointError("The question is empty: type a question for the model")
    url, key, timeout, params = endpoint_settings(temperature, max_new_tokens)
    return query_azml_endpoint(chat_input(question.strip(), turns, takes_text_only(url)), url, key, timeout, params)
