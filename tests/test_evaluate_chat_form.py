"""The form an endpoint serves, recorded where it is deployed and used by step 5; the questions read without
torch."""

import os
import subprocess
import sys

import pytest

from chat_fixtures import ANSWER, ROOT, stand_in  # noqa: F401
from test_deploy_model import workspace  # noqa: F401
from test_evaluate_chat import chats, no_nltk_data, offline, run, stopped_with, use_endpoint  # noqa: F401
from test_evaluate_chat import SlowEndpoint

import config
import deploy_model
from serving import local_endpoint


@pytest.fixture(autouse=True)
def settings_restored(monkeypatch):
    """config.save_settings() exports what it writes: the endpoint's settings go when the test does."""
    for name in ("AZURE_ML_ENDPOINT", "AZURE_ML_API_KEY", "AZURE_ML_ENDPOINT_FORM"):
        monkeypatch.setenv(name, "")


@pytest.mark.parametrize("form", ["int4", "transformers"])
def test_deploy_model_records_the_form_it_deployed(workspace, tmp_path, form):  # noqa: F811
    deploy_model.main(["--form", form])
    assert f"AZURE_ML_ENDPOINT_FORM={form}\n" in (tmp_path / ".env").read_text()


def test_the_local_endpoint_records_the_form_of_its_model(fine_tuned_model, tmp_path, monkeypatch):
    monkeypatch.setattr(config, "ENV_FILE", tmp_path / ".env")
    int4 = tmp_path / "model-int4"
    (int4 / "artifacts" / "onnx").mkdir(parents=True)
    (int4 / "artifacts" / "onnx" / "genai_config.json").write_text("{}")
    assert (local_endpoint.form_of(fine_tuned_model), local_endpoint.form_of(int4)) == ("transformers", "int4")
    local_endpoint.write_settings("http://127.0.0.1:5001/score", "local-key", "int4")
    written = (tmp_path / ".env").read_text()
    assert "AZURE_ML_ENDPOINT=http://127.0.0.1:5001/score\n" in written and "AZURE_ML_ENDPOINT_FORM=int4\n" in written


def test_step_5_asks_as_the_recorded_form_answers(offline, chats, monkeypatch, tmp_path):  # noqa: F811
    slow = SlowEndpoint(ANSWER, seconds=0.2)
    try:
        use_endpoint(monkeypatch, slow.base_url + "/score")
        monkeypatch.setenv("AZURE_ML_ENDPOINT_FORM", "transformers")  # as deploy_model.py --form transformers wrote
        results = run(tmp_path, "--test-data", chats, "--questions", 4)
    finally:
        slow.close()
    assert slow.most == 1 and results["endpoints"][0]["form"] == "transformers"
    assert results["endpoints"][0]["concurrency"] == 1


def test_an_unknown_recorded_form_is_named(stand_in, chats, monkeypatch, tmp_path, capsys):  # noqa: F811
    use_endpoint(monkeypatch, stand_in((200, [ANSWER], {})).url)
    monkeypatch.setenv("AZURE_ML_ENDPOINT_FORM", "fp8")
    assert stopped_with(tmp_path, "--test-data", chats) == 2  # argparse's exit status, with its one line
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert "AZURE_ML_ENDPOINT_FORM in .env is 'fp8', not one of int4, transformers" in said and "--form" in said


def test_reading_the_questions_imports_no_torch_nor_mlflow(chats):  # noqa: F811
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import evaluate_chat; from chat_evaluation import collect; "
        "questions = collect.load_questions(sys.argv[2], 3); "
        "heavy = [m for m in ('torch', 'mlflow', 'transformers', 'finetuning_dir.evaluation') if m in sys.modules]; "
        "print(len(questions), heavy)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(ROOT), str(chats)], capture_output=True, text=True,
                            env={k: v for k, v in os.environ.items() if k != "PF_HOME_DIRECTORY"}, cwd=ROOT)
    assert result.stdout.strip() == "3 []", result.stderr[-2000:]
