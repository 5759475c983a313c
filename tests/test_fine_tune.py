"""finetuning_dir/fine_tune.py, run for real on a tiny Phi-3 model, and its model-folder contract."""

import json

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT, TINY_TRAINING_FLAGS, fine_tune, run_script, write_jsonl

QUESTION = "Who founded Microsoft?"


@pytest.fixture(scope="module")
def pyfunc_model(fine_tuned_model):
    return mlflow.pyfunc.load_model(str(fine_tuned_model))


def run_metrics(model_dir):
    """The metrics of the MLflow run that wrote `model_dir`."""
    client = MlflowClient()
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiment_ids, filter_string=f"tags.model_output_dir = '{model_dir}'")
    assert len(runs) == 1, f"expected one run for {model_dir}, found {len(runs)}"
    return client, runs[0]


def test_output_folder_is_an_mlflow_text_generation_model(fine_tuned_model):
    mlmodel = yaml.safe_load((fine_tuned_model / "MLmodel").read_text())
    assert mlmodel["flavors"]["transformers"]["task"] == "text-generation"
    assert mlmodel["flavors"]["transformers"]["pipeline_model_type"] == "Phi3ForCausalLM"
    assert mlmodel["metadata"]["prompt_template"] == "<|user|>\n{prompt}<|end|>\n<|assistant|>\n"
    params = {p["name"]: p["default"] for p in json.loads(mlmodel["signature"]["params"])}
    assert params == {"max_new_tokens": 128, "temperature": 0.7, "do_sample": True, "return_full_text": False}
    requirements = (fine_tuned_model / "requirements.txt").read_text()
    assert "transformers==5.23.0" in requirements and "torchvision" not in requirements
    # Checkpoints stay out of the model folder.
    assert not list(fine_tuned_model.rglob("checkpoint-*"))
    assert (fine_tuned_model.parent / "checkpoints").is_dir()


def test_reloaded_model_answers_what_it_was_taught(pyfunc_model):
    answers = pyfunc_model.predict([QUESTION, "What is LoRA?"], params={"max_new_tokens": 40, "do_sample": False})
    assert answers == [
        "Microsoft was founded by Bill Gates and Paul Allen in 1975.",
        "LoRA trains small low-rank adapters instead of every weight of the model.",
    ]


def test_max_new_tokens_is_obeyed(pyfunc_model, fine_tuned_model):
    tokenizer = AutoTokenizer.from_pretrained(fine_tuned_model / "components" / "tokenizer")
    for limit in (1, 3, 6):
        (answer,) = pyfunc_model.predict([QUESTION], params={"max_new_tokens": limit, "do_sample": False})
        assert len(tokenizer(answer, add_special_tokens=False)["input_ids"]) == limit
        assert "Microsoft was founded by Bill Gates".startswith(answer.strip())


def test_return_full_text_shows_the_phi3_chat_format(pyfunc_model):
    (full,) = pyfunc_model.predict(
        [QUESTION], params={"max_new_tokens": 8, "do_sample": False, "return_full_text": True}
    )
    assert full.startswith("<|user|>\nWho founded Microsoft?<|end|>\n<|assistant|>\nMicrosoft was")


def test_sampling_params_are_passed_to_generation(pyfunc_model):
    greedy = pyfunc_model.predict([QUESTION] * 4, params={"max_new_tokens": 12, "do_sample": False})
    assert len(set(greedy)) == 1
    hot = pyfunc_model.predict([QUESTION] * 4, params={"max_new_tokens": 12, "do_sample": True, "temperature": 5.0})
    assert len(set(hot)) > 1, "a temperature of 5 with sampling should vary the answers"


def test_losses_and_throughput_go_to_mlflow(fine_tuned_model):
    client, run = run_metrics(str(fine_tuned_model))
    metrics = run.data.metrics
    for name in ("loss", "eval_loss", "train_loss", "train_tokens_per_second", "train_runtime"):
        assert name in metrics, name
    assert metrics["train_tokens_per_second"] > 0
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)]
    assert losses[-1] < losses[0] / 2
    assert run.data.params["learning_rate"] == "0.01"


def test_higher_learning_rate_learns_more(tmp_path, tiny_model_dir, chat_files, fine_tuned_model):
    # The tutorial's 5e-6 barely moves a tiny model; the local profile's 1e-2 does.
    flags = [f for f in TINY_TRAINING_FLAGS]
    flags[flags.index("--learning-rate") + 1] = "5e-6"
    out = tmp_path / "model"
    result = fine_tune(tiny_model_dir, *chat_files, out, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    _, slow = run_metrics(str(out))
    _, fast = run_metrics(str(fine_tuned_model))
    assert fast.data.metrics["eval_loss"] < slow.data.metrics["eval_loss"] - 1.0


def test_lora_is_merged_into_a_standalone_model(tmp_path, tiny_model_dir, chat_files):
    out = tmp_path / "model"
    result = fine_tune(tiny_model_dir, *chat_files, out, "--lora", "--max-steps", "5", "--learning-rate", "1e-2")
    assert result.returncode == 0, result.stderr[-3000:]
    weights = out / "model"
    assert not list(weights.glob("adapter_*")), "the saved model must not need PEFT to load"
    merged = AutoModelForCausalLM.from_pretrained(weights)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert type(merged).__name__ == "Phi3ForCausalLM"
    changed = [
        name for name, p in merged.state_dict().items() if not p.float().allclose(base.state_dict()[name].float())
    ]
    assert any("qkv_proj" in name for name in changed)
    assert not any("lora" in name for name in merged.state_dict())


@pytest.mark.parametrize(
    "case, content, expected",
    [
        ("malformed", '{"messages": [\n', "train.jsonl: line 1 is not valid JSON"),
        ("wrong schema", '{"messages": [{"role": "user", "content": "hi"}]}\n{"text": "x"}\n', "train.jsonl: line 2 has no 'messages' list"),
        ("bad role", '{"messages": [{"role": "bot", "content": "hi"}]}\n', "line 1 message 0 has role 'bot'"),
        ("empty", "\n", "train.jsonl: has no rows"),
    ],
)
def test_bad_training_data_stops_with_one_line(tmp_path, tiny_model_dir, chat_files, case, content, expected):
    train = tmp_path / "train.jsonl"
    train.write_text(content)
    result = fine_tune(tiny_model_dir, train, chat_files[1], tmp_path / "model")
    assert result.returncode != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "model").exists()


def test_missing_file_and_non_empty_output_are_refused(tmp_path, tiny_model_dir, chat_files):
    result = fine_tune(tiny_model_dir, tmp_path / "nope.jsonl", chat_files[1], tmp_path / "model")
    assert result.returncode != 0
    assert "nope.jsonl: no such file; run download_dataset.py first" in result.stderr

    out = tmp_path / "earlier"
    write_jsonl(out / "keep.jsonl", [{"kept": True}])
    result = fine_tune(tiny_model_dir, *chat_files, out)
    assert result.returncode != 0
    assert "is not empty; pass a new folder" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.jsonl"]


def test_unreachable_hub_model_gives_one_line(tmp_path, chat_files):
    result = fine_tune("microsoft/Phi-3.5-mini-instruct", *chat_files, tmp_path / "model")
    assert result.returncode != 0
    assert "could not load model 'microsoft/Phi-3.5-mini-instruct'" in result.stderr
    assert "pass --model-name with a local model folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_runs_distributed_under_torchrun(tmp_path, tiny_model_dir, chat_files):
    # setup_ml.py --instance-count N starts one process per node with RANK/WORLD_SIZE set, as torchrun does.
    out = tmp_path / "model"
    script = ROOT / "finetuning_dir" / "fine_tune.py"
    result = run_script(
        ["-m", "torch.distributed.run", "--nproc_per_node", "2", script, "--model-name", tiny_model_dir,
         "--train-file", chat_files[0], "--eval-file", chat_files[1], "--model_output_dir", out,
         "--checkpoint_dir", tmp_path / "checkpoints", "--max-steps", "3", "--max-length", "256"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Training on 2 process(es)" in result.stdout
    assert result.stdout.count("Saved the fine-tuned MLflow model") == 1, "only rank 0 saves"
    assert (out / "MLmodel").is_file()
    run_metrics(str(out))  # exactly one MLflow run holds it
