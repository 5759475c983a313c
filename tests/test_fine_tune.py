"""finetuning_dir/fine_tune.py, run for real on a tiny Phi-3 model: its model-folder contract, that
it learns at the tutorial's settings, its precision, and the evaluation every run reports."""

import json
import math
import re
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import (ROOT, fine_tune, one_line_naming, options_without_help, run_main, run_script, tracking_uri_of,
                      write_jsonl)

QUESTION = "Who founded Microsoft?"
SUMMARY = re.compile(r"test loss (\d+\.\d{3}) → (\d+\.\d{3}) \(perplexity (\S+) → (\S+)\)")


@pytest.fixture(scope="module")
def pyfunc_model(fine_tuned_model):
    return mlflow.pyfunc.load_model(str(fine_tuned_model))


def run_metrics(model_dir):
    """The metrics of the MLflow run that wrote `model_dir`."""
    client = MlflowClient(tracking_uri=tracking_uri_of(Path(model_dir)))
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
    for name in ("loss", "eval_loss", "base_eval_loss", "eval_perplexity", "base_eval_perplexity", "train_loss",
                 "train_tokens_per_second", "train_runtime"):
        assert name in metrics, name
    assert metrics["train_tokens_per_second"] > 0
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)]
    assert losses[-1] < losses[0] / 2
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert run.data.params["learning_rate"] == "0.01"


def evaluate_model(args, cwd):
    """evaluate_model.py's main() in this process (a new one would spend seconds importing torch)."""
    import evaluate_model

    return run_main(evaluate_model.main, args, cwd)


@pytest.fixture(scope="module")
def default_run(learning_setup, tmp_path_factory):
    """fine_tune.py at the tutorial's settings (lr 5e-6, 20% warm-up, cosine, 3 epochs, batch 4): only the
    sequence length is shortened, to the tiny model's chats."""
    model, train, test = learning_setup
    out = tmp_path_factory.mktemp("default-run") / "model"
    result = fine_tune(model, train, test, out, "--max-length", "256", "--eval-questions", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


def test_the_tutorials_defaults_learn(default_run):
    # At lr 5e-6 the tutorial's bf16 weights kept ~7% of AdamW's updates and the test loss moved ~0.03
    # on a model of this size; with fp32 weights every update lands.
    out, result = default_run
    client, run = run_metrics(str(out))
    metrics, params = run.data.metrics, run.data.params
    assert params["learning_rate"] == "5e-06" and params["warmup"] == "0.2" and params["epochs"] == "3"
    assert metrics["eval_loss"] < metrics["base_eval_loss"] - 0.3, metrics
    # The run ends with the line a person reads, made of the logged figures.
    last = result.stdout.strip().splitlines()[-1]
    found = SUMMARY.search(last)
    assert found, last
    assert float(found.group(1)) == pytest.approx(metrics["base_eval_loss"], abs=6e-4)
    assert float(found.group(2)) == pytest.approx(metrics["eval_loss"], abs=6e-4)
    assert run.data.tags["evaluation"] == found.group(0)
    # Full fine-tuning trains fp32 weights whichever precision "auto" picks here.
    assert re.search(r"precision (fp32|bf16-mixed) \(weights torch.float32\)", result.stdout)


def test_every_run_answers_eval_questions_before_and_after(default_run, learning_setup):
    out, result = default_run
    client, run = run_metrics(str(out))
    path = client.download_artifacts(run.info.run_id, "eval_answers.json", str(out.parent))
    table = json.loads(open(path).read())
    assert table["columns"] == ["question", "reference", "base model", "fine-tuned"]
    rows = [json.loads(line) for line in learning_setup[2].read_text().splitlines()[:2]]
    assert [r[0] for r in table["data"]] == [row["messages"][0]["content"] for row in rows]
    assert [r[1] for r in table["data"]] == [row["messages"][1]["content"] for row in rows]
    # Both models answered, and the log shows the same answers side by side.
    for question, reference, base, tuned in table["data"]:
        assert f"Q: {question}" in result.stdout
        assert f"fine-tuned: {tuned}" in result.stdout and f"base model: {base}" in result.stdout
    assert "Answers to 2 questions of the eval file (greedy, before and after fine-tuning)" in result.stdout


def test_the_evaluation_runs_on_its_own_and_reproduces_the_run(default_run, learning_setup, tmp_path):
    out, result = default_run
    model, _, test = learning_setup
    evaluated = evaluate_model(["--model", out, "--baseline", model, "--eval-file", test, "--max-length", "256",
                                "--questions", "1"], cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    # The same trainer, data and model: the same figures as the run's own line.
    run_line = SUMMARY.search(result.stdout.strip().splitlines()[-1]).group(0)
    assert evaluated.stdout.strip().splitlines()[-1] == run_line
    assert "baseline:" in evaluated.stdout and "model:" in evaluated.stdout
    assert not list(tmp_path.iterdir()), "the evaluation writes nothing"


def test_the_bf16_mixed_run_reports_the_saved_bf16_model_and_evaluate_model_reproduces_it(ft, tmp_path, chat_files,
                                                                                          caplog, monkeypatch):
    # The path an A100 (or a CPU with AVX512-BF16/AMX) takes under --precision auto, run on purpose
    # whatever this CPU is: fp32 weights under bf16 autocast, saved in the base model's bf16. The
    # closing line is the saved model's figure, so evaluating the saved folder gives the same line.
    from stand_ins import tiny_phi3

    asked = []  # how often main() asks the hardware: "auto" is resolved once, and every step uses that value
    monkeypatch.setattr(ft, "native_bf16", lambda: asked.append(True) or True)

    base = tiny_phi3.build(tmp_path / "base")
    AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).save_pretrained(base)  # stored in bf16, as Phi-3.5
    out = tmp_path / "run" / "model"
    with caplog.at_level("INFO", logger="fine_tune"):  # fine_tune.py's main() in this process: its log is caplog's
        ft.main(ft.parse_args([
            "--model-name", str(base), "--train-file", str(chat_files[0]), "--eval-file", str(chat_files[1]),
            "--model_output_dir", str(out), "--checkpoint_dir", str(tmp_path / "checkpoints"), "--precision",
            "auto", "--max-length", "256", "--learning-rate", "1e-3", "--epochs", "1", "--eval-questions", "1"]))
    assert asked == [True]
    _, run = run_metrics(str(out))
    assert (run.data.params["precision"], run.data.params["resolved_precision"]) == ("auto", "bf16-mixed")
    said = [record.getMessage() for record in caplog.records if record.name == "fine_tune"]
    assert any("precision bf16-mixed (weights torch.float32)" in line for line in said), said
    assert "Evaluating the fine-tuned model as it is saved (torch.bfloat16 weights)" in said
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(out / "model").dtype == torch.bfloat16
    run_line = SUMMARY.search(said[-1]).group(0)
    evaluated = evaluate_model(["--model", out, "--baseline", base, "--eval-file", chat_files[1], "--max-length", "256",
                                "--precision", "bf16-mixed", "--questions", "0"], cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    assert evaluated.stdout.strip().splitlines()[-1] == run_line


def test_a_model_folder_is_copied_in_with_its_mlmodel_last_or_not_at_all(tmp_path, monkeypatch):
    # An output folder may be an Azure ML mount point: it is written into, never replaced, and a copy
    # that stops half-way leaves it empty: no MLmodel, so nothing passes for a finished model.
    import shutil

    import model_folder

    def save(path):
        (path / "model").mkdir(parents=True)
        for name in ("a.safetensors", "config.json"):
            (path / "model" / name).write_text(name)
        (path / "MLmodel").write_text("flavors: {}")
        (path / "requirements.txt").write_text("mlflow")

    out = tmp_path / "out"
    out.mkdir()
    copied, real_copy = [], shutil.copyfile
    monkeypatch.setattr(model_folder.shutil, "copyfile", lambda src, dst: copied.append(dst) or real_copy(src, dst))
    with model_folder.staged(out) as path:
        save(path)
    assert copied[-1] == out / "MLmodel" and len(copied) == 4
    assert (out / "model" / "a.safetensors").read_text() == "a.safetensors"

    def disk_full(src, dst):
        if len(copied) == 2:
            raise OSError(28, "No space left on device")
        copied.append(dst)
        return real_copy(src, dst)

    half = tmp_path / "half"
    half.mkdir()
    copied.clear()
    monkeypatch.setattr(model_folder.shutil, "copyfile", disk_full)
    with pytest.raises(OSError, match="No space left"):
        with model_folder.staged(half) as path:
            save(path)
    assert half.is_dir() and not list(half.iterdir()), "the folder stays, empty"


def test_help_explains_every_flag(ft, tmp_path):
    result = run_main(lambda argv: ft.main(ft.parse_args(argv)), ["--help"], cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("usage:"), result.stderr
    assert options_without_help(ft.parse_args) == []


def test_the_evaluation_explains_its_flags_and_refuses_bad_input(tmp_path, capsys):
    # evaluate_model.py's main() in this process (the command line runs in the test above).
    import evaluate_model

    with pytest.raises(SystemExit) as done:
        evaluate_model.main(["--help"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("usage:")
    assert options_without_help(evaluate_model.parse_args) == []
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [\n')
    with pytest.raises(SystemExit) as stop:
        evaluate_model.main(["--model", str(tmp_path), "--eval-file", str(bad)])
    one_line_naming(str(stop.value), "evaluate_model.py", str(bad), "line 1", "not valid JSON")
    with pytest.raises(SystemExit) as stop:
        evaluate_model.main(["--model", str(tmp_path / "no-model"), "--eval-file", str(ROOT / "tests" / "nope.jsonl")])
    assert str(stop.value).startswith("evaluate_model.py: ") and "no such file" in str(stop.value)


# Precision: what the trainer is built with, checked on fine_tune.py's own functions.


@pytest.fixture
def ft(monkeypatch):
    import fine_tune

    return fine_tune


def built_trainer(ft, model_dir, chat_files, tmp_path, **options):
    args = ft.FineTuneArguments(model_name=str(model_dir), train_file=str(chat_files[0]), eval_file=str(chat_files[1]),
                                max_length=256, checkpoint_dir=str(tmp_path / "checkpoints"), **options)
    model, tokenizer = ft.load_model(args)
    train, test = ft.load_and_preprocess_data(args.train_file, args.eval_file, tokenizer)
    return args, ft.build_trainer(args, model, tokenizer, train, test)


def test_full_fine_tuning_keeps_fp32_weights_under_bf16_autocast(ft, tiny_model_dir, chat_files, tmp_path):
    args, trainer = built_trainer(ft, tiny_model_dir, chat_files, tmp_path, precision="bf16-mixed", max_steps=3)
    assert trainer.args.bf16 is True  # matmuls in bf16 (autocast) ...
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}  # ... on fp32 weights
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()  # three steps at the tutorial's lr 5e-6
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    assert len(moved) == len(before), "every weight takes AdamW's small steps"
    # Several GPUs: DDP must not copy the fp32 gradients into buckets of their own.
    assert trainer.accelerator.ddp_handler.gradient_as_bucket_view is True
    # The tutorial's gradient_checkpointing=True, under transformers' new name (the old one warns on every run).
    assert trainer.args.activation_checkpointing is True and trainer.model.is_activation_checkpointing


def test_lora_trains_fp32_adapters_on_a_bf16_base(ft, tiny_model_dir, chat_files, tmp_path):
    args, trainer = built_trainer(ft, tiny_model_dir, chat_files, tmp_path, precision="bf16-mixed", lora=True)
    trainable = {n: p.dtype for n, p in trainer.model.named_parameters() if p.requires_grad}
    frozen = {n: p.dtype for n, p in trainer.model.named_parameters() if not p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert set(trainable.values()) == {torch.float32}
    assert set(frozen.values()) == {torch.bfloat16}


def test_the_tutorials_bf16_weights_stay_available_and_auto_follows_the_hardware(ft, tiny_model_dir, chat_files,
                                                                                  tmp_path, monkeypatch):
    _, trainer = built_trainer(ft, tiny_model_dir, chat_files, tmp_path, precision="bf16")
    assert trainer.args.bf16 and {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}
    _, trainer = built_trainer(ft, tiny_model_dir, chat_files, tmp_path, precision="fp32")
    assert not trainer.args.bf16 and {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    monkeypatch.setattr(ft, "native_bf16", lambda: True)
    assert ft.resolve_precision("auto") == "bf16-mixed"
    monkeypatch.setattr(ft, "native_bf16", lambda: False)  # e.g. an AVX2 CPU: bf16 would be emulated, many times slower
    assert ft.resolve_precision("auto") == "fp32"
    assert ft.resolve_precision("bf16") == "bf16"
    # The functions after main() take the resolved value; "auto" reaching them is a mistake, not fp32.
    unresolved = ft.FineTuneArguments(model_name=str(tiny_model_dir))
    assert ft.resolved(unresolved).precision == "fp32" and unresolved.precision == "auto"
    for call in (lambda: ft.load_model(unresolved), lambda: ft.training_config(unresolved)):
        with pytest.raises(ValueError, match="precision 'auto' is not resolved"):
            call()


# Packing: bfd's packed rows kept apart (packed_rows.py) instead of TRL's one flattened row.


def test_per_row_collator_keeps_bfd_conversations_apart():
    from packed_rows import PerRowPackedCollator

    collator = PerRowPackedCollator(pad_token_id=0)
    batch = collator([{"input_ids": [5, 6, 7, 8, 9], "seq_lengths": [3, 2]}, {"input_ids": [4, 3], "seq_lengths": [2]}])
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: masks come from positions
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [4, 3, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 0, 0]]
    # No target at a conversation's first token (it would be predicted from the previous one) or on padding.
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 3, -100, -100, -100]]
    assert collator.last_spans == [3, 2, 2]


def test_rows_kept_apart_train_the_same_model_as_trls_flattened_bfd_batch(ft, tiny_model_dir, chat_files, tmp_path):
    from packed_rows import PerRowPackedCollator
    from transformers import set_seed
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    losses = {}
    for layout in ("rows kept apart", "flattened"):
        set_seed(0)
        _, trainer = built_trainer(ft, tiny_model_dir, chat_files, tmp_path, precision="fp32", max_steps=4,
                                   logging_steps=1)
        if layout == "rows kept apart":  # fine_tune.py's choice for bfd with sdpa
            assert isinstance(trainer.data_collator, PerRowPackedCollator)
        else:  # TRL's own padding-free batch: every packed row in one
            trainer.data_collator = DataCollatorForLanguageModeling(trainer.processing_class.pad_token_id,
                                                                    padding_free=True)
        trainer.train()
        losses[layout] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses["flattened"]) == 4
    # Same tokens, targets and attention within each conversation: the same losses, step by step.
    assert losses["rows kept apart"] == pytest.approx(losses["flattened"], rel=1e-5)


def test_lora_is_merged_into_a_standalone_model(ft, tmp_path, tiny_model_dir, chat_files):
    out = tmp_path / "model"
    ft.main(ft.parse_args(["--model-name", str(tiny_model_dir), "--train-file", str(chat_files[0]), "--eval-file",
                           str(chat_files[1]), "--model_output_dir", str(out), "--checkpoint_dir", str(tmp_path / "ck"),
                           "--lora", "--max-steps", "5", "--learning-rate", "1e-2", "--max-length", "256"]))
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
def test_bad_training_data_stops_with_one_line(ft, tmp_path, tiny_model_dir, chat_files, case, content, expected):
    # fine_tune.py's main() in this process: the command line around it is the next test's.
    train = tmp_path / "train.jsonl"
    train.write_text(content)
    message = stopped(ft, model_name=str(tiny_model_dir), train_file=str(train), eval_file=str(chat_files[1]),
                      model_output_dir=str(tmp_path / "model"))
    assert message.startswith("fine_tune.py: ") and expected in message and "\n" not in message
    assert not (tmp_path / "model").exists()


def stopped(ft, **arguments) -> str:
    """The one line fine_tune.py's main() stops with on these arguments."""
    with pytest.raises(SystemExit) as stop:
        ft.main(ft.FineTuneArguments(save_steps=0, **arguments))
    return str(stop.value)


def test_missing_file_and_non_empty_output_are_refused(ft, tmp_path, tiny_model_dir, chat_files):
    result = run_main(lambda argv: ft.main(ft.parse_args(argv)), [
        "--model-name", tiny_model_dir, "--train-file", tmp_path / "nope.jsonl", "--eval-file", chat_files[1],
        "--model_output_dir", tmp_path / "model"], cwd=tmp_path)
    assert result.returncode == 1
    one_line_naming(result.stderr, f"{tmp_path / 'nope.jsonl'}: no such file", "download_dataset.py")

    out = tmp_path / "earlier"
    write_jsonl(out / "keep.jsonl", [{"kept": True}])
    message = stopped(ft, model_name=str(tiny_model_dir), train_file=str(chat_files[0]),
                      eval_file=str(chat_files[1]), model_output_dir=str(out))
    one_line_naming(message, f"--model_output_dir {out}", "not empty", "new folder")
    assert [p.name for p in out.iterdir()] == ["keep.jsonl"]


def test_unreachable_hub_model_gives_one_line(ft, tmp_path, chat_files):
    message = stopped(ft, model_name="microsoft/Phi-3.5-mini-instruct", train_file=str(chat_files[0]),
                      eval_file=str(chat_files[1]), model_output_dir=str(tmp_path / "model"),
                      checkpoint_dir=str(tmp_path / "checkpoints"))
    assert message.startswith("fine_tune.py: could not load model 'microsoft/Phi-3.5-mini-instruct' (")
    assert message.endswith("; check your connection, or pass --model-name with a local model folder")


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
