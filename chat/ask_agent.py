"""Questions through step 4b's Agent Framework chat, as a learner's program asks it: the server started
(`.venv-agent/bin/python -m chat.serve_agent`), asked through its OpenAI-compatible API with openai's
client, and stopped. What `make local` asks after the Prompt flow, and `evaluate_chat.py --chat agent`."""

import contextlib
import os
import secrets
import shlex
import sys
from pathlib import Path

from chat.endpoint_client import EndpointError
from config import ROOT
from serving import processes

OUTPUTS = ROOT / "outputs"
AGENT_PYTHON = ROOT / ".venv-agent" / "bin" / "python"
SETUP = "build it with `make setup` (chat/requirements-agent.txt)"


class AgentChat:
    """A served Agent Framework chat: each ask() is a new conversation of one question."""

    def __init__(self, base_url: str, token: str):
        from openai import OpenAI
        import requests

        self.base_url = base_url
        (entity,) = requests.get(f"{base_url}/v1/entities", headers={"Authorization": f"Bearer {token}"},
                                 timeout=30).json()["entities"]
        self.agent = entity["id"]  # DevUI makes the id anew at each start; its API routes by it
        # The chat's own timeout and retries apply to the endpoint; this client waits for them, and asks once.
        self.client = OpenAI(base_url=f"{base_url}/v1", api_key=token, timeout=None, max_retries=0)

    def ask(self, question: str) -> str:
        """The answer, or EndpointError with the chat's one-line message."""
        response = self.client.responses.create(model=self.agent, input=question, metadata={"entity_id": self.agent})
        if response.status != "completed":
            raise EndpointError(response.error.message if response.error else f"the chat's answer was {response.status}")
        return response.output_text


@contextlib.contextmanager
def agent_chat(settings: dict, log: Path):
    """The Agent Framework chat served on a free port of localhost with `settings` (AZURE_ML_* values that stand
    for .env's) for the length of the block; stopped however the block ends."""
    if not AGENT_PYTHON.exists():
        raise EndpointError(f"step 4b's environment {AGENT_PYTHON.parent.parent} is missing: {SETUP}")
    port = processes.free_port()
    command = [AGENT_PYTHON, "-m", "chat.serve_agent", "--port", port]
    log.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(16)  # in the environment: out of `ps`, and out of the log
    try:
        server = processes.serve(command, f"http://localhost:{port}/health", url=f"http://localhost:{port}", key=token,
                                 log=log, env={**settings, "DEVUI_AUTH_TOKEN": token}, cwd=ROOT, timeout=120)
    except processes.NotLive as e:
        raise EndpointError(f"the Agent Framework chat {str(e).splitlines()[0]}; see {log}") from None
    with server:
        yield AgentChat(server.url, server.key)


def ask_the_agent(question: str, outputs: Path = OUTPUTS) -> str:
    """One question through the Agent Framework chat, greedy as the flow's in `make local`."""
    command = shlex.join([os.path.relpath(AGENT_PYTHON, ROOT), "-m", "chat.serve_agent", "--port"])
    print(f"\n== Step 4b: ask the same through the Agent Framework chat (served, asked with openai, stopped)\n"
          f"$ AZURE_ML_TEMPERATURE=0 {command} <a free port>", flush=True)
    try:
        with agent_chat({"AZURE_ML_TEMPERATURE": "0"}, outputs / "agent-chat.log") as chat:
            return chat.ask(question)
    except EndpointError as e:
        sys.exit(f"local pipeline: the Agent Framework chat failed: {e}")
