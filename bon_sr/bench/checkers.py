"""Answer checkers: the product's answer formats (``bon_sr.selection.answers``) plus the gold rule.

A checker is plain functions: ``extract(response) -> answer | None``, ``gold(reference) ->
answer`` (normalises the task's reference) and ``equal(a, b) -> bool``; checkers whose
answers have a canonical form also give ``key(answer)`` so that majority vote can group
answers without pairwise comparisons. A checker that grades a problem's responses together
(one that runs code: one sandbox batch per problem, never in this process) gives
``grade_many(responses, gold) -> (answers, correct)``; ``grade`` is the one entry point. Extraction and equivalence are the product's
(``bon_sr.selection.answers``, which ``--answer`` uses too); only the gold rules live here.

A task file may grade with a checker of its own: ``register_checker(Checker(...))`` before
its problems name it. Checkers know nothing about models, sampling or selection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from ..selection.answers import ANSWER_FORMATS, canonical_number, group_answers, last_boxed, normalize_text, parse_number
from ..errors import ConfigError

__all__ = ["CHECKERS", "Checker", "GradingUnavailable", "get_checker", "gold_letter", "gold_math", "gold_number",
           "register_checker"]


class GradingUnavailable(ConfigError):
    """A checker cannot grade on this machine (e.g. running code needs a sandbox): the bench
    caches the samples ungraded and refuses to report on them until ``--recheck`` grades them."""


def gold_number(reference: str) -> str:
    """A GSM8K reference (the number after "####", or the text itself) in canonical form."""
    text = reference.rsplit("####", 1)[1] if "####" in reference else reference
    value = parse_number(text)
    if value is None:
        raise ConfigError(f"Reference answer {reference!r} is not a number; use the 'exact' or 'math' checker.")
    return canonical_number(value)


def gold_math(reference: str) -> str:
    """A MATH reference: the last ``\\boxed{}`` of a solution, or the answer itself."""
    boxed = last_boxed(reference)
    return boxed if boxed is not None else reference.strip().strip("$")


def gold_letter(reference: str) -> str:
    """An option letter A-J, from a letter or a 0-based index."""
    ref = reference.strip().strip("()").upper()
    if len(ref) == 1 and "A" <= ref <= "J":
        return ref
    if ref.isdigit():
        return "ABCDEFGHIJ"[int(ref)]
    raise ConfigError(f"Reference answer {reference!r} is not an option letter (A-J) or index.")


@dataclass(frozen=True)
class Checker:
    name: str
    description: str
    extract: Callable[[str], "str | None"]
    gold: Callable[[str], str]
    equal: Callable[[str, str], bool]
    key: "Callable[[str], str] | None" = None
    #: one problem's responses graded together: (answers, correct) from the texts and the gold
    grade_many: Optional[Callable[[Sequence[str], str], "tuple[list[str | None], list[bool]]"]] = None

    def is_correct(self, answer: str | None, gold: str) -> bool:
        return answer is not None and self.equal(gold, answer)

    def grade(self, responses: Sequence[str], gold: str) -> tuple[list[str | None], list[bool]]:
        """Every response's answer and whether it is right, for one problem (``grade_many`` when
        the checker has one, else ``extract`` and ``is_correct`` per response). Raises
        ``GradingUnavailable`` when it cannot grade on this machine."""
        if self.grade_many is not None:
            answers, correct = self.grade_many(responses, gold)
            if len(answers) != len(responses) or len(correct) != len(responses):
                raise ValueError(f"checker '{self.name}' graded {len(correct)} of {len(responses)} responses")
            return list(answers), [bool(c) for c in correct]
        answers = [self.extract(r) for r in responses]
        return answers, [self.is_correct(a, gold) for a in answers]

    def group(self, answers: Sequence[str | None]) -> list[int]:
        return group_answers(answers, self)


_GOLD = {"choice": gold_letter, "exact": normalize_text, "math": gold_math, "numeric": gold_number}

CHECKERS: dict[str, Checker] = {
    name: Checker(fmt.name, fmt.description, fmt.extract, _GOLD[name], fmt.equal, key=fmt.key)
    for name, fmt in sorted(ANSWER_FORMATS.items()) if name in _GOLD  # code is graded by its task's tests
}


def register_checker(checker: Checker) -> Checker:
    """Make ``checker`` available by its name (to a task file's problems and to ``--checker``);
    registering the same name again replaces it. Returns the checker."""
    if not isinstance(checker, Checker) or not checker.name:
        raise ConfigError("register_checker takes a bon_sr.bench.checkers.Checker with a name.")
    CHECKERS[checker.name] = checker
    return checker


def get_checker(name: str) -> Checker:
    try:
        return CHECKERS[name]
    except KeyError:
        raise ConfigError(f"Unknown checker '{name}'. Available: {', '.join(sorted(CHECKERS))}") from None
