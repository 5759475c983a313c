"""The Prompt flow's one tool: send the chat's question, with its history, to the model's endpoint.

The tutorial's integrate_with_promptflow.py, made safe to chat with. The request itself, its
settings, timeout, retries and one-line errors live in chat/endpoint_client.py, which the same chat on
Microsoft Agent Framework (chat/agent.py) shares; what is the flow's is here: the tool, and the
chat history in Prompt flow's shape. Unlike the tutorial, the URI and key are read from the
environment or .env at each question (never from a source file), the earlier turns go into the
prompt so that follow-up questions keep their context, and every request has a timeout, retries
and a message that names the failure and its fix (chat/endpoint_client.py says each).
"""

import asyncio
import logging
import os
import platform

from promptflow.core import tool

from chat.endpoint_client import (  # noqa: F401  (the flow's names, as before the call moved to chat/endpoint_client.py)
    FIXES, HOW_TO_SET, MODEL_FIXES, MODEL_STATUS_HEADER, SETTINGS, EndpointError, endpoint_settings,
    query_azml_endpoint,
)
from chat import endpoint_client

# `pf flow serve`'s Flask engine would load .env into the environment once, at start, where it would
# shadow the .env this tool reads at each question (a restarted endpoint's new URI and key).
os.environ.setdefault("FLASK_SKIP_DOTENV", "1")

logging.basicConfig(
    format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
    datefmt="%Y-%m-%d %H:%M:%S",
    level=logging.INFO,
)
logger = logging.getLogger(__name__)


def flow_turns(chat_history: list | None) -> list[tuple[str, str]]:
    """The earlier (question, answer) turns from Prompt flow's chat_history."""
    turns = []
    for i, turn in enumerate(chat_history or []):
        try:
            turns.append((turn["inputs"]["input_data"], turn["outputs"]["answer"]))
        except (KeyError, TypeError):
            raise ValueError(
                f"chat_history[{i}] must look like {{'inputs': {{'input_data': ...}}, 'outputs': {{'answer': ...}}}}"
            ) from None
    return turns


def chat_input(question: str, chat_history: list | None):
    """The question after the earlier turns of Prompt flow's chat_history, as the chat sends it to the endpoint."""
    return endpoint_client.chat_input(question, flow_turns(chat_history))


def setup_asyncio_policy():
    """
    Setup asyncio event loop policy for Windows.
    """
    if platform.system() == "Windows":
        asyncio.set_event_loop_policy(asyncio.WindowsSelectorEventLoopPolicy())
        logger.info("Set Windows asyncio event loop policy.")


@tool
def my_python_tool(input_data: str, chat_history: list = None) -> str:
    """
    Tool function to process input data and query the Azure ML endpoint.
    """
    if not input_data or not input_data.strip():
        raise ValueError("The question is empty: type a question for the model (flow input input_data)")
    setup_asyncio_policy()
    return endpoint_client.ask(input_data, flow_turns(chat_history))
