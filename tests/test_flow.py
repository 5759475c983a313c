"""The Prompt flow (flow.dag.yml + integrate_with_promptflow.py) in front of the endpoint.

`pf flow test` and `pf flow serve` run as the learner runs them, against the local endpoint on
the fine-tuned tiny model, or against stand-in endpoints on 127.0.0.1 that fail on purpose
(down, 500, hanging, 429/503, odd answers). The endpoint's URI and key reach the flow only
through the .env file the endpoint wrote.
"""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from chat_fixtures import (  # noqa: F401
    ANSWER, PF, QUESTION, ROOT, FlowServer, chat_turn, endpoint, flow_answer, flow_server, free_port, pf_flow_test,
    chat_input, port_is_open, quiet_pf_home, stand_in,
)
from conftest import one_line_naming

FOLLOW_UP = "Is that right?"


@pytest.fixture
def flow_env(endpoint, quiet_pf_home):
    """Environment for a `pf` command that finds the endpoint through its .env file, as a learner's does.

    Greedy decoding (AZURE_ML_TEMPERATURE=0), so the tiny model's answers can be compared exactly.
    """
    return {**quiet_pf_home, "FINETUNE_PHI_ENV_FILE": str(endpoint.env_file), "AZURE_ML_TEMPERATURE": "0"}


def stand_in_env(url: str, quiet_pf_home: dict, tmp_path, **extra) -> dict:
    env_file = tmp_path / ".env"
    env_file.write_text(f"AZURE_ML_ENDPOINT={url}\nAZURE_ML_API_KEY=stand-in-key\n")
    return {**quiet_pf_home, "FINETUNE_PHI_ENV_FILE": str(env_file), **extra}


def test_pf_starts(quiet_pf_home):
    # An unpinned promptflow stack may not even start (see requirements.in); this one does.
    result = subprocess.run([PF, "--version"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, **quiet_pf_home})
    assert result.returncode == 0, result.stderr[-2000:]
    versions = json.loads(result.stdout[: result.stdout.index("}") + 1])
    assert versions["promptflow"] == versions["promptflow-devkit"] == versions["promptflow-core"] == "1.18.5"


def test_the_flow_is_the_tutorials_made_a_chat_flow():
    flow = yaml.safe_load((ROOT / "flow.dag.yml").read_text())
    assert flow["inputs"]["input_data"] == {"type": "string", "default": QUESTION, "is_chat_input": True}
    assert flow["inputs"]["chat_history"]["is_chat_history"] is True
    assert flow["outputs"]["answer"]["reference"] == "${integrate_with_promptflow.output}"
    assert flow["outputs"]["answer"]["is_chat_output"] is True
    (node,) = flow["nodes"]
    assert node["name"] == "integrate_with_promptflow"
    assert node["source"] == {"type": "code", "path": "integrate_with_promptflow.py"}


def test_pf_flow_test_answers_the_default_question(flow_env):
    result, _ = pf_flow_test(flow_env)
    assert flow_answer(result) == ANSWER


def test_pf_flow_test_answers_a_question(flow_env):
    result, _ = pf_flow_test(flow_env, "input_data=Where is Microsoft based?")
    assert flow_answer(result) == "Microsoft is based in Redmond, Washington."


def test_an_empty_question_is_refused(flow_env):
    result, _ = pf_flow_test(flow_env, "input_data=   ")
    assert result.returncode != 0
    assert "The question is empty: type a question for the model" in result.stdout + result.stderr


def test_pf_flow_serve_answers_on_score(flow_server):
    response = flow_server.ask(QUESTION)
    assert response.status_code == 200
    assert response.json() == {"answer": ANSWER}

    refused = flow_server.ask("")
    assert refused.status_code == 400
    assert "The question is empty" in refused.json()["error"]["message"]


def test_a_served_flow_follows_a_restarted_endpoint(endpoint, quiet_pf_home, tmp_path):
    # The endpoint may start, or move, after the flow: the URI and key are read from .env at each question.
    env_file = tmp_path / ".env"
    env_file.write_text(f"AZURE_ML_ENDPOINT=http://127.0.0.1:{free_port()}/score\nAZURE_ML_API_KEY=old\n")
    server = FlowServer({**quiet_pf_home, "FINETUNE_PHI_ENV_FILE": str(env_file), "AZURE_ML_TEMPERATURE": "0"},
                        tmp_path / "pf-serve.log")
    try:
        server.wait_until_live(timeout=120)
        down = server.ask(QUESTION)
        assert down.status_code >= 400
        assert "could not connect to" in down.json()["error"]["message"]
        env_file.write_text(endpoint.env_file.read_text())
        assert server.ask(QUESTION).json() == {"answer": ANSWER}
    finally:
        server.stop()


def test_a_env_file_in_the_flow_folder_does_not_shadow_the_settings(endpoint, quiet_pf_home, tmp_path):
    # Flask's development server (pf flow serve's default engine) loads a .env from the folder it
    # serves into the environment, where it would win over the settings the tool reads at each
    # question. A copy of the flow with a stale .env beside it must still reach the live endpoint.
    import shutil

    flow = tmp_path / "flow"
    (flow / "finetuning_dir").mkdir(parents=True)
    (flow / "chat").mkdir()
    for name in ("flow.dag.yml", "integrate_with_promptflow.py", "config.py", "finetuning_dir/chat_data.py",
                 "chat/__init__.py", "chat/endpoint_client.py"):
        shutil.copy(ROOT / name, flow / name)  # what the flow's tool imports
    (flow / ".env").write_text(f"AZURE_ML_ENDPOINT=http://127.0.0.1:{free_port()}/score\nAZURE_ML_API_KEY=stale\n")
    env = {**quiet_pf_home, "FINETUNE_PHI_ENV_FILE": str(endpoint.env_file), "AZURE_ML_TEMPERATURE": "0"}
    server = FlowServer(env, tmp_path / "pf-serve.log", engine=None, source=flow)
    try:
        server.wait_until_live(timeout=120)
        response = server.ask(QUESTION)
        assert response.status_code == 200, response.text
        assert response.json() == {"answer": ANSWER}
    finally:
        server.stop()


def test_chat_history_reaches_the_model(flow_server, endpoint):
    # The flow's answer is the model's own answer to the follow-up after its first turn, in the model's own format:
    # what the tiny model learned to say there. Whether it says the same to the follow-up alone depends on how
    # far its training generalised, so alone it must give its own answer to the bare follow-up.
    response = flow_server.ask(FOLLOW_UP, [chat_turn(QUESTION, ANSWER)])
    assert response.status_code == 200
    assert response.json() == {"answer": "Yes, that is right."}
    assert endpoint.greedy_answer(chat_input(FOLLOW_UP, [(QUESTION, ANSWER)])) == "Yes, that is right."
    assert flow_server.ask(FOLLOW_UP, []).json() == {"answer": endpoint.greedy_answer(FOLLOW_UP)}


def test_chat_history_is_sent_as_messages(stand_in, quiet_pf_home, tmp_path):
    recorder = stand_in((200, ["Sure."], {}))
    history = [chat_turn("What is Phi-3?", "A small model."), chat_turn("Who made it?", "Microsoft.")]
    env = stand_in_env(recorder.url, quiet_pf_home, tmp_path)
    result, _ = pf_flow_test(env, "input_data=Can you say that in one word?", f"chat_history={json.dumps(history)}")
    assert flow_answer(result) == "Sure."
    (request,) = recorder.requests
    assert request["headers"]["Authorization"] == "Bearer stand-in-key"
    assert request["body"] == {
        "input_data": [[
            {"role": "user", "content": "What is Phi-3?"}, {"role": "assistant", "content": "A small model."},
            {"role": "user", "content": "Who made it?"}, {"role": "assistant", "content": "Microsoft."},
            {"role": "user", "content": "Can you say that in one word?"},
        ]],
        "params": {"temperature": 0.7, "max_new_tokens": 128, "do_sample": True, "return_full_text": False},
    }


def test_azures_own_mlflow_scoring_gets_the_history_as_one_text(monkeypatch):
    """The transformers form deployed without code is served by Azure's scoring script, which takes one text a
    question: there the earlier turns go inside it, in the tutorial model's tags; everywhere else, as messages."""
    from chat.endpoint_client import chat_input, takes_text_only

    azure, local = "https://finetune-phi.eastus2.inference.ml.azure.com/score", "http://127.0.0.1:5001/score"
    monkeypatch.setenv("AZURE_ML_ENDPOINT_FORM", "transformers")
    assert takes_text_only(azure) and not takes_text_only(local)
    monkeypatch.setenv("AZURE_ML_ENDPOINT_FORM", "int4")
    assert not takes_text_only(azure)
    assert chat_input("Q2", [("Q1", "A1")], text_only=True) == "Q1<|end|>\n<|assistant|>\nA1<|end|>\n<|user|>\nQ2"
    assert chat_input("Q2", [("Q1", "A1")])[-1] == {"role": "user", "content": "Q2"}
    assert chat_input("Q1", text_only=True) == chat_input("Q1") == "Q1"


def test_endpoint_down_fails_with_a_clear_message(ask, backoff):
    from integrate_with_promptflow import EndpointError

    url = f"http://127.0.0.1:{free_port()}/score"  # nothing listens there
    with pytest.raises(EndpointError) as error:
        ask(url)
    assert f"could not connect to {url} (after 3 retries): is the endpoint running?" in str(error.value)
    assert "python deploy_model.py --local" in str(error.value)
    assert backoff == [2, 4], "refused connections are retried with backoff"


def test_endpoint_answering_500_fails_with_a_clear_message(ask, stand_in):
    from integrate_with_promptflow import EndpointError

    broken = stand_in((500, {"message": "An unexpected error occurred in scoring script."}, {}))
    with pytest.raises(EndpointError) as error:
        ask(broken.url)
    assert str(error.value).startswith(
        f"the endpoint {broken.url} answered HTTP 500 Internal Server Error (An unexpected error occurred in "
        "scoring script.): check the deployment's logs"
    )
    assert len(broken.requests) == 1, "a 500 is not retried"


def test_hanging_endpoint_fails_within_the_timeout(ask, stand_in):
    from integrate_with_promptflow import EndpointError

    hanging = stand_in("hang")
    started = time.monotonic()
    with pytest.raises(EndpointError) as error:
        ask(hanging.url, AZURE_ML_REQUEST_TIMEOUT="1")
    assert f"no answer from {hanging.url} within 1 s" in str(error.value)
    assert "raise `AZURE_ML_REQUEST_TIMEOUT`" in str(error.value)
    assert len(hanging.requests) == 1, "a timed-out request is not sent again"
    assert time.monotonic() - started < 1 + 5


def test_wrong_key_names_the_fix(endpoint, ask):
    from integrate_with_promptflow import EndpointError

    with pytest.raises(EndpointError) as error:
        ask(endpoint.url, AZURE_ML_API_KEY="an-old-key")
    assert f"the endpoint {endpoint.url} answered HTTP 401 UNAUTHORIZED" in str(error.value)
    assert "`AZURE_ML_API_KEY` in `.env` is not this endpoint's key" in str(error.value)


def test_exported_settings_win_over_env_file(endpoint, quiet_pf_home, tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("AZURE_ML_ENDPOINT=http://127.0.0.1:9/score\nAZURE_ML_API_KEY=an-old-key\n")
    env = {**quiet_pf_home, "FINETUNE_PHI_ENV_FILE": str(env_file), "AZURE_ML_TEMPERATURE": "0",
           "AZURE_ML_ENDPOINT": endpoint.url, "AZURE_ML_API_KEY": endpoint.key}
    result, _ = pf_flow_test(env)
    assert flow_answer(result) == ANSWER


def test_unset_endpoint_names_the_fix(ask):
    from integrate_with_promptflow import EndpointError

    with pytest.raises(EndpointError) as error:
        ask(None)  # no AZURE_ML_ENDPOINT exported, and the suite's .env file does not exist
    assert "`AZURE_ML_ENDPOINT` is not set: start the local endpoint with `python deploy_model.py --local`" in str(
        error.value)


def test_no_promptflow_service_is_left_running(flow_env):
    result, _ = pf_flow_test(flow_env)
    assert flow_answer(result) == ANSWER
    assert "Starting prompt flow service" not in result.stdout + result.stderr
    # A service `pf` starts writes its port under pfs/ first: none was ever chosen, so none started
    # (and the session's end fails the run if any process the tests started is still alive).
    assert not (Path(flow_env["PF_HOME_DIRECTORY"]) / "pfs").exists(), "no service port was ever chosen"
    processes = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    # What `pf` would start for tracing: `pf service start`, which runs waitress-serve on this app.
    assert "promptflow._cli._pf._service" not in processes
    assert "pf service start" not in processes


# The tool itself, called in this process against stand-ins: retries, statuses, answer shapes.


@pytest.fixture
def ask(monkeypatch):
    """Ask the flow's tool one question with the given settings, as if exported."""
    import integrate_with_promptflow as tool

    def ask_with(url, question=QUESTION, chat_history=None, **settings):
        exported = {"AZURE_ML_ENDPOINT": url, "AZURE_ML_API_KEY": "k", **settings}
        for name in tool.SETTINGS:
            if exported.get(name):
                monkeypatch.setenv(name, exported[name])
            else:
                monkeypatch.delenv(name, raising=False)
        return tool.my_python_tool(question, chat_history)

    return ask_with


def test_503_then_429_are_retried_until_an_answer(ask, stand_in):
    flaky = stand_in((503, {"message": "starting"}, {}), (429, {}, {"Retry-After": "1"}), (200, [ANSWER], {}))
    started = time.monotonic()
    assert ask(flaky.url) == ANSWER
    assert len(flaky.requests) == 3
    assert time.monotonic() - started >= 1, "Retry-After is honoured"


@pytest.fixture
def backoff(monkeypatch) -> list[float]:
    """The waits between retries, recorded instead of slept (urllib3's Retry sleeps with time.sleep)."""
    from types import SimpleNamespace

    from urllib3.util import retry

    waits = []
    monkeypatch.setattr(retry, "time", SimpleNamespace(sleep=waits.append, time=time.time))
    return waits


def test_429_that_persists_ends_with_one_message(ask, stand_in, backoff):
    from integrate_with_promptflow import EndpointError

    busy = stand_in((429, {"message": "Too many requests"}, {}))
    with pytest.raises(EndpointError) as error:
        ask(busy.url)
    one_line_naming(str(error.value), busy.url, "429", "after 3 retries", "more instances")
    assert len(busy.requests) == 4
    assert backoff == [2, 4], "backoff waits 0 s, 2 s and 4 s between the tries"


@pytest.mark.parametrize(
    "status, fix",
    [
        (401, "the endpoint refused the key: `AZURE_ML_API_KEY` in `.env` is not this endpoint's key"),
        (403, "the key may not call this endpoint: check `AZURE_ML_API_KEY`"),
        (404, "nothing is served at `AZURE_ML_ENDPOINT`: it must be the REST endpoint ending in `/score`"),
        (502, "check the deployment's logs (or the local endpoint's console)"),
    ],
)
def test_other_statuses_name_the_status_and_the_fix(ask, stand_in, status, fix):
    from integrate_with_promptflow import EndpointError

    failing = stand_in((status, {"message": "from the server"}, {}))
    with pytest.raises(EndpointError) as error:
        ask(failing.url)
    assert f"answered HTTP {status} " in str(error.value)
    assert "(from the server)" in str(error.value)
    assert fix in str(error.value)
    assert len(failing.requests) == 1


GATEWAY_FAILURES = [
    # (the container's status, its message): what Azure's gateway wraps in a 424.
    ("500", "An unexpected error occurred in scoring script. Check the logs for more info.",
     "the model failed: read the deployment's logs (the studio's endpoint page, Logs tab)"),
    ("400", "'input_data': Invalid input data type to parse. Expected: <class 'list'> but got <class 'str'>",
     "the model refused the request: its message says what to change"),
    ("408", "Scoring timeout after 180000 ms", "ask for a shorter answer (`AZURE_ML_MAX_NEW_TOKENS`)"),
]


@pytest.mark.parametrize("model_status, message, fix", GATEWAY_FAILURES)
def test_a_424_from_the_gateway_names_the_models_own_failure(ask, stand_in, model_status, message, fix):
    from integrate_with_promptflow import EndpointError

    gateway = stand_in((424, {"message": message}, {"ms-azureml-model-error-statuscode": model_status}))
    with pytest.raises(EndpointError) as error:
        ask(gateway.url)
    assert str(error.value).startswith(f"the model behind {gateway.url} failed with HTTP {model_status} ({message}): ")
    assert fix in str(error.value)
    assert len(gateway.requests) == 1, "a model failure is not retried"


def test_the_flow_shows_a_424_as_one_line(stand_in, quiet_pf_home, tmp_path):
    gateway = stand_in((424, {"message": GATEWAY_FAILURES[0][1]}, {"ms-azureml-model-error-statuscode": "500"}))
    result, _ = pf_flow_test(stand_in_env(gateway.url, quiet_pf_home, tmp_path))
    assert result.returncode != 0
    # The model's status, its message and the fix, in one line of pf's report.
    expected = (f"the model behind {gateway.url} failed with HTTP 500 (An unexpected error occurred in scoring script. "
                "Check the logs for more info.): the model failed: read the deployment's logs")
    assert any(expected in line for line in result.stdout.splitlines()), result.stdout[-3000:]


@pytest.mark.parametrize(
    "body, answer",
    [(["An answer.", "another"], "An answer."), ({"output": "An answer."}, "An answer."),
     ({"output": ["An answer."]}, "An answer."), (["  An answer.\n"], "An answer.")],
)
def test_both_azure_answer_shapes_are_read(ask, stand_in, body, answer):
    assert ask(stand_in((200, body, {})).url) == answer


def test_an_unexpected_answer_shape_is_named(ask, stand_in):
    from integrate_with_promptflow import EndpointError

    with pytest.raises(EndpointError, match=r"unexpected shape \(\{\"predictions\": \[1\]\}\); expected a list of strings"):
        ask(stand_in((200, {"predictions": [1]}, {})).url)


def test_temperature_0_asks_for_greedy_decoding(ask, stand_in):
    recorder = stand_in((200, ["ok"], {}))
    ask(recorder.url, AZURE_ML_TEMPERATURE="0", AZURE_ML_MAX_NEW_TOKENS="32")
    ask(recorder.url, AZURE_ML_TEMPERATURE="1.5")
    assert [r["body"]["params"] for r in recorder.requests] == [
        {"max_new_tokens": 32, "do_sample": False, "return_full_text": False},
        {"temperature": 1.5, "max_new_tokens": 128, "do_sample": True, "return_full_text": False},
    ]


@pytest.mark.parametrize(
    "name, value, rule",
    [
        ("AZURE_ML_REQUEST_TIMEOUT", "soon", "a number of seconds above 0"),
        ("AZURE_ML_REQUEST_TIMEOUT", "0", "a number of seconds above 0"),
        ("AZURE_ML_TEMPERATURE", "-1", "a number, 0 or more (0: greedy)"),
        ("AZURE_ML_MAX_NEW_TOKENS", "2.5", "a whole number, 1 or more"),
    ],
)
def test_bad_settings_are_named(ask, stand_in, name, value, rule):
    from integrate_with_promptflow import EndpointError

    server = stand_in((200, ["ok"], {}))
    with pytest.raises(EndpointError) as error:
        ask(server.url, **{name: value})
    one_line_naming(str(error.value), f"`{name}`", rule, f"'{value}'")
    assert server.requests == []


def test_bad_history_is_named(ask, stand_in):
    server = stand_in((200, ["ok"], {}))
    with pytest.raises(ValueError, match=r"chat_history\[0\] must look like"):
        ask(server.url, chat_history=[{"question": "hi"}])
    assert server.requests == []


def test_the_local_pipeline_serves_asks_and_stops_the_endpoint(fine_tuned_model, tmp_path, monkeypatch, capsys):
    from local import pipeline

    monkeypatch.setattr(pipeline, "OUTPUTS", tmp_path)
    monkeypatch.setenv("FINETUNE_PHI_ENV_FILE", str(tmp_path / ".env"))
    port = free_port()
    answer, endpoint = pipeline.serve_and_ask(port, keep_endpoint=False, model_dir=fine_tuned_model, form="transformers")
    assert answer == ANSWER
    assert endpoint.process.poll() is not None, "the endpoint was stopped"
    printed = capsys.readouterr().out
    assert f"$ {pipeline.sys.executable} deploy_model.py --local --port {port} --model-dir {fine_tuned_model}" in printed
    assert f"Q: {QUESTION}\nA (transformers): {ANSWER}\n" in printed
    assert "pf flow serve --source ./ --port 8080 --host localhost --engine fastapi" in pipeline.CHAT_HOW_TO
    assert f"AZURE_ML_ENDPOINT=http://127.0.0.1:{port}/score" in (tmp_path / ".env").read_text()
    assert (tmp_path / "promptflow" / "pf.yaml").read_text().startswith("telemetry:\n  enabled: 'false'")
    assert not port_is_open(port), "the endpoint is stopped at the end"
