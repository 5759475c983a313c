"""Step 5, evaluate_chat.py: the chat's answers scored with azure-ai-evaluation.

The fine-tuned tiny model is served as the learner serves it (`deploy_model.py --local`) and
evaluate_chat.py serves its base itself; the offline evaluators run for real, with no NLTK data
and nothing downloaded. The AI-assisted evaluators talk to a stand-in Azure OpenAI deployment, and
the safety evaluators and evaluate()'s log to a stand-in Azure AI Foundry project, through
azure-ai-evaluation's own clients over HTTP(S) on 127.0.0.1. Bad input ends with one line, and the
answers collected before it are kept for the rerun.
"""

import json
import re
import sys
from pathlib import Path

import mlflow
import pytest

from chat_fixtures import ANSWER, QUESTION, ROOT, endpoint, free_port, stand_in  # noqa: F401
from conftest import run_main, run_script, write_jsonl
from evaluation_fixtures import AzureOpenAIStandIn, FoundryProjectStandIn, StaticCredential, make_certificate
from stand_ins import sample_chats

import evaluate_chat  # noqa: E402
import integrate_with_promptflow as flow  # noqa: E402

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
            f"{evaluate_chat.display(answers_file(tmp_path))}: run the same command again to continue")


def test_help_explains_every_flag():
    result = run_main(evaluate_chat.main, ["--help"], cwd=ROOT)
    assert result.returncode == 0, result.stderr
    for flag in ("--questions", "--test-data", "--baseline ", "--baseline-endpoint", "--form", "--concurrency",
                 "--temperature", "--max-new-tokens", "--show", "--out", "--fresh"):
        assert flag in result.stdout, flag
    assert "max_concurrent_requests_per_instance" in result.stdout


def test_the_fine_tuned_model_beats_its_base_on_f1(endpoint, tiny_model_dir, chat_files, no_nltk_data, tmp_path):
    """The learner's command against the fine-tuned tiny model's local endpoint, its base served by the script."""
    env_before = endpoint.env_file.read_text()
    out = tmp_path / "evaluations"
    result = run_script(
        ["evaluate_chat.py", "--questions", 8, "--temperature", 0, "--baseline", tiny_model_dir, "--out", out],
        cwd=ROOT, env={"FINETUNE_PHI_ENV_FILE": str(endpoint.env_file), "TEST_DATA_PATH": str(chat_files[1]),
                       "NLTK_DATA": str(no_nltk_data)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run_dir,) = [p for p in out.iterdir() if p.name != "baseline-models"]
    results = json.loads((run_dir / "results.json").read_text())
    f1 = {name: metrics["f1_score.f1_score"] for name, metrics in results["metrics"].items()}
    assert f1["fine-tuned"] > 0.9 and f1["baseline"] < 0.3, f1
    assert results["settings"]["endpoints"] == {"fine-tuned": endpoint.url,
                                                "baseline": f"served here: {tiny_model_dir.resolve()}"}
    # One table: each metric's mean for both and the difference; then where the two differ most, with both answers.
    table = result.stdout[result.stdout.index("== 8 questions"):]
    assert "metric   fine-tuned  baseline  difference" in table
    assert f"F1       {f1['fine-tuned']:10.3f}  {f1['baseline']:8.3f}  {f1['fine-tuned'] - f1['baseline']:+10.3f}" in table
    assert "ROUGE-L" in table and "The 3 questions on which the two differ most (F1):" in table
    top = results["largest_differences"][0]
    assert f"    fine-tuned (F1 {top['fine-tuned F1']:.2f}): {top['fine-tuned']}" in table
    assert "Note: BLEU, GLEU and METEOR left out" in table and "nltk_data" not in result.stderr  # nothing downloaded
    assert (run_dir / "table.txt").read_text().strip() == table.split("\n\nResults:")[0].split("\n", 1)[1].strip()
    # Served through its own .env: the learner's keeps pointing at the fine-tuned endpoint.
    assert endpoint.env_file.read_text() == env_before
    assert (run_dir / "baseline.env").exists() and "Serving the baseline" in result.stdout
    assert len((run_dir / "answers-baseline.jsonl").read_text().splitlines()) == 8
    # The same figures in an MLflow run of the suite's store.
    (run,) = mlflow.search_runs(experiment_names=["finetune-phi"], filter_string="tags.step = 'evaluate_chat' and "
                                f"attributes.run_name = 'evaluate-chat-{run_dir.name}'", output_format="list")
    assert run.data.metrics["fine-tuned.f1_score"] == pytest.approx(f1["fine-tuned"])
    assert run.data.metrics["difference.f1_score"] == pytest.approx(f1["fine-tuned"] - f1["baseline"])


def test_the_offline_evaluators_score_for_real_and_download_nothing(offline, tmp_path):
    evaluators, left_out = evaluate_chat.lexical_evaluators()
    assert list(evaluators) == ["f1_score", "rouge"]
    assert left_out == [f"BLEU, GLEU and METEOR left out: they need NLTK's tokenizer and WordNet data, which "
                        f"azure-ai-evaluation would download at run time; to add them, download it once: "
                        f"{evaluate_chat.NLTK_DOWNLOAD}"]
    answers = write_jsonl(tmp_path / "answers-fine-tuned.jsonl", [
        {"line": 0, "query": QUESTION, "ground_truth": ANSWER, "response": ANSWER},
        {"line": 1, "query": QUESTION, "ground_truth": ANSWER, "response": "Bill Gates and Paul Allen founded it."},
        {"line": 2, "query": QUESTION, "ground_truth": ANSWER, "response": "Nobody knows."},
    ])
    how = evaluate_chat.Scoring(evaluators, {}, None, None, [])
    fine_tuned = evaluate_chat.Endpoint("fine-tuned", "", "", 1, "")
    result = evaluate_chat.score(fine_tuned, answers, tmp_path, how)
    f1 = [row["outputs.f1_score.f1_score"] for row in result["rows"]]
    # SQuAD's F1 over normalised words: "bill gates and paul allen" is 5 of the reference's 9 and of the answer's 6.
    assert f1 == pytest.approx([1.0, 2 * (5 / 6) * (5 / 9) / (5 / 6 + 5 / 9), 0.0])
    assert result["metrics"]["f1_score.f1_score"] == pytest.approx(sum(f1) / 3)
    assert result["rows"][0]["outputs.rouge.rouge"] == pytest.approx(1.0)


def test_bleu_gleu_and_meteor_join_when_nltks_data_is_here(monkeypatch):
    monkeypatch.setattr(evaluate_chat, "nltk_data_present", lambda: True)
    evaluators, left_out = evaluate_chat.lexical_evaluators()
    assert list(evaluators) == ["f1_score", "rouge", "bleu", "gleu", "meteor"] and left_out == []


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
    metrics = results["metrics"]["fine-tuned"]
    for name in ("groundedness", "relevance", "coherence", "fluency", "similarity"):
        assert metrics[f"{name}.{name}"] == 4.0, name
    printed = capsys.readouterr().out
    assert re.search(r"^relevance \(1-5\) +4\.000$", printed, re.M) and "Note: groundedness" not in printed
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
        monkeypatch.setattr(evaluate_chat, "azure_credential", lambda: credential)
        results = run(tmp_path, "--test-data", chats, "--questions", 2)
    finally:
        project.close()
    metrics = results["metrics"]["fine-tuned"]
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
    assert re.search(r"^violence \(defect rate\) +0\.000$", printed, re.M)
    assert "Logged to the Azure AI project: https://ai.azure.com/resource/build/evaluation/stand-in-run" in printed


def results_dir(tmp_path):
    (found,) = (tmp_path / "evaluations").glob("*/results.json")
    return found.parent


# ------------------------------------------------------------------------------------------------------------
# Bad input: one line, and what was collected is kept


def test_an_unreachable_endpoint_stops_with_one_line(chats, monkeypatch, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/score"
    use_endpoint(monkeypatch, url, "some-key")
    monkeypatch.setattr(flow, "BACKOFF_FACTOR", 0)  # the retries still happen, without their waits
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
    assert f"Continuing the unfinished evaluation in {evaluate_chat.display(answers.parent)}" in capsys.readouterr().out
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
    assert stopped_with(tmp_path) == f"evaluate_chat.py: AZURE_ML_ENDPOINT is not set: {flow.HOW_TO_SET}"


def test_half_an_azure_openai_setting_is_refused(stand_in, chats, monkeypatch, tmp_path):
    use_endpoint(monkeypatch, stand_in(OK).url)
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", "https://judge.openai.azure.com")
    assert stopped_with(tmp_path, "--test-data", chats) == (
        "evaluate_chat.py: config: AZURE_OPENAI_API_KEY, AZURE_OPENAI_DEPLOYMENT still unset; the AI-assisted "
        "evaluators need all of AZURE_OPENAI_ENDPOINT, AZURE_OPENAI_API_KEY, AZURE_OPENAI_DEPLOYMENT in .env (copy "
        ".env.example), or none of them")


def test_questions_go_out_as_many_at_once_as_the_deployment_admits(monkeypatch):
    from deploy_model import SERVING

    monkeypatch.setenv("AZURE_ML_ENDPOINT", "http://127.0.0.1:9/score")
    monkeypatch.setenv("AZURE_ML_API_KEY", "k")
    for form in ("int4", "transformers"):
        args = evaluate_chat.parse_args(["--form", form, "--baseline", "some/model"])
        (fine_tuned, baseline), _, _ = evaluate_chat.endpoints_to_ask(args)
        assert fine_tuned.concurrency == SERVING[form].max_concurrent_requests
        assert baseline.concurrency == SERVING["transformers"].max_concurrent_requests
    assert SERVING["int4"].max_concurrent_requests == 3


def test_make_local_ends_by_evaluating_the_int4_endpoint_against_the_base(monkeypatch, tmp_path):
    from local import pipeline
    from stand_ins.tiny_phi3 import TINY_MODEL_DIR

    steps = []
    monkeypatch.setattr(pipeline, "OUTPUTS", tmp_path)
    monkeypatch.setattr(pipeline, "prepare_data", lambda split: steps.append("data"))
    monkeypatch.setattr(pipeline, "fine_tune", lambda model_name: steps.append("fine-tune"))
    monkeypatch.setattr(pipeline, "serve_and_ask", lambda port, keep_endpoint, form: steps.append(
        f"serve {form}, keep {keep_endpoint}") or ("answer", f"{form} endpoint"))
    monkeypatch.setattr(pipeline, "run", lambda step, command, check=True: steps.append((step, command)))
    monkeypatch.setattr(pipeline.processes, "stop", lambda process: steps.append(f"stop {process}"))
    pipeline.main([])
    assert steps == [
        "data", "fine-tune", "serve transformers, keep False", "serve int4, keep True",
        ("Step 5: evaluate the chat's answers against the base model's",
         [sys.executable, "evaluate_chat.py", "--questions", "20", "--temperature", "0", "--baseline",
          str(TINY_MODEL_DIR), "--fresh"]),
        "stop int4 endpoint",
    ]
