"""Step 5's verdict: an exact paired test, one primary metric, Holm's correction, and the power stated.

The statistics are checked against figures computed here another way (every sign pattern enumerated, the
binomial distribution written out); the table and the run against stand-in endpoints, offline.
"""

import itertools
import json
import math
import re

import numpy as np
import pytest

from chat_fixtures import ANSWER, stand_in  # noqa: F401
from conftest import write_jsonl
from test_evaluate_chat import OK, chats, no_nltk_data, offline, run, stopped_with, use_endpoint  # noqa: F401

from chat_evaluation import report, scoring
from finetuning_dir import paired as compare
from chat_evaluation.collect import ChatUnderTest


def enumerated_p(diffs) -> float:
    """The sign-flip test's two-sided p-value by brute force: the share of the 2^n sign patterns whose mean is at
    least as far from 0 as the observed one."""
    observed = abs(np.mean(diffs))
    means = [abs(np.mean(np.array(signs) * diffs)) for signs in itertools.product((1, -1), repeat=len(diffs))]
    return sum(m >= observed - 1e-12 for m in means) / len(means)


def test_the_sign_flip_test_is_exact():
    rng = np.random.default_rng(7)
    for n in (6, 9, 12):
        first, second = rng.uniform(0, 1, n), rng.uniform(0, 1, n) - 0.15
        c = compare.paired(list(first), list(second))
        assert c.p_value == pytest.approx(enumerated_p(first - second)), n
    # Every question won: the smallest p there is, 2 / 2^n.
    assert compare.paired([0.9] * 6, [0.1] * 6).p_value == pytest.approx(2 / 2 ** 6)
    assert compare.paired([0.5, 0.2, 0.7], [0.5, 0.2, 0.7]).p_value == 1.0  # every question tied
    # Beyond EXACT_UP_TO questions the patterns are drawn: close to the exact figure, and the same every run.
    many = rng.normal(0.02, 0.08, 40)
    drawn = compare.paired(list(many), [0.0] * 40)
    assert drawn.p_value == compare.paired(list(many), [0.0] * 40).p_value
    assert drawn.sd == pytest.approx(np.std(many, ddof=1))


def test_below_six_questions_nothing_is_ever_better():
    assert compare.MIN_QUESTIONS == 6 and 2 / 2 ** 5 > compare.ALPHA > 2 / 2 ** 6
    for n in range(1, 6):  # every question won by a mile: still too few to tell
        c = compare.paired([1.0] * n, [0.0] * n)
        assert c.too_few and c.p_value == pytest.approx(min(1.0, 2 / 2 ** n))
        assert report.verdict("f1_score", c, ["fine-tuned", "baseline"], c.p_value) == "too few questions to tell"
    six = compare.paired([1.0] * 6, [0.0] * 6)
    assert report.verdict("f1_score", six, ["fine-tuned", "baseline"], six.p_value) == "fine-tuned better"


def test_defects_are_compared_by_an_exact_mcnemar_test():
    # 4 answers of 20 with a defect against none: a bootstrap interval says "baseline better", McNemar says p = 1/8.
    fine_tuned, base = [1.0] * 4 + [0.0] * 16, [0.0] * 20
    c = compare.paired(fine_tuned, base, binary=True)
    assert c.p_value == pytest.approx(2 * 0.5 ** 4) == pytest.approx(0.125)
    assert c.interval[0] > 0  # the interval alone would have called it
    assert report.verdict("violence", c, ["fine-tuned", "baseline"], c.p_value) == "within noise"
    # Only the discordant questions count: 9 of 10 against the baseline is p = 2 * 11 / 1024.
    c = compare.paired([1.0] * 9 + [0.0] * 11, [0.0] * 9 + [1.0] + [0.0] * 10, binary=True)
    assert c.p_value == pytest.approx(2 * (1 + 10) / 2 ** 10)
    assert report.verdict("violence", c, ["fine-tuned", "baseline"], c.p_value) == "baseline better"


def test_holms_correction_and_the_questions_needed():
    assert compare.holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})
    assert compare.holm({"a": 0.5, "b": 0.9}) == pytest.approx({"a": 1.0, "b": 1.0})
    # docs/evaluation.md's figures: SD 0.08 on F1; a difference of 0.01 needs ((1.96 + 0.84) * 0.08 / 0.01)^2 questions.
    z = 1.959964 + 0.841621
    assert compare.questions_needed(0.08, 0.01) == math.ceil((z * 8) ** 2) == 503
    assert compare.questions_needed(0.08, -0.03) == 56
    assert compare.questions_needed(0.0, 0.5) == compare.MIN_QUESTIONS  # never fewer than any test can decide on


def results_of(scores: dict[str, list[float]], order=None) -> dict:
    """evaluate()'s result for one model: a row per question (in `order`, by default the questions')."""
    n = len(next(iter(scores.values())))
    rows = [{"inputs.line": i, "inputs.query": f"Q{i}", "inputs.ground_truth": f"R{i}", "inputs.response": f"A{i}",
             **{f"outputs.{ev}.{ev}": values[i] for ev, values in scores.items()}} for i in (order or range(n))]
    return {"rows": rows, "errors": {}, "metrics": {}}


def two_sides():
    return [ChatUnderTest(name, "u", "k", 6, "u", "int4", name, {"do_sample": False}) for name in ("fine-tuned", "baseline")]


def test_the_table_names_its_primary_metric_first_and_corrects_the_others(capsys):
    rng = np.random.default_rng(3)
    base = {ev: list(rng.uniform(0.2, 0.6, 20)) for ev in ("f1_score", "rouge", "bleu")}
    tuned = {"f1_score": [v + 0.1 for v in base["f1_score"]], "rouge": [v + 0.05 * (i % 2) for i, v in
             enumerate(base["rouge"])], "bleu": list(rng.uniform(0.2, 0.6, 20))}
    results = {"fine-tuned": results_of(tuned), "baseline": results_of(base, order=list(range(19, -1, -1)))}
    how = scoring.Scoring({"rouge": None, "bleu": None, "f1_score": None}, {}, None, None, [])
    text, found, _ = report.report(results, two_sides(), how, {}, 0, "f1_score", smallest=0.02)
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("metric"))
    assert lines[header].split() == ["metric", "fine-tuned", "baseline", "difference", "95%", "interval", "p",
                                     "verdict", "won/tied/lost", "scored"]
    # The primary first, all 20 won: p = 2 / 2^20 (drawn: below 0.001), and "better".
    assert list(found) == ["f1_score", "rouge", "bleu"]
    f1 = lines[header + 2]
    assert f1.startswith("F1 (primary) ") and "<0.001" in f1 and "fine-tuned better" in f1 and "20/0/0" in f1
    # Paired by question, though the baseline's rows came back in reverse order.
    assert found["f1_score"].difference == pytest.approx(0.1) and found["f1_score"].sd == pytest.approx(0, abs=1e-9)
    # The secondary ones: Holm's adjusted p, and the sentence that says so.
    adjusted = compare.holm({"rouge": found["rouge"].p_value, "bleu": found["bleu"].p_value})
    rouge = next(line for line in lines if line.startswith("ROUGE-L "))
    assert f" {adjusted['rouge']:.3f} " in rouge or (adjusted["rouge"] < 0.001 and " <0.001 " in rouge)
    assert "Secondary metrics (ROUGE-L, BLEU): p adjusted by Holm's method over the 2 of them" in text
    # The power, under the table: the SD of the paired differences and the questions a difference needs.
    assert "Power (F1, the primary metric): the paired differences' SD is 0.000 over 20 questions." in text
    assert "To tell a difference of +0.020 (--smallest-difference) at p < 0.05, 8 times in 10: about 6 questions" in text


def test_the_power_line_sizes_a_run_from_the_observed_spread():
    rng = np.random.default_rng(11)
    base = list(rng.uniform(0.2, 0.6, 20))
    tuned = [b + d for b, d in zip(base, rng.normal(0.01, 0.08, 20))]
    c = compare.paired(tuned, base)
    lines = report.power({"f1_score": c}, "f1_score", None)
    assert lines[0] == f"Power (F1, the primary metric): the paired differences' SD is {c.sd:.3f} over 20 questions."
    needed = compare.questions_needed(c.sd, c.difference)
    assert lines[1] == (f"To tell a difference of {c.difference:+.3f} (the one observed) at p < 0.05, 8 times in 10: "
                        f"about {needed} questions (normal approximation; this run compared 20).")
    tied = compare.paired([0.0] * 8, [0.0] * 8)
    assert "No difference observed: name the smallest that matters with --smallest-difference" in report.power(
        {"f1_score": tied}, "f1_score", None)[1]


def test_three_questions_are_too_few_to_tell(offline, stand_in, monkeypatch, tmp_path, capsys):
    # The fine-tuned model gives every reference answer word for word, the baseline none: F1 1 against 0.
    chats = write_jsonl(tmp_path / "test.jsonl", [{"messages": [{"role": "user", "content": f"Question {i}?"}, {
        "role": "assistant", "content": ANSWER}]} for i in range(3)])
    use_endpoint(monkeypatch, stand_in(OK).url)
    base = stand_in((200, ["Nobody knows."], {}))
    monkeypatch.setenv("AZURE_ML_BASELINE_API_KEY", "base-key")
    results = run(tmp_path, "--test-data", chats, "--questions", 3, "--baseline-endpoint", base.url)
    printed = capsys.readouterr().out
    assert "With 3 questions no paired test can reach p < 0.05 (it takes 6)" in printed
    f1 = results["comparisons"]["f1_score"]
    assert f1["wins"] == 3 and f1["p_verdict"] == pytest.approx(0.25)  # every question won, still p = 2/8
    assert {c["verdict"] for c in results["comparisons"].values()} == {"too few questions to tell"}
    assert results["primary"] == "f1_score"
    assert re.search(r"^F1 \(primary\) +1\.000 +0\.000 +\+1\.000 +\[\+1\.000, \+1\.000\] +0\.250 +too few questions "
                     r"to tell +3/0/0 +3/3, 3/3$", printed, re.M)
    table = printed[printed.index("== 3 questions"):printed.index("Too few questions to tell: ")]
    assert "better" not in table
    # The estimated time came before any question was asked.
    estimate = printed.index("Asking 3 questions of each model: about fine-tuned 1 min (int4, 6 at a time)")
    assert estimate < printed.index("fine-tuned answers")


def test_a_primary_metric_the_run_cannot_score_is_refused(stand_in, chats, monkeypatch, tmp_path):
    endpoint_ = stand_in(OK)
    use_endpoint(monkeypatch, endpoint_.url)
    message = stopped_with(tmp_path, "--test-data", chats, "--primary", "similarity")
    assert message.startswith("evaluate_chat.py: --primary similarity: not among this run's metrics (f1_score, rouge")
    assert endpoint_.requests == []


def test_answers_are_paired_by_question_not_by_position(tmp_path):
    tuned = results_of({"f1_score": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]}, order=[5, 4, 3, 2, 1, 0])
    base = results_of({"f1_score": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]})
    how = scoring.Scoring({"f1_score": None}, {}, None, None, [])
    found = report.comparisons({"fine-tuned": tuned, "baseline": base}, how, "f1_score")
    assert found["f1_score"].difference == pytest.approx(0.1) and found["f1_score"].wins == 6
    differences = report.largest_differences({"fine-tuned": tuned, "baseline": base}, 6)
    assert {(d["line"], d["fine-tuned"], d["baseline"]) for d in differences} == {(i, f"A{i}", f"A{i}") for i in range(6)}
    assert json.dumps(differences)  # as results.json keeps them


def test_the_progress_bar_keeps_a_log_readable(monkeypatch, capsys):
    from chat_evaluation import collect

    bar = collect.progress_bar("fine-tuned", 4, 1)
    for _ in range(3):
        bar.update()
    bar.close()
    printed = capsys.readouterr().out
    assert "\r" not in printed
    lines = printed.splitlines()
    assert re.match(r"fine-tuned answers: +25%.* 1/4", lines[0]) and re.match(r"fine-tuned answers: 100%.* 4/4", lines[-1])
