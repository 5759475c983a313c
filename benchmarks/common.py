"""What the benchmark scripts share: an isolated environment, the machine's description, peak
memory and peak-FLOP/s measurements, synthetic ultrachat-shaped data and a Phi-3.5-mini config.

Import this module before transformers, datasets or mlflow: `setup_env()` points their state at
.scratch/bench (never `~`) and keeps the Hugging Face Hub offline.
"""

import json
import os
import platform
import random
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRATCH = ROOT / ".scratch" / "bench"


def setup_env() -> Path:
    """Keep tool state under .scratch/bench and the Hub offline; make the project importable.

    Values already set (by the test suite, or by you) win.
    """
    SCRATCH.mkdir(parents=True, exist_ok=True)
    for name, value in {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(SCRATCH / "hf"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{SCRATCH / 'mlflow.db'}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PF_HOME_DIRECTORY": str(SCRATCH / "promptflow"),
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
        "PYTHONUNBUFFERED": "1",
    }.items():
        os.environ.setdefault(name, value)
    for path in (ROOT, ROOT / "finetuning_dir"):  # fine_tune.py imports chat_data from its own folder
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    return SCRATCH


# ---------------------------------------------------------------- the machine


def cpu_count() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_report() -> dict:
    """The facts a figure depends on: software versions, CPU, GPU, and how busy the CPU was."""
    from importlib.metadata import version

    import torch

    report = {
        "python": platform.python_version(),
        "cpu": f"{cpu_model()} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})",
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }
    for package in ("torch", "transformers", "trl", "peft", "datasets", "mlflow"):
        try:
            report[package] = version(package)
        except Exception:  # noqa: BLE001 - a package the script does not need
            pass
    if torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name(0)
    return report


def print_header(title: str, configuration: dict) -> None:
    """Print what is measured and under which exact configuration, before any figure."""
    print(f"# {title}")
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))
    print("machine: " + json.dumps(machine_report()))
    print("configuration: " + json.dumps(configuration, default=str))
    sys.stdout.flush()


def print_table(rows: list[dict], columns: list[str]) -> None:
    """A Markdown table of `rows` (dicts) in the order of `columns`."""
    def cell(value):
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
        return str(value)

    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |")
    sys.stdout.flush()


def emit_json(name: str, payload: dict) -> None:
    """One machine-readable line per result, for the tests and for BENCHMARKS.md."""
    print(f"RESULT {name} " + json.dumps(payload, default=str))
    sys.stdout.flush()


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation, as numpy's default."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def median(values):
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------- memory and peak FLOP/s


class PeakRSS:
    """Sample this process's resident set size in a thread; `peak` is the largest seen (bytes).

    ru_maxrss cannot be reset between runs in one process, so each run samples its own peak.
    """

    def __init__(self, interval: float = 0.01):
        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.peak = 0
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(self._interval)

    def __enter__(self):
        self.peak = self._process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


# Dense bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s (no sparsity).
GPU_BF16_PEAK_TFLOPS = [
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM / HBM3
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10", 125.0),
]


def gpu_bf16_peak_tflops(device_name: str) -> float | None:
    for key, peak in GPU_BF16_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def measure_cpu_peak_tflops(dtype_name: str, size: int = 2048, repeats: int = 5) -> float:
    """The best `dtype_name` matmul rate torch reaches on this CPU with its current threads (TFLOP/s).

    An achievable peak, measured, not a data-sheet figure: CPUs have no single peak number that
    holds across AVX2/AVX-512/AMX and thread counts. Measure it in the dtype the CPU computes
    natively: bf16 on a CPU without bf16 instructions is emulated, far below its fp32 rate.
    """
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - start))
    return best / 1e12


@contextmanager
def timed():
    """`with timed() as t: ...` then t() is the elapsed seconds."""
    start = time.perf_counter()
    end = None

    def elapsed():
        return (end or time.perf_counter()) - start

    try:
        yield elapsed
    finally:
        end = time.perf_counter()


# ---------------------------------------------------------------- data and models

# Words the tiny tokenizer was trained on, so synthetic text tokenizes at a realistic rate.
def _vocabulary() -> list[str]:
    from stand_ins.sample_chats import FACTS, FOLLOW_UPS

    words = []
    for question, answer in FACTS + FOLLOW_UPS:
        words += (question + " " + answer).split()
    return words


def synthetic_chats(count: int, seed: int = 0) -> list[dict]:
    """Ultrachat-shaped rows with roughly ultrachat_200k's shape (not its text).

    1-5 user/assistant exchanges (mean ~3), user turns ~lognormal around 35 words, assistant turns
    ~lognormal around 130 words: about 550 words, ~1,100 tokens with the tiny tokenizer, a
    conversation, and a tail (~10%) past 2,048 tokens. An assumption stated, not a measurement of
    the real set (the Hub cannot be reached from here).
    """
    rng = random.Random(seed)
    words = _vocabulary()

    def text(median_words: float, sigma: float) -> str:
        n = max(3, min(2000, int(rng.lognormvariate(0, sigma) * median_words)))
        return " ".join(rng.choice(words) for _ in range(n))

    rows = []
    for i in range(count):
        exchanges = rng.choices([1, 2, 3, 4, 5], weights=[15, 20, 30, 20, 15])[0]
        messages = []
        for _ in range(exchanges):
            messages.append({"role": "user", "content": text(35, 0.7)})
            messages.append({"role": "assistant", "content": text(130, 0.6)})
        rows.append({"prompt": messages[0]["content"], "prompt_id": f"synthetic-{seed}-{i}", "messages": messages})
    return rows


# microsoft/Phi-3.5-mini-instruct's config.json (the values that shape compute), for a model of its
# size built with random weights where the real one cannot be downloaded.
PHI35_MINI_CONFIG = {
    "architectures": ["Phi3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "embd_pdrop": 0.0,
    "eos_token_id": 32000,
    "hidden_act": "silu",
    "hidden_size": 3072,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "original_max_position_embeddings": 4096,
    "pad_token_id": 32000,
    "resid_pdrop": 0.0,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "type": "longrope",
        "short_factor": [
            1.0, 1.0199999809265137, 1.0299999713897705, 1.0299999713897705, 1.0499999523162842,
            1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.0499999523162842,
            1.0699999332427979, 1.0999999046325684, 1.1099998950958252, 1.1599998474121094,
            1.1599998474121094, 1.1699998378753662, 1.2899998426437378, 1.339999794960022,
            1.679999828338623, 1.7899998426437378, 1.8199998140335083, 1.8499997854232788,
            1.8799997568130493, 1.9099997282028198, 1.9399996995925903, 1.9899996519088745,
            2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346,
            2.0199997425079346, 2.0199997425079346, 2.0299997329711914, 2.0299997329711914,
            2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914,
            2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0799996852874756,
            2.0899996757507324, 2.189999580383301, 2.2199995517730713, 2.5899994373321533,
            2.729999542236328, 2.749999523162842, 2.8399994373321533,
        ],
        "long_factor": [
            1.0800000429153442, 1.1100000143051147, 1.1399999856948853, 1.340000033378601,
            1.5899999141693115, 1.600000023841858, 1.6200000047683716, 2.620000123977661,
            3.2300000190734863, 3.2300000190734863, 4.789999961853027, 7.400000095367432,
            7.700000286102295, 9.09000015258789, 12.199999809265137, 17.670000076293945,
            24.46000099182129, 28.57000160217285, 30.420001983642578, 30.840002059936523,
            32.590003967285156, 32.93000411987305, 42.320003509521484, 44.96000289916992,
            50.340003967285156, 50.45000457763672, 57.55000305175781, 57.93000411987305,
            58.21000289916992, 60.1400032043457, 62.61000442504883, 62.62000274658203,
            62.71000289916992, 63.1400032043457, 63.1400032043457, 63.77000427246094,
            63.93000411987305, 63.96000289916992, 63.970001220703125, 64.02999877929688,
            64.06999969482422, 64.08000183105469, 64.12000274658203, 64.41000366210938,
            64.4800033569336, 64.51000213623047, 64.52999877929688, 64.83999633789062,
        ],
    },
    "rope_theta": 10000.0,
    "sliding_window": 262144,
    "tie_word_embeddings": False,
    "vocab_size": 32064,
}


def random_phi35_mini(device: str = "cpu", dtype=None, layers: int | None = None):
    """A Phi3ForCausalLM with Phi-3.5-mini-instruct's architecture and size and random weights.

    `layers` shrinks the depth for quick checks; None keeps all 32.
    """
    import torch
    from transformers import AutoModelForCausalLM, Phi3Config

    values = dict(PHI35_MINI_CONFIG)
    if layers:
        values["num_hidden_layers"] = layers
    torch.manual_seed(0)
    with torch.device(device):  # initialise where it will run, in its final dtype: no fp32 copy
        return AutoModelForCausalLM.from_config(Phi3Config(**values), dtype=dtype or torch.bfloat16)


def build_random_phi35_mini(out: Path, device: str = "cpu", layers: int | None = None) -> Path:
    """Write a model folder with Phi-3.5-mini's architecture and size, random bf16 weights, and the
    tiny tokenizer (ids < 512 are valid ids of the 32,064-token vocabulary, so the compute is the
    real model's). Reused when it is already there with the same depth.
    """
    from stand_ins.tiny_phi3 import build_tokenizer

    depth = layers or PHI35_MINI_CONFIG["num_hidden_layers"]
    if (out / "config.json").exists() and json.loads((out / "config.json").read_text())["num_hidden_layers"] == depth:
        return out
    model = random_phi35_mini(device, layers=layers)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    del model
    return out


def build_serving_phi35_mini(out: Path, layers: int | None = None) -> tuple[Path, Path]:
    """Phi-3.5-mini-sized MLflow models for serving benchmarks: fine_tune.py's transformers folder
    (`out/model`, bf16) and its int4 form (`out/model-int4`, quantize_model.py), built once.

    The weights are random, but its answers must run to max_new_tokens to time 128-token answers:
    the output rows of the stand-in tokenizer's special tokens (end markers among them) and of the
    ids it cannot decode are zeroed, so greedy decoding picks an ordinary token every time. Same
    shapes, same compute as the real model.
    """
    import torch

    import fine_tune as ft
    import quantize_model
    from stand_ins.tiny_phi3 import build_tokenizer

    model_dir, int4_dir = out / "model", out / "model-int4"
    if not (model_dir / "MLmodel").exists():
        tokenizer = build_tokenizer()
        model = random_phi35_mini("cpu", layers=layers)
        ordinary = torch.zeros(model.config.vocab_size, dtype=torch.bool)
        ordinary[: len(tokenizer)] = True
        ordinary[tokenizer.all_special_ids] = False
        with torch.no_grad():
            model.lm_head.weight[~ordinary] = 0
        model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(["<|end|>", "<|endoftext|>"])
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        ft.save_mlflow_model(model, ft.configure_tokenizer(tokenizer, 4096), str(model_dir))
        del model
    if not (int4_dir / "MLmodel").exists():
        quantize_model.quantize(model_dir, int4_dir)
    return model_dir, int4_dir


def tiny_model(out: Path | None = None) -> Path:
    """The project's tiny Phi-3 (stand_ins/tiny_phi3.py), built once under .scratch/bench."""
    from stand_ins.tiny_phi3 import build

    out = out or SCRATCH / "tiny-phi3"
    if not (out / "config.json").exists():
        build(out)
    return out
