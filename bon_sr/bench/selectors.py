"""Benchmark selectors over a subset of one problem's cached candidates.

Every selector is ``fn(candidates) -> weights``: one weight per candidate, summing to 1.
A selector that picks one candidate returns a one-hot vector; the random@n baseline
returns uniform weights, so its accuracy is the EXPECTED correctness of a random pick
(mean correctness over the candidates), not one noisy draw. The accuracy of a selector
on a subset is then ``sum(w_i * correct_i)`` and its selected length ``sum(w_i * len_i)``.

Ties always go to the EARLIEST candidate in the subset (subsets keep sampling order), so
the same cache always gives the same numbers; since sampling order is random, that is a
random tie-break in expectation. Majority vote: the answer class with most votes; equal
counts go to the class whose first member comes earliest; the pick is that first member.
Candidates with no extractable answer (group -1) do not vote; if none has an answer the
first candidate is picked. A NaN score ranks below every number.

Greedy is not here: it is a separate decode, not a pick from the samples. Selectors know
nothing about models, sampling or answer checking beyond the cached ``group``/``correct``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from ..errors import ConfigError

#: score names written by ``bench.scores`` into every cached candidate
SCORE_KEYS = ("sr_response", "sr_full", "mean_logprob", "self_certainty")


@dataclass(frozen=True)
class Scored:
    """What a selector may look at for one candidate."""

    correct: bool
    group: int
    num_tokens: int
    scores: Mapping[str, float] = field(default_factory=dict)
    truncated: bool = False  # stopped by the token limit, not by end-of-turn


Weights = list[float]
BenchSelectorFn = Callable[[Sequence[Scored]], Weights]


def _one_hot(n: int, i: int) -> Weights:
    w = [0.0] * n
    w[i] = 1.0
    return w


def _value(x: float) -> float:
    return -math.inf if x is None or math.isnan(x) else x


def _argmax(values: Sequence[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if _value(v) > _value(values[best]):
            best = i
    return best


def _need(cands: Sequence[Scored]) -> None:
    if not cands:
        raise ConfigError("cannot select from zero candidates")


def score_max(key: str) -> BenchSelectorFn:
    def select(cands: Sequence[Scored]) -> Weights:
        _need(cands)
        missing = [i for i, c in enumerate(cands) if key not in c.scores]
        if missing:
            raise ConfigError(f"candidates {missing} have no '{key}' score; the cache predates this score.")
        return _one_hot(len(cands), _argmax([c.scores[key] for c in cands]))
    select.__doc__ = f"Highest '{key}'."
    return select


def _vote(cands: Sequence[Scored], weight: Callable[[Scored], float],
          tie: Callable[[Scored], float] | None = None) -> Weights:
    _need(cands)
    totals: dict[int, float] = {}
    first: dict[int, int] = {}
    for i, c in enumerate(cands):
        if c.group < 0:
            continue
        totals[c.group] = totals.get(c.group, 0.0) + weight(c)
        first.setdefault(c.group, i)
    if not totals:
        return _one_hot(len(cands), 0)
    top = max(totals.values())
    tied = [g for g in totals if totals[g] == top]
    if tie is not None and len(tied) > 1:
        best_tie = {g: max(_value(tie(c)) for c in cands if c.group == g) for g in tied}
        hi = max(best_tie.values())
        tied = [g for g in tied if best_tie[g] == hi]
    group = min(tied, key=lambda g: first[g])
    return _one_hot(len(cands), first[group])


def majority(cands: Sequence[Scored]) -> Weights:
    """Self-consistency: the most frequent extracted answer."""
    return _vote(cands, lambda c: 1.0)


def majority_sr_tiebreak(cands: Sequence[Scored]) -> Weights:
    """Majority vote; tied answer classes are split by their highest SR (response)."""
    return _vote(cands, lambda c: 1.0, tie=lambda c: c.scores.get("sr_response", math.nan))


def sr_weighted_vote(cands: Sequence[Scored]) -> Weights:
    """Each answer class scores the sum of its members' SR (response); the winning class's
    highest-SR member is picked (its answer is the class's answer either way)."""
    def weight(c: Scored) -> float:
        sr = c.scores.get("sr_response", math.nan)
        return 0.0 if sr is None or math.isnan(sr) else sr

    w = _vote(cands, weight)
    chosen = w.index(1.0)
    group = cands[chosen].group
    if group < 0:
        return w
    members = [i for i, c in enumerate(cands) if c.group == group]
    best = members[_argmax([cands[i].scores.get("sr_response", math.nan) for i in members])]
    return _one_hot(len(cands), best)


def oracle(cands: Sequence[Scored]) -> Weights:
    """pass@n ceiling: a correct candidate whenever the subset has one."""
    _need(cands)
    return _one_hot(len(cands), next((i for i, c in enumerate(cands) if c.correct), 0))


def random_expected(cands: Sequence[Scored]) -> Weights:
    """random@n as an expected value: uniform weights."""
    _need(cands)
    return [1.0 / len(cands)] * len(cands)


def shortest(cands: Sequence[Scored]) -> Weights:
    """Fewest response tokens (a length baseline: SR correlates with length)."""
    _need(cands)
    return _one_hot(len(cands), _argmax([-float(c.num_tokens) for c in cands]))


@dataclass(frozen=True)
class BenchSelector:
    name: str
    fn: BenchSelectorFn
    description: str


GREEDY = "greedy"
RANDOM = "random"
ORACLE = "oracle"

BENCH_SELECTORS: dict[str, BenchSelector] = {s.name: s for s in [
    BenchSelector("majority", majority, "majority vote over extracted answers (self-consistency)"),
    BenchSelector("majority-sr-tiebreak", majority_sr_tiebreak, "majority vote, ties split by SR (response)"),
    BenchSelector("mean-logprob", score_max("mean_logprob"), "highest mean token log-prob"),
    BenchSelector(ORACLE, oracle, "pass@n: any candidate correct (ceiling)"),
    BenchSelector(RANDOM, random_expected, "random@n, expected value (mean correctness)"),
    BenchSelector("self-certainty", score_max("self_certainty"), "highest self-certainty (Kang et al. 2025)"),
    BenchSelector("shortest", shortest, "fewest response tokens"),
    BenchSelector("sr-full", score_max("sr_full"), "highest stable rank, prompt + response tokens"),
    BenchSelector("sr-response", score_max("sr_response"), "highest stable rank, response tokens (paper)"),
    BenchSelector("sr-weighted-vote", sr_weighted_vote, "majority vote weighted by SR (response)"),
]}


def get_bench_selector(name: str) -> BenchSelector:
    try:
        return BENCH_SELECTORS[name]
    except KeyError:
        available = ", ".join(sorted([*BENCH_SELECTORS, GREEDY]))
        raise ConfigError(f"Unknown selector '{name}'. Available: {available}") from None
