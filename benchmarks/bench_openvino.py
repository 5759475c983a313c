"""Another engine on this CPU: the Phi-3.5-mini-sized int4 model answering 1, 3 and 6 conversations at once in
onnxruntime-genai 0.18 (the project's int4 form, one static batch, as serving/scoring/batching.py calls it) and
in OpenVINO GenAI (continuous batching), in one run, the two engines taking turns.

It runs in a virtualenv of its own (OpenVINO's export tools pin a transformers older than the project's), and
needs the model `python benchmarks/bench_serving.py --big-endpoint` builds under .scratch/bench:

    make bench-openvino
    # which is:
    python3 -m venv .scratch/venv-openvino
    .scratch/venv-openvino/bin/pip install -r benchmarks/requirements-openvino.txt
    .scratch/venv-openvino/bin/python benchmarks/bench_openvino.py

The OpenVINO form is exported once from the same bf16 weights as quantize_model.py's int4 form, and quantized
alike: 4-bit symmetric weights in groups of 32, every layer (`optimum-cli export openvino`). Each round starts
one process per engine, which loads the model, answers one warm-up question, then for each --clients value
n answers n copies of the same chat question at once, exactly --tokens tokens each (end markers ignored,
greedy), and reports the seconds until the last answer ended and its memory (RSS) after the answers.
"""

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRATCH = ROOT / ".scratch" / "bench"
QUESTION = "What are the main causes of climate change, and what can individuals do about them?"
# The Phi-3 chat format, as the served models wrap a question.
PROMPT = "<|user|>\n{question}<|end|>\n<|assistant|>\n"
ENGINES = ("onnxruntime-genai", "openvino-genai")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32,
                        help="the layers of the model built by bench_serving.py (--big-layers there; default 32)")
    parser.add_argument("--clients", default="1,3,6", help="comma-separated numbers of conversations at once")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per answer (default: the flow's 128)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; figures are the medians over rounds")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, of: {', '.join(ENGINES)}")
    parser.add_argument("--kv-cache-gb", type=int, default=2,
                        help="OpenVINO GenAI's KV cache (SchedulerConfig.cache_size), in GB")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)  # one round of one engine
    return parser.parse_args(argv)


def model_dirs(layers: int) -> dict:
    """The bf16 weights and the two int4 forms of the model of bench_serving.py --big-endpoint."""
    base = SCRATCH / f"phi35-mini-{layers}l"
    return {"bf16": base / "model" / "model", "tokenizer": base / "model" / "components" / "tokenizer",
            "onnxruntime-genai": base / "model-int4" / "artifacts" / "onnx", "openvino-genai": base / "openvino-int4"}


def export_openvino(dirs: dict) -> None:
    """The OpenVINO int4 form, exported once from the bf16 weights and the tokenizer (put side by side)."""
    out = dirs["openvino-genai"]
    if (out / "openvino_model.xml").exists():
        return
    source = out.with_name("hf-bf16")
    source.mkdir(parents=True, exist_ok=True)
    for folder in (dirs["bf16"], dirs["tokenizer"]):
        for file in folder.iterdir():
            if not (source / file.name).exists():
                (source / file.name).symlink_to(file.resolve())
    print(f"Exporting the OpenVINO int4 form to {out} (a few minutes)", flush=True)
    subprocess.run([str(Path(sys.executable).with_name("optimum-cli")), "export", "openvino", "--model", str(source),
                    "--task", "text-generation-with-past", "--weight-format", "int4", "--group-size", "32",
                    "--ratio", "1.0", "--sym", str(out)], check=True)


def prompt_ids(dirs: dict) -> list[int]:
    """The question's tokens, the same for both engines."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(dirs["onnxruntime-genai"] / "tokenizer.json")).encode(
        PROMPT.format(question=QUESTION), add_special_tokens=False).ids


def onnxruntime_answer(dirs: dict):
    """`answer(n, tokens)`: n copies of the question decoded as one static batch, as Int4ChatModel does."""
    import numpy as np
    import onnxruntime_genai as og

    config = og.Config(str(dirs["onnxruntime-genai"]))
    threads = len(os.sched_getaffinity(0))  # as int4_model.py sets it
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model, ids = og.Model(config), prompt_ids(dirs)

    def answer(n: int, tokens: int) -> None:
        params = og.GeneratorParams(model)
        length = len(ids) + tokens
        params.set_search_options(max_length=length, min_length=length, batch_size=n, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(np.asarray([ids] * n, dtype=np.int32))
        while not generator.is_done():
            generator.generate_next_token()
        assert generator.token_count() == length

    return answer


def openvino_answer(dirs: dict, kv_cache_gb: int):
    """`answer(n, tokens)`: n copies of the question added to OpenVINO GenAI's continuous-batching pipeline."""
    import numpy as np
    import openvino as ov
    import openvino_genai as ov_genai

    scheduler = ov_genai.SchedulerConfig()
    scheduler.cache_size = kv_cache_gb
    pipeline = ov_genai.ContinuousBatchingPipeline(str(dirs["openvino-genai"]), scheduler, "CPU")
    ids = prompt_ids(dirs)

    def answer(n: int, tokens: int) -> None:
        config = ov_genai.GenerationConfig()
        config.max_new_tokens, config.min_new_tokens, config.ignore_eos = tokens, tokens, True
        inputs = [ov.Tensor(np.asarray([ids], dtype=np.int64)) for _ in range(n)]
        results = pipeline.generate(inputs, [config] * n)
        assert all(len(result.m_generation_ids[0]) == tokens for result in results), "an answer ended early"

    return answer


def run_worker(opts) -> None:
    """One round of one engine: load, warm up, then each number of conversations at once; one JSON line."""
    import psutil

    dirs = model_dirs(opts.layers)
    started = time.perf_counter()
    answer = onnxruntime_answer(dirs) if opts.worker == "onnxruntime-genai" else openvino_answer(dirs, opts.kv_cache_gb)
    load_s = time.perf_counter() - started
    answer(1, 8)
    seconds = {}
    for n in [int(n) for n in opts.clients.split(",")]:
        started = time.perf_counter()
        answer(n, opts.tokens)
        seconds[n] = time.perf_counter() - started
    rss_mb = psutil.Process().memory_info().rss / 2**20
    print(json.dumps({"engine": opts.worker, "load_s": load_s, "seconds": seconds, "rss_mb": rss_mb}))


def engine_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("onnxruntime-genai", "onnxruntime", "openvino-genai", "openvino", "optimum-intel"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def main(argv=None) -> None:
    opts = parse_args(argv)
    if opts.worker:
        return run_worker(opts)
    dirs = model_dirs(opts.layers)
    if not (dirs["onnxruntime-genai"] / "genai_config.json").exists():
        sys.exit(f"No int4 model at {dirs['onnxruntime-genai']}: run `python benchmarks/bench_serving.py "
                 f"--big-endpoint` first (it builds the model).")
    engines = opts.engines.split(",")
    missing = [engine for engine in engines if engine not in ENGINES or importlib.util.find_spec(
        engine.replace("-", "_")) is None]
    if missing:
        sys.exit(f"Cannot run {', '.join(missing)} here (engines: {', '.join(ENGINES)}): run `make bench-openvino`, "
                 f"which installs both in .scratch/venv-openvino.")
    if "openvino-genai" in engines:
        export_openvino(dirs)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print("# Conversations at once, per engine")
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))
    print("machine: " + json.dumps({"python": platform.python_version(), "cpu": f"{cpu} ({os.cpu_count()} logical "
                                    f"cores)", "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
                                    **engine_versions()}))
    print("configuration: " + json.dumps(vars(opts)), flush=True)
    runs = {engine: [] for engine in engines}
    for round_ in range(opts.rounds):
        for engine in engines if round_ % 2 == 0 else engines[::-1]:  # so that load from elsewhere hits both alike
            worker = subprocess.run([sys.executable, __file__, *(argv or sys.argv[1:]), "--worker", engine],
                                    capture_output=True, text=True)
            if worker.returncode:
                sys.exit(f"{engine} failed:\n{worker.stderr[-3000:]}")
            runs[engine].append(json.loads(worker.stdout.strip().splitlines()[-1]))
            print(f"round {round_ + 1}, {engine}: {runs[engine][-1]['seconds']}", flush=True)
    rows = []
    for engine, results in runs.items():
        alone = statistics.median(r["seconds"]["1"] for r in results) if "1" in results[0]["seconds"] else None
        for n in results[0]["seconds"]:
            seconds = statistics.median(r["seconds"][n] for r in results)
            rows.append({"engine": engine, "conversations": int(n), "last_answer_s": round(seconds, 2),
                         "vs_one_alone": round(seconds / alone, 2) if alone else None,
                         "load_s": round(statistics.median(r["load_s"] for r in results), 1),
                         "rss_mb": round(max(r["rss_mb"] for r in results))})
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    print(f"loadavg now: {[round(x, 2) for x in os.getloadavg()]}")
    print("RESULT engines " + json.dumps({"rows": rows, "runs": runs}))


if __name__ == "__main__":
    main()
