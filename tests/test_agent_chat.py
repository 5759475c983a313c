"""Step 4b: the tutorial's chat on Microsoft Agent Framework (chat/agent.py), served by DevUI (chat/serve_agent.py).

The server runs as the learner starts it, in its own environment (.venv-agent), and is asked through
its OpenAI-compatible API with openai's client: against the local endpoint (the fine-tuned tiny
model), and against stand-in endpoints for the same requests as the Prompt flow's and for the
flow's one-line errors. The chat page is driven in tests/test_chat_browser.py.
"""

import json
import re
import socket
import time
from http.server import BaseHTTPRequestHandler

import pytest
import requests

import integrate_with_promptflow as flow
from chat_fixtures import (  # noqa: F401
    AGENT_PYTHON, ANSWER, QUESTION, AgentServer, agent_server, chat_input, chat_turn, endpoint, eventually,
    flow_answer, free_port, pf_flow_test, quiet_pf_home, stand_in,
)
from conftest import ROOT, options_without_help, run_main

FOLLOW_UP = "Is that right?"
FOLLOW_UP_ANSWER = "Yes, that is right."  # what the tiny model learned to answer after the first turn


def test_the_api_answers_with_openai_and_keeps_the_conversation(agent_server, endpoint):
    conversation = agent_server.new_conversation()
    first = agent_server.ask(QUESTION, conversation)
    assert first.status == "completed" and first.output_text == ANSWER
    follow_up = agent_server.ask(FOLLOW_UP, conversation)
    assert follow_up.output_text == FOLLOW_UP_ANSWER
    # The conversation reached the model as the first turn before the follow-up; outside it, the follow-up went
    # alone (what the tiny model says to it alone depends on how far its training generalised).
    assert endpoint.greedy_answer(chat_input(FOLLOW_UP, [(QUESTION, ANSWER)])) == FOLLOW_UP_ANSWER
    assert agent_server.ask(FOLLOW_UP).output_text == endpoint.greedy_answer(FOLLOW_UP)


@pytest.fixture
def agent_on(tmp_path):
    """Start agent servers that read the .env file they are given (as a learner's reads .env), with more settings
    and flags; all are stopped."""
    started = []

    def start(env_file, *flags, **env):
        started.append(AgentServer({"FINETUNE_PHI_ENV_FILE": str(env_file), **env},
                                   tmp_path / f"agent-serve-{len(started)}.log", *flags))
        return started[-1].wait_until_live(timeout=120)

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def recorded_agent(stand_in, agent_on, tmp_path):
    """An agent server in front of a stand-in endpoint (answering ANSWER), whose .env the test writes."""
    endpoint_ = stand_in((200, [ANSWER], {}))
    env_file = tmp_path / ".env"
    env_file.write_text(f"AZURE_ML_ENDPOINT={endpoint_.url}\nAZURE_ML_API_KEY=stand-in-key\n")
    return agent_on(env_file), endpoint_, env_file


def test_the_same_conversation_sends_the_endpoint_the_same_requests_as_the_flow(recorded_agent, quiet_pf_home):
    server, endpoint_, env_file = recorded_agent
    # Two turns through `pf flow test`: the second with the first as its chat_history.
    env = {**quiet_pf_home, "FINETUNE_PHI_ENV_FILE": str(env_file)}
    assert flow_answer(pf_flow_test(env, f"input_data={QUESTION}")[0]) == ANSWER
    history = json.dumps([chat_turn(QUESTION, ANSWER)])
    assert flow_answer(pf_flow_test(env, f"input_data={FOLLOW_UP}", f"chat_history={history}")[0]) == ANSWER
    # The same two turns through the Agent Framework chat, in one conversation.
    conversation = server.new_conversation()
    assert [server.ask(q, conversation).output_text for q in (QUESTION, FOLLOW_UP)] == [ANSWER, ANSWER]
    # And with no conversation on the server: the earlier turns sent along in `input`, as the flow's chat_history.
    messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER},
                {"role": "user", "content": FOLLOW_UP}]
    assert server.ask(messages).output_text == ANSWER

    by_flow, by_agent, by_messages = endpoint_.requests[:2], endpoint_.requests[2:4], endpoint_.requests[4:]
    assert len(by_agent) == 2 and len(by_messages) == 1
    assert [r["body"] for r in by_agent] == [r["body"] for r in by_flow]
    assert by_messages[0]["body"] == by_flow[1]["body"]
    assert by_agent[1]["body"]["input_data"] == [[{"role": "user", "content": QUESTION},
                                                  {"role": "assistant", "content": ANSWER},
                                                  {"role": "user", "content": FOLLOW_UP}]]
    for agent_request, flow_request in zip(by_agent, by_flow):
        for header in ("Authorization", "Content-Type"):
            assert agent_request["headers"][header] == flow_request["headers"][header]
        assert agent_request["path"] == flow_request["path"] == "/score"


def flows_message(monkeypatch, env_file) -> str:
    """The one line the flow's tool fails with under the settings in `env_file`."""
    import config

    monkeypatch.setattr(config, "ENV_FILE", env_file)  # what FINETUNE_PHI_ENV_FILE chose at import
    with pytest.raises(flow.EndpointError) as failed:
        flow.my_python_tool(QUESTION)
    return str(failed.value)


@pytest.fixture
def never_accepting_port():
    """A port of 127.0.0.1 that never accepts a connection: a listening socket whose queue is already full
    (backlog 0, one connection waiting), so the kernel drops every further connection request unanswered, as
    from a host that is down."""
    with socket.socket() as listener, socket.socket() as waiting:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        waiting.setblocking(False)
        waiting.connect_ex(listener.getsockname())
        yield listener.getsockname()[1]


def test_bad_settings_fail_with_the_flows_line_and_the_server_keeps_running(agent_on, stand_in, never_accepting_port,
                                                                             monkeypatch, tmp_path):
    # Started before any endpoint is configured, as the flow may be: the settings are read at each question.
    env_file = tmp_path / ".env"
    env_file.write_text("")
    server = agent_on(env_file)
    refusing = stand_in((401, {"message": "Unauthorized"}, {}))
    answering = stand_in((200, [ANSWER], {}))
    unreachable = f"http://127.0.0.1:{free_port()}/score"
    settings = {
        "no endpoint": "",
        "a wrong key": f"AZURE_ML_ENDPOINT={refusing.url}\nAZURE_ML_API_KEY=wrong-secret-key\n",
        "an unreachable endpoint": f"AZURE_ML_ENDPOINT={unreachable}\nAZURE_ML_API_KEY=unreached-secret-key\n",
        "an endpoint that never accepts": f"AZURE_ML_ENDPOINT=http://127.0.0.1:{never_accepting_port}/score\n"
                                          "AZURE_ML_API_KEY=k\n",
    }
    monkeypatch.setattr(flow.endpoint_client, "BACKOFF_FACTOR", 0)  # the flow's own line, without its waits
    for case, text in settings.items():
        env_file.write_text(text)
        expected = flows_message(monkeypatch, env_file)
        started = time.monotonic()
        failed = server.ask(QUESTION)
        assert (failed.status, failed.error.message, failed.output_text) == ("failed", expected, ""), case
        assert time.monotonic() - started < flow.endpoint_client.CONNECT_TIMEOUT_S + 5, case
    assert flows_message(monkeypatch, env_file.with_name("absent.env")).startswith("`AZURE_ML_ENDPOINT` is not set")
    # The server is still up, and answers once the settings are right.
    env_file.write_text(f"AZURE_ML_ENDPOINT={answering.url}\nAZURE_ML_API_KEY=right-secret-key\n")
    assert server.ask(QUESTION).output_text == ANSWER
    assert server.process.poll() is None
    log = server.output()
    assert "the endpoint refused the key" in log and "could not connect to" in log
    # Each question reached the server once (openai's client as the docs set it: no retries of its own).
    assert len(re.findall(r'"POST /v1/responses HTTP/1.1" 200', log)) == len(settings) + 1
    assert not [key for key in ("wrong-secret-key", "unreached-secret-key", "right-secret-key") if key in log]


def test_an_endpoint_that_never_accepts_is_asked_once_and_fails_in_seconds(never_accepting_port, monkeypatch):
    import urllib3.util.connection

    port = never_accepting_port
    tries = []
    connect = urllib3.util.connection.create_connection
    monkeypatch.setattr(urllib3.util.connection, "create_connection",
                        lambda address, *args, **kwargs: tries.append(address) or connect(address, *args, **kwargs))
    monkeypatch.setenv("AZURE_ML_ENDPOINT", f"http://127.0.0.1:{port}/score")
    monkeypatch.setenv("AZURE_ML_API_KEY", "some-key")
    monkeypatch.setattr(flow.endpoint_client, "CONNECT_TIMEOUT_S", 1.0)  # 5 s in the served chat's test above
    started = time.monotonic()
    with pytest.raises(flow.EndpointError) as failed:
        flow.my_python_tool(QUESTION)  # the flow's tool, and the agent's chat client, make this one call
    assert tries == [("127.0.0.1", port)]
    assert time.monotonic() - started < 3
    assert f"could not connect to http://127.0.0.1:{port}/score within 1 s" in str(failed.value)


def test_help_explains_every_flag_and_serving_beyond_this_machine_is_refused():
    from chat import serve_agent

    assert options_without_help(serve_agent.parse_args) == []
    shown = run_main(serve_agent.main, ["--help"], ROOT)
    assert shown.returncode == 0 and ".venv-agent/bin/python -m chat.serve_agent" in shown.stdout
    result = run_main(serve_agent.main, ["--host", "0.0.0.0", "--port", "8093"], ROOT)
    assert result.returncode == 2
    assert "--host 0.0.0.0 would serve beyond this machine" in result.stderr
    assert "ssh -L 8093:localhost:8093" in result.stderr


def test_the_api_needs_the_token_unless_the_learner_opts_out(recorded_agent, agent_on):
    server, endpoint_, env_file = recorded_agent
    body = {"model": server.entity_id(), "input": QUESTION, "metadata": {"entity_id": server.entity_id()}}
    for headers in ({}, {"Authorization": "Bearer not-the-token"}):
        refused = requests.post(server.base_url + "/v1/responses", json=body, headers=headers, timeout=30)
        assert refused.status_code == 401, headers
        assert requests.get(server.base_url + "/v1/conversations", headers=headers, timeout=30).status_code == 401
    assert endpoint_.requests == []
    assert server.ask(QUESTION).output_text == ANSWER  # openai's client with api_key=DEVUI_AUTH_TOKEN
    # --no-auth, on localhost: anyone on this machine may chat.
    open_to_all = agent_on(env_file, "--no-auth")
    assert requests.get(open_to_all.base_url + "/v1/entities", timeout=30).status_code == 200


def test_a_restart_forgets_conversations_and_an_old_one_fails_with_one_line(recorded_agent, agent_on):
    server, endpoint_, env_file = recorded_agent
    conversation = server.new_conversation()
    assert server.ask(QUESTION, conversation).output_text == ANSWER
    server.stop()
    restarted = agent_on(env_file)
    from openai import NotFoundError

    with pytest.raises(NotFoundError) as failed:
        restarted.ask(FOLLOW_UP, conversation)
    message = failed.value.body["message"]
    assert f"conversation {conversation} is not on this server" in message and "a restart forgets them" in message
    assert "\n" not in message
    assert len(endpoint_.requests) == 1  # the follow-up was not answered without its first turn


def test_spans_reach_an_otlp_collector_naming_the_model_and_host_never_the_key(stand_in, agent_on, tmp_path):
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from chat_fixtures import serve_in_background

    received = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append((self.path, self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    collector, collector_url = serve_in_background(Collector)
    try:
        endpoint_ = stand_in((200, [ANSWER], {}))
        env_file = tmp_path / ".env"
        env_file.write_text(f"AZURE_ML_ENDPOINT={endpoint_.url}\nAZURE_ML_API_KEY=traced-secret-key\n")
        server = agent_on(env_file, OTEL_EXPORTER_OTLP_ENDPOINT=collector_url, OTEL_BSP_SCHEDULE_DELAY="50")
        assert server.ask(QUESTION).output_text == ANSWER
        eventually(lambda: received)
    finally:
        collector.shutdown()
        collector.server_close()
    spans = {}
    for path, body in received:
        assert path == "/v1/traces" and b"traced-secret-key" not in body
        for resource in ExportTraceServiceRequest.FromString(body).resource_spans:
            for scope in resource.scope_spans:
                spans.update({span.name.split()[0]: {a.key: a.value.string_value for a in span.attributes}
                              for span in scope.spans})
    assert spans["chat"]["gen_ai.request.model"] == "finetuned-phi"
    assert spans["chat"]["server.address"] == "127.0.0.1"
    assert spans["invoke_agent"]["gen_ai.agent.name"] == "finetuned-phi"
    assert "traced-secret-key" not in server.output()


def test_without_a_collector_no_span_is_made_and_no_processor_piles_up(tmp_path):
    # DevUI adds a span processor to the global provider at each request (for its trace panel): the chat's
    # provider turns it away, and with no collector the framework makes no spans at all.
    import os
    import subprocess

    code = ("import sys; sys.path.insert(0, sys.argv[1]); from fastapi import FastAPI; from opentelemetry import trace; "
            "from opentelemetry.sdk.trace.export import SimpleSpanProcessor; "
            "from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter as Memory; "
            "from agent_framework.observability import OBSERVABILITY_SETTINGS; "
            "from chat.serve_agent import set_up_tracing; traced = set_up_tracing(FastAPI()); late = Memory(); "
            "trace.get_tracer_provider().add_span_processor(SimpleSpanProcessor(late)); "
            "trace.get_tracer('t').start_span('s').end(); "
            "print(traced, OBSERVABILITY_SETTINGS.ENABLED, len(late.get_finished_spans()))")
    env = {name: value for name, value in os.environ.items() if not name.startswith("OTEL_")}
    result = subprocess.run([AGENT_PYTHON, "-c", code, str(ROOT)], capture_output=True, text=True, cwd=tmp_path,
                            env=env)
    assert result.stdout.split() == ["False", "False", "0"], result.stderr[-2000:]


def test_a_grpc_collector_is_refused_with_one_line(tmp_path):
    import os
    import subprocess

    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
           "DEVUI_AUTH_TOKEN": "t"}
    result = subprocess.run([AGENT_PYTHON, "-m", "chat.serve_agent", "--port", str(free_port())], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("serve_agent: the OTLP protocol is grpc")
    assert "http/protobuf" in line and "unset OTEL_EXPORTER_OTLP_PROTOCOL" in line


def test_agent_run_options_stand_for_the_settings(stand_in, tmp_path):
    # temperature and max_tokens, as a program passes them to agent.run, reach the endpoint as its params.
    import os
    import subprocess

    endpoint_ = stand_in((200, [ANSWER], {}))
    code = ("import asyncio, sys; sys.path.insert(0, sys.argv[1]); from chat.agent import make_agent; "
            "agent = make_agent(); ask = lambda options: print(asyncio.run(agent.run('Q', options=options)).text); "
            "ask({'temperature': 0.3, 'max_tokens': 5}); ask({'temperature': 0})")
    env = {**os.environ, "AZURE_ML_ENDPOINT": endpoint_.url, "AZURE_ML_API_KEY": "k", "AZURE_ML_MAX_NEW_TOKENS": "9"}
    result = subprocess.run([AGENT_PYTHON, "-c", code, str(ROOT)], capture_output=True, text=True, cwd=tmp_path,
                            env=env)
    assert result.stdout.split("\n")[:2] == [ANSWER, ANSWER], result.stderr[-2000:]
    sampled, greedy = (request["body"]["params"] for request in endpoint_.requests)
    assert (sampled["temperature"], sampled["max_new_tokens"], sampled["do_sample"]) == (0.3, 5, True)
    assert (greedy["do_sample"], greedy["max_new_tokens"]) == (False, 9) and "temperature" not in greedy


def test_uvloop_is_pinned_for_the_platforms_it_supports_and_make_rebuilds_the_environment():
    import subprocess

    from packaging.requirements import Requirement

    lines = (ROOT / "chat" / "requirements-agent.txt").read_text().splitlines()
    (uvloop,) = [Requirement(line) for line in lines if line.startswith("uvloop")]
    assert not uvloop.marker.evaluate({"sys_platform": "win32"})
    assert uvloop.marker.evaluate({"sys_platform": "linux", "platform_python_implementation": "CPython"})
    # A change of chat/requirements-agent.txt builds .venv-agent anew, so no package of older pins stays.
    # --no-print-directory: under `make test`, a nested make would open with "Entering directory".
    plan = subprocess.run(["make", "--no-print-directory", "-n", "-W", "chat/requirements-agent.txt",
                           ".venv-agent/.installed"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout.splitlines()
    assert plan[0] == "rm -rf .venv-agent" and plan[1].endswith("-m venv .venv-agent")
    assert ".venv-agent/bin/python -m pip install --quiet -r chat/requirements-agent.txt" in plan


def test_the_agent_environment_stands_alone_and_importing_the_chat_changes_nothing(tmp_path):
    # .venv-agent has neither promptflow nor torch, its OpenTelemetry is one promptflow's tracing refuses, and
    # importing the chat's modules there writes nothing and changes no setting.
    import os
    import subprocess

    code = ("import os, sys, logging, importlib.util as u, opentelemetry.version as v; sys.path.insert(0, sys.argv[1]); "
            "before, level = dict(os.environ), logging.getLogger().level; "
            "import chat.agent, chat.serve_agent, chat.endpoint_client; "
            "assert dict(os.environ) == before and logging.getLogger().level == level; "
            "print(u.find_spec('promptflow') is None, u.find_spec('torch') is None, v.__version__)")
    result = subprocess.run([AGENT_PYTHON, "-c", code, str(ROOT)], capture_output=True, text=True, cwd=tmp_path,
                            env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")})
    assert result.returncode == 0, result.stderr[-2000:]
    no_promptflow, no_torch, otel = result.stdout.split()
    assert (no_promptflow, no_torch) == ("True", "True")
    assert tuple(map(int, otel.split(".")[:2])) >= (1, 39)
    assert list(tmp_path.iterdir()) == []


def test_make_local_asks_the_agent_after_the_flow(endpoint, monkeypatch, tmp_path, capsys):
    from chat.ask_agent import ask_the_agent

    monkeypatch.setenv("FINETUNE_PHI_ENV_FILE", str(endpoint.env_file))  # as make local's .env points at it
    assert ask_the_agent(QUESTION, tmp_path) == ANSWER
    assert "$ AZURE_ML_TEMPERATURE=0 .venv-agent/bin/python -m chat.serve_agent" in capsys.readouterr().out
    assert "Application shutdown complete" in (tmp_path / "agent-chat.log").read_text()  # stopped, not killed


def test_step_5_asks_through_either_chat_and_gets_the_same_answers(endpoint, monkeypatch, tmp_path):
    import evaluate_chat
    from conftest import write_jsonl
    from stand_ins import sample_chats

    chats = write_jsonl(tmp_path / "test.jsonl", sample_chats.make_rows(3, seed=3))
    for name in ("AZURE_ML_ENDPOINT", "AZURE_ML_API_KEY"):
        monkeypatch.setenv(name, endpoint.settings()[name])
    answers = {}
    for chat in ("flow", "agent"):
        run_dir = evaluate_chat.main(["--chat", chat, "--questions", "3", "--test-data", str(chats), "--temperature",
                                      "0", "--form", "transformers", "--out", str(tmp_path / chat)])
        rows = [json.loads(line) for line in (run_dir / "answers-fine-tuned.jsonl").read_text().splitlines()]
        answers[chat] = [row["response"] for row in rows]
        assert json.loads((run_dir / "results.json").read_text())["settings"]["chat"] == chat
    assert answers["agent"] == answers["flow"] and len(answers["flow"]) == 3
    (log,) = (tmp_path / "agent").glob("*/agent-chat-fine-tuned.log")  # the chat served for the run, then stopped
    assert "Application shutdown complete" in log.read_text()
