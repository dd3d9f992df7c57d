"""The bench's exec columns: each cached problem's candidates run on the examples its prompt
shows, once, with the product's ``python`` answer format.

For a record, the sampled candidates' texts and the greedy decode's go through
``get_extractor("python").read`` with the record's prompt as the context (the examples the
prompt SHOWS, never the task's hidden tests: ``bon_sr.selection.execution``), which runs the
programs in one ``bon_sr.sandbox`` batch; its answers are grouped as the product groups them
(identical behaviour). Each candidate's behaviour group and pass result go onto its
``bench.selectors.Scored``, where the exec selectors read them, for every n and every subset
(``ExecRuns`` keeps each problem's runs in memory: one batch per problem per report).

The step's cost is kept apart from the accuracy: the wall time of each problem's batch and the
programs that hit the time limit (a timeout is a failing candidate for selection).

Knows nothing about models, sampling or grading (the task's own checker grades).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from ..selection.answers import get_extractor
from ..selection.execution import PYTHON, PromptContext, find_examples
from .selectors import BENCH_SELECTORS, Scored


@dataclass(frozen=True)
class ProblemRuns:
    """One problem's candidates run on its prompt's examples: per sampled candidate its
    behaviour group (-1: no examples) and whether it passed them all (None: no examples),
    then the same for the greedy decode."""

    groups: tuple[int, ...]
    passed: tuple[bool, ...] | None
    greedy_group: int
    greedy_passed: bool | None
    examples: int
    wall_s: float
    timeouts: int


def needs_execution(name: str) -> bool:
    """Whether the bench selector ``name`` reads the candidates' runs."""
    sel = BENCH_SELECTORS.get(name)
    return bool(sel and sel.executes)


def shows_examples(rec: Mapping[str, Any]) -> bool:
    """Whether a cached problem's prompt shows examples the ``python`` format would run."""
    return bool(find_examples(PromptContext.of(rec["prompt"]))[0])


def _timed_out(checks: Sequence[Mapping[str, Any]]) -> bool:
    return any(c.get("error_type") == "Timeout" for c in checks)


class ExecRuns:
    """Each problem's runs, made on first use and kept in memory (keyed by problem id)."""

    def __init__(self) -> None:
        self._runs: dict[str, ProblemRuns] = {}
        self._fmt = get_extractor(PYTHON)  # a machine without the sandbox fails here, naming what it lacks

    def get(self, rec: Mapping[str, Any]) -> ProblemRuns:
        key = str(rec["id"])
        if key not in self._runs:
            self._runs[key] = self._run(rec)
        return self._runs[key]

    def _run(self, rec: Mapping[str, Any]) -> ProblemRuns:
        texts = [c["text"] for c in rec["candidates"]] + [rec["greedy"]["text"]]
        started = time.perf_counter()
        got = self._fmt.read(texts, PromptContext.of(rec["prompt"]))
        wall = time.perf_counter() - started
        groups = self._fmt.group(got.answers)
        passed = got.passed
        timeouts = sum(_timed_out(ch) for ch in got.checks or [])
        return ProblemRuns(tuple(groups[:-1]), tuple(passed[:-1]) if passed is not None else None, groups[-1],
                           passed[-1] if passed is not None else None, got.examples,
                           wall if got.examples else 0.0, timeouts)

    def attach(self, rec: Mapping[str, Any], cands: Sequence[Scored],
               greedy: Scored | None = None) -> tuple[list[Scored], Scored | None]:
        """The problem's candidates and greedy decode with their behaviour groups and passes."""
        runs = self.get(rec)
        passed = runs.passed or [None] * len(cands)
        out = [replace(c, behaviour=g, passed=p) for c, g, p in zip(cands, runs.groups, passed)]
        if greedy is not None:
            greedy = replace(greedy, behaviour=runs.greedy_group, passed=runs.greedy_passed)
        return out, greedy

    def summary(self, ids: Sequence[str]) -> dict[str, Any]:
        """The step's cost and what it found, over the problems ``ids``."""
        runs = [self._runs[str(i)] for i in ids if str(i) in self._runs]
        shown = [r for r in runs if r.examples]
        walls = sorted(r.wall_s for r in shown)
        return {
            "problems": len(runs), "with_examples": len(shown),
            "programs_per_problem": (len(shown[0].groups) + 1) if shown else 0,
            "wall_s_median": statistics.median(walls) if walls else None,
            "wall_s_p90": walls[min(len(walls) - 1, int(0.9 * len(walls)))] if walls else None,
            "wall_s_total": sum(walls),
            "timeouts": sum(r.timeouts for r in shown),
            "problems_with_timeouts": sum(1 for r in shown if r.timeouts),
            "any_sample_passes": sum(1 for r in shown if any(r.passed or ())),
            "any_passes_with_greedy": sum(1 for r in shown if any(r.passed or ()) or r.greedy_passed),
            "greedy_passes": sum(1 for r in shown if r.greedy_passed),
            "note": ("exec: each problem's sampled candidates and its greedy decode run once, in one sandbox batch, "
                     "on the examples its prompt shows (the product's python answer format); wall time per problem's "
                     "batch; a timeout counts as a failing candidate"),
        }


def exec_plan(records: Sequence[Mapping[str, Any]], selectors: Sequence[str]) -> tuple[list[str], ExecRuns | None]:
    """The selectors to evaluate and the runs they need: the exec columns only where some
    prompt shows examples (a math or QA report has none), else they are left out."""
    wanted = [s for s in selectors if needs_execution(s)]
    if not wanted:
        return list(selectors), None
    if not any(shows_examples(r) for r in records):
        return [s for s in selectors if not needs_execution(s)], None
    return list(selectors), ExecRuns()
