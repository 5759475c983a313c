"""Step 4b: the tutorial's chat on Microsoft Agent Framework (chat/agent.py), served by DevUI (chat/serve_agent.py).

The server runs as the learner starts it, in its own environment (.venv-agent), and is asked through
its OpenAI-compatible API with openai's client: against the local endpoint (the fine-tuned tiny
model), and against stand-in endpoints for the same requests as the Prompt flow's and for the
flow's one-line errors. The chat page is driven in tests/test_chat_browser.py.
"""

import json

import pytest

import integrate_with_promptflow as flow
from chat_fixtures import (  # noqa: F401
    AGENT_PYTHON, ANSWER, QUESTION, AgentServer, agent_server, chat_turn, endpoint, flow_answer, free_port,
    pf_flow_test, chat_input, quiet_pf_home, stand_in,
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
    """Start agent servers that read the .env file they are given (as a learner's reads .env); all are stopped."""
    started = []

    def start(env_file):
        started.append(AgentServer({"FINETUNE_PHI_ENV_FILE": str(env_file)}, tmp_path / f"agent-serve-{len(started)}.log"))
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

    by_flow, by_agent = endpoint_.requests[:2], endpoint_.requests[2:]
    assert len(by_agent) == 2
    assert [r["body"] for r in by_agent] == [r["body"] for r in by_flow]
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


def test_bad_settings_fail_with_the_flows_line_and_the_server_keeps_running(agent_on, stand_in, monkeypatch, tmp_path):
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
    }
    monkeypatch.setattr(flow.endpoint, "BACKOFF_FACTOR", 0)  # the flow's own line, without its waits
    for case, text in settings.items():
        env_file.write_text(text)
        expected = flows_message(monkeypatch, env_file)
        failed = server.ask(QUESTION)
        assert (failed.status, failed.error.message, failed.output_text) == ("failed", expected, ""), case
    assert flows_message(monkeypatch, env_file.with_name("absent.env")).startswith("`AZURE_ML_ENDPOINT` is not set")
    # The server is still up, and answers once the settings are right.
    env_file.write_text(f"AZURE_ML_ENDPOINT={answering.url}\nAZURE_ML_API_KEY=right-secret-key\n")
    assert server.ask(QUESTION).output_text == ANSWER
    assert server.process.poll() is None
    log = server.output()
    assert "the endpoint refused the key" in log and "could not connect to" in log
    assert not [key for key in ("wrong-secret-key", "unreached-secret-key", "right-secret-key") if key in log]


def test_help_explains_every_flag_and_serving_beyond_this_machine_needs_a_token():
    from chat import serve_agent

    assert options_without_help(serve_agent.parse_args) == []
    shown = run_main(serve_agent.main, ["--help"], ROOT)
    assert shown.returncode == 0 and ".venv-agent/bin/python -m chat.serve_agent" in shown.stdout
    result = run_main(serve_agent.main, ["--host", "0.0.0.0"], ROOT)
    assert result.returncode == 2
    assert "--host 0.0.0.0 serves beyond this machine: give --auth-token too" in result.stderr


def test_the_agent_environment_stands_alone_and_importing_the_chat_changes_nothing(tmp_path):
    # .venv-agent has neither promptflow nor torch, its OpenTelemetry is one promptflow's tracing refuses, and
    # importing the chat's modules there writes nothing and changes no setting.
    import os
    import subprocess

    code = ("import os, sys, logging, importlib.util as u, opentelemetry.version as v; sys.path.insert(0, sys.argv[1]); "
            "before, level = dict(os.environ), logging.getLogger().level; "
            "import chat.agent, chat.serve_agent, chat.endpoint; "
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
    from local.ask_agent import ask_the_agent

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
