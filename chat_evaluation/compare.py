"""The two models question by question: is the difference larger than the questions' own spread?

For each metric, only the questions both models were scored on count. Per question, the difference is
fine-tuned minus baseline; its mean is the table's difference, and a 95% percentile bootstrap over the
questions (resampled with replacement, the same questions for both models) says how far that mean could
move with other questions of the same kind. An interval that spans 0 is "within noise".
"""

from dataclasses import dataclass

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
SEED = 0  # the same interval for the same answers, run after run


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

    @property
    def within_noise(self) -> bool:
        return self.interval is not None and self.interval[0] <= 0 <= self.interval[1]


def paired(first: list[float | None], second: list[float | None]) -> Comparison:
    """Compare two models' per-question scores (None: not scored)."""
    pairs = [(a, b) for a, b in zip(first, second) if a is not None and b is not None]
    scored = (sum(v is not None for v in first), sum(v is not None for v in second))
    if not pairs:
        return Comparison(scored, len(first), 0, (None, None), None, None, 0, 0, 0)
    a, b = np.array(pairs).T
    diffs = a - b
    return Comparison(
        scored, len(first), len(pairs), (float(a.mean()), float(b.mean())), float(diffs.mean()),
        bootstrap_interval(diffs), int((diffs > 1e-12).sum()), int((abs(diffs) <= 1e-12).sum()),
        int((diffs < -1e-12).sum()),
    )


def bootstrap_interval(diffs: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of `diffs`, resampling questions."""
    rng = np.random.default_rng(SEED)
    means = diffs[rng.integers(0, len(diffs), size=(BOOTSTRAP_RESAMPLES, len(diffs)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def one_model(values: list[float | None]) -> Comparison:
    """One model alone: its mean over the questions it was scored on."""
    scored = [v for v in values if v is not None]
    mean = float(np.mean(scored)) if scored else None
    return Comparison((len(scored), 0), len(values), len(scored), (mean, None), None, None, 0, 0, 0)
