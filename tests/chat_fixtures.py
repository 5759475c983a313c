"""Fixtures for the chat tests: the local endpoint, `pf`, and stand-in servers, all on 127.0.0.1.

Every server runs as the learner would start it (a subprocess of the project's own command) on a
free port, and is stopped, with every process it started (azmlinfsrv runs in a process group of
its own), when its fixture ends, also when the test failed.
Prompt flow's home is a quiet project-local folder (chat/pf_home.py): no telemetry, no trace
service, nothing left running.
"""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
import requests

from chat.endpoint_client import chat_input  # noqa: F401  (the chat's prompt of a question and its history)
from conftest import ROOT
from finetuning_dir.chat_data import PREDICT_PARAMS
from chat import pf_home
from chat.ask_agent import AGENT_PYTHON  # noqa: F401  (.venv-agent's interpreter, as make local finds it)
from serving import processes
from serving.processes import free_port  # noqa: F401  (the tests' free ports)

PF = Path(sys.executable).with_name("pf")
QUESTION = "Who founded Microsoft?"
ANSWER = "Microsoft was founded by Bill Gates and Paul Allen in 1975."
SCRATCH = Path(os.environ.get("FINETUNE_PHI_TEST_SCRATCH", ROOT / ".scratch" / "tests"))
ARTIFACTS = SCRATCH / "artifacts"


def eventually(check, timeout: float = 15, every: float = 0.1):
    """Poll `check()` until it returns something true, and return that; AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            assert result, f"not so after {timeout} s"
            return result
        time.sleep(every)


def port_is_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


class Server:
    """A server subprocess (serving.processes), with its output kept in a log file."""

    def __init__(self, command, env, log: Path, liveness_url: str):
        self.log = log
        self.liveness_url = liveness_url
        self.process = processes.start(command, log=log, env=env, cwd=ROOT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_until_live(self, timeout=180):
        try:
            processes.wait_until_live(self.process, self.liveness_url, timeout=timeout, log=self.log)
        except processes.NotLive as e:
            raise AssertionError(f"server {e}") from None
        return self

    def descendants(self) -> list:
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, sig=signal.SIGTERM, timeout=30) -> int:
        """Stop the command the learner would stop (Ctrl-C or SIGTERM), then whatever it left."""
        return processes.stop(self.process, grace_s=timeout, sig=sig)


class Endpoint(Server):
    """The local endpoint, as the learner starts it: `python deploy_model.py --local --model-dir ...`."""

    def __init__(self, model_dir: Path, workdir: Path, **env):
        self.port = free_port()
        self.env_file = workdir / ".env"
        self.url = f"http://127.0.0.1:{self.port}/score"
        command = [sys.executable, "deploy_model.py", "--local", "--model-dir", model_dir, "--port", self.port]
        super().__init__(command, {"FINETUNE_PHI_ENV_FILE": str(self.env_file), **env}, workdir / "endpoint.log",
                         f"http://127.0.0.1:{self.port}/")

    def settings(self) -> dict:
        """What the endpoint wrote to its .env file."""
        lines = self.env_file.read_text().splitlines()
        return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))

    @property
    def key(self) -> str:
        return self.settings()["AZURE_ML_API_KEY"]

    def greedy_answer(self, prompt: str) -> str:
        """The model's answer to `prompt` asked directly, with the params a chat sends at AZURE_ML_TEMPERATURE=0."""
        params = {**PREDICT_PARAMS, "do_sample": False}
        del params["temperature"]
        response = self.post({"input_data": [prompt], "params": params})
        assert response.status_code == 200, response.text
        (answer,) = response.json()
        return answer

    def post(self, body, key: str | None = "default", content_type="application/json", **kwargs) -> requests.Response:
        headers = {} if key is None else {"Authorization": f"Bearer {self.key if key == 'default' else key}"}
        if content_type:
            headers["Content-Type"] = content_type
        data = json.dumps(body) if isinstance(body, (dict, list)) else body
        return requests.post(self.url, data=data, headers=headers, timeout=120, **kwargs)


class FlowServer(Server):
    """`pf flow serve --source ./ --port P --host localhost --engine fastapi`, the README's command."""

    def __init__(self, env: dict, log: Path, engine: str | None = "fastapi", source: Path | str = "./"):
        self.port = free_port()
        self.base_url = f"http://localhost:{self.port}"
        command = [PF, "flow", "serve", "--source", source, "--port", self.port, "--host", "localhost"]
        if engine:
            command += ["--engine", engine]
        super().__init__(command, env, log, self.base_url + "/health")

    def ask(self, question: str, chat_history=None) -> requests.Response:
        body = {"input_data": question}
        if chat_history is not None:
            body["chat_history"] = chat_history
        return requests.post(self.base_url + "/score", json=body, timeout=300)


class AgentServer(Server):
    """`.venv-agent/bin/python -m chat.serve_agent --port P`, the README's step 4b: DevUI serving the agent, with
    a token of its own in DEVUI_AUTH_TOKEN."""

    def __init__(self, env: dict, log: Path, *flags):
        self.port = free_port()
        self.base_url = f"http://localhost:{self.port}"
        self.token = secrets.token_urlsafe(16)
        super().__init__([AGENT_PYTHON, "-m", "chat.serve_agent", "--port", self.port, *flags],
                         {"DEVUI_AUTH_TOKEN": self.token, **env}, log, self.base_url + "/health")

    def entity_id(self) -> str:
        """The agent's id, which DevUI makes anew at each start (its OpenAI API routes by it)."""
        (entity,) = requests.get(self.base_url + "/v1/entities", headers={"Authorization": f"Bearer {self.token}"},
                                 timeout=30).json()["entities"]
        return entity["id"]

    def client(self):
        """openai's client, pointed at the server's OpenAI-compatible API, as the docs set it: no timeout of its own
        and no retries (the chat's own apply to the endpoint), so that each question is asked once."""
        from openai import OpenAI

        return OpenAI(base_url=self.base_url + "/v1", api_key=self.token, timeout=None, max_retries=0)

    def ask(self, question, conversation: str | None = None):
        """One question, or a list of messages, through the Responses API (in `conversation`, to keep the chat's
        history)."""
        agent = self.entity_id()
        extra = {"conversation": conversation} if conversation else {}
        return self.client().responses.create(model=agent, input=question, metadata={"entity_id": agent}, **extra)

    def new_conversation(self) -> str:
        return self.client().conversations.create().id


def pf_flow_test(env: dict, *inputs: str, timeout=300) -> tuple[subprocess.CompletedProcess, float]:
    """`pf flow test --flow . [--inputs ...]`; the result and how long it took."""
    command = [str(PF), "flow", "test", "--flow", "."]
    if inputs:
        command += ["--inputs", *inputs]
    started = time.monotonic()
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True,
                            timeout=timeout)
    return result, time.monotonic() - started


def flow_answer(result: subprocess.CompletedProcess) -> str:
    """The `answer` output `pf flow test` printed as JSON at the end of its output."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    return json.loads(out[out.rindex("{"):])["answer"]


def chat_turn(question: str, answer: str) -> dict:
    """One earlier turn, as the chat page sends it in chat_history."""
    return {"inputs": {"input_data": question}, "outputs": {"answer": answer}}


def send_json(handler: BaseHTTPRequestHandler, status: int, body, headers: dict) -> None:
    """Answer a stand-in server's request with `body` as JSON (no body for None), with extra `headers`."""
    payload = b"" if body is None else json.dumps(body).encode()
    handler.send_response(status)
    for name, value in {"Content-Type": "application/json", **headers}.items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    handler.wfile.write(payload)


def serve_in_background(handler, certificate: tuple[Path, Path] | None = None) -> tuple[ThreadingHTTPServer, str]:
    """A ThreadingHTTPServer on a free port of 127.0.0.1 running `handler` in a daemon thread (HTTPS with
    `certificate`, a (cert, key) pair): the server, to shut down, and its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    scheme = "http"
    if certificate:
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*map(str, certificate))
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    # A short poll: shutdown() waits up to one poll interval (0.5 s by default), in every test that uses one.
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    return server, f"{scheme}://127.0.0.1:{server.server_address[1]}"


class StandIn:
    """A stand-in endpoint on 127.0.0.1 that answers from a script and records what it got."""

    def __init__(self, replies):
        """replies: (status, body, headers) tuples, one per request (the last repeats), or "hang"."""
        self.replies = list(replies)
        self.requests = []
        self.release = threading.Event()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                stand_in.requests.append(
                    {"path": self.path, "headers": dict(self.headers), "body": json.loads(self.rfile.read(length))}
                )
                reply = stand_in.replies[min(len(stand_in.requests), len(stand_in.replies)) - 1]
                if reply == "hang":
                    stand_in.release.wait(60)  # bounded: the test's own teardown releases it sooner
                    return
                send_json(self, *reply)

            def log_message(self, *args):
                pass

        self.server, base_url = serve_in_background(Handler)
        self.url = base_url + "/score"

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="session")
def quiet_pf_home() -> dict:
    """Prompt flow's home for the tests (conftest's PF_HOME_DIRECTORY), set up to stay quiet."""
    return pf_home.prepare(Path(os.environ["PF_HOME_DIRECTORY"]))


@pytest.fixture(scope="session")
def endpoint(fine_tuned_model, tmp_path_factory):
    """The learner's `python deploy_model.py --local` on the fine-tuned tiny model (azmlinfsrv)."""
    server = Endpoint(fine_tuned_model, tmp_path_factory.mktemp("endpoint"))
    yield server.wait_until_live()
    server.stop()


@pytest.fixture(scope="session")
def flow_server(endpoint, quiet_pf_home, tmp_path_factory):
    """`pf flow serve` in front of the endpoint; it finds the endpoint through the endpoint's .env.

    Greedy decoding (AZURE_ML_TEMPERATURE=0), so the tiny model's answers can be compared exactly.
    """
    env = {**quiet_pf_home, "FINETUNE_PHI_ENV_FILE": str(endpoint.env_file), "AZURE_ML_TEMPERATURE": "0"}
    server = FlowServer(env,
                        tmp_path_factory.mktemp("flow-serve") / "pf-serve.log")
    yield server.wait_until_live(timeout=120)
    server.stop()


@pytest.fixture(scope="session")
def agent_server(endpoint, tmp_path_factory):
    """Step 4b's Agent Framework chat in front of the endpoint, found through the endpoint's .env; greedy, as
    flow_server."""
    server = AgentServer({"FINETUNE_PHI_ENV_FILE": str(endpoint.env_file), "AZURE_ML_TEMPERATURE": "0"},
                         tmp_path_factory.mktemp("agent-serve") / "agent-serve.log")
    yield server.wait_until_live(timeout=120)
    server.stop()


@pytest.fixture
def stand_in():
    """Make stand-in endpoints; all are closed at the end of the test."""
    made = []

    def make(*replies):
        made.append(StandIn(replies))
        return made[-1]

    yield make
    for server in made:
        server.close()
