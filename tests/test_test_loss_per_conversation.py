"""The test loss conversation by conversation: base and fine-tuned, paired, in every fine-tuning run and in
evaluate_model.py, on the suite's shared fine-tuned tiny model (no fine-tune of its own)."""

import re
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import tracking_uri_of

import paired


def test_each_conversations_loss_is_the_models_own_loss(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import evaluation

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Who founded Microsoft?"},
                                          {"role": "assistant", "content": "Bill Gates and Paul Allen."}], tokenize=False)
    (ids,) = evaluation.conversation_ids([text], tokenizer, max_length=256)
    ending = "" if text.endswith(tokenizer.eos_token) else tokenizer.eos_token  # TRL appends EOS when missing
    assert ids[-1] == tokenizer.eos_token_id and ids == tokenizer(text=text + ending)["input_ids"]
    (loss, short) = evaluation.conversation_losses(evaluation.torch_logits(model), [ids, ids[:1]])
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()  # transformers' own
    assert loss == pytest.approx(expected, rel=1e-5) and short is None
    assert len(evaluation.conversation_ids([text], tokenizer, max_length=5)[0]) == 5


def test_every_fine_tuning_run_compares_the_test_loss_conversation_by_conversation(fine_tuned_model, chat_files):
    # The run that wrote the shared model (fine_tune.py, as the Azure job runs it) logged the paired comparison.
    client = MlflowClient(tracking_uri=tracking_uri_of(Path(fine_tuned_model)))
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                filter_string=f"tags.model_output_dir = '{fine_tuned_model}'")
    metrics = run.data.metrics
    conversations = len(chat_files[1].read_text().splitlines())
    # Trained until it repeats the training chats, whose facts the test chats share: every conversation lower.
    assert metrics["test_loss_conversations_lowered"] == conversations == 40
    assert metrics["test_loss_difference"] < 0 and metrics["test_loss_difference_high"] < 0
    assert metrics["test_loss_p_value"] < 1e-3  # 40 of 40 lowered: drawn sign patterns, none as extreme


def test_evaluate_model_prints_the_paired_test_loss_table(fine_tuned_model, tiny_model_dir, chat_files, tmp_path,
                                                         monkeypatch, capsys):
    import evaluate_model

    monkeypatch.chdir(tmp_path)
    baseline, model = evaluate_model.main([
        "--model", str(fine_tuned_model), "--baseline", str(tiny_model_dir), "--eval-file", str(chat_files[1]),
        "--max-length", "256", "--questions", "0", "--limit", "12",
        "--caption", "What this shows: the tiny model learned its facts."])
    out = capsys.readouterr().out
    assert len(model.losses) == len(baseline.losses) == 12
    assert "What this shows: the tiny model learned its facts.\nThe test loss, conversation by conversation:" in out
    header, rule, line = out.split("conversation by conversation:\n")[1].splitlines()[:3]
    assert header.split() == ["metric", "model", "baseline", "difference", "95%", "interval", "p", "verdict",
                              "won/tied/lost"]
    cells = re.split(r"\s{2,}", line.strip())
    assert cells[0] == "test loss, per conversation" and cells[-2:] == ["model better", "12/0/0"]
    assert cells[1:4] == [f"{sum(model.losses) / 12:.3f}", f"{sum(baseline.losses) / 12:.3f}",
                          f"{(sum(model.losses) - sum(baseline.losses)) / 12:+.3f}"]
    # All 12 lowered: the exact test's smallest p, 2 / 2^12, printed as <0.001.
    assert paired.paired(model.losses, baseline.losses).p_value == pytest.approx(2 / 2 ** 12) and cells[5] == "<0.001"
    assert re.search(r"Power \(test loss\): the paired differences' SD is \d+\.\d{3} over 12 conversations\.", out)
    # The closing line stays the run's summary (the aggregate loss, as fine_tune.py reports it).
    assert out.strip().splitlines()[-1].startswith("test loss ")
    assert not list(tmp_path.iterdir())


def test_a_lower_loss_counts_as_won():
    c = paired.paired([1.0, 2.0, 1.5, 1.0, 1.0, 1.2], [2.0, 2.5, 1.5, 1.5, 1.2, 1.0])
    cells = paired.row("test loss", c, ["fine-tuned", "base"], c.p_value, lower_is_better=True)
    assert cells[-1] == "4/1/1" and cells[3] == f"{c.difference:+.3f}" and c.difference < 0
