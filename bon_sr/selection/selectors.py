"""Selectors: plain functions that pick one candidate, plus one registry.

Each selector is ``fn(candidates, *, seed=0, groups=None, **kwargs) -> int | Pick``.
``candidates`` need only ``.scores`` (a mapping) and ``.num_tokens``: product
``Candidate`` objects and the benchmark's cached records both qualify. ``groups`` holds
one answer-class id per candidate for the voting selectors (equal answers share an id,
-1 = no answer found; ``bon_sr.selection.answers`` makes them). A user's own callable with the same
signature may stand in for any of them (``select_best(..., selector=my_fn)``).

One rule for every selector: ties go to the LOWEST candidate index (the earliest sample),
and a NaN or missing-as-NaN score ranks below every number, so it never wins unless all
are NaN (then the first candidate). Voting: the answer class with the most votes (or the
largest score sum for ``sr-weighted-vote``); equal classes go to the one whose first
member comes earliest (``majority-sr``: to the higher best SR first). When no candidate
has an answer, a voting selector falls back to the rule named by ``fallback`` and says so
in the returned ``Pick``.

Consensus: ``mbr`` picks the candidate with the highest mean similarity to the others
(Minimum Bayes Risk); it takes the N x N ``similarity`` matrix that the caller computed
with a utility of ``bon_sr.selection.consensus`` (``bon_sr.selection.decide.decide`` does it in the product;
the benchmark passes sub-matrices for subsets). ``auto`` votes when an answer extractor ran
and at least half the candidates gave an answer, else runs ``mbr``.

Measured on this project's runs (docs/does-it-work.md): majority vote is the selector
that helps at 0.5B (GSM8K 35.0% vs 21.4% random at n=16; MATH-500 13.0% vs 8.1% at n=8);
the paper's ``stable-rank`` scored below random on both.

Selectors know nothing about models, sampling or how answers are extracted.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

from .consensus import mbr_utilities
from ..errors import ConfigError, OptionError


@dataclass(frozen=True)
class Pick:
    """A selector's decision: the index, and the rule that decided it. ``order``: every
    candidate index, best first, when the selector ranks them all (``mbr``: by utility);
    None: callers rank by picking again among the rest (``selection.ranked``)."""

    index: int
    rule: str
    order: tuple[int, ...] | None = None


SelectorFn = Callable[..., Union[int, Pick]]


def _value(x: Any) -> float:
    return -math.inf if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def argmax(values: Sequence[Any]) -> int:
    """Index of the largest value; NaN/None rank last; ties to the lowest index."""
    if not values:
        raise ConfigError("cannot select from zero candidates")
    best = 0
    for i, v in enumerate(values):
        if _value(v) > _value(values[best]):
            best = i
    return best


def ranking(values: Sequence[Any]) -> tuple[int, ...]:
    """Every index, largest value first; NaN/None last; ties to the lower index
    (``ranking(v)[0] == argmax(v)``)."""
    return tuple(sorted(range(len(values)), key=lambda i: (-_value(values[i]), i)))


def _need(candidates: Sequence[Any]) -> None:
    if not candidates:
        raise ConfigError("cannot select from zero candidates")


def _scores(candidates: Sequence[Any], key: str) -> list[float]:
    missing = [i for i, c in enumerate(candidates) if key not in c.scores]
    if missing:
        raise ConfigError(f"candidates {missing} have no '{key}' score; score them with a scorer that "
                          f"computes '{key}' before selecting (an old cache predates it).")
    return [c.scores[key] for c in candidates]


def score_max(key: str, name: str | None = None) -> SelectorFn:
    """A selector that picks the highest ``scores[key]``."""

    def select(candidates: Sequence[Any], **kwargs: Any) -> int:
        _need(candidates)
        return argmax(_scores(candidates, key))

    select.__name__ = (name or key).replace("-", "_")
    select.__doc__ = f"Highest '{key}'."
    return select


def stable_rank_max(candidates: Sequence[Any], *, sr_key: str = "stable_rank", **kwargs: Any) -> int:
    """Highest stable rank (the paper's Best-of-N rule)."""
    _need(candidates)
    return argmax(_scores(candidates, sr_key))


def random_pick(candidates: Sequence[Any], *, seed: int = 0, **kwargs: Any) -> int:
    """Uniform pick with the prompt's seed (the random@N baseline)."""
    _need(candidates)
    return random.Random(seed).randrange(len(candidates))


def first(candidates: Sequence[Any], **kwargs: Any) -> int:
    """The first sample: equivalent to sampling once."""
    _need(candidates)
    return 0


def shortest(candidates: Sequence[Any], **kwargs: Any) -> int:
    """Fewest response tokens."""
    _need(candidates)
    return argmax([-float(c.num_tokens) for c in candidates])


def longest(candidates: Sequence[Any], **kwargs: Any) -> int:
    """Most response tokens."""
    _need(candidates)
    return argmax([float(c.num_tokens) for c in candidates])


def _groups(candidates: Sequence[Any], groups: Sequence[int] | None) -> Sequence[int]:
    if groups is None:
        raise ConfigError("a voting selector needs each candidate's answer: pass an answer extractor "
                          "(--answer numeric|math|choice|exact, --answer-regex, or answer= in the API).")
    if len(groups) != len(candidates):
        raise ValueError("groups must have one entry per candidate")
    return groups


def _vote(groups: Sequence[int], weights: Sequence[float], tie: Sequence[Any] | None = None) -> int | None:
    """First member of the winning answer class (see the module docstring); None: no answers."""
    totals: dict[int, float] = {}
    first_of: dict[int, int] = {}
    for i, (g, w) in enumerate(zip(groups, weights)):
        if g < 0:
            continue
        totals[g] = totals.get(g, 0.0) + w
        first_of.setdefault(g, i)
    if not totals:
        return None
    top = max(totals.values())
    tied = [g for g in totals if totals[g] == top]
    if tie is not None and len(tied) > 1:
        best_tie = {g: max(_value(t) for t, cg in zip(tie, groups) if cg == g) for g in tied}
        hi = max(best_tie.values())
        tied = [g for g in tied if best_tie[g] == hi]
    return first_of[min(tied, key=lambda g: first_of[g])]


def _fallback(candidates: Sequence[Any], fallback: str, seed: int, **kwargs: Any) -> Pick:
    spec = get_selector(fallback)
    if spec.needs_answers:
        raise ConfigError(f"fallback '{fallback}' itself needs answers; use e.g. first or stable-rank.")
    index = _as_pick(spec.fn(candidates, seed=seed, **kwargs), fallback).index
    return Pick(index, f"fallback: {fallback} (no candidate had an answer)")


def _exec_vote(candidates: Sequence[Any], groups: Sequence[int], passed: Sequence[bool],
               tie: Sequence[Any] | None, examples: str) -> Pick | None:
    """Execution-checked vote (the ``python`` answer format): a greedy decode in the pool
    (``include_greedy``) that passes every example is kept; else the candidates that pass
    come first and the largest group of identical behaviour among them wins; when none
    passes, the largest behaviour group of all. None: no candidate ran (no behaviour)."""
    if len(passed) != len(groups):
        raise ValueError("passed must have one entry per candidate")
    greedy = [i for i, c in enumerate(candidates) if getattr(c, "greedy", False) and passed[i]]
    if greedy:
        return Pick(greedy[0], f"exec: the greedy decode passes {examples}")
    ok = sum(bool(p) for p in passed)
    voters = [g if p else -1 for g, p in zip(groups, passed)] if ok else list(groups)
    index = _vote(voters, [1.0] * len(groups), tie=tie)
    if index is None:
        return None
    size = sum(1 for g in voters if g == voters[index])
    n = len(groups)
    if ok:
        return Pick(index, f"exec: {ok}/{n} pass {examples}, the largest agreeing group {size}")
    return Pick(index, f"exec: none of {n} passes {examples}; the largest behaviour group {size}")


def majority(candidates: Sequence[Any], *, groups: Sequence[int] | None = None, seed: int = 0,
             fallback: str = "first", passed: Sequence[bool] | None = None, examples: str = "the examples",
             **kwargs: Any) -> Pick:
    """Self-consistency: the most frequent extracted answer (its first candidate). With
    ``passed`` (code run on the prompt's examples): the pass-first vote of ``_exec_vote``."""
    _need(candidates)
    if passed is not None:
        pick = _exec_vote(candidates, _groups(candidates, groups), passed, None, examples)
        return pick or _fallback(candidates, fallback, seed, **kwargs)
    index = _vote(_groups(candidates, groups), [1.0] * len(candidates))
    if index is None:
        return _fallback(candidates, fallback, seed, **kwargs)
    return Pick(index, "majority")


def majority_sr(candidates: Sequence[Any], *, groups: Sequence[int] | None = None, seed: int = 0,
                sr_key: str = "stable_rank", fallback: str = "stable-rank", passed: Sequence[bool] | None = None,
                examples: str = "the examples", **kwargs: Any) -> Pick:
    """Majority vote; answer classes with equal votes are split by their highest stable rank
    (with ``passed``: the pass-first vote, its ties split the same way)."""
    _need(candidates)
    if passed is not None:
        pick = _exec_vote(candidates, _groups(candidates, groups), passed, _scores(candidates, sr_key), examples)
        return pick or _fallback(candidates, fallback, seed, sr_key=sr_key, **kwargs)
    index = _vote(_groups(candidates, groups), [1.0] * len(candidates), tie=_scores(candidates, sr_key))
    if index is None:
        return _fallback(candidates, fallback, seed, sr_key=sr_key, **kwargs)
    return Pick(index, "majority, SR tie-break")


def sr_weighted_vote(candidates: Sequence[Any], *, groups: Sequence[int] | None = None, seed: int = 0,
                     sr_key: str = "stable_rank", fallback: str = "stable-rank", **kwargs: Any) -> Pick:
    """Each answer class scores the sum of its members' stable ranks (NaN counts 0); the
    winning class's highest-SR member is picked (its answer is the class's answer either way)."""
    _need(candidates)
    groups = _groups(candidates, groups)
    values = _scores(candidates, sr_key)
    index = _vote(groups, [max(_value(v), 0.0) for v in values])
    if index is None:
        return _fallback(candidates, fallback, seed, sr_key=sr_key, **kwargs)
    members = [i for i, g in enumerate(groups) if g == groups[index]]
    return Pick(members[argmax([values[i] for i in members])], "SR-weighted vote")


def mbr(candidates: Sequence[Any], *, similarity: Sequence[Sequence[float]] | None = None,
        utility: str = "", **kwargs: Any) -> Pick:
    """Minimum Bayes Risk: the candidate with the highest mean ``similarity`` to the other
    candidates (``similarity[i][j]``: candidate i against j, N x N; ``bon_sr.selection.consensus``).
    ``Pick.order`` ranks every candidate by that utility. ``utility`` only names the
    similarity in the rule (e.g. "mbr lexical")."""
    _need(candidates)
    if similarity is None:
        raise ConfigError("selector 'mbr' needs the candidates' pairwise similarity: pass similarity= (an N x N "
                          "matrix from bon_sr.selection.consensus.similarity) or select through BestOfN with utility=.")
    if len(similarity) != len(candidates):
        raise ConfigError(f"the similarity matrix has {len(similarity)} rows for {len(candidates)} candidates.")
    order = ranking(mbr_utilities(similarity))
    return Pick(order[0], f"mbr {utility}".rstrip(), order)


def auto(candidates: Sequence[Any], *, groups: Sequence[int] | None = None,
         similarity: Sequence[Sequence[float]] | None = None, utility: str = "",
         passed: Sequence[bool] | None = None, examples: str = "the examples", **kwargs: Any) -> Pick:
    """Majority vote when answers were extracted and at least half the candidates gave
    one; otherwise ``mbr``. With ``passed`` (code run on the prompt's examples): the
    pass-first vote. The rule says which decided and why."""
    _need(candidates)
    n = len(candidates)
    if passed is not None and groups is not None:
        pick = _exec_vote(candidates, _groups(candidates, groups), passed, None, examples)
        if pick is not None:
            return Pick(pick.index, f"auto: {pick.rule}")
    if groups is None:
        why = "no answer extractor"
    else:
        answered = sum(1 for g in _groups(candidates, groups) if g >= 0)
        index = _vote(groups, [1.0] * n) if 2 * answered >= n else None
        if index is not None:
            return Pick(index, f"auto: majority ({answered}/{n} candidates gave an answer)")
        why = f"only {answered}/{n} candidates gave an answer"
    pick = mbr(candidates, similarity=similarity, utility=utility)
    return Pick(pick.index, f"auto: {pick.rule} ({why})", pick.order)


#: the default selector of every interface (API, CLI, server, bench's product path): chosen by
#: the rule in docs/code-selection.md ("The default selector"), checked by tests/test_defaults.py
DEFAULT_SELECTOR = "auto"


@dataclass(frozen=True)
class SelectorSpec:
    """A selector with what it needs: score keys (None = unknown: score everything the
    scorer gives), whether it needs extracted answers, and whether it needs the
    candidates' pairwise ``similarity`` (the consensus selectors)."""

    name: str
    fn: SelectorFn
    description: str
    needs_scores: frozenset[str] | None = frozenset()
    needs_answers: bool = False
    needs_similarity: bool = False

    @property
    def uses_answers(self) -> bool:
        """Whether answers change the pick (a voting selector, or ``auto``): only then does
        an answer format that runs code (``python``) run it."""
        return self.needs_answers or self.name == "auto"


SELECTORS: dict[str, SelectorSpec] = {s.name: s for s in [
    SelectorSpec("auto", auto, "majority vote when an answer extractor is given and at least half the candidates "
                 "gave an answer, else mbr", needs_similarity=True),
    SelectorSpec("first", first, "the first sample (= sampling once)"),
    SelectorSpec("longest", longest, "most response tokens"),
    SelectorSpec("majority", majority, "majority vote over extracted answers (self-consistency); "
                 "no answers: first candidate", needs_answers=True),
    SelectorSpec("majority-sr", majority_sr, "majority vote, ties split by stable rank; no answers: "
                 "highest stable rank", frozenset({"stable_rank"}), True),
    SelectorSpec("mbr", mbr, "consensus (Minimum Bayes Risk): highest mean similarity to the other candidates "
                 "under the chosen utility", needs_similarity=True),
    SelectorSpec("mean-logprob", score_max("mean_logprob", "mean-logprob"),
                 "highest mean token log-prob under the frozen model", frozenset({"mean_logprob"})),
    SelectorSpec("random", random_pick, "uniform pick with the prompt's seed"),
    SelectorSpec("self-certainty", score_max("self_certainty", "self-certainty"),
                 "highest self-certainty, mean KL(uniform || p) (Kang et al. 2025)",
                 frozenset({"self_certainty"})),
    SelectorSpec("shortest", shortest, "fewest response tokens"),
    SelectorSpec("sr-weighted-vote", sr_weighted_vote, "answer classes weighted by summed stable rank; "
                 "no answers: highest stable rank", frozenset({"stable_rank"}), True),
    SelectorSpec("stable-rank", stable_rank_max, "highest stable rank (the paper)", frozenset({"stable_rank"})),
]}

def get_selector(selector: str | SelectorFn | SelectorSpec) -> SelectorSpec:
    """The registry entry for a name, or a spec for a user's callable. A callable may set
    ``needs_scores`` (an iterable of score keys), ``needs_answers`` and ``needs_similarity``
    attributes."""
    if isinstance(selector, SelectorSpec):
        return selector
    if callable(selector):
        needs = getattr(selector, "needs_scores", None)
        return SelectorSpec(getattr(selector, "__name__", "custom"), selector, "user selector",
                            None if needs is None else frozenset(needs), bool(getattr(selector, "needs_answers", False)),
                            bool(getattr(selector, "needs_similarity", False)))
    try:
        return SELECTORS[selector]
    except KeyError:
        raise OptionError("selector", f"Unknown selector '{selector}'. Available: {', '.join(sorted(SELECTORS))}") \
            from None


def _as_pick(result: int | Pick, name: str) -> Pick:
    if isinstance(result, Pick):
        return result
    if isinstance(result, bool) or not isinstance(result, int):
        raise ConfigError(f"selector '{name}' returned {result!r}; a selector returns a candidate index (int).")
    return Pick(int(result), name)


def select(spec: SelectorSpec, candidates: Sequence[Any], *, seed: int = 0, groups: Sequence[int] | None = None,
           **kwargs: Any) -> Pick:
    """Run one selector and check its answer; an int result becomes ``Pick(index, name)``."""
    pick = _as_pick(spec.fn(candidates, seed=seed, groups=groups, **kwargs), spec.name)
    if not 0 <= pick.index < len(candidates):
        raise ConfigError(f"selector '{spec.name}' returned index {pick.index} for {len(candidates)} candidates.")
    return pick
