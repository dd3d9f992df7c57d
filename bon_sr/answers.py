"""Final answers pulled out of candidate texts, so that selectors can vote.

An answer extractor is chosen by name (the benchmark's checkers: ``numeric``, ``math``,
``choice``, ``exact``), by a regular expression (the last match's first group, or the whole
match when the pattern has no group), or given as a callable ``fn(text) -> str | None``.
Each comes with the rule that decides when two answers are the same, which voting needs:
the named checkers' own equivalence (math-verify for ``math``), whitespace-and-case
normalisation for a regex or a callable.

This module knows nothing about models, scores or which candidate wins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence, Union

from .errors import ConfigError

AnswerFn = Callable[[str], Union[str, None]]
#: what ``answer=`` accepts: a checker name, or a callable text -> answer
AnswerInput = Union[str, AnswerFn, None]


def _normalize(text: str) -> str:
    return " ".join(text.strip().strip(".").lower().split())


@dataclass(frozen=True)
class AnswerExtractor:
    """``extract(text)`` gives a candidate's answer (None: none found); ``group(answers)``
    numbers equal answers alike, in order of first appearance (-1 for None)."""

    name: str
    extract: AnswerFn
    _checker: object = None  # a bench Checker: its key/equal decide equality

    def group(self, answers: Sequence[str | None]) -> list[int]:
        from .bench.checkers import Checker, group_answers

        checker = self._checker
        if checker is None:
            checker = Checker(self.name, "", self.extract, _normalize, lambda a, b: _normalize(a) == _normalize(b),
                              key=_normalize)
        return group_answers(answers, checker)  # type: ignore[arg-type]


def regex_extractor(pattern: str) -> AnswerExtractor:
    """The last match of ``pattern`` (its first group when it has one)."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"--answer-regex {pattern!r} is not a valid regular expression: {exc}") from None

    def extract(text: str) -> str | None:
        matches = list(compiled.finditer(text))
        if not matches:
            return None
        found = matches[-1].group(1) if compiled.groups else matches[-1].group(0)
        return found.strip() if found is not None and found.strip() else None

    return AnswerExtractor(f"regex:{pattern}", extract)


def get_extractor(answer: AnswerInput = None, *, regex: str | None = None) -> AnswerExtractor | None:
    """The extractor for ``answer`` (a checker name or a callable) or ``regex``; None if neither."""
    if answer is not None and regex is not None:
        raise ConfigError("Give either an answer extractor name/callable or a regex, not both.")
    if regex is not None:
        return regex_extractor(regex)
    if answer is None:
        return None
    if callable(answer):
        return AnswerExtractor(getattr(answer, "__name__", "custom"), answer)
    from .bench.checkers import CHECKERS

    checker = CHECKERS.get(str(answer))
    if checker is None:
        raise ConfigError(f"Unknown answer extractor '{answer}'. Available: {', '.join(sorted(CHECKERS))}, "
                          "or a regex (--answer-regex / answer_regex=).")
    if checker.name == "math":
        from .bench.checkers import math_verify_module

        math_verify_module()  # a missing math-verify fails now, not after sampling
    return AnswerExtractor(checker.name, checker.extract, checker)
