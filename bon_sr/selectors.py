"""Selectors: plain functions that pick one candidate, plus one registry.

Each selector is ``fn(candidates, *, seed=0, **kwargs) -> index``. Ties are broken
deterministically toward the LOWEST candidate index (the earliest sample), so the same
scores always give the same pick. Selectors know nothing about models or sampling.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Sequence

from .errors import ConfigError
from .types import Candidate

SelectorFn = Callable[..., int]


def _argmax(values: Sequence[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def _need(candidates: Sequence[Candidate]) -> None:
    if not candidates:
        raise ConfigError("cannot select from zero candidates")


def stable_rank_max(candidates: Sequence[Candidate], **kwargs: Any) -> int:
    """Highest ``stable_rank`` score (the paper's Best-of-N rule)."""
    _need(candidates)
    missing = [c.index for c in candidates if "stable_rank" not in c.scores]
    if missing:
        raise ConfigError(f"candidates {missing} have no 'stable_rank' score; score them before selecting")
    return _argmax([c.scores["stable_rank"] for c in candidates])


def random_pick(candidates: Sequence[Candidate], *, seed: int = 0, **kwargs: Any) -> int:
    """Uniform pick with the prompt's seed (the random@N baseline)."""
    _need(candidates)
    return random.Random(seed).randrange(len(candidates))


def first(candidates: Sequence[Candidate], **kwargs: Any) -> int:
    """The first sample: equivalent to sampling once."""
    _need(candidates)
    return 0


def shortest(candidates: Sequence[Candidate], **kwargs: Any) -> int:
    """Fewest response tokens."""
    _need(candidates)
    return _argmax([-c.num_tokens for c in candidates])


def longest(candidates: Sequence[Candidate], **kwargs: Any) -> int:
    """Most response tokens."""
    _need(candidates)
    return _argmax([c.num_tokens for c in candidates])


SELECTORS: dict[str, SelectorFn] = {
    "first": first,
    "longest": longest,
    "random": random_pick,
    "shortest": shortest,
    "stable-rank": stable_rank_max,
}

#: Selectors whose decision needs hidden-state scores (others can skip the scoring pass).
NEEDS_SCORES = frozenset({"stable-rank"})


def get_selector(name: str) -> SelectorFn:
    try:
        return SELECTORS[name]
    except KeyError:
        raise ConfigError(f"Unknown selector '{name}'. Available: {', '.join(sorted(SELECTORS))}") from None
