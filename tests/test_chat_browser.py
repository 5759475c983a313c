"""The chat page of `pf flow serve`, used in a real browser: headless Chromium driven by Playwright.

A question typed into the page travels page -> pf flow serve -> the flow's tool -> the local
endpoint (azmlinfsrv) -> the fine-tuned tiny model, and its answer is read off the page; a
follow-up question then needs the chat history to be answered right. The page is saved as
.scratch/tests/artifacts/chat-page.png. The browser may reach localhost only: everything else
the page asks for (web fonts) is refused.
"""

import os
import shutil
from pathlib import Path

import pytest
import requests

from chat_fixtures import (  # noqa: F401
    ANSWER, ARTIFACTS, QUESTION, FlowServer, endpoint, flow_server, quiet_pf_home,
)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Flags for a root, offline, headless Chromium: no sandbox (root), no background calls home.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        message = "Chromium is not installed: apt-get install -y chromium (.ci/run does)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, flow_server):
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    page = context.new_page()
    local = f"http://localhost:{flow_server.port}/"
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(local) else route.abort())
    yield page
    context.close()


def ask_on_page(page, question: str, expected_answer: str):
    box = page.get_by_label("input_data")
    box.fill(question)
    page.locator("button").last.click()  # "Send message"
    page.get_by_text(expected_answer, exact=True).wait_for(timeout=120_000)


def test_chat_page_answers_and_keeps_the_conversation(page, flow_server):
    page.goto(flow_server.base_url + "/")
    assert page.title() == "Local Server Test App"

    ask_on_page(page, QUESTION, ANSWER)
    ask_on_page(page, "Is that right?", "Yes, that is right.")  # only right with the first turn as history

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "chat-page.png"))
    # Both turns are on the page, in order.
    texts = page.locator("body").inner_text()
    assert texts.index(QUESTION) < texts.index(ANSWER) < texts.index("Is that right?") < texts.index("Yes, that is right.")


def test_the_default_flask_engine_cannot_show_the_page(endpoint, quiet_pf_home, tmp_path):
    # Why the README's command adds --engine fastapi: promptflow 1.18.1-1.18.5's Flask engine
    # answers GET / with 400 (static_web_blueprint.py uses `os` without importing it). When this
    # test fails, promptflow has fixed it and the flag may go.
    server = FlowServer({**quiet_pf_home, "FINETUNE_PHI_ENV_FILE": str(endpoint.env_file)},
                        tmp_path / "pf-serve-flask.log", engine=None)
    try:
        server.wait_until_live(timeout=120)
        home = requests.get(server.base_url + "/", timeout=30)
        assert home.status_code == 400
        assert "name 'os' is not defined" in server.output()
        # The flow itself still answers on /score.
        assert requests.post(server.base_url + "/score", json={"input_data": QUESTION}, timeout=120).status_code == 200
    finally:
        server.stop()
