"""What the benchmark scripts share: the machine's description, tables and RESULT lines, ultrachat-shaped
synthetic chats and models of Phi-3.5-mini's and Phi-4-mini's sizes with random weights.

Import it first, once the project is on sys.path: it keeps the tools' state under .scratch/bench (never `~`)
and the Hugging Face Hub offline (settings already made, by the tests or by you, win), and makes
fine_tune.py's folder importable.
"""

import json
import os
import platform
import random
import sys
from importlib.metadata import version
from pathlib import Path

from config import ROOT  # the bench scripts put the project on sys.path first

SCRATCH = ROOT / ".scratch" / "bench"
SCRATCH.mkdir(parents=True, exist_ok=True)
for _name, _value in {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(SCRATCH / "hf"),
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1",
}.items():
    os.environ.setdefault(_name, _value)
if str(ROOT / "finetuning_dir") not in sys.path:  # fine_tune.py imports its neighbours (chat_data, ...) by name
    sys.path.insert(0, str(ROOT / "finetuning_dir"))

import torch  # noqa: E402  (now that the environment is set)
from transformers import AutoModelForCausalLM, Phi3Config  # noqa: E402

import fine_tune as ft  # noqa: E402
from stand_ins.sample_chats import FACTS, FOLLOW_UPS  # noqa: E402
from stand_ins import tiny_phi3, tiny_phi4  # noqa: E402


def machine() -> dict:
    """The facts a figure depends on: software versions, CPU and its vector ISA, GPU, how busy the CPU was."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
               platform.processor())
    report = {
        "python": platform.python_version(),
        "cpu": f"{cpu} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})",
        "cpu_isa": torch.backends.cpu.get_cpu_capability(), "native_bf16": ft.native_bf16(),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "unset"),
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }
    report.update({name: version(name) for name in ("torch", "transformers", "trl", "peft", "datasets", "mlflow")})
    if torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name(0)
    return report


def print_header(title: str, configuration: dict) -> None:
    """Before any figure: what is measured, the command, the machine and the exact configuration."""
    print(f"# {title}")
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))
    print("machine: " + json.dumps(machine()))
    print("configuration: " + json.dumps(configuration, default=str), flush=True)


def print_table(rows: list[dict], columns: list[str]) -> None:
    """A Markdown table of `rows` (dicts) in the order of `columns`, then the load it was taken under."""
    def cell(value):
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
        return str(value)

    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |")
    print(f"loadavg now: {[round(x, 2) for x in os.getloadavg()]}", flush=True)


def emit_json(name: str, payload: dict) -> None:
    """One machine-readable `RESULT <name> <json>` line: what the tests parse and BENCHMARKS.md quotes."""
    print(f"RESULT {name} " + json.dumps(payload, default=str), flush=True)


def synthetic_chats(count: int, seed: int = 0) -> list[dict]:
    """Rows with ultrachat_200k's schema and roughly its shape (not its text, which the Hub cannot give here):
    1-5 user/assistant exchanges (mean ~3), user turns ~lognormal around 35 words, assistant turns around
    130: ~1,100 tokens with the tiny tokenizer, ~10% past 2,048. (The stand-in sample chats are too short
    for packing and attention to cost anything.)
    """
    words = " ".join(q + " " + a for q, a in FACTS + FOLLOW_UPS).split()  # words the tiny tokenizer knows
    rng = random.Random(seed)

    def text(median_words: float, sigma: float) -> str:
        n = max(3, min(2000, int(rng.lognormvariate(0, sigma) * median_words)))
        return " ".join(rng.choice(words) for _ in range(n))

    rows = []
    for i in range(count):
        messages = []
        for _ in range(rng.choices([1, 2, 3, 4, 5], weights=[15, 20, 30, 20, 15])[0]):
            messages += [{"role": "user", "content": text(35, 0.7)}, {"role": "assistant", "content": text(130, 0.6)}]
        rows.append({"prompt": messages[0]["content"], "prompt_id": f"synthetic-{seed}-{i}", "messages": messages})
    return rows


# microsoft/Phi-3.5-mini-instruct's config.json, where it differs from Phi3Config's defaults, for a model of
# its size and compute built with random weights (the real one cannot be downloaded here). The LongRoPE
# factors are float32 values, written as short as they round-trip (transformers reads them as float32).
PHI35_MINI_CONFIG = {
    "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 32, "vocab_size": 32064, "max_position_embeddings": 131072,
    "original_max_position_embeddings": 4096, "sliding_window": 262144, "rope_theta": 10000.0,
    "rope_scaling": {
        "type": "longrope",
        "short_factor": [
            1.0, 1.02, 1.03, 1.03, *[1.05] * 5, 1.0699999, 1.0999999, 1.1099999, 1.1599998, 1.1599998, 1.1699998,
            1.2899998, 1.3399998, 1.6799998, 1.7899998, 1.8199998, 1.8499998, 1.8799998, 1.9099997, 1.9399997,
            1.9899997, *[2.0199997] * 6, *[2.0299997] * 9, 2.0799997, 2.0899997, 2.1899996, 2.2199996, 2.5899994,
            2.7299995, 2.7499995, 2.8399994,
        ],
        "long_factor": [
            1.08, 1.11, 1.14, 1.34, 1.5899999, 1.6, 1.62, 2.6200001, 3.23, 3.23, 4.79, 7.4, 7.7000003, 9.09, 12.2,
            17.67, 24.460001, 28.570002, 30.420002, 30.840002, 32.590004, 32.930004, 42.320004, 44.960003, 50.340004,
            50.450005, 57.550003, 57.930004, 58.210003, 60.140003, 62.610004, 62.620003, 62.710003, 63.140003,
            63.140003, 63.770004, 63.930004, 63.960003, 63.97, 64.03, 64.07, 64.08, 64.12, 64.41, 64.48, 64.51, 64.53,
            64.84,
        ],
    },
}


# microsoft/Phi-4-mini-instruct's config.json where it differs from Phi-3.5-mini's (3,836,021,760 parameters); its 48
# LongRoPE factors a list are set to 1.0 here: they change the rotation's angles, not its cost.
PHI4_MINI_CONFIG = {**PHI35_MINI_CONFIG, "vocab_size": 200064, "tie_word_embeddings": True, "num_attention_heads": 24,
                    "num_key_value_heads": 8, "partial_rotary_factor": 0.75,
                    "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [1.0] * 48}}
BIG_MODELS = {"phi35-mini": (PHI35_MINI_CONFIG, tiny_phi3), "phi4-mini": (PHI4_MINI_CONFIG, tiny_phi4)}


def random_phi35_mini(dtype=None, layers: int | None = None, model: str = "phi35-mini"):
    """A Phi3ForCausalLM of Phi-3.5-mini-instruct's (or `model`'s: BIG_MODELS) architecture and size, random weights
    (bf16 by default); `layers` shrinks the depth for quick checks (figures scale about linearly)."""
    torch.manual_seed(0)
    config = Phi3Config(**{**BIG_MODELS[model][0], "num_hidden_layers": layers or 32})
    return AutoModelForCausalLM.from_config(config, dtype=dtype or torch.bfloat16)


def phi35_mini_mlflow(layers: int | None = None, model: str = "phi35-mini") -> Path:
    """Phi-3.5-mini-sized (or `model`-sized) random bf16 weights and the tiny tokenizer of that model (its ids < 512
    are valid ids of the big vocabulary), saved by fine_tune.py's save_mlflow_model, built once under .scratch/bench.

    To time 128-token answers, answers must run to max_new_tokens: the output rows of special tokens (the
    end markers) and of ids the tokenizer cannot decode are zeroed, so greedy decoding picks an ordinary
    token every time. Same shapes, same compute.
    """
    out = SCRATCH / f"{model}-{layers or 32}l" / "model"
    if not (out / "MLmodel").exists():
        tokenizer = BIG_MODELS[model][1].build_tokenizer()
        model = random_phi35_mini(layers=layers, model=model)
        ordinary = torch.zeros(model.config.vocab_size, dtype=torch.bool)
        ordinary[: len(tokenizer)] = True
        ordinary[tokenizer.all_special_ids] = False
        with torch.no_grad():
            model.lm_head.weight[~ordinary] = 0
        model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(["<|end|>", "<|endoftext|>"])
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        ft.save_mlflow_model(model, ft.configure_tokenizer(tokenizer, 4096), str(out))
    return out
