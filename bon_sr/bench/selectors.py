"""Benchmark selectors over a subset of one problem's cached candidates.

Every selector is ``fn(candidates) -> weights``: one weight per candidate, summing to 1.
A selector that picks one candidate returns a one-hot vector; the random@n baseline
returns uniform weights, so its accuracy is the EXPECTED correctness of a random pick
(mean correctness over the candidates), not one noisy draw. The accuracy of a selector
on a subset is then ``sum(w_i * correct_i)`` and its selected length ``sum(w_i * len_i)``.

Every pick is made by the product's own selector (``bon_sr.selectors``, wrapped by
``picks``): the same function ``bon-sr generate`` runs, with its tie rule (the EARLIEST
candidate in the subset: subsets keep sampling order, so the same cache always gives the
same numbers, a random tie-break in expectation) and its NaN rule (NaN ranks last). The
cache's score keys are ``sr_response`` / ``sr_full`` where the product says
``stable_rank``. Candidates with no extractable answer (group -1) do not vote; if none
in the subset has an answer the first candidate is picked. Only the oracle and the
expected-value random@n are bench-only: they are not picks a user could make.

Greedy is not here: it is a separate decode, not a pick from the samples. Selectors know
nothing about models, sampling or answer checking beyond the cached ``group``/``correct``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from ..errors import ConfigError
from ..selectors import get_selector, select

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


def _need(cands: Sequence[Scored]) -> None:
    if not cands:
        raise ConfigError("cannot select from zero candidates")


def picks(selector: str, **options: Any) -> BenchSelectorFn:
    """The product selector ``selector`` (``bon_sr.selectors``) as one-hot weights: the
    same function the API and CLI run, on the cache's score keys, falling back to the first
    candidate when no candidate of the subset has an answer."""
    spec = get_selector(selector)

    def weights(cands: Sequence[Scored]) -> Weights:
        _need(cands)
        groups = [c.group for c in cands] if spec.needs_answers else None
        return _one_hot(len(cands), select(spec, cands, groups=groups, **options).index)

    weights.__doc__ = spec.description
    return weights


def oracle(cands: Sequence[Scored]) -> Weights:
    """pass@n ceiling: a correct candidate whenever the subset has one."""
    _need(cands)
    return _one_hot(len(cands), next((i for i, c in enumerate(cands) if c.correct), 0))


def random_expected(cands: Sequence[Scored]) -> Weights:
    """random@n as an expected value: uniform weights."""
    _need(cands)
    return [1.0 / len(cands)] * len(cands)


@dataclass(frozen=True)
class BenchSelector:
    name: str
    fn: BenchSelectorFn
    description: str


GREEDY = "greedy"
RANDOM = "random"
ORACLE = "oracle"

BENCH_SELECTORS: dict[str, BenchSelector] = {s.name: s for s in [
    BenchSelector("majority", picks("majority", fallback="first"),
                  "majority vote over extracted answers (self-consistency)"),
    BenchSelector("majority-sr-tiebreak", picks("majority-sr", sr_key="sr_response", fallback="first"),
                  "majority vote, ties split by SR (response)"),
    BenchSelector("mean-logprob", picks("mean-logprob"), "highest mean token log-prob"),
    BenchSelector(ORACLE, oracle, "pass@n: any candidate correct (ceiling)"),
    BenchSelector(RANDOM, random_expected, "random@n, expected value (mean correctness)"),
    BenchSelector("self-certainty", picks("self-certainty"), "highest self-certainty (Kang et al. 2025)"),
    BenchSelector("shortest", picks("shortest"), "fewest response tokens"),
    BenchSelector("sr-full", picks("stable-rank", sr_key="sr_full"), "highest stable rank, prompt + response tokens"),
    BenchSelector("sr-response", picks("stable-rank", sr_key="sr_response"),
                  "highest stable rank, response tokens (paper)"),
    BenchSelector("sr-weighted-vote", picks("sr-weighted-vote", sr_key="sr_response", fallback="first"),
                  "majority vote weighted by SR (response)"),
]}


def get_bench_selector(name: str) -> BenchSelector:
    try:
        return BENCH_SELECTORS[name]
    except KeyError:
        available = ", ".join(sorted([*BENCH_SELECTORS, GREEDY]))
        raise ConfigError(f"Unknown selector '{name}'. Available: {available}") from None
