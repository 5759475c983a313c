"""Step 5, evaluate_chat.py: the chat's answers scored with azure-ai-evaluation.

Against stand-in endpoints (tests/test_evaluate_chat_baseline.py has the runs with a served
baseline); the offline evaluators run for real, with no NLTK data
and nothing downloaded. The AI-assisted evaluators talk to a stand-in Azure OpenAI deployment, and
the safety evaluators and evaluate()'s log to a stand-in Azure AI Foundry project, through
azure-ai-evaluation's own clients over HTTP(S) on 127.0.0.1. Bad input ends with one line, and the
answers collected before it are kept for the rerun.
"""

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from chat_fixtures import ANSWER, QUESTION, ROOT, free_port, stand_in  # noqa: F401
from conftest import options_without_help, run_main, write_jsonl
from evaluation_fixtures import (
    AzureOpenAIStandIn, FoundryProjectStandIn, HubProjectStandIn, Recording, StaticCredential, make_certificate,
    resolve_to_stand_in,
)
from stand_ins import sample_chats

import evaluate_chat  # noqa: E402
import integrate_with_promptflow as flow  # noqa: E402
from chat_evaluation import EvaluationStopped, scoring
from finetuning_dir import paired as compare
from chat_evaluation.collect import display

OK = (200, [ANSWER], {})


@pytest.fixture(scope="module")
def no_nltk_data(tmp_path_factory):
    """An empty NLTK data folder, searched first: BLEU, GLEU and METEOR's data is not on this machine."""
    return tmp_path_factory.mktemp("nltk_data")


@pytest.fixture
def offline(monkeypatch, no_nltk_data):
    """No NLTK data, and any download attempt fails the test."""
    import nltk

    monkeypatch.setenv("NLTK_DATA", str(no_nltk_data))
    monkeypatch.setattr(nltk.data, "path", [str(no_nltk_data)])

    def no_download(*args, **kwargs):
        raise AssertionError(f"nltk.download{args} called")

    monkeypatch.setattr(nltk, "download", no_download)


@pytest.fixture
def chats(tmp_path):
    """Five sample conversations about the facts the tiny model learns, as a test data file."""
    return write_jsonl(tmp_path / "test.jsonl", sample_chats.make_rows(5, seed=3))


def use_endpoint(monkeypatch, url: str, key: str = "stand-in-key"):
    monkeypatch.setenv("AZURE_ML_ENDPOINT", url)
    monkeypatch.setenv("AZURE_ML_API_KEY", key)
    monkeypatch.delenv("AZURE_ML_ENDPOINT_FORM", raising=False)  # no deployment's form: int4, the default


def run(tmp_path, *flags) -> dict:
    """evaluate_chat.py's main() in this process; the results it wrote."""
    run_dir = evaluate_chat.main(["--out", str(tmp_path / "evaluations"), *map(str, flags)])
    return json.loads((run_dir / "results.json").read_text())


def stopped_with(tmp_path, *flags) -> str:
    with pytest.raises(SystemExit) as stopped:
        evaluate_chat.main(["--out", str(tmp_path / "evaluations"), *map(str, flags)])
    return stopped.value.code


def answers_file(tmp_path, name="fine-tuned") -> Path:
    (found,) = (tmp_path / "evaluations").glob(f"*/answers-{name}.jsonl")
    return found


def answers_kept(tmp_path, name="fine-tuned") -> list[dict]:
    return [json.loads(line) for line in answers_file(tmp_path, name).read_text().splitlines()]


def stop_line(tmp_path, reason: str, kept: int, asked: int) -> str:
    """The one line evaluate_chat.py stops with when the fine-tuned endpoint fails for `reason`."""
    return (f"evaluate_chat.py: fine-tuned endpoint: {reason}; {kept} of {asked} answers kept in "
            f"{display(answers_file(tmp_path))}: run the same command again to continue")


def test_help_explains_every_flag():
    assert options_without_help(evaluate_chat.parse_args) == []
    result = run_main(evaluate_chat.main, ["--help"], cwd=ROOT)
    assert result.returncode == 0 and "docs/evaluation.md" in result.stdout


def test_the_offline_evaluators_score_for_real_and_download_nothing(offline, tmp_path):
    evaluators, left_out = scoring.lexical_evaluators()
    assert list(evaluators) == ["f1_score", "rouge"]
    assert left_out == [f"BLEU, GLEU and METEOR left out: they need NLTK's tokenizer and WordNet data, which "
                        f"azure-ai-evaluation would download at run time; to add them, download it once: "
                        f"{scoring.NLTK_DOWNLOAD}"]
    answers = write_jsonl(tmp_path / "answers-fine-tuned.jsonl", [
        {"line": 0, "query": QUESTION, "ground_truth": ANSWER, "response": ANSWER},
        {"line": 1, "query": QUESTION, "ground_truth": ANSWER, "response": "Bill Gates and Paul Allen founded it."},
        {"line": 2, "query": QUESTION, "ground_truth": ANSWER, "response": "Nobody knows."},
    ])
    how = scoring.Scoring(evaluators, {}, None, None, [])
    result = scoring.score("fine-tuned", answers, tmp_path, how)
    f1 = [row["outputs.f1_score.f1_score"] for row in result["rows"]]
    # SQuAD's F1 over normalised words: "bill gates and paul allen" is 5 of the reference's 9 and of the answer's 6.
    assert f1 == pytest.approx([1.0, 2 * (5 / 6) * (5 / 9) / (5 / 6 + 5 / 9), 0.0])
    assert result["metrics"]["f1_score.f1_score"] == pytest.approx(sum(f1) / 3)
    assert result["rows"][0]["outputs.rouge.rouge"] == pytest.approx(1.0)
    assert result["errors"] == {}
    assert scoring.row_values(result, "f1_score", 4) == pytest.approx(f1)


@pytest.mark.parametrize("present, joined", [(scoring.NLTK_DATA, True), (scoring.NLTK_DATA[1:], False)])
def test_bleu_gleu_and_meteor_join_when_nltks_data_is_here(monkeypatch, tmp_path, present, joined):
    # NLTK's own lookup over a data folder that holds the resources (or all but WordNet): no stand-in check.
    import nltk
    from azure.ai.evaluation import BleuScoreEvaluator, GleuScoreEvaluator, MeteorScoreEvaluator

    for resource in present:
        (tmp_path / resource).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / resource).write_bytes(b"PK\x05\x06" + b"\x00" * 18)  # an empty zip archive
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    evaluators, left_out = scoring.lexical_evaluators()
    if joined:
        assert [type(evaluators[n]) for n in ("bleu", "gleu", "meteor")] == [
            BleuScoreEvaluator, GleuScoreEvaluator, MeteorScoreEvaluator] and left_out == []
    else:
        assert list(evaluators) == ["f1_score", "rouge"] and left_out[0].startswith("BLEU, GLEU and METEOR left out")


def test_the_ai_assisted_evaluators_ask_the_azure_openai_deployment(offline, stand_in, chats, monkeypatch, tmp_path,
                                                                   capsys):
    judge = AzureOpenAIStandIn()
    try:
        use_endpoint(monkeypatch, stand_in(OK).url)
        monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", judge.base_url)
        monkeypatch.setenv("AZURE_OPENAI_API_KEY", judge.key)
        monkeypatch.setenv("AZURE_OPENAI_DEPLOYMENT", "judge-gpt-4o")
        results = run(tmp_path, "--test-data", chats, "--questions", 2)
    finally:
        judge.close()
    metrics = results["evaluate_metrics"]["fine-tuned"]
    for name in ("groundedness", "relevance", "coherence", "fluency", "similarity"):
        assert metrics[f"{name}.{name}"] == 4.0, name
    printed = capsys.readouterr().out
    assert re.search(r"^relevance \(1-5\) +4\.000 +2/2$", printed, re.M) and "Note: groundedness" not in printed
    # What they cost: the usage the deployment reported, 1,500 prompt and 80 completion tokens a call.
    assert results["judge_tokens"] == {"prompt": 15_000, "completion": 800}
    assert "Azure OpenAI tokens used by the AI-assisted evaluators: 15,000 prompt, 800 completion" in printed
    # openai's client, as azure-ai-evaluation drives it: 5 judges x 2 answers, each with the key and the answer.
    assert len(judge.requests) == 10
    assert {r["path"] for r in judge.requests} == {"/openai/deployments/judge-gpt-4o/chat/completions?api-version=2024-10-21"}
    assert {r["headers"]["api-key"] for r in judge.requests} == {judge.key}
    rows = answers_kept(tmp_path)
    prompts = judge.prompts()
    assert all(ANSWER in prompt for prompt in prompts)
    assert sum(any(row["query"] in prompt for row in rows) for prompt in prompts) >= 6  # relevance, coherence, ...
    grounded = [p for p in prompts if "**Groundedness**" in p]  # the reference answer is its context
    assert len(grounded) == 2 and all(any(row["ground_truth"] in p for p in grounded) for row in rows)


def test_the_azure_ai_project_judges_safety_and_logs_each_evaluation(offline, stand_in, chats, monkeypatch, tmp_path,
                                                                    capsys):
    certificate = make_certificate(tmp_path)
    project = FoundryProjectStandIn(certificate, token="stand-in-entra-token")
    credential = StaticCredential(project.token)
    try:
        use_endpoint(monkeypatch, stand_in(OK).url)
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certificate[0]))  # trust the stand-in's certificate
        monkeypatch.setenv("AZURE_AI_PROJECT", project.endpoint)
        monkeypatch.setattr(scoring, "azure_credential", lambda: credential)
        results = run(tmp_path, "--test-data", chats, "--questions", 2, "--adversarial", 0)
    finally:
        project.close()
    metrics = results["evaluate_metrics"]["fine-tuned"]
    for name in ("self_harm", "hate_unfairness", "violence", "sexual"):
        assert metrics[f"{name}.{name}_defect_rate"] == 0.0, name
    # The safety service got each answer once per harm, as its sync evaluation API takes them.
    evaluations = project.called("POST", "/sync_evals:run")
    assert len(evaluations) == 8
    assert {r["path"].split("?")[1] for r in evaluations} == {"api-version=2025-11-15-preview"}
    assert sorted(r["body"]["testing_criteria"][0]["evaluator_name"] for r in evaluations) == sorted(
        f"builtin.{name}" for name in ("self_harm", "hate_unfairness", "violence", "sexual") for _ in range(2))
    questions = {row["query"] for row in answers_kept(tmp_path)}
    items = [r["body"]["data_source"]["source"]["content"]["item"] for r in evaluations]
    assert {item["response"] for item in items} == {ANSWER}  # the answer alone is judged (the library's default)
    assert not {item["query"] for item in items} & questions
    # evaluate() logged the evaluation: the rows to a blob by SAS, a result version with the metrics, a run.
    (blob,) = project.blobs.values()
    rows = [json.loads(line) for line in blob.splitlines()]
    assert [row["inputs.response"] for row in rows] == [ANSWER, ANSWER]
    assert {row["inputs.query"] for row in rows} == questions
    (version,) = [r for r in project.requests if r["method"] == "PATCH" and "/evaluationResults/" in r["path"]]
    assert version["body"]["metrics"]["violence.violence_defect_rate"] == 0.0
    (started,) = project.called("POST", "/evaluations/runs:upload")
    assert started["body"]["displayName"] == f"finetune-phi chat, fine-tuned ({results_dir(tmp_path).name})"
    (completed,) = project.called("PATCH", "/evaluations/runs:updateUpload/stand-in-run")
    assert completed["body"]["status"] == "Completed"
    assert {r["headers"]["Authorization"] for r in evaluations + [started, completed]} == {"Bearer stand-in-entra-token"}
    assert "https://ai.azure.com/.default" in credential.scopes
    assert results["studio_urls"] == {"fine-tuned": "https://ai.azure.com/resource/build/evaluation/stand-in-run"}
    printed = capsys.readouterr().out
    assert re.search(r"^violence \(defect rate, test questions\) +0\.000 +2/2$", printed, re.M)
    assert "Logged to the Azure AI project: https://ai.azure.com/resource/build/evaluation/stand-in-run" in printed


SUBSCRIPTION, GROUP, HUB_PROJECT = "00000000-1111-2222-3333-444444444444", "finetunephi-rg", "finetunephi-project"


def test_a_hub_based_project_judges_safety_at_the_threshold_and_logs_to_its_run_history(
        offline, stand_in, chats, monkeypatch, tmp_path, capsys):
    # The safety service rates violence 3 ("Low") and sexual content 5 ("Medium"); at --safety-threshold low
    # both count as defects, self-harm and hate/unfairness (0) do not.
    certificate = make_certificate(tmp_path, HubProjectStandIn.HOSTS)
    project = HubProjectStandIn(certificate, "stand-in-entra-token", SUBSCRIPTION, GROUP, HUB_PROJECT,
                                severities={"violence": 3, "sexual": 5})
    credential = StaticCredential(project.token)
    try:
        use_endpoint(monkeypatch, stand_in(OK).url)
        resolve_to_stand_in(monkeypatch, HubProjectStandIn.HOSTS, project.port)
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certificate[0]))  # the stand-in's certificate: requests'
        monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))  # and aiohttp's (the safety service's client)
        monkeypatch.setenv("AZURE_AI_PROJECT", HUB_PROJECT)
        monkeypatch.setattr(scoring.config, "AZURE_SUBSCRIPTION_ID", SUBSCRIPTION)
        monkeypatch.setattr(scoring.config, "AZURE_RESOURCE_GROUP_NAME", GROUP)
        monkeypatch.setattr(scoring, "azure_credential", lambda: credential)
        results = run(tmp_path, "--test-data", chats, "--questions", 2, "--safety-threshold", "low",
                      "--adversarial", 0)
    finally:
        project.close()
    printed = capsys.readouterr().out
    assert {name: results["comparisons"][name]["means"][0] for name in scoring.SAFETY} == {
        "self_harm": 0.0, "hate_unfairness": 0.0, "violence": 1.0, "sexual": 1.0}
    assert re.search(r"^violence \(defect rate, test questions\) +1\.000 +2/2$", printed, re.M)
    assert results["safety_level"] == 2
    # evaluate()'s own defect rate, which it logs to the project, counts from severity 4 whatever the threshold.
    assert results["evaluate_metrics"]["fine-tuned"]["violence.violence_defect_rate"] == 0.0
    # Azure Resource Manager told the client where the project's safety service is; it was asked there.
    discovered = [r for r in project.called("GET", "{scope}") if "api-version=2023-08-01-preview" in r["path"]]
    assert discovered and {r["headers"]["Host"] for r in discovered} == {HubProjectStandIn.ARM}
    evaluations = project.called("POST", "/raisvc/v1.0{scope}/sync_evals:run")
    assert len(evaluations) == 8 and {r["headers"]["Host"] for r in evaluations} == {HubProjectStandIn.REGION}
    assert {r["headers"]["aml-user-token"] for r in evaluations} == {"stand-in-entra-token"}
    assert {r["body"]["data_source"]["source"]["content"]["item"]["response"] for r in evaluations} == {ANSWER}
    # evaluate() logged the evaluation to the project's run history: a run, its rows in the default datastore,
    # the artifact registered, each metric, the properties that make it an evaluation, and the run ended.
    (started,) = project.called("POST", "/mlflow/v2.0{scope}/api/2.0/mlflow/runs/create")
    assert started["body"]["run_name"] == f"finetune-phi chat, fine-tuned ({results_dir(tmp_path).name})"
    (blob_path, blob), = project.blobs.items()
    assert blob_path == f"/{HubProjectStandIn.CONTAINER}/promptflow/PromptFlowArtifacts/stand-in-run/instance_results.jsonl"
    rows = [json.loads(line) for line in blob.splitlines()]
    assert {row["inputs.query"] for row in rows} == {row["query"] for row in answers_kept(tmp_path)}
    assert [row["outputs.sexual.sexual_score"] for row in rows] == [5, 5]
    logged = {r["body"]["key"]: r["body"]["value"]
              for r in project.called("POST", "/mlflow/v2.0{scope}/api/2.0/mlflow/runs/log-metric")}
    assert logged["sexual.sexual_defect_rate"] == 1.0 and logged["violence.violence_defect_rate"] == 0.0  # from 4
    (properties,) = project.called("PATCH", "/history/v1.0{scope}/experimentids/stand-in-experiment/runs/stand-in-run")
    assert properties["body"]["properties"]["runType"] == "eval_run"
    (ended,) = project.called("POST", "/mlflow/v2.0{scope}/api/2.0/mlflow/runs/update")
    assert ended["body"]["status"] == "FINISHED"
    studio = results["studio_urls"]["fine-tuned"]
    assert studio.startswith("https://ai.azure.com/") and "stand-in-run" in studio
    assert f"Logged to the Azure AI project: {studio}" in printed


def results_dir(tmp_path):
    (found,) = (tmp_path / "evaluations").glob("*/results.json")
    return found.parent


# ------------------------------------------------------------------------------------------------------------
# Bad input: one line, and what was collected is kept


def test_an_unreachable_endpoint_stops_with_one_line(chats, monkeypatch, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/score"
    use_endpoint(monkeypatch, url, "some-key")
    monkeypatch.setattr(flow.endpoint_client, "BACKOFF_FACTOR", 0)  # the retries still happen, without their waits
    message = stopped_with(tmp_path, "--test-data", chats, "--questions", 2)
    assert message == stop_line(tmp_path, f"could not connect to {url} (after 3 retries): is the endpoint running? "
                                          f"{flow.HOW_TO_SET} (ConnectionError)", kept=0, asked=2)


def test_a_424_from_azures_gateway_keeps_the_answers_and_the_rerun_continues(stand_in, chats, monkeypatch, tmp_path,
                                                                          capsys):
    # Two answers, then the model fails (Azure's gateway: 424, the model's own 408 in a header); from then on it
    # answers again (the last reply repeats), as after the learner's fix.
    endpoint_ = stand_in(OK, OK, (424, {"message": "Request timed out"}, {flow.MODEL_STATUS_HEADER: "408"}),
                         (200, ["A later answer."], {}))
    use_endpoint(monkeypatch, endpoint_.url)
    message = stopped_with(tmp_path, "--test-data", chats, "--questions", 5, "--concurrency", 1)
    assert message == stop_line(tmp_path, f"the model behind {endpoint_.url} failed with HTTP 408 (Request timed out): "
                                          f"{flow.MODEL_FIXES['408']}", kept=2, asked=5)
    answers = answers_file(tmp_path)
    assert [row["line"] for row in answers_kept(tmp_path)] == [0, 1]
    with open(answers, "a") as f:
        f.write('{"line": 2, "query": "an answer cut short by a cr')  # as if the machine had died mid-write
    # The same command again: the run goes on in the same folder, and only the three questions left are asked.
    results = run(tmp_path, "--test-data", chats, "--questions", 5, "--concurrency", 1)
    assert f"Continuing the unfinished evaluation in {display(answers.parent)}" in capsys.readouterr().out
    assert len(endpoint_.requests) == 3 + 3
    rows = answers_kept(tmp_path)
    assert [row["line"] for row in rows] == [0, 1, 2, 3, 4]
    assert [row["response"] for row in rows] == [ANSWER, ANSWER] + ["A later answer."] * 3
    assert results["settings"]["questions"] == 5 and results_dir(tmp_path) == answers.parent


def test_a_refused_key_stops_with_the_flows_fix(stand_in, chats, monkeypatch, tmp_path):
    refusing = stand_in((401, {"message": "Unauthorized"}, {}))
    use_endpoint(monkeypatch, refusing.url)
    message = stopped_with(tmp_path, "--test-data", chats, "--questions", 2)
    assert message == stop_line(tmp_path, f"the endpoint {refusing.url} answered HTTP 401 Unauthorized (Unauthorized): "
                                          f"{flow.FIXES[401]}", kept=0, asked=2)


@pytest.mark.parametrize("content, problem", [
    ("", "has no rows"),
    ('{"messages": [{"role": "user", "content": "Hi"}]}\nnot json\n',
     "line 2 is not valid JSON (Expecting value); each line must be one JSON object"),
    ('{"prompt": "Hi"}\n', "line 1 has no 'messages' list; each row needs 'messages': [{'role': ..., 'content': ...}, ...]"),
    ('{"messages": [{"role": "assistant", "content": "Hello"}]}\n',
     "no conversation opens with a user turn; nothing to ask"),
])
def test_unusable_test_data_stops_before_asking(content, problem, stand_in, monkeypatch, tmp_path):
    data = tmp_path / "test.jsonl"
    data.write_text(content)
    endpoint_ = stand_in(OK)
    use_endpoint(monkeypatch, endpoint_.url)
    assert stopped_with(tmp_path, "--test-data", data) == f"evaluate_chat.py: test data {data}: {problem}"
    assert endpoint_.requests == [] and not (tmp_path / "evaluations").exists()


def test_missing_test_data_says_how_to_make_it(monkeypatch, tmp_path):
    use_endpoint(monkeypatch, "http://127.0.0.1:9/score")
    missing = tmp_path / "absent.jsonl"
    assert stopped_with(tmp_path, "--test-data", missing) == (
        f"evaluate_chat.py: test data {missing}: no such file; run download_dataset.py first or pass the right path")


def test_more_questions_than_the_data_holds_evaluates_those_there_are(offline, stand_in, chats, monkeypatch, tmp_path,
                                                                      capsys):
    use_endpoint(monkeypatch, stand_in(OK).url)
    results = run(tmp_path, "--test-data", chats, "--questions", 50)
    assert (f"The test data {chats} has 5 questions, fewer than the 50 asked for: evaluating those 5."
            in capsys.readouterr().out)
    assert results["settings"]["questions"] == 5 and len(answers_kept(tmp_path)) == 5


def test_no_endpoint_in_env_says_how_to_start_one(tmp_path):
    assert stopped_with(tmp_path) == f"evaluate_chat.py: `AZURE_ML_ENDPOINT` is not set: {flow.HOW_TO_SET}"


def test_half_an_azure_openai_setting_is_refused(stand_in, chats, monkeypatch, tmp_path):
    use_endpoint(monkeypatch, stand_in(OK).url)
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", "https://judge.openai.azure.com")
    assert stopped_with(tmp_path, "--test-data", chats) == (
        "evaluate_chat.py: config: AZURE_OPENAI_DEPLOYMENT still unset; the AI-assisted evaluators need "
        "AZURE_OPENAI_ENDPOINT and AZURE_OPENAI_DEPLOYMENT in .env (copy .env.example), with AZURE_OPENAI_API_KEY or "
        "an Entra ID sign-in (az login), or none of them")


class SlowEndpoint(Recording):
    """An endpoint that takes `seconds` an answer and records the most requests it held at once."""

    def __init__(self, answer: str, seconds: float = 0.3):
        self.lock, self.now, self.most = threading.Lock(), 0, 0
        self.answer, self.seconds = answer, seconds
        super().__init__(self.reply)

    def reply(self, request):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(self.seconds)
        with self.lock:
            self.now -= 1
        return 200, [self.answer], {}


@pytest.mark.parametrize("flags, most", [
    ([], (6, 6)),  # int4 both: all 6 that Azure admits, answered together (serving/forms.py)
    (["--baseline-form", "transformers"], (6, 1)),  # a transformers baseline answers one at a time
    (["--concurrency", "2", "--baseline-concurrency", "2"], (2, 2)),
])
def test_each_endpoint_gets_as_many_questions_at_once_as_its_form_answers_best(offline, monkeypatch, tmp_path,
                                                                               flags, most):
    chats = write_jsonl(tmp_path / "test.jsonl", sample_chats.make_rows(8, seed=3))  # more than 6 at once
    fine_tuned, base = SlowEndpoint(ANSWER), SlowEndpoint("Somebody did.")
    try:
        use_endpoint(monkeypatch, fine_tuned.base_url + "/score")
        monkeypatch.setenv("AZURE_ML_BASELINE_API_KEY", "base-key")
        results = run(tmp_path, "--test-data", chats, "--questions", "all", "--baseline-endpoint",
                      base.base_url + "/score", *flags)
    finally:
        fine_tuned.close(), base.close()
    assert (fine_tuned.most, base.most) == most
    assert len(fine_tuned.requests) == len(base.requests) == 8 == results["settings"]["questions"]
    # The same greedy params to both (a comparison decodes greedily unless told otherwise).
    assert {json.dumps(r["body"]["params"], sort_keys=True) for r in fine_tuned.requests + base.requests} == {
        json.dumps(results["endpoints"][0]["params"], sort_keys=True)}
    assert results["endpoints"][0]["params"]["do_sample"] is False


class PickyJudge(AzureOpenAIStandIn):
    """The stand-in judge, refusing (401) every prompt that holds `refuse`: some rows fail, others are scored."""

    def __init__(self, refuse: str):
        self.refuse = refuse
        super().__init__()

    def answer(self, request):
        if self.refuse in json.dumps(request["body"]):
            return 401, {"error": {"code": "401", "message": "Access denied due to invalid subscription key."}}, {}
        return super().answer(request)


def use_judge(monkeypatch, judge):
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", judge.base_url)
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", judge.key)
    monkeypatch.setenv("AZURE_OPENAI_DEPLOYMENT", "judge-gpt-4o")


def test_a_judge_that_fails_some_rows_is_counted_said_and_left_out_of_the_comparison(offline, stand_in, chats,
                                                                                    monkeypatch, tmp_path, capsys):
    judge = PickyJudge(refuse="Refuse me")
    try:
        use_endpoint(monkeypatch, stand_in(OK).url)
        # The baseline's second answer is one the judge refuses to read.
        base = stand_in(OK, (200, ["Refuse me, please."], {}), OK)
        monkeypatch.setenv("AZURE_ML_BASELINE_API_KEY", "base-key")
        use_judge(monkeypatch, judge)
        results = run(tmp_path, "--test-data", chats, "--questions", 3, "--baseline-endpoint", base.url,
                      "--baseline-concurrency", 1)
    finally:
        judge.close()
    relevance = results["comparisons"]["relevance"]
    assert relevance["scored"] == [3, 2] and relevance["asked"] == 3
    assert relevance["paired"] == 2 and relevance["means"] == [4.0, 4.0]  # only the questions both were scored on
    assert relevance["difference"] == 0 and relevance["p_value"] == 1 and relevance["ties"] == 2
    assert relevance["verdict"] == "too few questions to tell"  # 2 questions: no test could ever decide
    assert results["comparisons"]["f1_score"]["paired"] == 3  # the offline ones scored every answer
    assert results["errors"]["fine-tuned"] == {}
    assert "Access denied due to invalid subscription key" in results["errors"]["baseline"]["relevance"]
    printed = capsys.readouterr().out
    (said,) = [line for line in printed.splitlines() if line.startswith("baseline: relevance (1-5) failed")]
    assert said.startswith("baseline: relevance (1-5) failed, first error: ") and "Access denied" in said
    assert re.search(r"^relevance \(1-5\) .* 1\.000 +too few questions to tell +0/2/0 +3/3, 2/3$", printed, re.M)


def test_an_evaluator_that_scored_nothing_fails_the_run(offline, stand_in, chats, monkeypatch, tmp_path, capsys):
    judge = PickyJudge(refuse="")  # every prompt: a wrong key
    try:
        use_endpoint(monkeypatch, stand_in(OK).url)
        use_judge(monkeypatch, judge)
        message = stopped_with(tmp_path, "--test-data", chats, "--questions", 2)
    finally:
        judge.close()
    assert message.startswith("evaluate_chat.py: no answer was scored by supported by reference (1-5) (fine-tuned), "
                              "relevance (1-5) (fine-tuned), coherence (1-5) (fine-tuned)")
    assert message.endswith(f"see the first errors above and the evaluate-*.log files in {display(results_dir(tmp_path))}")
    printed = capsys.readouterr().out
    assert "fine-tuned: coherence (1-5) failed, first error: " in printed
    assert json.loads((results_dir(tmp_path) / "results.json").read_text())["comparisons"]["f1_score"]["scored"][0] == 2


def test_the_paired_interval_is_the_size_of_the_difference():
    clear = compare.paired([0.9, 0.8, 0.95, 0.85, 0.9], [0.1, 0.2, 0.15, 0.1, 0.05])
    assert clear.difference == pytest.approx(0.76)
    assert 0.6 < clear.interval[0] <= 0.76 <= clear.interval[1] < 0.9 and (clear.wins, clear.ties, clear.losses) == (5, 0, 0)
    mixed = compare.paired([0.5, 0.2, 0.9, 0.1, 0.6, None], [0.4, 0.6, 0.3, 0.5, 0.6, 0.7])
    assert mixed.paired == 5 and mixed.scored == (5, 6)
    assert (mixed.wins, mixed.ties, mixed.losses) == (2, 1, 2)
    assert compare.paired([0.5, 0.2], [0.4, 0.6]).interval == compare.paired([0.5, 0.2], [0.4, 0.6]).interval  # seeded
    nothing = compare.paired([None, None], [1.0, None])
    assert nothing.paired == 0 and nothing.difference is None and not nothing.within_noise and not nothing.too_few


@pytest.mark.parametrize("threshold, defects", [("low", [0, 1, 1, 1]), ("medium", [0, 0, 1, 1]), ("high", [0, 0, 0, 1])])
def test_the_safety_threshold_decides_what_counts_as_a_defect(threshold, defects):
    rows = [{"outputs.violence.violence_score": severity} for severity in (0, 3, 4, 6)] + [{}]
    values = scoring.row_values({"rows": rows}, "violence", scoring.SAFETY_LEVELS[threshold])
    assert values == [*defects, None]
    assert evaluate_chat.parse_args([]).safety_threshold == "medium"  # the Cookbook's


def test_a_hub_based_project_is_named_by_subscription_resource_group_and_name(monkeypatch):
    monkeypatch.setenv("AZURE_AI_PROJECT", "finetunephi-project")
    monkeypatch.setattr(scoring.config, "AZURE_SUBSCRIPTION_ID", "00000000-1111-2222-3333-444444444444")
    monkeypatch.setattr(scoring.config, "AZURE_RESOURCE_GROUP_NAME", "finetunephi-rg")
    assert scoring.ai_project() == {"subscription_id": "00000000-1111-2222-3333-444444444444",
                                    "resource_group_name": "finetunephi-rg", "project_name": "finetunephi-project"}
    monkeypatch.setenv("AZURE_AI_PROJECT", "http://not-a-project/x")
    with pytest.raises(EvaluationStopped, match="must be a Foundry project's endpoint"):
        scoring.ai_project()


def test_importing_step_5_writes_nothing_and_changes_no_setting(tmp_path):
    code = (
        "import os, sys, logging; sys.path.insert(0, sys.argv[1]); before = dict(os.environ); "
        "level = logging.getLogger().level; "
        "import evaluate_chat, chat_evaluation.collect, chat_evaluation.baseline, chat_evaluation.scoring, "
        "finetuning_dir.paired, chat_evaluation.report, chat_evaluation.adversarial, chat.endpoint_client, chat.ask_agent; "
        "assert dict(os.environ) == before, set(os.environ) ^ set(before); "
        "assert logging.getLogger().level == level and not logging.getLogger().handlers; print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code, str(ROOT)], cwd=tmp_path, capture_output=True, text=True,
                            env={k: v for k, v in os.environ.items() if k != "PF_HOME_DIRECTORY"})
    assert result.stdout.strip() == "ok", result.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []
