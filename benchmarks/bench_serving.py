"""Serving: the local endpoint's latency and tokens/s, and what the Prompt flow adds on top.

1. Endpoint: it starts the project's local endpoint (`python -m serving.endpoint`, the server and
   scoring script the learner runs) on an MLflow model folder, and POSTs to /score the body the
   flow's tool sends ({"input_data": [question], "params": {max_new_tokens, do_sample: false,
   return_full_text: false}}), one fresh connection per call as the tool makes: p50/p99 latency
   over --calls sequential calls, generated tokens/s (the answer's tokens, counted with the model's
   tokenizer, per second of latency), then --concurrency clients at once (latency and answers/s).
   With --workers 1,2 it repeats this for each azmlinfsrv WORKER_COUNT.
2. Prompt flow: it also starts `pf flow serve --source ./ --engine fastapi` on the same endpoint and
   sends the same question to the flow's /score. Calls alternate direct / through the flow, so noise
   hits both alike; the flow's added latency is the difference of the p50s (and p99s), also under
   --concurrency clients.
3. --big: Phi-3.5-mini-sized generation on this CPU, in process, random weights, for each form in
   --big-forms: bfloat16 and float32 (transformers' model.generate, what the transformers MLflow
   model runs) and int4 (onnxruntime-genai on the int4 ONNX form quantize_model.py writes, what
   the int4 MLflow model runs): time to the first token and per further token, and the
   time for max_new_tokens=128 (first + 127 x per token) against the deployment's 180 s limit.
4. --big-endpoint: the same Phi-3.5-mini-sized model as the two MLflow models deploy_model.py
   serves (the bf16 transformers folder and its int4 form), each behind the local endpoint with
   deploy_model.py's settings for that form: the time until the server is live (what the probes
   wait for), then --big-concurrency clients asking at once for 128-token answers, of which Azure
   would admit 2 x max_concurrent_requests_per_instance (the rest get 429): p50/p99 latency of the
   admitted ones, and the server's resident memory.

Default model: the tiny Phi-3 saved as an MLflow model with fine_tune.py's own save_mlflow_model.

    python benchmarks/bench_serving.py                                # tiny model, endpoint + flow
    python benchmarks/bench_serving.py --workers 1,2 --calls 300
    python benchmarks/bench_serving.py --big --skip-endpoint          # Phi-3.5-mini-sized on CPU
    python benchmarks/bench_serving.py --skip-endpoint --big --big-forms bfloat16,float32,int4 --big-endpoint
    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/bench_serving.py ...  # torch limited to a Broadwell host's ISA
"""

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402
from serving import processes  # noqa: E402

ROOT = common.ROOT
QUESTION = "Who founded Microsoft?"
REQUEST_LIMIT_S = 180  # the deployment's request_timeout_ms (the tutorial's 180000)
STANDARD_E4S_V3 = ("Standard_E4s_v3: 4 vCPUs (2 hyper-threaded cores of a Broadwell, Skylake or Cascade Lake "
                   "Xeon: AVX2 at least, bf16 instructions on none), 32 GiB")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path,
                        help="the MLflow model folder to serve (default: the tiny Phi-3 saved as fine_tune.py saves)")
    parser.add_argument("--workers", default="1",
                        help="comma-separated azmlinfsrv WORKER_COUNT values to measure, each with its own endpoint "
                             "(Azure's default is 1)")
    parser.add_argument("--threads", default="default",
                        help="comma-separated torch threads per server worker to measure (OMP_NUM_THREADS for the "
                             "endpoint): default (torch's choice, one per core) or a number")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="tokens each answer may have (greedy decoding)")
    parser.add_argument("--calls", type=int, default=200, help="sequential calls to each target (default: 200, enough for a p99)")
    parser.add_argument("--concurrency", type=int, default=8, help="clients calling at once in the concurrent phase")
    parser.add_argument("--concurrent-calls", type=int, default=80, help="calls in all in the concurrent phase, per target")
    parser.add_argument("--skip-flow", action="store_true", help="measure the endpoint only, no Prompt flow")
    parser.add_argument("--skip-endpoint", action="store_true", help="measure neither endpoint nor flow (with --big)")
    parser.add_argument("--big", action="store_true",
                        help="also time generation with a Phi-3.5-mini-sized random model on this CPU (~8 GB RAM)")
    parser.add_argument("--big-tokens", type=int, default=4, help="with --big: tokens generated in the longer run")
    parser.add_argument("--big-layers", type=int,
                        help="with --big: build only this many layers (a quick check; figures scale ~linearly)")
    parser.add_argument("--big-forms", default="bfloat16",
                        help="with --big: comma-separated forms to time: bfloat16, float32 (torch; float32 needs "
                             "~16 GB), int4 (onnxruntime-genai; built once from the bf16 model, ~10 min)")
    parser.add_argument("--big-threads", default="default",
                        help="with --big: comma-separated torch thread counts to time (default: torch's, one per core)")
    parser.add_argument("--big-endpoint", action="store_true",
                        help="serve the Phi-3.5-mini-sized bf16 transformers model and its int4 form through the "
                             "local endpoint, one after the other, to concurrent clients")
    parser.add_argument("--big-concurrency", type=int, default=3,
                        help="with --big-endpoint: clients at once (default: 3, the deployment's concurrent requests)")
    parser.add_argument("--big-calls", type=int, default=6, help="with --big-endpoint: calls in all, per form")
    parser.add_argument("--big-answer-tokens", type=int, default=128,
                        help="with --big-endpoint: max_new_tokens of each call (default: 128, the flow's)")
    parser.add_argument("--port", type=int, default=0, help="first port to use (default: free ports)")
    return parser.parse_args(argv)


def cpu_capability() -> str:
    """The widest vector ISA torch's kernels use here (AVX2, AVX512, ...), and whether bf16 is native."""
    import torch

    import fine_tune as ft

    native = "native bf16" if ft.native_bf16() else "no native bf16"
    return f"{torch.backends.cpu.get_cpu_capability()}, {native}"


def tiny_mlflow_model(out: Path) -> Path:
    """The tiny Phi-3, untrained, written by fine_tune.py's save_mlflow_model (the served contract)."""
    if (out / "MLmodel").exists():
        return out
    import fine_tune as ft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = common.tiny_model()
    model = AutoModelForCausalLM.from_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    with tempfile.TemporaryDirectory(dir=common.SCRATCH) as tmp:
        staged = Path(tmp) / "model"
        ft.save_mlflow_model(model, tokenizer, str(staged))
        staged.rename(out)
    return out


class Services:
    """The endpoint (and the flow) as subprocesses, with an isolated .env and Prompt flow home."""

    def __init__(self, work: Path):
        self.work = work
        self.key = secrets.token_urlsafe(24)
        self.env_file = work / "bench.env"
        self.env_file.write_text("")
        self.processes = []
        self.logs = []  # paths

    def environment(self, **extra) -> dict:
        from local import pf_home

        return {
            **os.environ,
            **pf_home.prepare(self.work / "promptflow"),
            "FINETUNE_PHI_ENV_FILE": str(self.env_file),  # never the learner's .env
            "AZURE_ML_API_KEY": self.key,
            "PYTHONPATH": str(ROOT),
            **extra,
        }

    def start(self, command: list, name: str, url: str, **extra) -> subprocess.Popen:
        """Start a server and wait until `url` answers; its log stays in the work folder."""
        log = self.work / f"{name}.log"
        self.logs.append(log)
        process = processes.start(command, log=log, env=self.environment(**extra), cwd=ROOT)
        self.processes.append(process)
        try:
            processes.wait_until_live(process, url, timeout=3600, log=log)
        except processes.NotLive as e:
            raise SystemExit(f"bench_serving.py: {name} {e}")
        return process

    def endpoint(self, model_dir: Path, workers: int, threads: str, port: int) -> str:
        # A local endpoint keeps the key that .env (here the environment) gives its own URL.
        extra = {"WORKER_COUNT": str(workers), "AZURE_ML_ENDPOINT": f"http://127.0.0.1:{port}/score"}
        if threads != "default":
            extra.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        base = f"http://127.0.0.1:{port}"
        self.start([sys.executable, "-m", "serving.endpoint", "--model-dir", model_dir, "--port", port],
                   f"endpoint-{port}", base + "/", **extra)
        return base + "/score"

    def flow(self, endpoint_url: str, port: int, max_new_tokens: int) -> str:
        pf = Path(sys.executable).with_name("pf")
        base = f"http://127.0.0.1:{port}"
        self.start(
            [pf, "flow", "serve", "--source", ROOT, "--port", port, "--host", "127.0.0.1", "--engine", "fastapi",
             "--skip-open-browser"], f"flow-{port}", base + "/health",
            AZURE_ML_ENDPOINT=endpoint_url, AZURE_ML_TEMPERATURE="0", AZURE_ML_MAX_NEW_TOKENS=str(max_new_tokens))
        return base + "/score"

    def stop_all(self):
        for process in reversed(self.processes):
            processes.stop(process)
        self.processes.clear()

    def tail(self) -> str:
        return "\n".join(f"--- {log.name}\n{processes.log_tail(log, 20)}" for log in self.logs)


class Client:
    """One call = one fresh connection, as the flow's tool makes."""

    def __init__(self, key: str, max_new_tokens: int, tokenizer, timeout: float = REQUEST_LIMIT_S + 10):
        self.key = key
        self.timeout = timeout
        self.params = {"max_new_tokens": max_new_tokens, "do_sample": False, "return_full_text": False}
        self.tokenizer = tokenizer
        self.lock = threading.Lock()

    def direct(self, url: str) -> tuple[float, str]:
        import requests

        start = time.perf_counter()
        response = requests.post(url, json={"input_data": [QUESTION], "params": self.params},
                                 headers={"Authorization": f"Bearer {self.key}"}, timeout=self.timeout)
        elapsed = time.perf_counter() - start
        response.raise_for_status()
        return elapsed, response.json()[0]

    def flow(self, url: str) -> tuple[float, str]:
        import requests

        start = time.perf_counter()
        response = requests.post(url, json={"input_data": QUESTION, "chat_history": []}, timeout=self.timeout)
        elapsed = time.perf_counter() - start
        response.raise_for_status()
        return elapsed, response.json()["answer"]

    def tokens(self, answer: str) -> int:
        with self.lock:
            return len(self.tokenizer(answer, add_special_tokens=False)["input_ids"])


def latency_stats(samples: list[tuple[float, str]], client: Client, wall: float | None = None) -> dict:
    latencies = [s for s, _ in samples]
    tokens = [client.tokens(a) for _, a in samples]
    stats = {
        "calls": len(samples),
        "p50_ms": 1000 * common.percentile(latencies, 50),
        "p99_ms": 1000 * common.percentile(latencies, 99),
        "mean_ms": 1000 * sum(latencies) / len(latencies),
        "tokens_per_answer": sum(tokens) / len(tokens),
        "tokens_per_s": sum(tokens) / sum(latencies),
        # Answers that took longer than the deployment's request timeout: Azure would have answered 408.
        "over_180_s": sum(latency > REQUEST_LIMIT_S for latency in latencies),
    }
    if wall:
        stats["answers_per_s"] = len(samples) / wall
        stats["tokens_per_s"] = sum(tokens) / wall
    return stats


def concurrent(call, url: str, clients: int, calls: int) -> tuple[list, float]:
    with ThreadPoolExecutor(clients) as pool:
        start = time.perf_counter()
        samples = list(pool.map(lambda _: call(url), range(calls)))
        return samples, time.perf_counter() - start


def measure_endpoint(opts, services: Services, client: Client, workers: int, threads: str) -> list[dict]:
    endpoint_url = services.endpoint(opts.model_dir, workers, threads, opts.port or processes.free_port())
    flow_url = None if opts.skip_flow else services.flow(endpoint_url, processes.free_port(), opts.max_new_tokens)
    targets = {"endpoint": (client.direct, endpoint_url)}
    if flow_url:
        targets["flow"] = (client.flow, flow_url)
        # Same answer both ways: the flow adds transport, not a different generation.
        assert client.flow(flow_url)[1].strip() == client.direct(endpoint_url)[1].strip()
    for call, url in targets.values():  # warm up: first requests load lazily built parts
        for _ in range(5):
            call(url)

    sequential = {name: [] for name in targets}
    for i in range(opts.calls):
        order = list(targets) if i % 2 == 0 else list(targets)[::-1]
        for name in order:
            call, url = targets[name]
            sequential[name].append(call(url))
    rows = []
    for name, samples in sequential.items():
        rows.append({"workers": workers, "threads": threads, "target": name, "phase": "sequential",
                     **latency_stats(samples, client)})
    # Two rounds in opposite orders, half the calls each, so that load from elsewhere hits both alike.
    concurrent_samples = {name: ([], 0.0) for name in targets}
    for order in (list(targets), list(targets)[::-1]):
        for name in order:
            call, url = targets[name]
            samples, wall = concurrent(call, url, opts.concurrency, max(1, opts.concurrent_calls // 2))
            before, walls = concurrent_samples[name]
            concurrent_samples[name] = (before + samples, walls + wall)
    for name, (samples, wall) in concurrent_samples.items():
        rows.append({"workers": workers, "threads": threads, "target": name,
                     "phase": f"{opts.concurrency} concurrent", **latency_stats(samples, client, wall)})
    if flow_url:
        paired = [f - d for (d, _), (f, _) in zip(sequential["endpoint"], sequential["flow"])]
        rows.append({"workers": workers, "threads": threads, "target": "flow - endpoint", "phase": "sequential",
                     "calls": len(paired),
                     "p50_ms": rows[1]["p50_ms"] - rows[0]["p50_ms"],
                     "p99_ms": rows[1]["p99_ms"] - rows[0]["p99_ms"],
                     "mean_ms": 1000 * common.median(paired)})  # the median of paired differences
        conc = [r for r in rows if r["phase"] != "sequential"]
        rows.append({"workers": workers, "threads": threads, "target": "flow - endpoint",
                     "phase": f"{opts.concurrency} concurrent",
                     "calls": conc[1]["calls"],
                     "p50_ms": conc[1]["p50_ms"] - conc[0]["p50_ms"], "p99_ms": conc[1]["p99_ms"] - conc[0]["p99_ms"]})
    services.stop_all()
    return rows


def big_prompt():
    from stand_ins.tiny_phi3 import build_tokenizer

    tokenizer = build_tokenizer()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                           add_generation_prompt=True)
    return tokenizer, prompt


def torch_generator(dtype_name: str, layers: int | None):
    """A timed `generate(n)` of exactly n new tokens with a Phi-3.5-mini-sized torch model."""
    import torch
    from transformers import GenerationConfig

    tokenizer, prompt = big_prompt()
    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    model = common.random_phi35_mini("cpu", dtype=getattr(torch, dtype_name), layers=layers).eval()

    def generate(n):
        config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
        with torch.inference_mode(), common.timed() as elapsed:
            out = model.generate(input_ids, generation_config=config, attention_mask=torch.ones_like(input_ids))
        assert out.shape[1] == input_ids.shape[1] + n
        return elapsed()

    return generate, model.config.num_hidden_layers, input_ids.shape[1]


def int4_generator(onnx_dir: Path):
    """A timed `generate(n)` of exactly n new tokens with the int4 form, as the int4 MLflow model runs it."""
    import numpy as np

    from int4_model import Int4ChatModel

    _, prompt = big_prompt()
    chat = Int4ChatModel()
    chat.load(str(onnx_dir), "{prompt}", {})  # its generate() below sets every search option itself
    prompt_ids = chat.tokenizer.encode(prompt)

    def generate(n):
        params = chat.og.GeneratorParams(chat.model)
        params.set_search_options(max_length=len(prompt_ids) + n, min_length=len(prompt_ids) + n, do_sample=False)
        with common.timed() as elapsed:
            generator = chat.og.Generator(chat.model, params)
            generator.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
            while not generator.is_done():
                generator.generate_next_token()
        assert generator.token_count() == len(prompt_ids) + n
        return elapsed()

    return generate, len(prompt_ids)


def measure_big(opts) -> list[dict]:
    """Phi-3.5-mini-sized generation on this CPU: first token, each further token, 128 tokens."""
    import torch

    rows = []
    default_threads = torch.get_num_threads()
    for form in filter(None, opts.big_forms.split(",")):
        with common.timed() as built:
            if form == "int4":
                _, int4_dir = common.build_serving_phi35_mini(big_models_dir(opts), layers=opts.big_layers)
                generate, prompt_tokens = int4_generator(int4_dir / "artifacts" / "onnx")
                layers = opts.big_layers or common.PHI35_MINI_CONFIG["num_hidden_layers"]
            else:
                generate, layers, prompt_tokens = torch_generator(form, opts.big_layers)
        thread_counts = ["default"] if form == "int4" else filter(None, opts.big_threads.split(","))
        for threads in thread_counts:
            if form != "int4":
                torch.set_num_threads(default_threads if threads == "default" else int(threads))
            generate(1)  # warm-up
            first = common.median([generate(1) for _ in range(2)])
            longer = common.median([generate(opts.big_tokens) for _ in range(2)])
            per_token = (longer - first) / (opts.big_tokens - 1)
            estimate_128 = first + 127 * per_token
            used = torch.get_num_threads() if form != "int4" else common.cpu_count()
            rows.append({
                "form": form, "threads": used, "layers": layers, "prompt_tokens": prompt_tokens,
                "build_s": built(), "first_token_s": first, "per_token_s": per_token, "tokens_per_s": 1 / per_token,
                "est_128_tokens_s": estimate_128, "fits_180_s": estimate_128 < REQUEST_LIMIT_S,
                "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "unset"),
            })
            print(f"big {form}, {used} threads: first token {first:.2f} s, then {per_token:.3f} s/token; "
                  f"128 tokens ~ {estimate_128:.1f} s (limit {REQUEST_LIMIT_S} s); load {os.getloadavg()[0]:.2f}",
                  flush=True)
        torch.set_num_threads(default_threads)
        del generate
    bf16 = next((r for r in rows if r["form"] == "bfloat16" and r["threads"] == default_threads), None)
    int4 = next((r for r in rows if r["form"] == "int4"), None)
    if bf16 and int4:
        print(f"int4 / bf16 tokens/s: {int4['tokens_per_s'] / bf16['tokens_per_s']:.2f}x", flush=True)
    return rows


def big_models_dir(opts) -> Path:
    return common.SCRATCH / f"phi35-mini-serving-{opts.big_layers or 32}l"


def server_rss_mb(process) -> float:
    """Resident memory of a server process and all its children (azmlinfsrv's workers)."""
    import psutil

    try:
        root = psutil.Process(process.pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20
    except psutil.NoSuchProcess:
        return float("nan")


def measure_big_endpoint(opts, services: Services) -> list[dict]:
    """The Phi-3.5-mini-sized model's two served forms through the local endpoint, to concurrent clients."""
    from transformers import AutoTokenizer

    model_dir, int4_dir = common.build_serving_phi35_mini(big_models_dir(opts), layers=opts.big_layers)
    tokenizer = AutoTokenizer.from_pretrained(model_dir / "components" / "tokenizer")
    # Waits past the request limit, so that a queued call is timed rather than lost.
    client = Client(services.key, opts.big_answer_tokens, tokenizer, timeout=opts.big_calls * REQUEST_LIMIT_S)
    from deploy_model import SERVING

    rows = []
    for form, name, folder in (("transformers", "bf16 transformers", model_dir), ("int4", "int4", int4_dir)):
        started = time.monotonic()
        url = services.endpoint(folder, 1, "default", opts.port or processes.free_port())
        load_s = time.monotonic() - started  # what the deployment's probes must wait for
        client.direct(url)  # warm-up: the first request builds what the server builds lazily
        # Azure admits 2 x max_concurrent_requests_per_instance requests at once and answers 429 to the rest.
        admitted = min(opts.big_concurrency, 2 * SERVING[form].max_concurrent_requests)
        calls = max(admitted, admitted * opts.big_calls // opts.big_concurrency)
        samples, wall = concurrent(client.direct, url, admitted, calls)
        stats = latency_stats(samples, client, wall)
        rows.append({"form": name, "clients": opts.big_concurrency, "admitted": admitted,
                     "rejected_429": opts.big_concurrency - admitted, "load_s": round(load_s, 1), **stats,
                     "server_rss_mb": server_rss_mb(services.processes[-1])})
        print(f"endpoint {name}: live after {load_s:.1f} s; {admitted} of {opts.big_concurrency} clients admitted: "
              f"p50 {stats['p50_ms'] / 1000:.1f} s, p99 {stats['p99_ms'] / 1000:.1f} s, max_new_tokens "
              f"{opts.big_answer_tokens}; server RSS {rows[-1]['server_rss_mb']:,.0f} MB; load {os.getloadavg()[0]:.2f}",
              flush=True)
        services.stop_all()
    return rows


def main(argv=None):
    opts = parse_args(argv)
    common.setup_env()
    import transformers

    transformers.logging.set_verbosity_error()
    workers = [int(w) for w in opts.workers.split(",") if w]
    thread_counts = [t.strip() for t in opts.threads.split(",") if t.strip()]
    if opts.model_dir is None and not opts.skip_endpoint:
        opts.model_dir = tiny_mlflow_model(common.SCRATCH / "tiny-mlflow-model")
    common.print_header("Serving latency", {
        "model_dir": str(opts.model_dir), "server": "azmlinfsrv 1.5.1", "workers": workers, "threads": thread_counts,
        "max_new_tokens": opts.max_new_tokens,
        "decoding": "greedy", "sequential_calls": opts.calls, "concurrency": opts.concurrency,
        "concurrent_calls": opts.concurrent_calls, "flow": not (opts.skip_flow or opts.skip_endpoint),
        "flow_engine": "fastapi", "question": QUESTION, "big": opts.big, "big_tokens": opts.big_tokens,
        "big_layers": opts.big_layers or 32, "big_forms": opts.big_forms, "big_threads": opts.big_threads,
        "big_endpoint": opts.big_endpoint, "big_concurrency": opts.big_concurrency, "big_calls": opts.big_calls,
        "big_answer_tokens": opts.big_answer_tokens,
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "unset"), "cpu_capability": cpu_capability(),
    })

    rows, big = [], []
    if not opts.skip_endpoint:
        tokenizer = transformers.AutoTokenizer.from_pretrained(opts.model_dir / "components" / "tokenizer")
        with tempfile.TemporaryDirectory(dir=common.SCRATCH) as tmp:
            services = Services(Path(tmp))
            client = Client(services.key, opts.max_new_tokens, tokenizer)
            try:
                for count in workers:
                    for threads in thread_counts:
                        rows += measure_endpoint(opts, services, client, count, threads)
                        print(f"workers={count} threads={threads} done; load {os.getloadavg()[0]:.2f}", flush=True)
            except BaseException:
                print(services.tail(), file=sys.stderr)
                raise
            finally:
                services.stop_all()
        print()
        common.print_table(rows, ["workers", "threads", "target", "phase", "calls", "p50_ms", "p99_ms", "mean_ms",
                                  "tokens_per_answer", "tokens_per_s", "answers_per_s"])
        print("(flow - endpoint rows: differences of p50 and p99; mean_ms there is the median of paired differences)")
    big_endpoint = []
    if opts.big:
        big = measure_big(opts)
        print()
        common.print_table(big, ["form", "threads", "layers", "prompt_tokens", "first_token_s", "per_token_s",
                                 "tokens_per_s", "est_128_tokens_s", "fits_180_s"])
    if opts.big_endpoint:
        with tempfile.TemporaryDirectory(dir=common.SCRATCH) as tmp:
            services = Services(Path(tmp))
            try:
                big_endpoint = measure_big_endpoint(opts, services)
            except BaseException:
                print(services.tail(), file=sys.stderr)
                raise
            finally:
                services.stop_all()
        print()
        common.print_table(big_endpoint, ["form", "clients", "admitted", "rejected_429", "load_s", "calls", "p50_ms",
                                          "p99_ms", "over_180_s", "answers_per_s", "server_rss_mb"])
        # Random weights never stop early, but their text re-tokenizes loosely (the int4 form's decodes
        # to a few words): per-token speed is the in-process table's.
        print(f"(answers of max_new_tokens {opts.big_answer_tokens} new tokens; over_180_s: answers that took "
              "longer than the deployment's request timeout, 408 on Azure)")
    if opts.big or opts.big_endpoint:
        print(f"measured on this machine ({cpu_capability()}); the tutorial's deployment runs on {STANDARD_E4S_V3}")
    print(f"loadavg after: {[round(x, 2) for x in os.getloadavg()]}")
    common.emit_json("serving", {"endpoint": rows, "big": big, "big_endpoint": big_endpoint})
    return rows, big


if __name__ == "__main__":
    main()
