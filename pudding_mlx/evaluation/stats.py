"""Accuracy statistics for `pudding eval`: lm-eval's acc / acc_norm decisions, chance levels, and
paired bootstrap confidence intervals over questions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


def decide(loglik: Sequence[float], choices: Sequence[str], norm: bool) -> int:
    """lm-eval's choice: argmax of the summed log-likelihood (acc), or of it divided by the
    choice's length in characters (acc_norm); ties go to the first choice, as np.argmax."""
    ll = np.asarray(loglik, dtype=np.float64)
    if norm:
        ll = ll / np.array([len(c) for c in choices], dtype=np.float64)
    return int(np.argmax(ll))


def gold_margin(loglik: Sequence[float], choices: Sequence[str], gold: int, norm: bool) -> float:
    """Gold's (normalised) score minus the best other choice's: > 0 when the gold answer wins."""
    ll = np.asarray(loglik, dtype=np.float64)
    if norm:
        ll = ll / np.array([len(c) for c in choices], dtype=np.float64)
    return float(ll[gold] - np.delete(ll, gold).max())


def chance_level(num_choices: Sequence[int]) -> float:
    """Expected accuracy of a uniform random guess."""
    return float(np.mean([1.0 / k for k in num_choices]))


def above_chance(acc: float, num_choices: Sequence[int], z: float = 1.96) -> bool:
    """Whether accuracy beats chance by more than z binomial standard errors (of chance)."""
    p = np.array([1.0 / k for k in num_choices])
    se = np.sqrt(np.sum(p * (1 - p))) / len(p)
    return bool(acc > p.mean() + z * se)


@dataclass
class PairedDiff:
    """mean(a) - mean(b) over the same questions, with a percentile bootstrap interval."""

    diff: float
    low: float
    high: float
    n: int
    resamples: int
    confidence: float = 0.95

    def to_dict(self) -> dict:
        return asdict(self)


def _resampled_means(x: np.ndarray, resamples: int, rng: np.random.Generator,
                     chunk: int = 1 << 22) -> np.ndarray:
    """Means of `resamples` bootstrap resamples of x (drawn in chunks to bound memory)."""
    out = np.empty(resamples)
    rows = max(1, chunk // max(len(x), 1))
    for start in range(0, resamples, rows):
        m = min(rows, resamples - start)
        out[start:start + m] = x[rng.integers(0, len(x), size=(m, len(x)))].mean(axis=1)
    return out


def paired_bootstrap(groups: Sequence[tuple[Sequence[float], Sequence[float]]],
                     resamples: int = 2000, seed: int = 0,
                     confidence: float = 0.95) -> PairedDiff:
    """Paired difference of two methods scored on the same questions.

    `groups` is one (a, b) pair of per-question scores (e.g. 0/1 correct) per task; the
    statistic is the mean over tasks of mean(a) - mean(b) (one task: the plain difference).
    Each resample draws questions with replacement within every task independently.
    """
    rng = np.random.default_rng(seed)
    diffs = [np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64) for a, b in groups]
    if not diffs or any(len(d) == 0 for d in diffs):
        raise ValueError("paired_bootstrap needs at least one question per group")
    point = float(np.mean([d.mean() for d in diffs]))
    boot = np.mean([_resampled_means(d, resamples, rng) for d in diffs], axis=0)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(boot, [alpha, 1 - alpha])
    return PairedDiff(point, float(low), float(high), int(sum(len(d) for d in diffs)),
                      resamples, confidence)
