"""What the learner reads, and where the results go: the table, results.json and an MLflow run."""

import json
import os
from dataclasses import asdict
from pathlib import Path

from finetuning_dir.paired import (
    ALPHA, MIN_QUESTIONS, Comparison, aligned, columns, holm, number, one_model, paired, power_lines, row,
)
from finetuning_dir.paired import verdict as paired_verdict
from chat_evaluation.scoring import AI_ASSISTED, LABELS, Scoring, lower_is_better, row_values, safety_only


def comparisons(results: dict[str, dict], how: Scoring, primary: str) -> dict[str, Comparison]:
    """Per evaluator, the primary metric first: both models question by question (or the one model alone)."""
    names = list(results)
    found = {}
    for evaluator in sorted(how.evaluators, key=lambda name: name != primary):
        keyed = [by_question(results[name], evaluator, how.safety_level) for name in names]
        lines = sorted(set().union(*keyed))
        values = [[scores.get(line) for line in lines] for scores in keyed]
        found[evaluator] = paired(*values, binary=lower_is_better(evaluator)) if len(names) == 2 else one_model(values[0])
    return found


def by_question(result: dict, evaluator: str, level: int) -> dict[int, float | None]:
    """An evaluator's scores keyed by question (its number in the test data, the answers' `line`): the two
    models' answers are paired by question, whatever order evaluate() returned its rows in."""
    return {int(row.get("inputs.line", i)): value
            for i, (row, value) in enumerate(zip(result["rows"], row_values(result, evaluator, level)))}


def p_values(found: dict[str, Comparison], primary: str) -> dict[str, float]:
    """Each metric's p-value as its verdict reads it: the primary metric's as it is, the secondary ones' adjusted
    by Holm's method over them."""
    secondary = {ev: c.p_value for ev, c in found.items() if ev != primary and c.p_value is not None}
    first = {primary: found[primary].p_value} if primary in found and found[primary].p_value is not None else {}
    return {**first, **holm(secondary)}


def verdict(evaluator: str, c: Comparison, names: list[str], p: float | None) -> str:
    return paired_verdict(c, names, p, lower_is_better(evaluator))  # a defect rate: lower is better


def label(evaluator: str, primary: str) -> str:
    return LABELS.get(evaluator, evaluator) + (" (primary)" if evaluator == primary else "")


def table(found: dict[str, Comparison], names: list[str], primary: str) -> str:
    """Each metric, the primary one first: the models' means over the questions compared, the paired difference
    with its 95% interval, its p-value and verdict, the questions won, tied and lost, and how many each model was
    scored on."""
    two = len(names) == 2
    lines = [(columns(names) if two else ["metric", *names]) + ["scored"]]
    ps = p_values(found, primary)
    for evaluator, c in found.items():
        scored = ", ".join(f"{n}/{c.asked}" for n in c.scored[: len(names)])
        if two:
            line = row(label(evaluator, primary), c, names, ps.get(evaluator), lower_is_better(evaluator))
        else:
            line = [label(evaluator, primary), number(c.means[0])]
        lines.append(line + [scored])
    return aligned(lines)


def how_to_read(found: dict[str, Comparison], primary: str) -> list[str]:
    """The sentences under a two-model table: what the interval and p are, the secondary metrics' correction, and
    why a run too small says nothing."""
    lines = ["Means and differences are over the questions both were scored on; the interval (a 95% bootstrap) is "
             "the size of the difference; p is the exact paired test's (sign-flip over the questions; McNemar for "
             f"defect rates) and the verdict is its, at p < {ALPHA} (docs/evaluation.md)."]
    secondary = [LABELS.get(ev, ev) for ev, c in found.items() if ev != primary and c.p_value is not None]
    if secondary:
        lines.append(f"Secondary metrics ({', '.join(secondary)}): p adjusted by Holm's method over the "
                     f"{len(secondary)} of them; metrics that measure alike (the word-overlap ones: F1, ROUGE-L, BLEU, "
                     "GLEU, METEOR) move together, so their agreement is not separate evidence.")
    if any(c.too_few for c in found.values()):
        lines.append(f"Too few questions to tell: with n questions no paired test can give p below 2/2^n, so fewer "
                     f"than {MIN_QUESTIONS} can never show a difference at p < {ALPHA}; ask at least {MIN_QUESTIONS}.")
    return lines


def power(found: dict[str, Comparison], primary: str, smallest: float | None) -> list[str]:
    """The questions needed to tell the primary metric's difference, under the table."""
    c = found.get(primary)
    return [] if c is None else power_lines(c, f"{LABELS.get(primary, primary)}, the primary metric", smallest)


def shorten(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def largest_differences(results: dict[str, dict], count: int) -> list[dict]:
    """The `count` questions whose F1 differs most between the two models, with both answers."""
    (first, a), (second, b) = results.items()
    rows_b = {int(row.get("inputs.line", i)): row for i, row in enumerate(b["rows"])}
    f1_a, f1_b = by_question(a, "f1_score", 0), by_question(b, "f1_score", 0)
    pairs = [{"question": row_a["inputs.query"], "reference": row_a["inputs.ground_truth"],
              first: row_a["inputs.response"], second: rows_b[line]["inputs.response"],
              f"{first} F1": f1_a[line], f"{second} F1": f1_b[line], "line": line}
             for line, row_a in ((int(row.get("inputs.line", i)), row) for i, row in enumerate(a["rows"]))
             if f1_a.get(line) is not None and f1_b.get(line) is not None]
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


def report(results: dict[str, dict], endpoints, how: Scoring, seconds: dict[str, float], show: int, primary: str,
           smallest: float | None = None, adversarial: dict[str, dict] | None = None
           ) -> tuple[str, dict[str, Comparison], list[dict]]:
    """The text the learner reads, the comparisons (the safety metrics on `adversarial`'s answers, when given, as
    adversarial.<harm>), and the questions that differ most."""
    names = list(results)
    found = comparisons(results, how, primary)
    if adversarial:
        found.update({f"adversarial.{ev}": c for ev, c in comparisons(adversarial, safety_only(how), primary).items()})
    parts = [sides(endpoints), "", table(found, names, primary)]
    if adversarial:
        asked = next(c.asked for ev, c in found.items() if ev.startswith("adversarial."))
        parts.append(f"The adversarial rows: {asked} questions made by the Azure AI project's safety service "
                     "(azure-ai-evaluation's AdversarialSimulator, ADVERSARIAL_QA), asked of each model; the rows on "
                     "test questions: the harmless questions of the test data.")
    if len(names) == 2:
        parts += how_to_read(found, primary) + power(found, primary, smallest)
    for name, result in [*results.items(), *((n + " (adversarial)", r) for n, r in (adversarial or {}).items())]:
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
    parts += [f"Logged to the Azure AI project: {r['studio_url']}" for r in [*results.values(), *(adversarial or {}).values()]
              if r.get("studio_url")]
    return "\n".join(parts), found, differences


def unscored(found: dict[str, Comparison], names: list[str]) -> list[str]:
    """Evaluators that scored nothing for some model: the run has failed."""
    return [f"{LABELS.get(ev, ev)} ({name})" for ev, c in found.items() for name, n in zip(names, c.scored) if n == 0]


def write_results(run_dir: Path, settings: dict, results: dict, found: dict, endpoints, how: Scoring,
                  seconds: dict, differences: list[dict], primary: str) -> None:
    names, ps = list(results), p_values(found, primary)
    (run_dir / "results.json").write_text(json.dumps({
        # evaluate()'s own aggregates, as it logs them to a project: its safety defect rates count from
        # severity 4 whatever the threshold; the table's figures are in "comparisons".
        "settings": settings, "evaluate_metrics": {name: r["metrics"] for name, r in results.items()},
        "primary": primary,
        "comparisons": {ev: {**asdict(c), "within_noise": c.within_noise, "p_verdict": ps.get(ev),
                             "verdict": verdict(ev, c, names, ps.get(ev)) if len(names) == 2 else None}
                        for ev, c in found.items()},
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
                            f"difference_high.{evaluator}": c.interval[1], f"p_value.{evaluator}": c.p_value})
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
