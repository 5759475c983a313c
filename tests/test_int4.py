"""The int4 ONNX serving form (finetuning_dir/quantize_model.py): converted from the fine-tuned tiny
model for real, loaded with mlflow.pyfunc, evaluated against the model it came from, and chatted
with through `deploy_model.py --local` and the Prompt flow."""

import json
import re
from concurrent.futures import ThreadPoolExecutor

import mlflow
import pytest
import yaml
from transformers import AutoTokenizer

from chat_fixtures import ANSWER, QUESTION, Endpoint, flow_answer, pf_flow_test, quiet_pf_home  # noqa: F401
from conftest import ROOT, one_line_naming, options_without_help, run_main, run_script, write_jsonl

QUANTIZE = ROOT / "finetuning_dir" / "quantize_model.py"


def quantize_in_process(args, cwd):
    """quantize_model.py's main() in this process, for its error paths; the int4_model fixture runs the command."""
    import quantize_model

    return run_main(quantize_model.main, args, cwd)


@pytest.fixture(scope="session")
def int4_model(fine_tuned_model, tmp_path_factory):
    """`quantize_model.py` run on the fine-tuned tiny model, as a learner runs it."""
    out = tmp_path_factory.mktemp("int4") / "model-int4"
    result = run_script([QUANTIZE, "--model-dir", fine_tuned_model, "--output-dir", out], cwd=out.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"Saved the int4 MLflow model to {out}" in result.stdout
    return out


@pytest.fixture(scope="module")
def pyfunc_int4(int4_model):
    return mlflow.pyfunc.load_model(str(int4_model))


def test_the_int4_folder_keeps_the_models_contract(int4_model, fine_tuned_model):
    int4, source = (yaml.safe_load((folder / "MLmodel").read_text()) for folder in (int4_model, fine_tuned_model))
    assert set(int4["flavors"]) == {"python_function"}
    assert int4["signature"] == source["signature"]  # the same inputs, outputs and params with their defaults
    assert int4["metadata"]["prompt_template"] == source["metadata"]["prompt_template"]
    assert "int4 weights" in int4["metadata"]["quantization"]
    assert (int4_model / "artifacts" / "onnx" / "model.onnx").is_file()
    # Installs on a CPU image: no torch, no transformers, no CUDA wheels.
    requirements = (int4_model / "requirements.txt").read_text().splitlines()
    names = {re.split(r"[=<>]", line)[0].lower() for line in requirements if line}
    assert {"mlflow", "onnxruntime-genai", "onnxruntime"} <= names
    assert not names & {"torch", "transformers", "accelerate", "onnxruntime-genai-cuda"}
    assert not any(name.startswith("nvidia") for name in names)
    assert not (int4_model / "python_model.pkl").exists(), "the model's code is a file, not a pickle"


def test_int4_answers_what_the_fine_tuned_model_learned(pyfunc_int4):
    answers = pyfunc_int4.predict([QUESTION, "What is LoRA?"], params={"max_new_tokens": 40, "do_sample": False})
    assert answers == [ANSWER, "LoRA trains small low-rank adapters instead of every weight of the model."]


def test_a_requests_questions_are_decoded_together_each_as_if_alone(pyfunc_int4, monkeypatch):
    # Prompts of different lengths, answers that end early and one that runs to the limit: greedy, each answer
    # of the batch is the one the question gets alone, and the whole request is one generator (one batch).
    from types import SimpleNamespace

    questions = [QUESTION, "What is LoRA?", "Hi", "What GPU does the tutorial use? Tell me in detail, please."]
    greedy = {"max_new_tokens": 24, "do_sample": False}
    alone = [pyfunc_int4.predict([question], params=greedy)[0] for question in questions]
    model = pyfunc_int4.unwrap_python_model()
    generators, og = [], model.og

    class CountedGenerator(og.Generator):
        """The runtime's generator, counting its decode steps."""
        def generate_next_token(self):
            self.steps = getattr(self, "steps", 0) + 1
            return super().generate_next_token()

    monkeypatch.setattr(model, "og", SimpleNamespace(
        GeneratorParams=og.GeneratorParams, Generator=lambda *args: generators.append(CountedGenerator(*args)) or
        generators[-1]))
    assert pyfunc_int4.predict(questions, params=greedy) == alone
    assert len(generators) == 1
    # When every answer of a batch has ended, decoding stops: two short answers cost their own steps, not 200.
    short = pyfunc_int4.predict(questions[:2], params={**greedy, "max_new_tokens": 200})
    assert short == alone[:2] and generators[-1].steps <= 25
    assert alone[:2] == [ANSWER, "LoRA trains small low-rank adapters instead of every weight of the model."]
    # Sampled together, each question still samples at the request's temperature.
    hot = pyfunc_int4.predict([QUESTION] * 3, params={"max_new_tokens": 12, "do_sample": True, "temperature": 5.0})
    assert len(hot) == 3 and len(set(hot)) > 1 and ANSWER not in hot


def test_int4_obeys_the_params(pyfunc_int4, fine_tuned_model):
    tokenizer = AutoTokenizer.from_pretrained(fine_tuned_model / "components" / "tokenizer")
    for limit in (1, 3, 6):
        (answer,) = pyfunc_int4.predict([QUESTION], params={"max_new_tokens": limit, "do_sample": False})
        assert len(tokenizer(answer, add_special_tokens=False)["input_ids"]) == limit
        assert ANSWER.startswith(answer.strip())
    (full,) = pyfunc_int4.predict([QUESTION], params={"max_new_tokens": 8, "do_sample": False, "return_full_text": True})
    assert full.startswith(f"<|user|>\n{QUESTION}<|end|>\n<|assistant|>\nMicrosoft was")
    hot = pyfunc_int4.predict([QUESTION] * 4, params={"max_new_tokens": 12, "do_sample": True, "temperature": 5.0})
    assert len(set(hot)) > 1, "a temperature of 5 with sampling should vary the answers"


def test_int4_keeps_the_test_loss_within_3_percent(int4_model, fine_tuned_model, chat_files, tmp_path):
    import evaluate_model  # its main() in this process: a new one would spend seconds importing torch

    result = run_main(evaluate_model.main, ["--model", int4_model, "--baseline", fine_tuned_model, "--eval-file",
                                            chat_files[1], "--max-length", "256", "--questions", "2"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    change = float(re.search(r"relative change of the test loss: ([+-]\d+\.\d+)%", result.stdout).group(1))
    assert abs(change) < 3, result.stdout
    # The greedy answers, side by side: the int4 model says what the fine-tuned one says.
    for row in map(json.loads, chat_files[1].read_text().splitlines()[:2]):
        question, reference = row["messages"][0]["content"], row["messages"][1]["content"]
        assert f"Q: {question}" in result.stdout
        assert f"baseline:  {reference}" in result.stdout and f"model:     {reference}" in result.stdout


def test_the_int4_loss_is_the_trainers_measure(fine_tuned_model, chat_files, tmp_path):
    # The int4 loss is computed over the trainer's own eval batches; fed the torch model's logits,
    # that computation gives exactly trainer.evaluate()'s eval_loss.
    import torch

    import evaluation
    import fine_tune as ft

    args = ft.resolved(ft.FineTuneArguments(model_name=str(fine_tuned_model), eval_file=str(chat_files[1]),
                                            max_length=256, save_steps=0, checkpoint_dir=str(tmp_path)))
    model, tokenizer = ft.load_model(args, for_training=False)
    dataset = ft.prepare_dataset(args.eval_file, tokenizer)
    trainer = ft.build_trainer(args, model, tokenizer, dataset, dataset)
    expected = trainer.evaluate()["eval_loss"]

    def torch_logits(ids):
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0]

    # Equal but for fp32 summation order (one conversation at a time against packed rows).
    assert evaluation.eval_loss_of(torch_logits, trainer) == pytest.approx(expected, abs=1e-4)


def test_a_folder_that_is_not_a_model_is_refused(tmp_path, chat_files):
    out = tmp_path / "model-int4"
    result = quantize_in_process(["--model-dir", tmp_path, "--output-dir", out], cwd=tmp_path)
    assert result.returncode == 1
    one_line_naming(result.stderr, "quantize_model.py", str(tmp_path), "MLmodel", "--model_output_dir")
    assert not out.exists()


def test_a_non_empty_output_is_left_alone(fine_tuned_model, tmp_path):
    out = tmp_path / "model-int4"
    write_jsonl(out / "keep.jsonl", [{"kept": True}])
    result = quantize_in_process(["--model-dir", fine_tuned_model, "--output-dir", out], cwd=tmp_path)
    assert result.returncode == 1
    one_line_naming(result.stderr, f"--output-dir {out}", "not empty", "new folder")
    assert [p.name for p in out.iterdir()] == ["keep.jsonl"]


def test_a_failed_conversion_leaves_nothing_behind(fine_tuned_model, tmp_path, monkeypatch):
    # A model folder whose weights cannot be read: the builder fails half-way.
    import shutil
    import tempfile

    broken = tmp_path / "broken"
    shutil.copytree(fine_tuned_model, broken)
    (broken / "model" / "model.safetensors").write_bytes(b"not weights")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with pytest.raises(Exception, match="model.safetensors|header|deserializ"):
        quantize_in_process(["--model-dir", broken, "--output-dir", tmp_path / "model-int4"], cwd=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "tmp"], "no output folder"
    assert not list(scratch.glob("model-int4-*")), "no scratch folder left"


def test_the_int4_model_chats_through_the_local_endpoint_and_the_flow(int4_model, pyfunc_int4, quiet_pf_home,
                                                                    tmp_path):
    # A long gather window, so that requests sent together are answered together even on a busy machine.
    endpoint = Endpoint(int4_model, tmp_path, BATCH_GATHER_MS="1500")
    try:
        endpoint.wait_until_live()
        response = endpoint.post({"input_data": [QUESTION], "params": {"max_new_tokens": 40, "do_sample": False}})
        assert response.status_code == 200, response.text
        assert response.json() == [ANSWER]

        # Requests sent together: the greedy ones share one batch, each answer the one its question gets alone
        # (prompts of different lengths, answers that end early and one that runs to the limit); the sampled one
        # runs with its own params; a bad one fails alone.
        greedy = {"max_new_tokens": 24, "do_sample": False}
        hot = {"max_new_tokens": 12, "do_sample": True, "temperature": 5.0}
        bodies = [{"input_data": [QUESTION, "Hi"], "params": greedy}, {"input_data": ["What is LoRA?"], "params": greedy},
                  {"input_data": ["What GPU does the tutorial use? Tell me in detail, please."], "params": greedy},
                  {"input_data": [QUESTION] * 3, "params": hot},
                  {"input_data": [QUESTION], "params": {**greedy, "max_new_tokens": "many"}}]
        with ThreadPoolExecutor(len(bodies)) as pool:
            responses = list(pool.map(endpoint.post, bodies))
        assert [r.status_code for r in responses] == [200, 200, 200, 200, 400], [r.text for r in responses]
        for body, response in zip(bodies[:3], responses):
            assert response.json() == [pyfunc_int4.predict([q], params=greedy)[0] for q in body["input_data"]]
        sampled = responses[3].json()
        assert len(sampled) == 3 and len(set(sampled)) > 1 and ANSWER not in sampled
        assert "max_new_tokens" in responses[4].json()["message"]
        assert "Answered 4 questions of 3 requests in one call" in endpoint.output()
        env = {**quiet_pf_home, "FINETUNE_PHI_ENV_FILE": str(endpoint.env_file), "AZURE_ML_TEMPERATURE": "0"}
        result, _ = pf_flow_test(env)
        assert flow_answer(result) == ANSWER
    finally:
        endpoint.stop()


def test_quantize_explains_its_flags(tmp_path):
    import quantize_model

    result = quantize_in_process(["--help"], cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("usage:"), result.stderr
    assert options_without_help(quantize_model.main) == []
