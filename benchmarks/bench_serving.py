"""Serving: the local endpoint's latency and tokens/s, what the Prompt flow adds, and the answers of a
Phi-3.5-mini-sized model on this CPU.

Default: the local endpoint (`python -m serving.local_endpoint`: azmlinfsrv and the learner's scoring script)
serves an MLflow model (default: the tiny Phi-3 saved by fine_tune.py's save_mlflow_model), `pf flow
serve --engine fastapi` the flow on it. Calls are the flow tool's (a fresh connection, greedy), alternate
endpoint / flow so that noise hits both alike: p50/p99 latency of --calls sequential calls, tokens/s
(answer tokens per second of latency), then --concurrency clients at once, 10 calls each; "flow -
endpoint" is what the flow adds. Once per --workers (azmlinfsrv WORKER_COUNT) and --threads value.

--big: a Phi-3.5-mini-sized model (--big-model phi4-mini: Phi-4-mini-sized), random weights, in process,
in each of --big-forms: bfloat16, float32 (transformers' generate, as the transformers MLflow model
runs) and int4 (onnxruntime-genai, as the int4 MLflow model runs): the first token, each further one,
so 128 tokens against the 180 s request limit.
--big-endpoint: that model as the MLflow models deploy_model.py serves (--big-endpoint-forms), behind
the local endpoint with the deployment's settings for its form (serving/forms.py): seconds until live
(what the probes wait for), then one answer of 128 tokens alone and bursts of --big-clients clients
asking at once, of which Azure admits 2 x max_concurrent_requests_per_instance (429 for the rest): the
admitted ones' latency, the slowest answer of a burst against one answer alone, server memory. The int4
form once per --big-serving: batched (requests that arrive together answered together) and in-turn.
--agent-questions N: step 4b's chat server (chat/serve_agent.py) asked N questions through its API, in
front of a stand-in endpoint that answers at once: its memory and time per question, every tenth of N.

    python benchmarks/bench_serving.py --workers 1,2 --threads default,1
    python benchmarks/bench_serving.py --big --big-forms bfloat16,float32,int4
    python benchmarks/bench_serving.py --big-endpoint --big-clients 1,3,6
    python benchmarks/bench_serving.py --agent-questions 3000
    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/bench_serving.py --big   # torch held to a Broadwell host's ISA
"""

import argparse
import contextlib
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402  (first: it keeps tool state under .scratch/bench)

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer, GenerationConfig  # noqa: E402

import fine_tune as ft  # noqa: E402  (finetuning_dir/fine_tune.py)
from serving.forms import FORMS, PROBE_PERIOD_S, worker_threads  # noqa: E402
from int4_model import Int4ChatModel, cpu_threads  # noqa: E402
from chat import pf_home  # noqa: E402
from serving import REQUEST_TIMEOUT_MS, processes  # noqa: E402
from stand_ins import tiny_phi3  # noqa: E402

QUESTION = "Who founded Microsoft?"
REQUEST_LIMIT_S = REQUEST_TIMEOUT_MS / 1000  # the deployment's request limit


def parse_args(argv=None):
    """The command line; every flag's help says what it changes."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flag = parser.add_argument
    flag("--model-dir", type=Path, help="the MLflow model to serve (default: the tiny Phi-3 as fine_tune.py saves it)")
    flag("--workers", default="1", help="comma-separated azmlinfsrv WORKER_COUNT values (Azure's default: 1)")
    flag("--threads", default="default", help="comma-separated torch threads per server worker (OMP_NUM_THREADS): "
                                               "default (torch's choice, one per core) or a number")
    flag("--max-new-tokens", type=int, help="tokens per answer (default: 8; with --big-endpoint the flow's 128)")
    flag("--calls", type=int, default=200, help="sequential calls to each target (enough for a p99)")
    flag("--concurrency", type=int, default=8, help="clients calling at once in the concurrent phase")
    flag("--big", action="store_true", help="instead: time a Phi-3.5-mini-sized random model in process (~8 GB RAM)")
    flag("--big-forms", default="bfloat16", help="with --big: comma-separated forms: bfloat16, float32 (~16 GB), "
                                                 "int4 (onnxruntime-genai; built once from the bf16 model, ~10 min)")
    flag("--big-threads", default="default", help="with --big: comma-separated torch threads (default: one per core)")
    flag("--big-tokens", type=int, default=4, help="with --big: tokens generated in the longer run")
    flag("--big-endpoint", action="store_true", help="instead: serve the Phi-3.5-mini-sized model's forms, one after "
                                                     "the other, with the deployment's settings, to --big-clients")
    flag("--big-endpoint-forms", default="int4", help="with --big-endpoint: comma-separated int4 and/or transformers "
                                                      "(bf16, served one request at a time as Azure's own script does)")
    flag("--big-serving", default="batched,in-turn", help="with --big-endpoint: how the int4 worker answers: batched "
                                                          "(the deployment's: a thread per admitted request, requests "
                                                          "that arrive together answered together) and/or in-turn "
                                                          "(azmlinfsrv's sync worker, one request at a time)")
    flag("--big-clients", default="1,3,6", help="with --big-endpoint: comma-separated numbers of clients asking at "
                                                "once; 1 (first) is one answer alone, the others' ratio is to it")
    flag("--big-rounds", type=int, default=3, help="with --big-endpoint: bursts of clients per number of clients")
    flag("--big-layers", type=int, help="with --big or --big-endpoint: only this many layers (a quick check)")
    flag("--agent-questions", type=int, default=0, help="instead: ask step 4b's chat server this many questions")
    flag("--big-model", default="phi35-mini", choices=common.BIG_MODELS, help="with --big/--big-endpoint: whose size")
    return parser.parse_args(argv)


class Servers:
    """The servers a run starts, each a process with its log in `work` and an environment of its own (a
    Prompt flow home without telemetry, a .env that is never the learner's); leaving stops them all."""

    def __init__(self, work: Path):
        self.work, self.key, self.running = work, secrets.token_urlsafe(24), []
        (work / "bench.env").write_text("")
        self.env = {**pf_home.prepare(work / "promptflow"), "FINETUNE_PHI_ENV_FILE": str(work / "bench.env"),
                    "AZURE_ML_API_KEY": self.key, "PYTHONPATH": str(common.ROOT)}

    def start(self, name: str, command: list, live_url: str, **env) -> float:
        """Start a server; return the seconds until `live_url` answered."""
        try:
            self.running.append(processes.serve(command, live_url, log=self.work / f"{name}.log",
                                                env={**self.env, **env}, cwd=common.ROOT, timeout=3600))
        except processes.NotLive as e:
            raise SystemExit(f"bench_serving.py: {name} {e}")
        return self.running[-1].live_s

    def endpoint(self, model_dir: Path, workers: int = 1, threads: str = "default", server_threads: int | None = None,
                 **env) -> tuple[str, float]:
        """The local endpoint on `model_dir`, with `server_threads` per worker (default: the endpoint's own): its
        scoring URL, and the seconds it took to be live."""
        port = processes.free_port()
        # Its own URL as AZURE_ML_ENDPOINT: a local endpoint then keeps the key it finds there (ours).
        env.update(WORKER_COUNT=str(workers), AZURE_ML_ENDPOINT=f"http://127.0.0.1:{port}/score")
        if threads != "default":
            env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        command = [sys.executable, "-m", "serving.local_endpoint", "--model-dir", model_dir, "--port", port]
        if server_threads:
            command += ["--threads", server_threads]
        live_s = self.start(f"endpoint-{port}", command, f"http://127.0.0.1:{port}/", **env)
        return env["AZURE_ML_ENDPOINT"], live_s

    def flow(self, endpoint_url: str, max_new_tokens: int) -> str:
        """`pf flow serve` of this project's flow on `endpoint_url`: its scoring URL."""
        port = processes.free_port()
        command = [Path(sys.executable).with_name("pf"), "flow", "serve", "--source", common.ROOT, "--port", port,
                   "--host", "127.0.0.1", "--engine", "fastapi", "--skip-open-browser"]
        self.start(f"flow-{port}", command, f"http://127.0.0.1:{port}/health", AZURE_ML_ENDPOINT=endpoint_url,
                   AZURE_ML_TEMPERATURE="0", AZURE_ML_MAX_NEW_TOKENS=str(max_new_tokens))
        return f"http://127.0.0.1:{port}/score"

    def stop_all(self):
        """Stop every server started so far, and whatever runs under it."""
        for server in reversed(self.running):
            server.stop()
        self.running.clear()

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if error is not None:  # why a server failed is in its log
            for log in sorted(self.work.glob("*.log")):
                print(f"--- {log.name}\n{processes.log_tail(log, 20)}", file=sys.stderr)
        self.stop_all()


def ask(url: str, body: dict, timeout: float, key: str | None = None) -> tuple[float, str]:
    """One call on a fresh connection, as the flow's tool makes it: (seconds, answer)."""
    start = time.perf_counter()
    response = requests.post(url, json=body, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=timeout)
    seconds = time.perf_counter() - start
    if response.status_code == 500 and seconds >= REQUEST_LIMIT_S:
        return seconds, ""  # azmlinfsrv gave up at the request limit, as Azure would (its 408): timed, not lost
    response.raise_for_status()
    answer = response.json()
    return seconds, answer[0] if isinstance(answer, list) else answer["answer"]


def endpoint_call(url: str, key: str, max_new_tokens: int, timeout: float = REQUEST_LIMIT_S + 10):
    """A call to the endpoint with the body the flow's tool sends."""
    params = {"max_new_tokens": max_new_tokens, "do_sample": False, "return_full_text": False}
    return partial(ask, url, {"input_data": [QUESTION], "params": params}, timeout, key)


def concurrent(call, clients: int, calls: int) -> tuple[list, float]:
    """`calls` calls from `clients` clients at once: the samples, and the wall time of them all."""
    with ThreadPoolExecutor(clients) as pool:
        start = time.perf_counter()
        samples = list(pool.map(lambda _: call(), range(calls)))
        return samples, time.perf_counter() - start


class ProbeWatch:
    """Azure's probes while calls run: GET / every PROBE_EVERY_S (liveness and readiness, each every
    PROBE_PERIOD_S); the slowest answer, and how many took longer than the probe's timeout (Azure's default,
    2 s), which Azure counts as failures."""

    PROBE_EVERY_S, PROBE_TIMEOUT_S = PROBE_PERIOD_S / 2, 2.0

    def __init__(self, base_url: str):
        self.base_url, self.seconds = base_url, []

    @contextlib.contextmanager
    def running(self):
        """Probe in the background for as long as the block runs."""
        done = threading.Event()

        def watch():
            while not done.wait(self.PROBE_EVERY_S):
                start = time.perf_counter()
                try:
                    requests.get(self.base_url + "/", timeout=4 * REQUEST_LIMIT_S)
                except requests.RequestException:
                    pass
                self.seconds.append(time.perf_counter() - start)

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            done.set()
            thread.join()

    def stats(self) -> dict:
        return {"probe_max_s": max(self.seconds, default=0.0),
                "probes_failed": sum(s > self.PROBE_TIMEOUT_S for s in self.seconds), "probes": len(self.seconds)}


def latency_stats(samples: list[tuple[float, str]], tokenizer, wall: float | None = None) -> dict:
    """Latency percentiles and tokens/s of (seconds, answer) samples; with `wall`, rates per second of wall time."""
    latencies = [s for s, _ in samples]
    tokens = [len(tokenizer(answer, add_special_tokens=False)["input_ids"]) for _, answer in samples]
    stats = {
        "calls": len(samples), "p50_ms": 1000 * np.percentile(latencies, 50),
        "p99_ms": 1000 * np.percentile(latencies, 99), "mean_ms": 1000 * statistics.mean(latencies),
        "tokens_per_answer": statistics.mean(tokens), "tokens_per_s": sum(tokens) / sum(latencies),
        # Answers that took longer than the deployment's request timeout: Azure would have answered 408.
        "over_180_s": sum(latency > REQUEST_LIMIT_S for latency in latencies),
    }
    if wall:
        stats.update(answers_per_s=len(samples) / wall, tokens_per_s=sum(tokens) / wall)
    return stats


def measure_endpoint(opts, servers: Servers, tokenizer, workers: int, threads: str) -> list[dict]:
    """The endpoint and the flow on it: sequential, then concurrent calls; and what the flow adds."""
    endpoint_url, _ = servers.endpoint(opts.model_dir, workers, threads)
    flow_url = servers.flow(endpoint_url, opts.max_new_tokens)
    targets = {"endpoint": endpoint_call(endpoint_url, servers.key, opts.max_new_tokens),
               "flow": partial(ask, flow_url, {"input_data": QUESTION, "chat_history": []}, REQUEST_LIMIT_S + 10)}
    for call in targets.values():  # warm up: first requests load lazily built parts
        for _ in range(5):
            call()
    sequential = {name: [] for name in targets}
    for i in range(opts.calls):
        for name in list(targets) if i % 2 == 0 else list(targets)[::-1]:
            sequential[name].append(targets[name]())
    # Two rounds in opposite orders, half the calls each, so that load from elsewhere hits both alike.
    rounds = {name: [] for name in targets}
    for order in (list(targets), list(targets)[::-1]):
        for name in order:
            rounds[name].append(concurrent(targets[name], opts.concurrency, 5 * opts.concurrency))
    servers.stop_all()

    at = {"workers": workers, "threads": threads}
    rows = [{**at, "target": name, "phase": "sequential", **latency_stats(samples, tokenizer)}
            for name, samples in sequential.items()]
    rows += [{**at, "target": name, "phase": f"{opts.concurrency} concurrent",
              **latency_stats(samples_a + samples_b, tokenizer, wall_a + wall_b)}
             for name, ((samples_a, wall_a), (samples_b, wall_b)) in rounds.items()]
    for endpoint, flow in (rows[0:2], rows[2:4]):
        rows.append({**at, "target": "flow - endpoint", "phase": flow["phase"], "calls": flow["calls"],
                     "p50_ms": flow["p50_ms"] - endpoint["p50_ms"], "p99_ms": flow["p99_ms"] - endpoint["p99_ms"]})
    paired = [f - e for (e, _), (f, _) in zip(sequential["endpoint"], sequential["flow"])]
    rows[4]["mean_ms"] = 1000 * statistics.median(paired)  # sequential: the median of paired differences
    return rows


def int4_form(opts) -> Path:
    """quantize_model.py's int4 MLflow model of the Phi-3.5-mini-sized (--big-model) model, built once, in a process
    of its own: the model builder's ~20 GB would otherwise stay with this one while the servers load."""
    model_dir = common.phi35_mini_mlflow(opts.big_layers, opts.big_model)
    if not (model_dir.with_name("model-int4") / "MLmodel").exists():
        subprocess.run([sys.executable, str(common.ROOT / "finetuning_dir" / "quantize_model.py"), "--model-dir",
                        str(model_dir), "--output-dir", str(model_dir.with_name("model-int4"))], check=True)
    return model_dir.with_name("model-int4")


def torch_generator(dtype_name: str, opts, tokenizer, prompt: str):
    """A timed `generate(n)` of exactly n new tokens by a Phi-3.5-mini-sized torch model; the prompt's tokens."""
    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    model = common.random_phi35_mini(getattr(torch, dtype_name), opts.big_layers, opts.big_model).eval()

    def generate(n):
        config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids, generation_config=config, attention_mask=torch.ones_like(input_ids))
        assert out.shape[1] == input_ids.shape[1] + n
        return time.perf_counter() - start

    return generate, input_ids.shape[1]


def int4_generator(onnx_dir: Path, prompt: str):
    """A timed `generate(n)` of exactly n new tokens by the int4 form, as the int4 MLflow model runs it."""
    chat = Int4ChatModel()
    chat.load(str(onnx_dir), "{prompt}", {})  # generate() below sets every search option itself
    prompt_ids = chat.tokenizer.encode(prompt)

    def generate(n):
        params = chat.og.GeneratorParams(chat.model)
        params.set_search_options(max_length=len(prompt_ids) + n, min_length=len(prompt_ids) + n, do_sample=False)
        start = time.perf_counter()
        generator = chat.og.Generator(chat.model, params)
        generator.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
        while not generator.is_done():
            generator.generate_next_token()
        assert generator.token_count() == len(prompt_ids) + n
        return time.perf_counter() - start

    return generate, len(prompt_ids)


def measure_big(opts) -> list[dict]:
    """Phi-3.5-mini-sized generation in process: the first token, each further one, 128 tokens."""
    rows, default_threads = [], torch.get_num_threads()
    tokenizer = common.BIG_MODELS[opts.big_model][1].build_tokenizer()
    prompt = ft.chat_prompt_template(tokenizer).format(prompt=QUESTION)  # as the served models wrap it
    for form in opts.big_forms.split(","):
        if form == "int4":
            generate, prompt_tokens = int4_generator(int4_form(opts) / "artifacts" / "onnx", prompt)
            thread_counts = [cpu_threads()]  # int4_model.py sets onnxruntime's threads itself
        else:
            generate, prompt_tokens = torch_generator(form, opts, tokenizer, prompt)
            thread_counts = [default_threads if t == "default" else int(t) for t in opts.big_threads.split(",")]
        for threads in thread_counts:
            if form != "int4":
                torch.set_num_threads(threads)
            generate(1)  # warm-up
            first = statistics.median([generate(1) for _ in range(2)])
            longer = statistics.median([generate(opts.big_tokens) for _ in range(2)])
            per_token = (longer - first) / (opts.big_tokens - 1)
            rows.append({"model": opts.big_model, "form": form, "threads": threads, "layers": opts.big_layers or 32,
                         "int4_mib": sum(f.stat().st_size for f in int4_form(opts).rglob("*") if f.is_file()) / 2**20
                         if form == "int4" else None,
                         "prompt_tokens": prompt_tokens, "first_token_s": first, "per_token_s": per_token,
                         "tokens_per_s": 1 / per_token, "est_128_tokens_s": first + 127 * per_token,
                         "fits_180_s": first + 127 * per_token < REQUEST_LIMIT_S})
        torch.set_num_threads(default_threads)
        del generate
    common.print_table(rows, ["model", "form", "threads", "layers", "int4_mib", "prompt_tokens", "first_token_s",
                              "per_token_s", "tokens_per_s", "est_128_tokens_s", "fits_180_s"])
    bf16 = next((r for r in rows if r["form"] == "bfloat16" and r["threads"] == default_threads), None)
    int4 = next((r for r in rows if r["form"] == "int4"), None)
    if bf16 and int4:
        print(f"int4 / bf16 tokens/s: {int4['tokens_per_s'] / bf16['tokens_per_s']:.2f}x", flush=True)
    return rows


def endpoint_setups(opts) -> list[tuple[str, str, str, Path, int]]:
    """(name, form, serving, model folder, worker threads) of each server --big-endpoint measures."""
    setups = []
    for form in opts.big_endpoint_forms.split(","):
        if form == "int4":
            folder = int4_form(opts)
            for serving in opts.big_serving.split(","):
                setups.append(("int4", form, serving, folder, worker_threads(FORMS[form]) if serving == "batched" else 1))
        else:  # Azure serves it with its own MLflow scoring script: one request at a time
            setups.append(("bf16 transformers", form, "in-turn", common.phi35_mini_mlflow(opts.big_layers, opts.big_model), 1))
    return setups


def measure_big_endpoint(opts, servers: Servers) -> list[dict]:
    """The Phi-3.5-mini-sized model's served forms behind the local endpoint, with the deployment's settings: one
    answer alone, then bursts of clients asking at once, of which Azure admits 2 x max_concurrent_requests. Every
    server is up at once and the bursts take turns, round by round, so that a change in the machine's speed
    during the run hits them all alike."""
    tokenizer = AutoTokenizer.from_pretrained(common.phi35_mini_mlflow(opts.big_layers, opts.big_model) / "components" / "tokenizer")
    served = []
    for name, form, serving, folder, threads in endpoint_setups(opts):
        # In turn: azmlinfsrv's sync worker, one request at a time; nothing arrives together, so nothing is gathered.
        env = {} if serving == "batched" else {"BATCH_GATHER_MS": "0"}
        url, load_s = servers.endpoint(folder, server_threads=threads, **env)  # load_s: what the probes wait for
        endpoint_call(url, servers.key, 1)()  # warm-up: the first request builds what the server builds lazily
        # Waits past the request limit, so that a queued call is timed rather than lost.
        call = endpoint_call(url, servers.key, opts.max_new_tokens, timeout=4 * REQUEST_LIMIT_S)
        served.append({"name": name, "form": form, "serving": serving, "threads": threads, "url": url,
                       "load_s": load_s, "call": call, "process": servers.running[-1].process})
    clients_list = [int(c) for c in opts.big_clients.split(",")]
    bursts = {(i, clients): [] for i in range(len(served)) for clients in clients_list}
    probes = {key: ProbeWatch(served[key[0]]["url"].removesuffix("/score")) for key in bursts}
    for _ in range(opts.big_rounds):
        for clients in clients_list:
            for i, server in enumerate(served):
                admitted = min(clients, FORMS[server["form"]].admitted)  # Azure answers 429 to the rest
                with probes[(i, clients)].running():
                    bursts[(i, clients)].append(concurrent(server["call"], admitted, admitted))
                slowest = max(seconds for seconds, _ in bursts[(i, clients)][-1][0])
                print(f"  {server['name']}, {server['serving']}, {clients} clients: slowest answer {slowest:.1f} s",
                      flush=True)
    rows = []
    for i, server in enumerate(served):
        process = psutil.Process(server["process"].pid)  # and its workers
        rss_mb = sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20
        alone = None
        for clients in clients_list:
            runs = bursts[(i, clients)]
            slowest = statistics.median(max(seconds for seconds, _ in samples) for samples, _ in runs)
            alone = slowest if clients == 1 else alone
            admitted = min(clients, FORMS[server["form"]].admitted)
            rows.append({"form": server["name"], "serving": server["serving"], "threads": server["threads"],
                         "clients": clients, "admitted": admitted, "rejected_429": clients - admitted,
                         "load_s": server["load_s"],
                         **latency_stats([x for samples, _ in runs for x in samples], tokenizer,
                                         sum(wall for _, wall in runs)),
                         "slowest_s": slowest, "slowest_vs_alone": slowest / alone if alone else None,
                         **probes[(i, clients)].stats(), "server_rss_mb": rss_mb})
    servers.stop_all()
    common.print_table(rows, ["form", "serving", "threads", "clients", "admitted", "rejected_429", "load_s", "calls", "p50_ms",
                              "p99_ms", "slowest_s", "slowest_vs_alone", "over_180_s", "answers_per_s",
                              "probe_max_s", "probes_failed", "probes", "server_rss_mb"])
    # Random weights never stop early, but their text re-tokenizes loosely: per-token speed is --big's.
    print(f"(answers of {opts.max_new_tokens} new tokens; slowest_s: the median over {opts.big_rounds} bursts of "
          "each burst's slowest answer; over_180_s: answers later than the 180 s request timeout, 408 on Azure; "
          f"probes: GET / every {ProbeWatch.PROBE_EVERY_S:g} s during the bursts, failed: slower than Azure's "
          f"{ProbeWatch.PROBE_TIMEOUT_S:g} s probe timeout)")
    return rows


def measure_agent(opts, servers: Servers) -> list[dict]:
    """Step 4b's chat server in front of an endpoint that answers at once: its memory and time per question."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from openai import OpenAI

    class Instant(BaseHTTPRequestHandler):
        log_message = staticmethod(lambda *args: None)

        def do_POST(self):  # HTTP/1.0: the answer ends with the connection
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'["Yes"]')

    endpoint = ThreadingHTTPServer(("127.0.0.1", 0), Instant)
    threading.Thread(target=endpoint.serve_forever, daemon=True).start()
    port, token = processes.free_port(), secrets.token_urlsafe(16)
    servers.start("agent", [common.ROOT / ".venv-agent" / "bin" / "python", "-m", "chat.serve_agent", "--port", port],
                  f"http://localhost:{port}/health", DEVUI_AUTH_TOKEN=token,
                  AZURE_ML_ENDPOINT=f"http://127.0.0.1:{endpoint.server_address[1]}/score")
    server = psutil.Process(servers.running[-1].pid)
    (agent,) = requests.get(f"http://localhost:{port}/v1/entities", headers={"Authorization": f"Bearer {token}"},
                            timeout=30).json()["entities"]
    client = OpenAI(base_url=f"http://localhost:{port}/v1", api_key=token, max_retries=0)
    rows, every = [], max(1, opts.agent_questions // 10)
    for asked in range(every, opts.agent_questions + 1, every):
        start = time.perf_counter()
        for _ in range(every):
            answer = client.responses.create(model=agent["id"], input=QUESTION, metadata={"entity_id": agent["id"]})
            assert answer.output_text == "Yes", answer.error
        rows.append({"questions": asked, "ms_per_question": 1000 * (time.perf_counter() - start) / every,
                     "server_rss_mib": server.memory_info().rss / 2**20})
    servers.stop_all()
    endpoint.shutdown()
    common.print_table(rows, ["questions", "ms_per_question", "server_rss_mib"])
    return rows


def main(argv=None):
    """Measure what the flags ask for; print the tables and the RESULT line."""
    opts = parse_args(argv)
    opts.max_new_tokens = opts.max_new_tokens or (128 if opts.big_endpoint else 8)
    payload = {"endpoint": [], "big": [], "big_endpoint": [], "agent": []}
    with tempfile.TemporaryDirectory(dir=common.SCRATCH) as tmp, Servers(Path(tmp)) as servers:
        if not (opts.big or opts.big_endpoint or opts.agent_questions) and opts.model_dir is None:
            tokenizer = tiny_phi3.build_tokenizer()
            opts.model_dir = Path(tmp) / "tiny-model"
            ft.save_mlflow_model(tiny_phi3.build_model(tokenizer), tokenizer, str(opts.model_dir))
        common.print_header("Serving", {**vars(opts), "question": QUESTION, "decoding": "greedy",
                                        "server": "azmlinfsrv 1.5.1 (serving/local_endpoint.py)", "flow_engine": "fastapi"})
        if opts.big:
            payload["big"] = measure_big(opts)
        if opts.big_endpoint:
            payload["big_endpoint"] = measure_big_endpoint(opts, servers)
        if opts.agent_questions:
            payload["agent"] = measure_agent(opts, servers)
        if not (opts.big or opts.big_endpoint or opts.agent_questions):
            tokenizer = AutoTokenizer.from_pretrained(opts.model_dir / "components" / "tokenizer")
            for workers in map(int, opts.workers.split(",")):
                for threads in opts.threads.split(","):
                    payload["endpoint"] += measure_endpoint(opts, servers, tokenizer, workers, threads)
            common.print_table(payload["endpoint"], ["workers", "threads", "target", "phase", "calls", "p50_ms",
                                                     "p99_ms", "mean_ms", "tokens_per_answer", "tokens_per_s",
                                                     "answers_per_s"])
            print("(flow - endpoint rows: differences of p50 and p99; mean_ms there: the median of paired differences)")
    common.emit_json("serving", payload)


if __name__ == "__main__":
    main()
