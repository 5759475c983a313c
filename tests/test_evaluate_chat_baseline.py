"""Step 5 with a served baseline: evaluate_chat.py serves the model before fine-tuning itself.

Apart from tests/test_evaluate_chat.py so that the two files' slow tests run side by side: make
local's step-5 command against the fine-tuned tiny model's local endpoint, the base's int4 form, and
Ctrl-C or SIGTERM while the served baseline answers.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import mlflow
import pytest

from chat_fixtures import ROOT, endpoint, port_is_open, stand_in  # noqa: F401
from test_evaluate_chat import OK, no_nltk_data, offline  # noqa: F401

from chat_evaluation import baseline


def test_the_fine_tuned_model_beats_its_base_like_with_like(endpoint, fine_tuned_model, tiny_model_dir, chat_files,
                                                            no_nltk_data, tmp_path, monkeypatch, capfd):
    """make local's step 5, as its own command line runs it, against the fine-tuned tiny model's local endpoint
    (its transformers form): the base is served by the script in that same form, with the same greedy params."""
    from local import pipeline

    env_before = endpoint.env_file.read_text()
    monkeypatch.setattr(pipeline, "OUTPUTS", tmp_path)
    for name, value in (("FINETUNE_PHI_ENV_FILE", endpoint.env_file), ("TEST_DATA_PATH", chat_files[1]),
                        ("NLTK_DATA", no_nltk_data)):
        monkeypatch.setenv(name, str(value))
    pipeline.evaluate_the_chat(tiny_model_dir, 8, sample_chats=True, form="transformers", fine_tuned=fine_tuned_model)
    printed = capfd.readouterr().out
    # First the row that shows learning: each of the 40 test conversations' loss, lowered by fine-tuning.
    losses = printed[printed.index("== Step 5: the test loss, conversation by conversation"):printed.index("== Step 5: evaluate")]
    assert pipeline.what_the_loss_shows(True) + "\nThe test loss, conversation by conversation:" in losses
    loss_line = next(line for line in losses.splitlines() if line.startswith("test loss, per conversation"))
    assert loss_line.split()[-3:] == ["model", "better", "40/0/0"] and " <0.001 " in loss_line
    (run_dir,) = [p for p in (tmp_path / "evaluations").iterdir() if p.name != "baseline-models"]
    results = json.loads((run_dir / "results.json").read_text())
    f1 = results["comparisons"]["f1_score"]
    assert f1["means"][0] > 0.9 and f1["means"][1] < 0.3, f1
    assert f1["scored"] == [8, 8] and f1["paired"] == 8 and f1["wins"] >= 6
    low, high = f1["interval"]
    assert 0 < low <= f1["difference"] <= high and f1["within_noise"] is False and f1["verdict"] == "fine-tuned better"
    # Like against like: both sides' form, params and model are recorded, and they are the same.
    (fine_tuned, baseline) = results["endpoints"]
    assert fine_tuned["form"] == baseline["form"] == "transformers"
    assert fine_tuned["params"] == baseline["params"] and fine_tuned["params"]["do_sample"] is False  # greedy
    assert baseline["model"] == str(tiny_model_dir.resolve())
    assert results["settings"]["endpoints"]["baseline"] == f"served here (transformers): {tiny_model_dir.resolve()}"
    # The table: what it shows, then per metric the means, the difference, its interval, wins, counts.
    table = printed[printed.index("== 8 questions"):]
    assert table.splitlines()[1] == pipeline.what_the_table_shows(True)
    assert "proves that the steps work together, not that fine-tuning helps" in table.splitlines()[1]
    assert "Unlike forms" not in table and "Unlike params" not in table and "Sampled answers" not in table
    line = next(line for line in table.splitlines() if line.startswith("F1 "))
    assert f1["p_value"] == f1["p_verdict"] < 0.05 and results["primary"] == "f1_score"
    assert line.split() == ["F1", "(primary)", f"{f1['means'][0]:.3f}", f"{f1['means'][1]:.3f}",
                            f"{f1['difference']:+.3f}", f"[{low:+.3f},", f"{high:+.3f}]", f"{f1['p_value']:.3f}",
                            "fine-tuned", "better", f"{f1['wins']}/{f1['ties']}/{f1['losses']}", "8/8,", "8/8"]
    assert "Power (F1, the primary metric): the paired differences' SD is " in table
    assert "The 3 questions on which the two differ most (F1):" in table
    top = results["largest_differences"][0]
    assert f"    fine-tuned (F1 {top['fine-tuned F1']:.2f}): {top['fine-tuned']}" in table
    assert "Note: BLEU, GLEU and METEOR left out" in table
    assert (run_dir / "table.txt").read_text().strip() == table.split("\n\nResults:")[0].strip()
    # Served through its own .env: the learner's keeps pointing at the fine-tuned endpoint.
    assert endpoint.env_file.read_text() == env_before
    assert (run_dir / "baseline.env").exists() and "Serving the baseline" in printed
    assert len((run_dir / "answers-baseline.jsonl").read_text().splitlines()) == 8
    # The same figures in an MLflow run of the suite's store.
    # Read from the store the command logged to (the suite's, from the environment it ran in), not from whatever
    # store an earlier in-process test left this process's mlflow pointing at.
    client = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    (experiment,) = [e for e in client.search_experiments() if e.name == "finetune-phi"]
    (run,) = client.search_runs([experiment.experiment_id], filter_string="tags.step = 'evaluate_chat' and "
                                f"attributes.run_name = 'evaluate-chat-{run_dir.name}'")
    assert run.data.metrics["fine-tuned.f1_score"] == pytest.approx(f1["means"][0])
    assert run.data.metrics["difference.f1_score"] == pytest.approx(f1["difference"])
    assert run.data.metrics["difference_low.f1_score"] == pytest.approx(low)


def test_the_baselines_int4_form_is_made_once_by_quantize_model(fine_tuned_model, tmp_path, capsys):
    # Any MLflow model folder will do (a base written by mlflow_model is one: the like-with-like test writes one).
    cache = tmp_path / "baseline-models"
    mlflow_dir = baseline.mlflow_model(str(fine_tuned_model), cache)
    assert mlflow_dir == fine_tuned_model.resolve()  # already an MLflow model: served as it is
    int4_dir = baseline.in_form(mlflow_dir, "int4", cache)
    assert (int4_dir / "MLmodel").is_file() and (int4_dir / "artifacts" / "onnx" / "genai_config.json").is_file()
    assert "Writing the baseline's int4 form" in capsys.readouterr().out
    assert baseline.in_form(mlflow_dir, "int4", cache) == int4_dir and capsys.readouterr().out == ""  # once
    assert baseline.in_form(mlflow_dir, "transformers", cache) == mlflow_dir


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_keeps_the_answers_and_stops_the_served_baseline(offline, stand_in, fine_tuned_model,
                                                                          chat_files, tmp_path, sig):
    fine_tuned = stand_in(OK)
    out = tmp_path / "evaluations"
    command = [sys.executable, "evaluate_chat.py", "--questions", "all", "--form", "transformers", "--baseline",
               str(fine_tuned_model), "--out", str(out), "--test-data", str(chat_files[1]), "--max-new-tokens", "8"]
    env = {**os.environ, "AZURE_ML_ENDPOINT": fine_tuned.url, "AZURE_ML_API_KEY": "k",
           "FINETUNE_PHI_ENV_FILE": str(tmp_path / ".env")}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        answers = None
        while time.monotonic() < deadline and process.poll() is None:
            found = list(out.glob("*/answers-baseline.jsonl"))
            if found and found[0].read_text().count("\n") >= 2:
                answers = found[0]
                break
            time.sleep(0.2)
        assert answers is not None, "the baseline never answered"
        port = int(re.search(r":(\d+)/score", (answers.parent / "baseline.env").read_text()).group(1))
        process.send_signal(sig)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1
    assert stderr.strip().splitlines()[-1] == ("evaluate_chat.py: stopped; the answers collected so far are kept: run "
                                               "the same command again to continue")
    kept = [json.loads(line) for line in answers.read_text().splitlines()]
    assert len(kept) >= 2 and all(row["response"] for row in kept)
    assert not port_is_open(port), "the served baseline was stopped"
