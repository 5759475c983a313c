"""The benchmark scripts on a tiny configuration, and their arithmetic on known inputs.

No timing threshold is asserted here (benchmarks are not timed tests): each script runs, prints
its configuration, and its figures follow from one another (tokens/s from tokens and seconds,
ratios from the medians they divide).
"""

import importlib
import json
import math

import pytest

from conftest import ROOT, options_without_help, run_main

BENCH = ROOT / "benchmarks"


def benchmark(script: str):
    """A benchmark script's module (conftest puts the project on sys.path)."""
    return importlib.import_module(f"benchmarks.{script[:-3]}")


def run_benchmark(script: str, args):
    """A benchmark's main() on these flags, in this process: a new one would spend its first seconds importing."""
    return run_main(benchmark(script).main, args, cwd=ROOT)


def results(stdout: str) -> dict:
    """The RESULT <name> <json> lines a benchmark prints."""
    found = {}
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            _, name, payload = line.split(" ", 2)
            found[name] = json.loads(payload)
    return found


@pytest.mark.parametrize("script", ["bench_finetune.py", "bench_serving.py"])
def test_help_explains_every_flag(script, capsys):
    with pytest.raises(SystemExit) as done:
        benchmark(script).parse_args(["--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")
    assert options_without_help(benchmark(script).parse_args) == []


def losses_by_runner(runs: list[dict]) -> dict:
    """{(setting, mode, precision): {runner: mean training loss}} of a fine-tuning benchmark's runs."""
    found = {}
    for run in runs:
        found.setdefault((run["setting"], run["mode"], run["precision"]), {})[run["runner"]] = run["loss"]
    return found


def test_finetune_benchmark_runs_both_trainers_on_the_same_model(tiny_model_dir):
    batch, length = 2, 128
    result = run_benchmark("bench_finetune.py", [
        "--model", tiny_model_dir, "--max-length", length, "--batch-size", batch, "--warmup-steps", 1, "--steps", 2,
        "--repeats", 1, "--rows", 60, "--settings", "tutorial,default", "--modes", "lora"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "configuration: " in out and '"max_length": 128' in out and "loadavg" in out
    payload = results(out)["finetune"]

    runs = payload["runs"]
    assert {(r["setting"], r["mode"], r["runner"]) for r in runs} == {
        (s, "lora", r) for s in ("tutorial", "default") for r in ("fine_tune", "bare")
    }  # full fine-tuning, both runners: the bf16 / fp32 test below
    for run in runs:
        assert 0 < run["tokens_per_step"] <= batch * length
        assert run["tokens_per_s_med"] == pytest.approx(run["tokens_per_step"] / run["step_s"])
        assert 0 < run["mfu_pct"] < 100
        assert math.isfinite(run["loss"]) and run["loss"] > 0
        if run["packing"] == "wrapped":  # concatenated and cut: every row is full
            assert run["tokens_per_step"] == batch * length
    tutorial = next(r for r in runs if r["setting"] == "tutorial")
    assert (tutorial["attn"], tutorial["packing"]) == ("eager", "wrapped")

    # fine_tune.py's trainer and the bare TRL one train the same model on the same batches: a fair race.
    for key, losses in losses_by_runner(runs).items():
        assert losses["fine_tune"] == pytest.approx(losses["bare"], abs=1e-3), key
    assert {(r["attn"], r["packing"]) for r in runs if r["setting"] == "default"} == {("sdpa", "bfd")}
    summary = {(r["setting"], r["mode"], r["runner"]): r for r in payload["summary"]}
    assert len(summary) == len(runs) and all(row["runs"] == 1 for row in summary.values())
    whats = {r["what"] for r in payload["ratios"]}
    assert "fine_tune / bare, default, lora" in whats and "default / tutorial, lora, fine_tune" in whats
    for ratio in payload["ratios"]:
        if ratio["what"].startswith("default / tutorial"):
            runner = ratio["what"].rsplit(", ", 1)[1]
            assert ratio["ratio"] == pytest.approx(summary[("default", "lora", runner)]["tokens_per_s_med"]
                                                   / summary[("tutorial", "lora", runner)]["tokens_per_s_med"])


def test_finetune_benchmark_compares_the_tutorials_bf16_weights_with_fp32_ones(tiny_model_dir):
    result = run_benchmark("bench_finetune.py", [
        "--model", tiny_model_dir, "--max-length", 128, "--batch-size", 2, "--warmup-steps", 1, "--steps", 8,
        "--repeats", 1, "--rows", 60, "--settings", "default", "--modes", "full", "--runners", "fine_tune,bare",
        "--precisions", "bf16,fp32"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    payload = results(result.stdout)["finetune"]
    runs = {(r["precision"], r["runner"]): r for r in payload["runs"]}
    assert set(runs) == {(p, r) for p in ("bf16", "fp32") for r in ("fine_tune", "bare")}
    assert runs[("bf16", "fine_tune")]["weights"] == runs[("bf16", "bare")]["weights"] == "bfloat16"
    assert runs[("fp32", "fine_tune")]["weights"] == runs[("fp32", "bare")]["weights"] == "float32"
    # At lr 5e-6 bf16 weights keep few of AdamW's steps: the test loss moves far less than with fp32 ones.
    bf16, fp32 = runs[("bf16", "fine_tune")]["learned"], runs[("fp32", "fine_tune")]["learned"]
    assert fp32 > 0 and fp32 > 3 * bf16, (bf16, fp32)
    # Each precision's two runners train the same model.
    for key, losses in losses_by_runner(payload["runs"]).items():
        assert losses["fine_tune"] == pytest.approx(losses["bare"], abs=1e-3), key


def test_the_big_model_is_phi35_minis_size():
    import torch

    from benchmarks.common import random_phi35_mini

    with torch.device("meta"):
        model = random_phi35_mini()
    # microsoft/Phi-3.5-mini-instruct: 3,821,079,552 parameters, bf16 unless asked otherwise.
    assert sum(p.numel() for p in model.parameters()) == 3_821_079_552
    assert next(model.parameters()).dtype == torch.bfloat16


def test_summary_takes_medians_over_repeats_and_pairs_runners_within_a_repeat():
    from benchmarks.bench_finetune import summarise

    def run(setting, runner, repeat, speed):
        return {"setting": setting, "mode": "lora", "runner": runner, "repeat": repeat, "tokens_per_s_med": speed,
                "loss": 1.0 + repeat}

    rows = [run("default", "fine_tune", 0, 90.0), run("default", "bare", 0, 100.0),
            run("default", "fine_tune", 1, 120.0), run("default", "bare", 1, 100.0),
            run("tutorial", "fine_tune", 0, 50.0), run("tutorial", "fine_tune", 1, 70.0)]
    table, ratios = summarise(rows)
    summary = {(r["setting"], r["runner"]): r for r in table}
    assert summary[("default", "fine_tune")]["tokens_per_s_med"] == 105.0 and summary[("default", "fine_tune")]["runs"] == 2
    assert summary[("default", "fine_tune")]["loss"] == 1.5
    found = {r["what"]: r for r in ratios}
    assert found["fine_tune / bare, default, lora"]["per_repeat"] == [0.9, 1.2]
    assert found["fine_tune / bare, default, lora"]["ratio"] == pytest.approx(1.05)
    assert found["default / tutorial, lora, fine_tune"]["ratio"] == pytest.approx(105 / 60)


def test_latency_figures_of_known_answers():
    from benchmarks.bench_serving import latency_stats
    from stand_ins.tiny_phi3 import build_tokenizer

    tokenizer = build_tokenizer()
    answer = "Microsoft was founded by Bill Gates"
    tokens = len(tokenizer(answer, add_special_tokens=False)["input_ids"])
    samples = [(0.5, answer)] * 3 + [(2.5, answer), (200.0, "")]
    stats = latency_stats(samples, tokenizer, wall=10.0)
    assert stats["calls"] == 5 and stats["p50_ms"] == 500.0 and stats["mean_ms"] == pytest.approx(40_800)
    assert stats["tokens_per_answer"] == pytest.approx(4 * tokens / 5)
    assert stats["over_180_s"] == 1  # past the deployment's 180 s request limit: a 408 on Azure
    assert stats["answers_per_s"] == 0.5 and stats["tokens_per_s"] == pytest.approx(4 * tokens / 10)


def test_batch_meter_counts_conversations_in_padding_free_batches():
    import torch

    from benchmarks.bench_finetune import BatchMeter

    padding_free = BatchMeter(lambda _: {"input_ids": torch.zeros(1, 7), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1]])})
    padding_free(None)
    assert padding_free.batches == [(7, 3 * 3 + 2 * 2 + 2 * 2)]
    padded = BatchMeter(lambda _: {"input_ids": torch.zeros(2, 4), "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])})
    padded(None)
    assert padded.batches == [(6, 16 + 4)]


def test_serving_benchmark_measures_endpoint_and_flow(fine_tuned_model):
    env_file = ROOT / ".env"
    before = env_file.read_text() if env_file.exists() else None
    result = run_benchmark("bench_serving.py", ["--model-dir", fine_tuned_model, "--max-new-tokens", 6, "--calls", 4,
                                                "--concurrency", 2])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    payload = results(result.stdout)["serving"]
    rows = {(r["target"], r["phase"]): r for r in payload["endpoint"]}
    assert set(rows) == {(t, p) for t in ("endpoint", "flow", "flow - endpoint") for p in ("sequential", "2 concurrent")}
    for target in ("endpoint", "flow"):
        sequential = rows[(target, "sequential")]
        assert sequential["calls"] == 4
        assert 0 < sequential["p50_ms"] <= sequential["p99_ms"]
        # The fine-tuned tiny model answers with 'Microsoft was founded ...', cut at 6 tokens.
        assert sequential["tokens_per_answer"] == 6
        assert sequential["tokens_per_s"] == pytest.approx(6 * 1000 / sequential["mean_ms"])
        assert rows[(target, "2 concurrent")]["calls"] == 20
    assert rows[("flow - endpoint", "sequential")]["p50_ms"] == pytest.approx(
        rows[("flow", "sequential")]["p50_ms"] - rows[("endpoint", "sequential")]["p50_ms"])
    # The endpoint it starts writes its URI and key to a .env of the benchmark's, never the learner's.
    assert (env_file.read_text() if env_file.exists() else None) == before


def test_serving_benchmark_times_the_big_model_in_every_form():
    # One layer of Phi-3.5-mini's size, so that it runs in a test: bf16 and int4 in process, then both
    # served forms through the local endpoint, the int4 one batched and in turn.
    result = run_benchmark("bench_serving.py", [
        "--big", "--big-layers", 1, "--big-tokens", 16, "--big-forms", "bfloat16,int4", "--big-endpoint",
        "--big-endpoint-forms", "int4,transformers", "--big-clients", "1,3", "--big-rounds", 1, "--max-new-tokens", 5])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    payload = results(result.stdout)["serving"]
    big = {r["form"]: r for r in payload["big"]}
    assert set(big) == {"bfloat16", "int4"}
    for row in big.values():
        assert row["layers"] == 1 and row["tokens_per_s"] == pytest.approx(1 / row["per_token_s"])
        assert row["est_128_tokens_s"] == pytest.approx(row["first_token_s"] + 127 * row["per_token_s"])
    assert "int4 / bf16 tokens/s: " in result.stdout and payload["endpoint"] == []
    served = {(r["form"], r["serving"], r["clients"]): r for r in payload["big_endpoint"]}
    assert set(served) == {(form, serving, clients) for form, serving in
                           [("int4", "batched"), ("int4", "in-turn"), ("bf16 transformers", "in-turn")]
                           for clients in (1, 3)}
    # Each form's deployment settings: Azure admits 2 x max_concurrent_requests_per_instance at once.
    assert [(served[(form, "in-turn", 3)]["admitted"], served[(form, "in-turn", 3)]["rejected_429"])
            for form in ("bf16 transformers", "int4")] == [(2, 1), (3, 0)]
    # The batched int4 worker holds a thread for each of the 6 requests Azure admits and 2 for probes; in turn, one.
    assert (served[("int4", "batched", 3)]["threads"], served[("int4", "in-turn", 3)]["threads"]) == (8, 1)
    for (form, serving, clients), row in served.items():
        # The random model never stops early. Counted again from the text, its 5 tokens re-tokenize loosely: a
        # partial UTF-8 character decodes to U+FFFD, whose 3 bytes are 3 tokens of the byte-level tokenizer.
        assert row["calls"] == row["admitted"] and 4 <= row["tokens_per_answer"] <= 3 * 5
        assert row["slowest_s"] * 1000 >= row["p50_ms"]
        assert row["slowest_vs_alone"] == pytest.approx(row["slowest_s"] / served[(form, serving, 1)]["slowest_s"])
        assert 0 < row["p50_ms"] <= row["p99_ms"] and row["server_rss_mb"] > 100
        assert row["over_180_s"] == 0  # five tokens of one layer: far inside the request limit
    assert served[("int4", "batched", 1)]["server_rss_mb"] < served[("bf16 transformers", "in-turn", 1)]["server_rss_mb"]

