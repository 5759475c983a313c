"""Step 4b: chat with the fine-tuned model through Microsoft Agent Framework, beside the tutorial's Prompt flow.

A local chat for one person: serves the agent of chat/agent.py on this machine with the framework's
development server, DevUI: a chat page at http://localhost:8090/ and an OpenAI-compatible Responses API
at http://localhost:8090/v1, as `pf flow serve` serves the flow's chat page at http://localhost:8080/. The
agent asks the endpoint in .env (AZURE_ML_ENDPOINT, AZURE_ML_API_KEY) with the flow's request, settings
and error messages.

    .venv-agent/bin/python -m chat.serve_agent                 # page http://localhost:8090/: paste the token it prints
    .venv-agent/bin/python -m chat.serve_agent --port 8091 --no-auth   # no token: any program here may chat

Every API request needs the token in DEVUI_AUTH_TOKEN, or the one DevUI makes and prints at start
(--no-auth: none); the page asks for it once. It listens on this machine only; from another one, use an
SSH tunnel. Conversations live in memory: a restart forgets them. With OTEL_EXPORTER_OTLP_ENDPOINT set,
each answer's spans go to that OpenTelemetry collector (OTLP over HTTP).

It runs in its own environment, .venv-agent (`make setup` builds it from chat/requirements-agent.txt):
Agent Framework needs OpenTelemetry 1.39 or newer, which promptflow's tracing refuses. Stop it with Ctrl-C.
"""

import argparse
import json
import logging
import os

DEFAULT_PORT = 8090  # beside `pf flow serve` on 8080
LOOPBACK = ("localhost", "127.0.0.1")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="localhost",
                        help="the loopback address to serve on, localhost (default) or 127.0.0.1; never beyond "
                             "this machine")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"the port (default: {DEFAULT_PORT})")
    parser.add_argument("--no-auth", action="store_true",
                        help="answer the API without a token, as `pf flow serve` does: anyone and any program on "
                             "this machine may then chat, and read or delete its conversations")
    args = parser.parse_args(argv)
    if args.host not in LOOPBACK:
        parser.error(f"--host {args.host} would serve beyond this machine, and step 4b is a local chat for one "
                     f"person: from another machine, reach it through an SSH tunnel, `ssh -L {args.port}:localhost:"
                     f"{args.port} you@this-machine`, then open http://localhost:{args.port}/ there")
    return args


def set_up_tracing(app) -> bool:
    """Spans to the OTLP collector at OTEL_EXPORTER_OTLP_ENDPOINT when it is set (True), else none made at all.

    DevUI adds a span processor for its trace panel (hidden in user mode) to the global tracer provider
    at each request and never removes it; the provider here takes its processors at start only, so
    nothing piles up with each question. Spans carry no questions or answers (no sensitive data).
    """
    import contextlib

    from agent_framework.observability import disable_instrumentation, enable_instrumentation
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from chat.agent import AGENT_NAME

    class StartupProcessorsOnly(TracerProvider):
        sealed = False

        def add_span_processor(self, span_processor) -> None:
            if not self.sealed:
                super().add_span_processor(span_processor)

    provider = StartupProcessorsOnly(resource=Resource.create({"service.name": AGENT_NAME}))
    disable_instrumentation()  # the framework's default is on
    traced = bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    if traced and protocol not in (None, "http/protobuf"):
        raise SystemExit(f"serve_agent: the OTLP protocol is {protocol}, but this chat sends spans over HTTP only "
                         "(http/protobuf): unset OTEL_EXPORTER_OTLP_PROTOCOL and give the collector's HTTP address")
    if traced:
        # The HTTP exporter reads the OTEL_EXPORTER_OTLP_* variables itself (endpoint, headers, timeout).
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        # On once DevUI has started: at its start it would build the framework's own exporters from the same
        # variables (for gRPC by default, which is not installed), beside this one.
        devui_lifespan = app.router.lifespan_context

        @contextlib.asynccontextmanager
        async def lifespan(app_):
            async with devui_lifespan(app_):
                enable_instrumentation(enable_sensitive_data=False, force=True)
                yield

        app.router.lifespan_context = lifespan
    provider.sealed = True
    trace.set_tracer_provider(provider)
    return traced


def refuse_unknown_conversations(app, server) -> None:
    """Answer a request in a conversation the server does not hold with 404 and one line, where DevUI would answer
    it without the conversation's history (DevUI keeps conversations in memory and takes no other store)."""
    from fastapi.responses import JSONResponse
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware

    async def known_conversation(request, call_next):
        if request.method == "POST" and request.url.path == "/v1/responses":
            try:
                body = json.loads(await request.body())
            except ValueError:
                body = None
            conversation = body.get("conversation") if isinstance(body, dict) else None
            if isinstance(conversation, dict):
                conversation = conversation.get("id")
            store = server.executor.conversation_store
            if isinstance(conversation, str) and store.get_conversation(conversation) is None:
                message = (f"conversation {conversation} is not on this server: it keeps conversations in memory, and "
                           "a restart forgets them; start a new conversation, or send the earlier turns in `input`")
                return JSONResponse(status_code=404, content={"error": {
                    "message": message, "type": "invalid_request_error", "param": "conversation",
                    "code": "conversation_not_found"}})
        return await call_next(request)

    # Appended, so that it runs inside DevUI's own middleware (after its token check).
    app.user_middleware.append(Middleware(BaseHTTPMiddleware, dispatch=known_conversation))


def main(argv=None):
    args = parse_args(argv)
    import uvicorn
    from agent_framework.devui import DevServer

    from chat.agent import AGENT_NAME, make_agent

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    # DevUI's own server, as its serve() builds it, with the unknown-conversation check added. User mode: the
    # chat and its API only (no entity reloads or deployments from the page); the endpoint's one-line errors
    # still reach the page and the API. DevUI reads the token from DEVUI_AUTH_TOKEN, or makes one and logs it.
    server = DevServer(host=args.host, port=args.port, mode="user", auth_enabled=not args.no_auth)
    server.set_pending_entities([make_agent()])
    app = server.get_app()
    traced = set_up_tracing(app)
    refuse_unknown_conversations(app, server)
    asks = ("no token (--no-auth)" if args.no_auth else
            "the token in DEVUI_AUTH_TOKEN" if os.environ.get("DEVUI_AUTH_TOKEN") else "the token above")
    print(f"Agent Framework chat '{AGENT_NAME}', for you on this machine: page http://{args.host}:{args.port}/, "
          f"OpenAI-compatible API http://{args.host}:{args.port}/v1, with {asks}; traces "
          f"{'to OTEL_EXPORTER_OTLP_ENDPOINT' if traced else 'off'} (Ctrl-C stops it)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
