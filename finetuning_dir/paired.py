"""Two models question by question: is the difference larger than the questions' own spread?

Step 5 compares the chat's answers with it (chat_evaluation/report.py), and evaluation.py the test loss of
each conversation, in fine_tune.py's runs too: it sits here to travel with fine_tune.py into the Azure ML job.
For each metric, only the questions both models were scored on count. Per question, the difference is
fine-tuned minus baseline; its mean is the table's difference. Two figures come with it:

- the verdict's p-value, from an exact paired test: a sign-flip permutation test over the questions for
  scores (scipy.stats.permutation_test; every sign pattern enumerated up to EXACT_UP_TO questions), an
  exact McNemar test (a binomial test on the questions where only one model had a defect) for 0/1 defects;
- the size of the effect: a 95% percentile bootstrap interval of the mean difference (the questions
  resampled with replacement, the same questions for both models).

With n questions neither test can give a p-value below 2 / 2^n, so below MIN_QUESTIONS no count of wins
could ever reach ALPHA: the verdict is then "too few questions to tell", whatever the answers.
"""

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

BOOTSTRAP_RESAMPLES = 10_000
SEED = 0  # the same interval and p-value for the same answers, run after run
ALPHA = 0.05
POWER = 0.8  # the chance of telling a difference of the named size, for the questions-needed figure
EXACT_UP_TO = 16  # questions; 2^16 sign patterns enumerated, beyond that PERMUTATIONS drawn
PERMUTATIONS = 20_000
# The fewest questions whose smallest possible p-value (2 / 2^n, every question won) is below ALPHA: 6.
MIN_QUESTIONS = math.ceil(1 + math.log2(1 / ALPHA))


@dataclass
class Comparison:
    """One metric, both models, over the questions both were scored on."""

    scored: tuple[int, int]  # questions each model was scored on
    asked: int
    paired: int  # questions both were scored on: the ones compared
    means: tuple[float | None, float | None]  # each model's mean over the paired questions
    difference: float | None  # mean of fine-tuned minus baseline
    interval: tuple[float, float] | None  # its 95% bootstrap interval
    wins: int
    ties: int
    losses: int
    p_value: float | None = None  # the exact paired test's, two-sided
    sd: float | None = None  # the sample SD of the per-question differences
    binary: bool = False  # 0/1 scores (a defect or not): McNemar's test

    @property
    def too_few(self) -> bool:
        """Fewer questions than any test at ALPHA could ever decide on."""
        return self.difference is not None and self.paired < MIN_QUESTIONS

    @property
    def within_noise(self) -> bool:
        return self.p_value is not None and not self.too_few and self.p_value >= ALPHA


def paired(first: list[float | None], second: list[float | None], binary: bool = False) -> Comparison:
    """Compare two models' per-question scores (None: not scored); `binary`: 0/1 scores, a defect or not."""
    pairs = [(a, b) for a, b in zip(first, second) if a is not None and b is not None]
    scored = (sum(v is not None for v in first), sum(v is not None for v in second))
    if not pairs:
        return Comparison(scored, len(first), 0, (None, None), None, None, 0, 0, 0)
    a, b = np.array(pairs, dtype=float).T
    diffs = a - b
    wins, losses = int((diffs > 1e-12).sum()), int((diffs < -1e-12).sum())
    return Comparison(
        scored, len(first), len(pairs), (float(a.mean()), float(b.mean())), float(diffs.mean()),
        bootstrap_interval(diffs), wins, len(diffs) - wins - losses, losses,
        p_value=mcnemar_p(wins, losses) if binary else sign_flip_p(diffs),
        sd=float(diffs.std(ddof=1)) if len(diffs) > 1 else None, binary=binary,
    )


def sign_flip_p(diffs: np.ndarray) -> float:
    """Two-sided p-value of the paired sign-flip permutation test of the mean difference: under "no difference"
    each question's difference is as likely to have either sign."""
    if len(diffs) < 2 or not np.any(np.abs(diffs) > 1e-12):
        return 1.0  # one question has two sign patterns, as extreme as each other
    result = stats.permutation_test(
        (diffs,), lambda x, axis: np.mean(x, axis=axis), permutation_type="samples", vectorized=True,
        n_resamples=2 ** EXACT_UP_TO if len(diffs) <= EXACT_UP_TO else PERMUTATIONS, alternative="two-sided", rng=SEED,
    )
    return float(min(1.0, result.pvalue))


def mcnemar_p(only_first: int, only_second: int) -> float:
    """Exact McNemar: of the questions where one model alone scored 1, is the split further from even than
    chance makes it? (A binomial test at 1/2 on the discordant questions.)"""
    discordant = only_first + only_second
    return 1.0 if discordant == 0 else float(stats.binomtest(only_first, discordant, 0.5).pvalue)


def bootstrap_interval(diffs: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of `diffs`, resampling questions."""
    rng = np.random.default_rng(SEED)
    means = diffs[rng.integers(0, len(diffs), size=(BOOTSTRAP_RESAMPLES, len(diffs)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjustment of several p-values (each compared with ALPHA afterwards): the family of
    secondary metrics then claims a difference by chance at most ALPHA of the time."""
    ordered = sorted(p_values, key=p_values.get)
    adjusted, running = {}, 0.0
    for rank, name in enumerate(ordered):
        running = max(running, min(1.0, (len(ordered) - rank) * p_values[name]))
        adjusted[name] = running
    return adjusted


def questions_needed(sd: float, difference: float, alpha: float = ALPHA, power: float = POWER) -> int:
    """About how many questions a paired comparison needs to tell a mean difference of `difference` at `alpha`
    with `power`, for per-question differences of SD `sd` (the normal approximation; never below
    MIN_QUESTIONS)."""
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return max(MIN_QUESTIONS, math.ceil((z * sd / abs(difference)) ** 2))


def verdict(c: Comparison, names: list[str], p: float | None, lower_is_better: bool = False) -> str:
    """The verdict on one metric at ALPHA, from its p-value `p` (adjusted, for a secondary metric)."""
    if c.difference is None or p is None:
        return "n/a"
    if c.too_few:
        return "too few questions to tell"
    if p >= ALPHA:
        return "within noise"
    better = (c.difference < 0) if lower_is_better else (c.difference > 0)
    return f"{names[0] if better else names[1]} better"


def number(value: float | None, sign: bool = False) -> str:
    return "no score" if value is None else (f"{value:+.3f}" if sign else f"{value:.3f}")


def p_text(p: float | None) -> str:
    return "n/a" if p is None else ("<0.001" if p < 0.001 else f"{p:.3f}")


def row(label: str, c: Comparison, names: list[str], p: float | None, lower_is_better: bool = False) -> list[str]:
    """One metric's cells in a two-model table (the `columns`, less the count of questions scored); won/tied/lost
    from the first model's side: won where it did better (a higher score, a lower defect rate or loss)."""
    interval = "n/a" if c.interval is None else f"[{c.interval[0]:+.3f}, {c.interval[1]:+.3f}]"
    won, lost = (c.losses, c.wins) if lower_is_better else (c.wins, c.losses)
    return [label, *(number(m) for m in c.means), number(c.difference, sign=True), interval, p_text(p),
            verdict(c, names, p, lower_is_better), f"{won}/{c.ties}/{lost}"]


def power_lines(c: Comparison, name: str, smallest: float | None = None, unit: str = "questions") -> list[str]:
    """How many questions would tell a difference the size of the one observed (or of `smallest`), from the
    spread of the paired differences `c` holds."""
    if c.difference is None:
        return []
    if c.sd is None:
        return [f"Power ({name}): one of the {unit} compared gives no spread to size a larger run from."]
    lines = [f"Power ({name}): the paired differences' SD is {c.sd:.3f} over {c.paired} {unit}."]
    for what, size in [("the one observed", c.difference)] + ([("--smallest-difference", smallest)] if smallest else []):
        if abs(size) < 1e-12:
            lines.append("No difference observed: name the smallest that matters with --smallest-difference to "
                         "size a run.")
            continue
        lines.append(f"To tell a difference of {size:+.3f} ({what}) at p < {ALPHA}, {round(POWER * 10)} times in 10: "
                     f"about {questions_needed(c.sd, size)} {unit} (normal approximation; this run compared {c.paired}).")
    return lines


def columns(names: list[str]) -> list[str]:
    return ["metric", *names, "difference", "95% interval", "p", "verdict", "won/tied/lost"]


def aligned(lines: list[list[str]]) -> str:
    """Rows of cells as a text table: the first column to the left, the others to the right, a rule under the
    header."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
            for line in lines]
    return "\n".join([text[0], "-" * len(text[0]), *text[1:]])


def one_model(values: list[float | None]) -> Comparison:
    """One model alone: its mean over the questions it was scored on."""
    scored = [v for v in values if v is not None]
    mean = float(np.mean(scored)) if scored else None
    return Comparison((len(scored), 0), len(values), len(scored), (mean, None), None, None, 0, 0, 0)
