"""Dense metrics of a per-candidate score from cached samples, without regenerating.

A *group* is one problem's candidates: ``(scores, correct)``, two equal-length sequences.

- Within-prompt AUC: for each group with mixed correctness (at least one right and one
  wrong candidate), the Mann-Whitney AUC = P(score of a right candidate > score of a
  wrong one), ties counting 1/2; then the mean over those groups. 0.5 = no signal; below
  0.5 the score prefers wrong answers (its minimum would be the better selector).
  Groups with all-right or all-wrong candidates carry no information and are skipped.
- Pairwise accuracy: the same comparison pooled over every (right, wrong) pair of every
  group, so groups with more pairs weigh more.
- BoN accuracy: correctness of the highest-scoring candidate, tied maxima splitting the
  credit, averaged over all groups.

NaN scores (empty responses) rank below every real score, as the selectors rank them.
95% intervals are percentile bootstraps over groups with a fixed seed; ``bootstrap_indices``
and ``bootstrap_ci`` are the ones every bench report uses. This module knows nothing about
models, variants or how scores were made.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

Group = tuple[Sequence[float], Sequence[bool]]


def bootstrap_indices(num: int, resamples: int, seed: int = 0) -> np.ndarray:
    """(resamples, num) indices drawn with replacement; shared so that differences are paired."""
    return np.random.default_rng(seed).integers(0, num, size=(resamples, num))


def bootstrap_ci(values: Sequence[float], idx: np.ndarray) -> tuple[float, float]:
    """Percentile 95% interval of the mean of ``values`` over the resamples ``idx``."""
    arr = np.asarray(values, dtype=float)
    means = arr[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def _key(x: float | None) -> float:
    return -math.inf if x is None or math.isnan(x) else float(x)


def _wins(scores: Sequence[float], correct: Sequence[bool]) -> tuple[float, int]:
    """(wins of right over wrong with ties 1/2, number of right x wrong pairs)."""
    if len(scores) != len(correct):
        raise ValueError("scores and correct must have the same length")
    right = [_key(s) for s, c in zip(scores, correct) if c]
    wrong = [_key(s) for s, c in zip(scores, correct) if not c]
    wins = sum(1.0 if r > w else 0.5 if r == w else 0.0 for r in right for w in wrong)
    return wins, len(right) * len(wrong)


def prompt_auc(scores: Sequence[float], correct: Sequence[bool]) -> float | None:
    """Mann-Whitney AUC of one group; None when its correctness is not mixed."""
    wins, pairs = _wins(scores, correct)
    return wins / pairs if pairs else None


def within_prompt_auc(groups: Sequence[Group], *, bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """``{"auc", "ci95", "prompts"}``: mean per-group AUC over mixed groups (None if none)."""
    aucs = [a for a in (prompt_auc(s, c) for s, c in groups) if a is not None]
    if not aucs:
        return {"auc": None, "ci95": [None, None], "prompts": 0}
    lo, hi = bootstrap_ci(aucs, bootstrap_indices(len(aucs), bootstrap, seed))
    return {"auc": float(np.mean(aucs)), "ci95": [lo, hi], "prompts": len(aucs)}


def pairwise_accuracy(groups: Sequence[Group], *, bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """``{"accuracy", "ci95", "pairs"}``: pooled share of (right, wrong) pairs ordered right."""
    counts = [w for w in (_wins(s, c) for s, c in groups) if w[1]]
    if not counts:
        return {"accuracy": None, "ci95": [None, None], "pairs": 0}
    wins = np.array([w for w, _ in counts])
    pairs = np.array([p for _, p in counts], dtype=float)
    idx = bootstrap_indices(len(counts), bootstrap, seed)
    ratios = wins[idx].sum(1) / pairs[idx].sum(1)
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return {"accuracy": float(wins.sum() / pairs.sum()), "ci95": [float(lo), float(hi)], "pairs": int(pairs.sum())}


def bon_pick(scores: Sequence[float], correct: Sequence[bool]) -> float:
    """Expected correctness of the argmax, ties split evenly (all-NaN: every candidate ties)."""
    if not scores:
        raise ValueError("an empty group has no best candidate")
    keys = [_key(s) for s in scores]
    best = max(keys)
    tied = [c for k, c in zip(keys, correct) if k == best]
    return sum(map(float, tied)) / len(tied)


def bon_accuracy(groups: Sequence[Group], *, bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """``{"accuracy", "ci95", "problems", "per_problem"}`` of max-score selection."""
    per = [bon_pick(s, c) for s, c in groups]
    if not per:
        return {"accuracy": None, "ci95": [None, None], "problems": 0, "per_problem": []}
    lo, hi = bootstrap_ci(per, bootstrap_indices(len(per), bootstrap, seed))
    return {"accuracy": float(np.mean(per)), "ci95": [lo, hi], "problems": len(per), "per_problem": per}


def mean_ci(values: Sequence[float], *, bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """``{"accuracy", "ci95"}`` of per-problem values (greedy, random, majority, oracle)."""
    if not values:
        return {"accuracy": None, "ci95": [None, None]}
    lo, hi = bootstrap_ci(values, bootstrap_indices(len(values), bootstrap, seed))
    return {"accuracy": float(np.mean(values)), "ci95": [lo, hi]}
