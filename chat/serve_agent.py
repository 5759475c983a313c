"""Step 4b: chat with the fine-tuned model through Microsoft Agent Framework, beside the tutorial's Prompt flow.

Serves the agent of chat/agent.py with the framework's own server, DevUI: a chat page at
http://localhost:8090/ and an OpenAI-compatible Responses API at http://localhost:8090/v1, as
`pf flow serve` serves the flow's chat page at http://localhost:8080/. The agent asks the endpoint in
.env (AZURE_ML_ENDPOINT, AZURE_ML_API_KEY) with the flow's request, settings and error messages.

    .venv-agent/bin/python -m chat.serve_agent                 # the chat page: http://localhost:8090/
    .venv-agent/bin/python -m chat.serve_agent --port 8091 --auth-token "$(openssl rand -hex 16)"

It runs in its own environment, .venv-agent (`make setup` builds it from chat/requirements-agent.txt):
Agent Framework needs OpenTelemetry 1.39 or newer, which promptflow's tracing refuses. Stop it with Ctrl-C.
"""

import argparse
import logging

DEFAULT_PORT = 8090  # beside `pf flow serve` on 8080
LOOPBACK = ("localhost", "127.0.0.1")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="localhost",
                        help="the address to serve on (default: localhost; any other needs --auth-token)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"the port (default: {DEFAULT_PORT})")
    parser.add_argument("--auth-token", default=None,
                        help="require this bearer token on the API (the page asks for it once); without it the chat "
                             "answers anyone on this machine, as `pf flow serve` does")
    args = parser.parse_args(argv)
    if args.host not in LOOPBACK and not args.auth_token:
        parser.error(f"--host {args.host} serves beyond this machine: give --auth-token too")
    return args


def main(argv=None):
    args = parse_args(argv)
    from agent_framework.devui import serve

    from chat.agent import AGENT_NAME, make_agent

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    # DevUI's trace processor warns at every answer that it has shut down; it has, harmlessly.
    logging.getLogger("opentelemetry.sdk.trace.export").setLevel(logging.ERROR)
    print(f"Agent Framework chat '{AGENT_NAME}': page http://{args.host}:{args.port}/, "
          f"OpenAI-compatible API http://{args.host}:{args.port}/v1 (Ctrl-C stops it)", flush=True)
    # user mode: the chat and its API only (no entity reloads or deployments from the page); the endpoint's
    # one-line errors still reach the page and the API.
    serve(entities=[make_agent()], host=args.host, port=args.port, auto_open=False, mode="user",
          auth_enabled=bool(args.auth_token), auth_token=args.auth_token)


if __name__ == "__main__":
    main()
