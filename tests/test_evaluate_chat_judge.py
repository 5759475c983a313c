"""Step 5's judge as Azure users have one: signed in to with Entra ID when no key is set, and a reasoning-model
deployment asked without the parameters it refuses; against the stand-in Azure OpenAI deployment."""

import pytest

from chat_fixtures import stand_in  # noqa: F401
from evaluation_fixtures import AzureOpenAIStandIn, StaticCredential
from test_evaluate_chat import OK, chats, no_nltk_data, offline, run, stopped_with, use_endpoint  # noqa: F401

from chat_evaluation import scoring


def use_judge(monkeypatch, judge, deployment, key=None):
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", judge.base_url)
    monkeypatch.setenv("AZURE_OPENAI_DEPLOYMENT", deployment)
    if key:
        monkeypatch.setenv("AZURE_OPENAI_API_KEY", key)


def test_without_a_key_the_judge_is_signed_in_to_with_entra_id(offline, stand_in, chats, monkeypatch, tmp_path,
                                                               capsys):
    judge = AzureOpenAIStandIn(token="stand-in-entra-token")
    credential = StaticCredential(judge.token)
    try:
        use_endpoint(monkeypatch, stand_in(OK).url)
        use_judge(monkeypatch, judge, "judge-gpt-4o")
        monkeypatch.setattr(scoring, "azure_credential", lambda: credential)
        results = run(tmp_path, "--test-data", chats, "--questions", 2)
    finally:
        judge.close()
    assert results["evaluate_metrics"]["fine-tuned"]["relevance.relevance"] == 4.0
    assert len(judge.requests) == 10  # 5 judges x 2 answers, each with the token and no key
    headers = [{name.lower(): value for name, value in r["headers"].items()} for r in judge.requests]
    assert {h.get("authorization") for h in headers} == {"Bearer stand-in-entra-token"}
    assert not any("api-key" in h for h in headers)
    # The scope azure-ai-evaluation 1.18.10 asks the credential for (its TokenScope.COGNITIVE_SERVICES_MANAGEMENT).
    assert {getattr(scope, "value", scope) for scope in credential.scopes} == {"https://ai.azure.com/.default"}
    assert "Note: the judge is signed in to with Entra ID (no AZURE_OPENAI_API_KEY)" in capsys.readouterr().out


@pytest.mark.parametrize("deployment, setting, reasoning", [
    ("o3-mini", None, True), ("gpt-5-mini", None, True), ("judge-gpt-4o", None, False), ("gpt-4o-mini", None, False),
    ("my-judge", "true", True), ("o3-mini", "false", False),
])
def test_a_reasoning_judge_is_known_by_its_name_or_the_setting(monkeypatch, deployment, setting, reasoning):
    if setting:
        monkeypatch.setenv("AZURE_OPENAI_REASONING_MODEL", setting)
    assert scoring.is_reasoning_model(deployment) is reasoning


@pytest.mark.parametrize("deployment, reasoning", [("o3-mini", True), ("judge-gpt-4o", False)])
def test_a_reasoning_judge_gets_no_temperature_nor_max_tokens(offline, stand_in, chats, monkeypatch, tmp_path,
                                                              deployment, reasoning):
    judge = AzureOpenAIStandIn()
    try:
        use_endpoint(monkeypatch, stand_in(OK).url)
        use_judge(monkeypatch, judge, deployment, key=judge.key)
        run(tmp_path, "--test-data", chats, "--questions", 1, "--primary", "similarity")
    finally:
        judge.close()
    bodies = [r["body"] for r in judge.requests]
    assert len(bodies) == 5 and {r["path"].split("?")[0] for r in judge.requests} == {
        f"/openai/deployments/{deployment}/chat/completions"}
    if reasoning:
        assert not any("temperature" in b or "max_tokens" in b for b in bodies)
        assert all(b["max_completion_tokens"] > 0 for b in bodies)
    else:
        assert all("max_tokens" in b and "max_completion_tokens" not in b for b in bodies)


def test_a_judge_without_its_deployment_is_refused(stand_in, chats, monkeypatch, tmp_path):
    use_endpoint(monkeypatch, stand_in(OK).url)
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "some-key")
    message = stopped_with(tmp_path, "--test-data", chats)
    assert message.startswith("evaluate_chat.py: config: AZURE_OPENAI_ENDPOINT, AZURE_OPENAI_DEPLOYMENT still unset")
    assert "AZURE_OPENAI_API_KEY or an Entra ID sign-in (az login)" in message
