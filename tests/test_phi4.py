"""Phi-4-mini-instruct through every step, on a tiny stand-in of its architecture (stand_ins/tiny_phi4.py), and
the loss on the assistant's words (fine_tune.py --assistant-only-loss) for both models.

One fine-tune of the stand-in, as the Azure job runs it (the model and its int4 form): what it learned, its
MLflow model with Phi-4-mini's own template, its int4 form at the local endpoint, a two-turn chat through the
Prompt flow, and step 5's table against its base."""

import json
import re

import mlflow
import pytest
import yaml
from transformers import AutoConfig, AutoTokenizer

from chat_fixtures import ANSWER, QUESTION, Endpoint, FlowServer, chat_turn, quiet_pf_home  # noqa: F401
from conftest import ROOT, TINY_TRAINING_FLAGS, built_once, fine_tune, write_jsonl
from stand_ins import tiny_phi3, tiny_phi4

FOLLOW_UP = "Is that right?"
FOLLOW_UP_ANSWER = "Yes, that is right."  # what the tiny models learned to answer after a first turn
SUMMARY = re.compile(r"test loss (\d+\.\d{3}) → (\d+\.\d{3})")
CHATS = [
    [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION},
     {"role": "assistant", "content": ANSWER}, {"role": "user", "content": FOLLOW_UP},
     {"role": "assistant", "content": FOLLOW_UP_ANSWER}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": "What is LoRA?"}],
]


@pytest.fixture(scope="session")
def tiny_phi4_dir(tmp_path_factory):
    """A tiny, untrained model of Phi-4-mini's architecture and tokenizer folder."""
    return built_once(tmp_path_factory, "tiny-phi4", tiny_phi4.build)


@pytest.fixture(scope="session")
def phi4_run(tmp_path_factory, tiny_phi4_dir, chat_files):
    """fine_tune.py on the stand-in as the Azure job runs it, writing the model and its int4 form, once for the run:
    the run's folder (model, model-int4, its output in stdout.txt, its MLflow store)."""
    from local import mlflow_store

    def train(folder):
        folder.mkdir()
        store = mlflow_store.prepare(folder / "mlflow.db", folder / "mlartifacts")
        result = fine_tune(tiny_phi4_dir, *chat_files, folder / "model", *TINY_TRAINING_FLAGS,
                           "--quantized_output_dir", folder / "model-int4", env=store)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        (folder / "stdout.txt").write_text(result.stdout)

    return built_once(tmp_path_factory, "fine-tuned-phi4", train)


def built_or(stand_in, folder):
    return folder if (folder / "config.json").exists() else stand_in.build(folder)


def test_the_stand_in_has_phi4_minis_architecture_tokens_and_template(tiny_phi4_dir):
    from chat_templates import PHI4_MINI

    config = AutoConfig.from_pretrained(tiny_phi4_dir)
    assert config.architectures == ["Phi3ForCausalLM"]
    assert config.partial_rotary_factor == 0.75 and config.tie_word_embeddings is True
    assert config.num_key_value_heads < config.num_attention_heads
    tokenizer = AutoTokenizer.from_pretrained(tiny_phi4_dir)
    assert tokenizer.chat_template == PHI4_MINI
    assert tokenizer.bos_token == tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    for token in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|tool|>", "<|/tool|>"):
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1, token
    assert tokenizer.apply_chat_template(CHATS[2], tokenize=False, add_generation_prompt=True) == (
        "<|system|><|end|><|user|>Hi<|end|><|assistant|>Hello.<|end|><|user|>What is LoRA?<|end|><|assistant|>")


@pytest.mark.parametrize("stand_in", [tiny_phi3, tiny_phi4], ids=["phi3", "phi4"])
def test_the_assistant_only_template_renders_the_models_own_token_for_token(stand_in, tmp_path):
    # TRL's own marked twin for Phi-3.5, the project's for Phi-4-mini (TRL has none): what fine_tune.py trains with.
    from trl.chat_template_utils import get_training_chat_template

    from chat_templates import training_template

    tokenizer = stand_in.build_tokenizer()
    marked = training_template(tokenizer.chat_template)
    if stand_in is tiny_phi3:
        assert marked is None  # TRL swaps in its own
        marked = get_training_chat_template(tokenizer)
    else:
        with pytest.raises(ValueError, match="patching is not supported for this template"):
            get_training_chat_template(tokenizer)
    assert "{% generation %}" in marked.replace("{%-", "{%")
    for chat in CHATS:
        for add_generation_prompt in (False, True):
            if add_generation_prompt == (chat[-1]["role"] == "assistant"):
                continue
            own, twin = (tokenizer.apply_chat_template(chat, chat_template=template, add_generation_prompt=add_generation_prompt,
                                                       return_dict=True)["input_ids"] for template in (None, marked))
            assert twin == own


@pytest.mark.parametrize("stand_in", [tiny_phi3, tiny_phi4], ids=["phi3", "phi4"])
def test_the_mask_covers_the_assistants_turns_and_nothing_else(stand_in, tmp_path):
    # fine_tune.py's own trainer with --assistant-only-loss: the tokens that get a loss are each answer with the
    # <|end|> that closes it and the end-of-text after the last answer; the rest (system, questions, the
    # assistant's tag) get none. Unpacked here, to read each chat's labels; packing only concatenates them.
    import fine_tune as ft

    rows = [{"messages": chat} for chat in CHATS[:2]]
    data = write_jsonl(tmp_path / "chats.jsonl", rows)
    model_dir = built_or(stand_in, tmp_path / "model")
    args = ft.resolved(ft.FineTuneArguments(model_name=str(model_dir), train_file=str(data), eval_file=str(data),
                                            max_length=256, checkpoint_dir=str(tmp_path / "ck"), packing=False,
                                            assistant_only_loss=True))
    model, tokenizer = ft.load_model(args)
    own_template = tokenizer.chat_template
    train, test = ft.load_and_preprocess_data(args.train_file, args.eval_file, tokenizer, conversational=True)
    trainer = ft.build_trainer(args, model, tokenizer, train, test)
    assert tokenizer.chat_template == own_template, "the model keeps its own template"
    for row, chat in zip(trainer.train_dataset, CHATS[:2]):
        learned = [token for token, label in zip(row["input_ids"], row["labels"]) if label != -100]
        answers = "".join(m["content"] + "<|end|>" + ("\n" if stand_in is tiny_phi3 else "")
                          for m in chat if m["role"] == "assistant") + tokenizer.eos_token
        assert tokenizer.decode(learned) == answers
        assert learned == tokenizer(answers, add_special_tokens=False)["input_ids"]
        assert 0 < len(learned) < len(row["input_ids"])


def test_phi4_fine_tunes_learns_and_saves_its_own_template(phi4_run):
    from chat_templates import PHI4_MINI

    found = SUMMARY.search(phi4_run.joinpath("stdout.txt").read_text().strip().splitlines()[-1])
    assert found and float(found.group(2)) < float(found.group(1)) / 3, found
    mlmodel = yaml.safe_load((phi4_run / "model" / "MLmodel").read_text())
    assert mlmodel["flavors"]["transformers"]["pipeline_model_type"] == "Phi3ForCausalLM"
    # The prompt as Phi-4-mini's template renders a question, as fine_tune.py trained it (after an empty system).
    assert mlmodel["metadata"]["prompt_template"] == "<|system|><|end|><|user|>{prompt}<|end|><|assistant|>"
    assert mlmodel["metadata"]["chat_template"] == PHI4_MINI
    params = {p["name"]: p["default"] for p in json.loads(mlmodel["signature"]["params"])}
    assert params == {"max_new_tokens": 128, "temperature": 0.7, "do_sample": True, "return_full_text": False}
    saved = AutoTokenizer.from_pretrained(phi4_run / "model" / "components" / "tokenizer")
    assert saved.chat_template == PHI4_MINI
    config = AutoConfig.from_pretrained(phi4_run / "model" / "model")
    assert config.partial_rotary_factor == 0.75 and config.tie_word_embeddings is True
    int4 = yaml.safe_load((phi4_run / "model-int4" / "MLmodel").read_text())
    assert int4["signature"] == mlmodel["signature"]
    for key in ("prompt_template", "chat_template", "eos_token"):
        assert int4["metadata"][key] == mlmodel["metadata"][key]
    answers = mlflow.pyfunc.load_model(str(phi4_run / "model")).predict([QUESTION], params={"do_sample": False})
    assert answers == [ANSWER]


def test_phi4_int4_chats_through_the_local_endpoint_the_flow_and_step_5(phi4_run, tiny_phi4_dir, chat_files,
                                                                     quiet_pf_home, tmp_path, monkeypatch, capfd):
    from local import pipeline

    endpoint = Endpoint(phi4_run / "model-int4", tmp_path)
    flow = None
    try:
        endpoint.wait_until_live()
        assert endpoint.greedy_answer(QUESTION) == ANSWER
        # A chat sent as messages reaches the model as Phi-4-mini's own template renders it, token for token: the
        # int4 model's answer to exactly that text, less what its prompt template adds around a question.
        chat = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER},
                {"role": "user", "content": FOLLOW_UP}]
        rendered = AutoTokenizer.from_pretrained(tiny_phi4_dir).apply_chat_template(
            [{"role": "system", "content": ""}, *chat], tokenize=False, add_generation_prompt=True)
        before, after = "<|system|><|end|><|user|>", "<|end|><|assistant|>"
        assert rendered.startswith(before) and rendered.endswith(after)
        int4 = mlflow.pyfunc.load_model(str(phi4_run / "model-int4"))
        own = int4.predict([rendered[len(before):-len(after)]], params={"max_new_tokens": 40, "do_sample": False})
        assert endpoint.greedy_answer(chat) == own[0] == FOLLOW_UP_ANSWER
        refused = endpoint.post({"input_data": [chat[:2]]})
        assert refused.status_code == 400 and "must end with the user's question" in refused.json()["message"]

        # Two turns through the Prompt flow: the second keeps the first as its context.
        flow = FlowServer({**quiet_pf_home, "FINETUNE_PHI_ENV_FILE": str(endpoint.env_file),
                           "AZURE_ML_TEMPERATURE": "0"}, tmp_path / "pf-serve.log").wait_until_live(timeout=120)
        assert flow.ask(QUESTION, []).json() == {"answer": ANSWER}
        assert flow.ask(FOLLOW_UP, [chat_turn(QUESTION, ANSWER)]).json() == {"answer": FOLLOW_UP_ANSWER}
        flow.stop()
        flow = None

        # Step 5 as make local MODEL=phi4 runs it: the fine-tuned int4 model against its base, served as int4 here.
        monkeypatch.setattr(pipeline, "OUTPUTS", tmp_path)
        for name, value in (("FINETUNE_PHI_ENV_FILE", endpoint.env_file), ("TEST_DATA_PATH", chat_files[1]),
                            ("NLTK_DATA", tmp_path / "no-nltk-data")):  # offline scores only, as make local's
            monkeypatch.setenv(name, str(value))
        pipeline.evaluate_the_chat(tiny_phi4_dir, 4, sample_chats=True, form="int4", stand_in="phi4")
    finally:
        if flow:
            flow.stop()
        endpoint.stop()
    table = capfd.readouterr().out
    table = table[table.index("== 4 questions"):]
    assert "a tiny Phi-4-mini fine-tuned here against its untrained base" in table.splitlines()[1]
    (run_dir,) = [p for p in (tmp_path / "evaluations").iterdir() if p.name != "baseline-models"]
    f1 = json.loads((run_dir / "results.json").read_text())["comparisons"]["f1_score"]
    assert f1["means"][0] > 0.9 and f1["means"][1] < 0.3 and f1["scored"] == [4, 4], f1
    line = next(line for line in table.splitlines() if line.startswith("F1 "))
    assert line.replace("(primary)", "").split()[1:3] == [f"{f1['means'][0]:.3f}", f"{f1['means'][1]:.3f}"]


def test_make_local_runs_either_model(tmp_path, monkeypatch):
    from local import pipeline

    ran = []
    monkeypatch.setattr(pipeline, "run", lambda step, command, check=True: ran.append(list(map(str, command))))
    monkeypatch.setattr(tiny_phi4, "TINY_MODEL_DIR", tmp_path / "tiny-phi4")
    pipeline.fine_tune(None, "phi4")
    assert ran[-1][1:] == ["setup_ml.py", "--local", "--model-name", str(tmp_path / "tiny-phi4"), "--",
                           *TINY_TRAINING_FLAGS]
    assert AutoConfig.from_pretrained(tmp_path / "tiny-phi4").partial_rotary_factor == 0.75
    pipeline.fine_tune(None, "phi3")
    assert ran[-1][1:] == ["setup_ml.py", "--local"]  # setup_ml.py builds the tiny Phi-3 itself
    assert "$(PY) -m local.pipeline --model $(MODEL)" in (ROOT / "Makefile").read_text()
    with pytest.raises(SystemExit):
        pipeline.main(["--model", "phi5"])


def test_the_phi4_mini_sized_benchmark_model_has_the_real_models_size():
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    from benchmarks.common import PHI4_MINI_CONFIG

    with torch.device("meta"):
        model = Phi3ForCausalLM(Phi3Config(**PHI4_MINI_CONFIG))
    # microsoft/Phi-4-mini-instruct: 3,836,021,760 parameters, its output layer the input embedding.
    assert sum(p.numel() for p in model.parameters()) == 3_836_021_760
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_a_template_nobody_marks_stops_the_assistant_only_loss_with_one_line(tmp_path, chat_files):
    import fine_tune as ft

    model = tiny_phi3.build(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    tokenizer.save_pretrained(model)
    with pytest.raises(SystemExit) as stop:
        ft.main(ft.FineTuneArguments(model_name=str(model), train_file=str(chat_files[0]), eval_file=str(chat_files[1]),
                                     model_output_dir=str(tmp_path / "out"), checkpoint_dir=str(tmp_path / "ck"),
                                     save_steps=0, assistant_only_loss=True))
    message = str(stop.value)
    assert message.startswith(f"fine_tune.py: --assistant-only-loss: the chat template of {model} has no ")
    assert "finetuning_dir/chat_templates.py" in message and "\n" not in message
    assert not (tmp_path / "out").exists()
