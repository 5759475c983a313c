"""The tutorial's chat on Microsoft Agent Framework: an agent whose chat client is the fine-tuned model's endpoint.

Microsoft's migration guide from Prompt flow maps a flow's Python node to Python logic the framework
runs, its inputs and outputs to typed messages, and its connection to settings read from the
environment. The flow here is one node that sends the question and the earlier turns to the endpoint,
so it becomes a chat client (the node's logic: chat/endpoint_client.py, shared with the flow) under an
Agent, whose session is the chat history that Prompt flow's chat_history input carried. An agent
rather than a workflow: a workflow's executors would have to carry the history by hand, while an
agent keeps it in the framework's own conversation state, which DevUI and its OpenAI-compatible API
serve as conversations.
"""

import asyncio
from collections.abc import AsyncIterable, Mapping, Sequence
from typing import Any, ClassVar
from urllib.parse import urlsplit

from agent_framework import (
    Agent, BaseChatClient, ChatMiddlewareLayer, ChatResponse, ChatResponseUpdate, Content, FunctionInvocationLayer,
    Message,
)
from agent_framework.observability import ChatTelemetryLayer

from chat import endpoint_client

AGENT_NAME = "finetuned-phi"


def turns_and_question(messages: Sequence[Message]) -> tuple[list[tuple[str, str]], str]:
    """The earlier (question, answer) turns and the new question, from the conversation's messages."""
    turns, question = [], None
    for message in messages:
        if message.role == "user":
            question = message.text if question is None else f"{question}\n{message.text}"
        elif message.role == "assistant" and question is not None:
            turns.append((question, message.text))
            question = None
    if question is None:
        raise endpoint_client.EndpointError("The question is empty: type a question for the model")
    return turns, question


class EndpointChatClient(BaseChatClient):
    """A chat client whose model is the Azure ML endpoint in AZURE_ML_ENDPOINT: each request is the flow's request,
    with the flow's settings (AZURE_ML_TEMPERATURE, AZURE_ML_MAX_NEW_TOKENS, read at each question), which the
    `temperature` and `max_tokens` options of `agent.run` override. Instructions (a system prompt) are not sent, as
    the flow sends none."""

    OTEL_PROVIDER_NAME: ClassVar[str] = "azureml-online-endpoint"
    model = AGENT_NAME  # what the telemetry layer's spans name as the model

    def service_url(self) -> str:
        """The endpoint's host, for the spans' server.address (never the path or the key)."""
        return urlsplit(endpoint_client.read_settings()["AZURE_ML_ENDPOINT"] or "").hostname or "unknown"

    async def answer(self, messages: Sequence[Message], options: Mapping[str, Any]) -> str:
        turns, question = turns_and_question(messages)
        # requests blocks: in a thread, so that the server keeps answering other chats meanwhile
        return await asyncio.to_thread(endpoint_client.ask, question, turns, temperature=options.get("temperature"),
                                       max_new_tokens=options.get("max_tokens"))

    def _inner_get_response(self, *, messages: Sequence[Message], stream: bool = False,
                            options: Mapping[str, Any], **kwargs: Any):
        # A plain def, as the framework's base class asks: an awaitable answer, or a stream of one update.
        if not stream:
            async def whole() -> ChatResponse:
                text = await self.answer(messages, options)
                return ChatResponse(messages=[Message(role="assistant", contents=[text])], model=AGENT_NAME)

            return whole()

        async def updates() -> AsyncIterable[ChatResponseUpdate]:
            text = await self.answer(messages, options)
            yield ChatResponseUpdate(contents=[Content.from_text(text)], role="assistant", model=AGENT_NAME)

        return self._build_response_stream(updates())


class EndpointChat(FunctionInvocationLayer, ChatMiddlewareLayer, ChatTelemetryLayer, EndpointChatClient):
    """The client with the framework's standard layers, as its custom-client sample composes them (DevUI shows
    the telemetry layer's spans; the model calls no tools, but the agent expects the layer)."""


def make_agent() -> Agent:
    """The chat: the endpoint's model, with the conversation kept in the agent's session."""
    return Agent(client=EndpointChat(), name=AGENT_NAME,
                 description="The fine-tuned Phi-3.5 model at AZURE_ML_ENDPOINT, as the tutorial's Prompt flow asks it")
