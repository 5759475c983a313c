"""What the learner reads, and where the results go: the table, results.json and an MLflow run."""

import json
import os
from dataclasses import asdict
from pathlib import Path

from chat_evaluation.compare import Comparison, one_model, paired
from chat_evaluation.scoring import AI_ASSISTED, LABELS, SAFETY, Scoring, row_values


def comparisons(results: dict[str, dict], how: Scoring) -> dict[str, Comparison]:
    """Per evaluator: both models question by question (or the one model alone)."""
    names = list(results)
    found = {}
    for evaluator in how.evaluators:
        values = [row_values(results[name], evaluator, how.safety_level) for name in names]
        found[evaluator] = paired(*values) if len(names) == 2 else one_model(values[0])
    return found


def number(value: float | None, sign: bool = False) -> str:
    return "no score" if value is None else (f"{value:+.3f}" if sign else f"{value:.3f}")


def verdict(evaluator: str, c: Comparison, names: list[str]) -> str:
    if c.difference is None:
        return "n/a"
    if c.within_noise:
        return "within noise"
    better = (c.difference < 0) if evaluator in SAFETY else (c.difference > 0)  # a defect rate: lower is better
    return f"{names[0] if better else names[1]} better"


def table(found: dict[str, Comparison], names: list[str]) -> str:
    """Each metric: the models' means over the questions compared, the paired difference with its 95% interval,
    the questions won, tied and lost, and how many each model was scored on."""
    two = len(names) == 2
    header = ["metric", *names] + (["difference", "95% interval", "verdict", "won/tied/lost"] if two else []) + ["scored"]
    lines = [header]
    for evaluator, c in found.items():
        scored = ", ".join(f"{n}/{c.asked}" for n in c.scored[: len(names)])
        line = [LABELS.get(evaluator, evaluator), *(number(m) for m in c.means[: len(names)])]
        if two:
            interval = "n/a" if c.interval is None else f"[{c.interval[0]:+.3f}, {c.interval[1]:+.3f}]"
            line += [number(c.difference, sign=True), interval, verdict(evaluator, c, names),
                     f"{c.wins}/{c.ties}/{c.losses}"]
        lines.append(line + [scored])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
            for line in lines]
    return "\n".join([text[0], "-" * len(text[0]), *text[1:]])


def shorten(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def largest_differences(results: dict[str, dict], count: int) -> list[dict]:
    """The `count` questions whose F1 differs most between the two models, with both answers."""
    (first, a), (second, b) = results.items()
    f1_a, f1_b = row_values(a, "f1_score", 0), row_values(b, "f1_score", 0)
    pairs = [{"question": row_a["inputs.query"], "reference": row_a["inputs.ground_truth"],
              first: row_a["inputs.response"], second: row_b["inputs.response"],
              f"{first} F1": x, f"{second} F1": y, "line": i}
             for i, (row_a, row_b, x, y) in enumerate(zip(a["rows"], b["rows"], f1_a, f1_b))
             if x is not None and y is not None]
    return sorted(pairs, key=lambda p: -abs(p[f"{first} F1"] - p[f"{second} F1"]))[:count]


def differences_text(differences: list[dict], names: list[str]) -> str:
    blocks = []
    for d in differences:
        lines = [f"[{d['line'] + 1}] Q: {shorten(d['question'])}", f"    reference: {shorten(d['reference'])}"]
        lines += [f"    {name} (F1 {d[f'{name} F1']:.2f}): {shorten(d[name])}" for name in names]
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


def judge_tokens(results: dict[str, dict]) -> dict[str, int]:
    """The Azure OpenAI tokens the AI-assisted evaluators used, from the usage each row keeps: what they cost."""
    tokens = {"prompt": 0, "completion": 0}
    for result in results.values():
        for row in result["rows"]:
            for name in AI_ASSISTED:
                usage = row.get(f"outputs.{name}.{name}_properties")
                if not isinstance(usage, dict):  # NaN where the judge failed that row
                    continue
                for kind in tokens:
                    tokens[kind] += int(usage.get(f"{kind}_tokens") or 0)
    return tokens


def sides(endpoints) -> str:
    """Who answered, in what form, with what params; said plainly where the two sides differ."""
    lines = [f"{e.name}: {e.model}, {e.form} form, params {json.dumps(e.params, sort_keys=True)}" for e in endpoints]
    if len(endpoints) == 2:
        a, b = endpoints
        if a.form != b.form:
            lines.append(f"Unlike forms: {a.name} {a.form}, {b.name} {b.form}; the difference mixes the fine-tuning "
                         "with the change of form (e.g. quantization)")
        if a.params != b.params:
            lines.append("Unlike params: the two answered with different settings")
        if any(e.params.get("do_sample", True) for e in endpoints):
            lines.append("Sampled answers (temperature above 0): a rerun gives other answers; --temperature 0 "
                         "compares greedy ones")
    return "\n".join(lines)


def report(results: dict[str, dict], endpoints, how: Scoring, seconds: dict[str, float], show: int
           ) -> tuple[str, dict[str, Comparison], list[dict]]:
    """The text the learner reads, the comparisons, and the questions that differ most."""
    names = list(results)
    found = comparisons(results, how)
    parts = [sides(endpoints), "", table(found, names)]
    if len(names) == 2:
        parts.append("Means and differences are over the questions both were scored on; the interval is a 95% "
                     "bootstrap over them: one that spans 0 is within noise (docs/evaluation.md).")
    for name, result in results.items():
        parts += [f"{name}: {LABELS.get(ev, ev)} failed, first error: {error}" for ev, error in result["errors"].items()]
    differences = largest_differences(results, show) if len(names) == 2 else []
    if differences:
        parts.append(f"\nThe {len(differences)} questions on which the two differ most (F1):\n"
                     + differences_text(differences, names))
    parts.append("\n" + "\n".join(f"{name}: answers collected in {s:.1f} s" for name, s in seconds.items() if s))
    tokens = judge_tokens(results)
    if tokens["prompt"]:
        parts.append(f"Azure OpenAI tokens used by the AI-assisted evaluators: {tokens['prompt']:,} prompt, "
                     f"{tokens['completion']:,} completion")
    parts += [f"Note: {line}" for line in how.left_out]
    parts += [f"Logged to the Azure AI project: {r['studio_url']}" for r in results.values() if r.get("studio_url")]
    return "\n".join(parts), found, differences


def unscored(found: dict[str, Comparison], names: list[str]) -> list[str]:
    """Evaluators that scored nothing for some model: the run has failed."""
    return [f"{LABELS.get(ev, ev)} ({name})" for ev, c in found.items() for name, n in zip(names, c.scored) if n == 0]


def write_results(run_dir: Path, settings: dict, results: dict, found: dict, endpoints, how: Scoring,
                  seconds: dict, differences: list[dict]) -> None:
    (run_dir / "results.json").write_text(json.dumps({
        # evaluate()'s own aggregates, as it logs them to a project: its safety defect rates count from
        # severity 4 whatever the threshold; the table's figures are in "comparisons".
        "settings": settings, "evaluate_metrics": {name: r["metrics"] for name, r in results.items()},
        "comparisons": {ev: {**asdict(c), "within_noise": c.within_noise} for ev, c in found.items()},
        "errors": {name: r["errors"] for name, r in results.items()},
        "answer_seconds": seconds, "judge_tokens": judge_tokens(results), "largest_differences": differences,
        "left_out": how.left_out, "safety_level": how.safety_level,
        "studio_urls": {name: r.get("studio_url") for name, r in results.items()},
        "endpoints": [{**asdict(e), "key": None} for e in endpoints],
    }, indent=2, default=str), encoding="utf-8")


def log_to_mlflow(run_dir: Path, settings: dict, found: dict[str, Comparison], names: list[str], tokens: dict,
                  store_env: dict) -> str:
    """One MLflow run: the settings, each metric per model (and the difference with its interval), the judges'
    tokens, the run folder as artifacts. `store_env`: the local store's settings, unless the learner has one."""
    import mlflow

    for name, value in store_env.items():
        os.environ.setdefault(name, value)
    metrics = {}
    for evaluator, c in found.items():
        metrics.update({f"{name}.{evaluator}": m for name, m in zip(names, c.means) if m is not None})
        if c.difference is not None:
            metrics.update({f"difference.{evaluator}": c.difference, f"difference_low.{evaluator}": c.interval[0],
                            f"difference_high.{evaluator}": c.interval[1]})
    metrics.update({f"judge_tokens.{kind}": count for kind, count in tokens.items() if count})
    with mlflow.start_run(run_name=f"evaluate-chat-{run_dir.name}") as run:
        mlflow.set_tag("step", "evaluate_chat")
        mlflow.log_params({"questions": settings["questions"], "test_data": settings["test_data"],
                           **{f"endpoint.{n}": i for n, i in settings["endpoints"].items()},
                           **{f"params.{n}.{k}": v for n, p in settings["params"].items() for k, v in p.items()},
                           "evaluators": ",".join(found)})
        mlflow.log_metrics(metrics)
        mlflow.log_artifacts(str(run_dir), artifact_path="evaluation")
    return run.info.run_id
