"""Answer checkers: pull the final answer out of a response and compare it with the gold.

A checker is three plain functions: ``extract(response) -> answer | None``,
``gold(reference) -> answer`` (normalises the task's reference) and
``equal(a, b) -> bool``; checkers whose answers have a canonical form also give
``key(answer)`` so that majority vote can group answers without pairwise comparisons.
LaTeX equivalence is delegated to math-verify (a maintained verifier), never parsed here.

Checkers know nothing about models, sampling or selection.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Callable, Sequence

from ..errors import ConfigError, MissingExtraError

_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_ANSWER_IS = re.compile(r"(?:final answer|answer)\s*(?:is|:)", re.IGNORECASE)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces matched; None if absent."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        # "\boxed 5": the argument is the next token.
        tail = text[start:].split(None, 1)
        return tail[1].split("$")[0].strip() if len(tail) > 1 else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j].strip()
    return None


# -- numeric (GSM8K) ----------------------------------------------------------------------

def parse_number(text: str) -> Fraction | None:
    """A number from text such as ``"1,000"``, ``"$18.50"``, ``"-3"``, ``"3/4"``."""
    cleaned = text.replace("\\$", "").replace("$", "").replace("\\,", "").replace("{,}", ",").strip()
    match = _NUMBER.search(cleaned)
    if not match:
        return None
    token = match.group(0).replace(",", "")
    try:
        if "/" in token:
            num, den = token.split("/")
            return Fraction(int(num), int(den)) if int(den) else None
        return Fraction(Decimal(token))
    except (InvalidOperation, ValueError, ZeroDivisionError):
        return None


def _canonical(value: Fraction) -> str:
    """"18", "1250.5" (terminating decimals), else "1/3"."""
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    for p in (2, 5):
        while den % p == 0:
            den //= p
    if den == 1:
        return format(Decimal(value.numerator) / Decimal(value.denominator), "f")
    return f"{value.numerator}/{value.denominator}"


def _numbers(text: str) -> list[str]:
    return _NUMBER.findall(text.replace("\\$", "").replace("$", "").replace("{,}", ","))


def extract_number(response: str) -> str | None:
    """The final numeric answer: the last ``\\boxed{}``, else the text after the last
    "answer is"/"answer:", else after "####", else the last number in the response."""
    candidates: list[str] = []
    boxed = last_boxed(response)
    if boxed is not None:
        candidates.append(boxed)
    tails = list(_ANSWER_IS.finditer(response))
    if tails:
        candidates.append(response[tails[-1].end():].split("\n")[0])
    if "####" in response:
        candidates.append(response.rsplit("####", 1)[1])
    for text in candidates:
        found = _numbers(text)
        # In a boxed expression such as "5 \times 3 = 15" the result is the last number;
        # after "answer is" the first number is the answer (text may follow it).
        pick = (found[-1] if text is boxed else found[0]) if found else None
        value = parse_number(pick) if pick else None
        if value is not None:
            return _canonical(value)
    found = _numbers(response)
    value = parse_number(found[-1]) if found else None
    return _canonical(value) if value is not None else None


def gold_number(reference: str) -> str:
    text = reference.rsplit("####", 1)[1] if "####" in reference else reference
    value = parse_number(text)
    if value is None:
        raise ConfigError(f"Reference answer {reference!r} is not a number; use the 'exact' or 'math' checker.")
    return _canonical(value)


def _numeric_key(answer: str) -> str:
    value = parse_number(answer)
    return _canonical(value) if value is not None else answer.strip()


def equal_number(a: str, b: str) -> bool:
    x, y = parse_number(a), parse_number(b)
    return x is not None and y is not None and x == y


# -- LaTeX math (MATH-500) via math-verify ------------------------------------------------

def math_verify_module():
    try:
        import math_verify
    except ImportError as exc:
        raise MissingExtraError("math-verify", "bench", "checking LaTeX answers") from exc
    return math_verify


def extract_math(response: str) -> str | None:
    """The final answer as LaTeX, found by math-verify (last ``\\boxed{}`` first)."""
    parsed = math_verify_module().parse(response)
    return str(parsed[1]) if len(parsed) >= 2 else None


def gold_math(reference: str) -> str:
    """A MATH reference: the last ``\\boxed{}`` of a solution, or the answer itself."""
    boxed = last_boxed(reference)
    return boxed if boxed is not None else reference.strip().strip("$")


def equal_math(a: str, b: str) -> bool:
    mv = math_verify_module()
    # Re-wrapping both answers in \boxed{} makes math-verify read them as one LaTeX answer.
    left, right = mv.parse("\\boxed{" + a + "}"), mv.parse("\\boxed{" + b + "}")
    if not left or not right:
        return a.strip() == b.strip()
    return bool(mv.verify(left, right))


# -- multiple choice (MMLU, ARC) ------------------------------------------------------------

_LETTER_PATTERNS = [
    # Only the word "answer" ignores case: a lowercase letter there is usually the article
    # "a" ("the answer is a number"), not an option.
    re.compile(r"(?i:answer)\s*(?i:is|:)?\s*:?\s*\**\s*\(?\\?(?:text\{|textbf\{)?([A-J])\b"),
    re.compile(r"\\boxed\{\s*(?:\\text\{)?\(?([A-J])\)?"),
    re.compile(r"^\s*\(?([A-J])[).:]?\s*$", re.MULTILINE),
    re.compile(r"\(([A-J])\)"),
]


def extract_letter(response: str) -> str | None:
    """The chosen option letter: the last "Answer: X" / "answer is (X)", else the last
    ``\\boxed{X}``, else a line holding only a letter, else the last "(X)"."""
    for pattern in _LETTER_PATTERNS:
        found = pattern.findall(response)
        if found:
            return found[-1]
    return None


def gold_letter(reference: str) -> str:
    ref = reference.strip().strip("()").upper()
    if len(ref) == 1 and "A" <= ref <= "J":
        return ref
    if ref.isdigit():
        return "ABCDEFGHIJ"[int(ref)]
    raise ConfigError(f"Reference answer {reference!r} is not an option letter (A-J) or index.")


# -- exact string ---------------------------------------------------------------------------

def normalize_text(text: str) -> str:
    return " ".join(text.strip().strip(".").lower().split())


def extract_exact(response: str) -> str | None:
    boxed = last_boxed(response)
    if boxed is not None:
        return normalize_text(boxed)
    tails = list(_ANSWER_IS.finditer(response))
    if tails:
        return normalize_text(response[tails[-1].end():].split("\n")[0])
    lines = [line for line in response.strip().splitlines() if line.strip()]
    return normalize_text(lines[-1]) if lines else None


@dataclass(frozen=True)
class Checker:
    name: str
    description: str
    extract: Callable[[str], "str | None"]
    gold: Callable[[str], str]
    equal: Callable[[str, str], bool]
    key: "Callable[[str], str] | None" = None

    def is_correct(self, answer: str | None, gold: str) -> bool:
        return answer is not None and self.equal(gold, answer)


CHECKERS: dict[str, Checker] = {
    "choice": Checker("choice", "multiple choice: option letter", extract_letter, gold_letter,
                      lambda a, b: a.upper() == b.upper(), key=str.upper),
    "exact": Checker("exact", "normalised exact string match", extract_exact, normalize_text,
                     lambda a, b: normalize_text(a) == normalize_text(b), key=normalize_text),
    "math": Checker("math", "LaTeX answers compared by math-verify", extract_math, gold_math, equal_math),
    "numeric": Checker("numeric", "numbers (thousands commas, fractions, decimals)", extract_number,
                       gold_number, equal_number, key=lambda a: _numeric_key(a)),
}


def get_checker(name: str) -> Checker:
    try:
        return CHECKERS[name]
    except KeyError:
        raise ConfigError(f"Unknown checker '{name}'. Available: {', '.join(sorted(CHECKERS))}") from None


def group_answers(answers: Sequence[str | None], checker: Checker) -> list[int]:
    """Equivalence-class ids for majority vote: equal answers share an id (numbered in
    order of first appearance); a missing answer gets -1."""
    groups: list[int] = []
    reps: list[str] = []
    keys: dict[str, int] = {}
    for ans in answers:
        if ans is None:
            groups.append(-1)
            continue
        if checker.key is not None:
            groups.append(keys.setdefault(checker.key(ans), len(keys)))
            continue
        for gid, rep in enumerate(reps):
            if checker.equal(rep, ans):
                groups.append(gid)
                break
        else:
            reps.append(ans)
            groups.append(len(reps) - 1)
    return groups
