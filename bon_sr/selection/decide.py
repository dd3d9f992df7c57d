"""One prompt's decision: answers and vote shares, then the selector's pick.

``decide`` is what ``BestOfN`` (and the OpenAI server) run on a prompt's scored candidates:
it extracts each candidate's answer when an extractor is given, groups equal answers,
records each candidate's vote share and the vote count per answer, computes the pairwise
similarity under the chosen utility for the consensus selectors (each candidate's MBR
utility goes into ``scores["mbr_utility"]``), and runs the selector.
This module knows nothing about models, sampling or scoring.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from .answers import AnswerExtractor
from .execution import PromptContext
from .consensus import UTILITY_KEY, Utility, get_utility, mbr_utilities, similarity
from .selectors import Pick, SelectorSpec, select
from ..types import Candidate


@dataclass(frozen=True)
class Decision:
    """The candidates (with ``answer``/``vote_share`` set when answers were extracted), the
    pick, and ``votes`` (answer -> number of candidates; None without an extractor)."""

    candidates: tuple[Candidate, ...]
    pick: Pick
    votes: Mapping[str, int] | None


def decide(candidates: Sequence[Candidate], selector: SelectorSpec, answers: AnswerExtractor | None = None, *,
           seed: int = 0, utility: Utility | None = None, context: PromptContext | None = None) -> Decision:
    """``utility``: the similarity the consensus selectors use (default: lexical).
    ``context``: the prompt's text and explicit tests, for answer formats that read them
    (``python``). A format that runs code runs only for a selector that uses answers, once."""
    return _decide(candidates, selector, answers, seed=seed, utility=utility, context=context)[0]


def _decide(candidates: Sequence[Candidate], selector: SelectorSpec, answers: AnswerExtractor | None, *,
            seed: int, utility: Utility | None,
            context: PromptContext | None) -> tuple[Decision, list[int] | None, dict[str, Any]]:
    """The decision, the answer classes (None without an extractor) and the selector's
    extra arguments (the similarity matrix, the pass results): what ``ranked`` reuses for
    the later choices."""
    classes = None
    votes = None
    cands = list(candidates)
    extra: dict[str, Any] = {}
    if answers is not None and (selector.uses_answers or not answers.runs_code):
        got = answers.read([c.text for c in cands], context)
        found = got.answers
        labels = got.labels or found
        if len(found) != len(cands):
            raise ValueError(f"answer format '{answers.name}' gave {len(found)} answers for {len(cands)} candidates")
        classes = answers.group(found)
        size: dict[int, int] = {}
        label: dict[int, str] = {}
        for lab, g in zip(labels, classes):
            if g >= 0:
                size[g] = size.get(g, 0) + 1
                label.setdefault(g, str(lab))
        answered = sum(size.values())
        cands = [replace(c, answer=a, vote_share=(size[g] / answered if g >= 0 else 0.0) if answered else None)
                 for c, a, g in zip(cands, labels, classes)]
        votes = {label[g]: size[g] for g in sorted(size, key=lambda g: (-size[g], g))}
        if got.passed is not None:
            cands = [replace(c, passed=p, checks=tuple(ch)) for c, p, ch in zip(cands, got.passed, got.checks or [])]
            extra.update(passed=got.passed, examples=got.note)
    if selector.needs_similarity:
        util = utility or get_utility()
        matrix = similarity(cands, util)
        cands = [c.with_scores(**{UTILITY_KEY: u}) for c, u in zip(cands, mbr_utilities(matrix))]
        extra.update(similarity=matrix, utility=util.name)
    pick = select(selector, cands, seed=seed, groups=classes, **extra)
    return Decision(tuple(cands), pick, votes), classes, extra


def ranked(candidates: Sequence[Candidate], selector: SelectorSpec, answers: AnswerExtractor | None = None, *,
           seed: int = 0, k: int = 1, utility: Utility | None = None,
           context: PromptContext | None = None) -> tuple[Decision, list[int]]:
    """The decision over all candidates, and the first ``k`` candidate indices in the
    selector's order: the selector's full ranking when it gives one (``mbr``: by utility
    over the whole group), else its pick, then its pick among the rest, and so on (works
    for every selector, voting and user callables included; OpenAI's ``n`` choices).

    Answers, their classes, the pass results and the similarity matrix are computed ONCE,
    by the decision: each later pick runs only the selector, over the remaining candidates
    with their classes, pass results and the matching rows and columns of the matrix
    (answer extraction, code runs, math-verify and an N x N utility never run k times)."""
    first, classes, extra = _decide(candidates, selector, answers, seed=seed, utility=utility, context=context)
    if first.pick.order is not None:
        return first, [first.candidates[i].index for i in first.pick.order[:k]]
    order = [first.pick.index]
    rest = [i for i in range(len(first.candidates)) if i != first.pick.index]
    while len(order) < min(k, len(first.candidates)):
        sub = dict(extra)
        if "similarity" in extra:
            sub["similarity"] = [[extra["similarity"][i][j] for j in rest] for i in rest]
        if "passed" in extra:
            sub["passed"] = [extra["passed"][i] for i in rest]
        pick = select(selector, [first.candidates[i] for i in rest], seed=seed,
                      groups=None if classes is None else [classes[i] for i in rest], **sub)
        order.append(rest.pop(pick.index))
    return first, [first.candidates[i].index for i in order]
