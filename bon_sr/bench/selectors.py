"""Benchmark selectors over a subset of one problem's cached candidates.

Every selector is ``fn(candidates) -> weights``: one weight per candidate, summing to 1.
A selector that picks one candidate returns a one-hot vector; the random@n baseline
returns uniform weights, so its accuracy is the EXPECTED correctness of a random pick
(mean correctness over the candidates), not one noisy draw. The accuracy of a selector
on a subset is then ``sum(w_i * correct_i)`` and its selected length ``sum(w_i * len_i)``.

Every pick is made by the product's own selector (``bon_sr.selection.selectors``, wrapped by
``picks``): the same function ``bon-sr generate`` runs, with its tie rule (the EARLIEST
candidate in the subset: subsets keep sampling order, so the same cache always gives the
same numbers, a random tie-break in expectation) and its NaN rule (NaN ranks last). The
cache's score keys are ``sr_response`` / ``sr_full`` where the product says
``stable_rank``. Candidates with no extractable answer (group -1) do not vote; if none
in the subset has an answer the first candidate is picked. Only the oracle and the
expected-value random@n are bench-only: they are not picks a user could make.

Consensus selectors (``mbr-*``, ``auto`` and the mixes) read the similarities among the
subset's candidates from ``Scored.similarities`` (``bench.consensus``: chrF from the texts,
cosines from the cached Gram matrices), so MBR at n compares only the n candidates it is
given, as the product does. A hidden-state column on a problem the embedding pass skipped
(all candidates equally right) counts a uniform pick: the same accuracy as any pick.

Exec selectors (``exec*``: code tasks whose prompts show examples) read each candidate's
``behaviour`` group and ``passed`` from its run on the prompt's examples (``bench.execution``,
the product's ``python`` answer format) and make the product's pass-first vote (``majority``
given ``passed``; the ``exec-*`` tie variants ``majority-sr`` with another score in place of
SR). ``exec+greedy`` has the greedy decode in its pool (``greedy_in_pool``: the evaluation
hands it the subset plus the greedy decode, last): the greedy decode when it passes the
examples, else the same vote over all (the product's rule, ``selection.selectors``, reads ``greedy``).

Greedy alone is not here: it is a separate decode, not a pick from the samples. Selectors know
nothing about models, sampling or answer checking beyond the cached ``group``/``correct``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from ..selection.consensus import UTILITIES, UTILITY_KEY, mbr_utilities
from ..errors import ConfigError
from ..selection.selectors import get_selector, select

if TYPE_CHECKING:
    from .consensus import Similarities

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
    index: int = 0  # position among the problem's cached candidates
    similarities: "Similarities | None" = field(default=None, compare=False, repr=False)
    #: its run on the prompt's examples (``bench.execution``): behaviour group (-1: none) and
    #: whether it passed them all (None: not run, or the prompt shows no examples)
    behaviour: int = -1
    passed: bool | None = None
    #: the greedy decode added to the pool (``greedy_in_pool``): the product's rule keeps it when it passes
    greedy: bool = False


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
    """The product selector ``selector`` (``bon_sr.selection.selectors``) as one-hot weights: the
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


def _matrix(cands: Sequence[Scored], utility: str) -> list[list[float]] | None:
    """The subset's ``utility`` similarities; None where the embedding pass did not run and
    no pick can matter (every candidate equally right)."""
    sims = cands[0].similarities
    if sims is not None and sims.available(utility):
        return sims.matrix(utility, [c.index for c in cands])
    if len({c.correct for c in cands}) > 1:
        raise ConfigError(f"A problem with mixed correctness has no '{utility}' similarities: run the embedding "
                          "pass (bon-sr bench --no-generate --embeddings) or leave the hidden-state selectors out.")
    return None


def consensus(selector: str, utility: str, **options: Any) -> BenchSelectorFn:
    """The product selector ``selector`` (``mbr``, ``auto``) given the subset's similarity
    matrix under ``utility`` and, for ``auto``, the candidates' answer groups."""

    def weights(cands: Sequence[Scored]) -> Weights:
        _need(cands)
        matrix = _matrix(cands, utility)
        if matrix is None:
            return random_expected(cands)
        pick = select(get_selector(selector), cands, groups=[c.group for c in cands], similarity=matrix, **options)
        return _one_hot(len(cands), pick.index)

    weights.__doc__ = f"{selector} with the {utility} utility"
    return weights


def with_utility(cands: Sequence[Scored], utility: str) -> list[Scored] | None:
    """The subset with each candidate's MBR utility (mean similarity to the others in the
    subset) under ``scores[UTILITY_KEY]``; None as for ``_matrix``."""
    matrix = _matrix(cands, utility)
    if matrix is None:
        return None
    return [replace(c, scores={**c.scores, UTILITY_KEY: u}) for c, u in zip(cands, mbr_utilities(matrix))]


def majority_mbr(utility: str) -> BenchSelectorFn:
    """Majority vote; answer classes with equal votes split by their best MBR utility (the
    product's ``majority-sr`` rule with the utility in place of SR); no answers: MBR."""
    vote = picks("majority-sr", sr_key=UTILITY_KEY, fallback="stable-rank")

    def weights(cands: Sequence[Scored]) -> Weights:
        _need(cands)
        scored = with_utility(cands, utility)
        return random_expected(cands) if scored is None else vote(scored)

    return weights


def borda_ranks(values: Sequence[float]) -> list[float]:
    """Rank of each value, 1 = highest; NaN ranks last; ties share their mean rank (the
    Borda ranks ``mbr_mix`` adds)."""
    keyed = [-math.inf if v is None or math.isnan(v) else float(v) for v in values]
    order = sorted(range(len(keyed)), key=lambda i: -keyed[i])
    ranks = [0.0] * len(keyed)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and keyed[order[end + 1]] == keyed[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def mbr_mix(utility: str, key: str) -> BenchSelectorFn:
    """Borda count of the MBR utility and ``scores[key]``: the lowest rank sum wins; ties go
    to the higher utility, then the earliest candidate."""

    def weights(cands: Sequence[Scored]) -> Weights:
        _need(cands)
        scored = with_utility(cands, utility)
        if scored is None:
            return random_expected(cands)
        util = [c.scores[UTILITY_KEY] for c in scored]
        total = [a + b for a, b in zip(borda_ranks(util), borda_ranks([c.scores.get(key, math.nan) for c in cands]))]
        u_rank = borda_ranks(util)
        best = min(range(len(cands)), key=lambda i: (total[i], u_rank[i], i))
        return _one_hot(len(cands), best)

    return weights


EXAMPLES = "the prompt's examples"


def executed(selector: str = "majority", utility: str | None = None, **options: Any) -> BenchSelectorFn:
    """The product selector ``selector`` given each candidate's behaviour group and pass result
    (the pass-first vote); ``utility``: each candidate's MBR utility among the subset under
    ``scores[UTILITY_KEY]`` first (for ``sr_key=UTILITY_KEY``)."""
    spec = get_selector(selector)

    def weights(cands: Sequence[Scored]) -> Weights:
        _need(cands)
        view = list(cands)
        if utility is not None:
            view = with_utility(cands, utility) or view
        passed = [c.passed for c in view]
        pick = select(spec, view, groups=[c.behaviour for c in view],
                      passed=None if None in passed else passed, examples=EXAMPLES, **options)
        return _one_hot(len(cands), pick.index)

    weights.__doc__ = f"{selector}, pass-first over the candidates' runs on the prompt's examples"
    return weights


@dataclass(frozen=True)
class BenchSelector:
    name: str
    fn: BenchSelectorFn
    description: str
    #: the similarity a consensus selector reads (``bon_sr.selection.consensus.UTILITIES``)
    utility: str | None = None
    #: reads the candidates' runs on the prompt's examples (``bench.execution``)
    executes: bool = False
    #: gets the greedy decode too, after the subset
    greedy_in_pool: bool = False


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
    *[BenchSelector(f"mbr-{u}", consensus("mbr", u), f"MBR: highest mean {u} similarity to the others", u)
      for u in UTILITIES],
    BenchSelector("mbr-ngram", consensus("mbr", "ngram"),
                  "MBR: highest mean token n-gram F1 (n = 1..4) to the others (bench-only utility)", "ngram"),
    BenchSelector("auto", consensus("auto", "lexical"),
                  "majority vote when at least half the candidates have an answer, else MBR (lexical)", "lexical"),
    BenchSelector("majority-mbr-tiebreak", majority_mbr("lexical"),
                  "majority vote, ties split by MBR utility (lexical)", "lexical"),
    BenchSelector("mbr-sr", mbr_mix("lexical", "sr_response"),
                  "Borda count of MBR utility (lexical) and SR (response)", "lexical"),
    BenchSelector("mbr-logprob", mbr_mix("lexical", "mean_logprob"),
                  "Borda count of MBR utility (lexical) and mean log-prob", "lexical"),
    BenchSelector("exec", executed("majority", fallback="first"),
                  "code run on the prompt's examples: the passing candidates' largest behaviour group "
                  "(majority with --answer python); ties to the earliest", executes=True),
    BenchSelector("exec+greedy", executed("majority", fallback="first"),
                  "exec with the greedy decode in the pool (the product's default with --answer python): "
                  "the greedy decode when it passes the prompt's examples, else the pass-first vote over all",
                  executes=True, greedy_in_pool=True),
    BenchSelector("exec-sr", executed("majority-sr", sr_key="sr_response", fallback="first"),
                  "exec, equal groups split by SR (response) (majority-sr with --answer python)", executes=True),
    BenchSelector("exec-logprob", executed("majority-sr", sr_key="mean_logprob", fallback="first"),
                  "exec, equal groups split by mean log-prob", executes=True),
    BenchSelector("exec-mbr", executed("majority-sr", "lexical", sr_key=UTILITY_KEY, fallback="first"),
                  "exec, equal groups split by MBR utility (lexical)", "lexical", executes=True),
]}


def needs_embeddings(name: str) -> bool:
    """Whether the bench selector ``name`` reads hidden-state similarities."""
    sel = BENCH_SELECTORS.get(name)
    return bool(sel and sel.utility in UTILITIES and UTILITIES[sel.utility].needs_embeddings)


def get_bench_selector(name: str) -> BenchSelector:
    try:
        return BENCH_SELECTORS[name]
    except KeyError:
        available = ", ".join(sorted([*BENCH_SELECTORS, GREEDY]))
        raise ConfigError(f"Unknown selector '{name}'. Available: {available}") from None
