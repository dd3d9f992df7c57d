"""Final answers pulled out of candidate texts, so that selectors can vote.

An answer extractor is chosen by name (``numeric``, ``math``, ``choice``, ``exact``: the
formats in ``ANSWER_FORMATS``, which the benchmark's checkers grade with), by a regular
expression (the last match's first group, or the whole match when the pattern has no
group), or given as a callable ``fn(text) -> str | None``. Each comes with the rule that
decides when two answers are the same, which voting needs: the named format's own
equivalence (math-verify for ``math``), whitespace-and-case normalisation for a regex or a
callable. LaTeX equivalence is delegated to math-verify (a maintained verifier), never
parsed here.

This module knows nothing about models, scores, gold answers or which candidate wins.
"""

from __future__ import annotations

import ctypes
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence, Union

from ..errors import MissingExtraError, OptionError
from .code import extract_code
from .execution import PYTHON, AnswerSet, PromptContext, read_python

AnswerFn = Callable[[str], Union[str, None]]
#: what ``answer=`` accepts: a format name, or a callable text -> answer
AnswerInput = Union[str, AnswerFn, None]

_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_ANSWER_IS = re.compile(r"(?:final answer|answer)\s*(?:is|:)", re.IGNORECASE)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces matched; None if absent.
    ``\\boxed 5`` (no brace after the command) takes the next token, as LaTeX does (up to a
    ``$``), never a brace group further on (REVIEW 1.13: ``\\boxed 5 ... {x}`` gave ``x``)."""
    boxed, fbox = text.rfind("\\boxed"), text.rfind("\\fbox")
    start = max(boxed, fbox)
    if start < 0:
        return None
    end = start + (len("\\boxed") if start == boxed else len("\\fbox"))
    i = end
    while i < len(text) and text[i].isspace():
        i += 1
    if i >= len(text) or text[i] != "{":
        token = text[end:].split(None, 1)
        arg = token[0].split("$")[0].strip() if token else ""
        return arg or None
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


def canonical_number(value: Fraction) -> str:
    """The canonical text of a number: "18", "1250.5" (terminating decimals), else "1/3"."""
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
            return canonical_number(value)
    found = _numbers(response)
    value = parse_number(found[-1]) if found else None
    return canonical_number(value) if value is not None else None


def numeric_key(answer: str) -> str:
    """The canonical form of a numeric answer (the text itself when it holds no number)."""
    value = parse_number(answer)
    return canonical_number(value) if value is not None else answer.strip()


def equal_number(a: str, b: str) -> bool:
    x, y = parse_number(a), parse_number(b)
    return x is not None and y is not None and x == y


# -- LaTeX math (MATH-500) via math-verify ------------------------------------------------

def math_verify_module() -> Any:
    """math-verify, or a MissingExtraError naming the extra that brings it."""
    try:
        import math_verify
    except ImportError as exc:
        raise MissingExtraError("math-verify", "bench", "checking LaTeX answers") from exc
    return math_verify


#: seconds one math-verify call (an extraction, or one comparison) may take: math-verify's own default
MATH_TIMEOUT = 5.0


class _Timeout(BaseException):
    """Raised into a thread whose math-verify call passed its deadline. A BaseException, so
    the ``except Exception`` blocks of math-verify and sympy do not swallow it."""


_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
_set_async_exc.argtypes = (ctypes.c_ulong, ctypes.c_void_p)


class _Watchdog:
    """One daemon thread that raises :class:`_Timeout` into threads past their deadline.

    math-verify bounds its calls with SIGALRM, which works only on the main thread (its
    ``parse`` raises ValueError elsewhere). The server selects in worker threads, so there
    math-verify runs with its timeouts off and this bounds it instead, the same way the
    signal handler would: an exception raised in the thread's Python code at the next
    bytecode boundary (``PyThreadState_SetAsyncExc``)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._armed: dict[int, tuple[int, float]] = {}  # token -> (thread id, deadline)
        self._fired: set[int] = set()
        self._next = 0
        self._thread: threading.Thread | None = None

    def arm(self, seconds: float) -> int:
        with self._cond:
            token = self._next = self._next + 1
            self._armed[token] = (threading.get_ident(), time.monotonic() + seconds)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="bon-sr-math-deadline", daemon=True)
                self._thread.start()
            self._cond.notify()
            return token

    def disarm(self, token: int) -> None:
        with self._cond:
            self._armed.pop(token, None)
            if token in self._fired:  # fired as the call returned: drop the undelivered exception
                self._fired.discard(token)
                _set_async_exc(threading.get_ident(), None)

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for token, (tid, deadline) in list(self._armed.items()):
                    if deadline <= now:
                        del self._armed[token]
                        self._fired.add(token)
                        _set_async_exc(tid, id(_Timeout))
                soonest = min((d for _, d in self._armed.values()), default=None)
                self._cond.wait(None if soonest is None else max(0.001, soonest - now))


_WATCHDOG = _Watchdog()


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    token = _WATCHDOG.arm(seconds)
    try:
        yield
    finally:
        _WATCHDOG.disarm(token)


def run_bounded(fn: Callable[[dict[str, Any]], Any], default: Any) -> Any:
    """``fn(timeouts)`` with math-verify's timeouts: its own on the main thread; off it, none
    of its own (they would raise) and the watchdog's deadline instead. A call past its
    deadline gives ``default``, as math-verify answers a timed-out call itself (no answer,
    not equal)."""
    if threading.current_thread() is threading.main_thread():
        return fn({})
    try:
        with _deadline(MATH_TIMEOUT):
            return fn({"parsing_timeout": None, "timeout_seconds": None})
    except _Timeout:
        return default


def extract_math(response: str) -> str | None:
    """The final answer as LaTeX, found by math-verify (last ``\\boxed{}`` first)."""
    mv = math_verify_module()

    def run(t: dict[str, Any]) -> str | None:
        parsed = mv.parse(response, **_parse_kw(t))
        return str(parsed[1]) if len(parsed) >= 2 else None

    return run_bounded(run, None)


def _parse_kw(t: dict[str, Any]) -> dict[str, Any]:
    return {"parsing_timeout": t["parsing_timeout"]} if "parsing_timeout" in t else {}


def equal_math(a: str, b: str) -> bool:
    mv = math_verify_module()

    def run(t: dict[str, Any]) -> bool:
        # Re-wrapping both answers in \boxed{} makes math-verify read them as one LaTeX answer.
        left, right = mv.parse("\\boxed{" + a + "}", **_parse_kw(t)), mv.parse("\\boxed{" + b + "}", **_parse_kw(t))
        if not left or not right:
            return a.strip() == b.strip()
        kw = {"timeout_seconds": t["timeout_seconds"]} if "timeout_seconds" in t else {}
        return bool(mv.verify(left, right, **kw))

    return run_bounded(run, False)


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


# -- exact string ---------------------------------------------------------------------------

def normalize_text(text: str) -> str:
    """Lower case, single spaces, no surrounding whitespace or full stops."""
    return " ".join(text.strip().strip(".").lower().split())


def extract_exact(response: str) -> str | None:
    """The last ``\\boxed{}``, else the line after the last "answer is", else the last line; normalised."""
    boxed = last_boxed(response)
    if boxed is not None:
        return normalize_text(boxed)
    tails = list(_ANSWER_IS.finditer(response))
    if tails:
        return normalize_text(response[tails[-1].end():].split("\n")[0])
    lines = [line for line in response.strip().splitlines() if line.strip()]
    return normalize_text(lines[-1]) if lines else None


# -- equivalence and the extractors -----------------------------------------------------------


class AnswerRule(Protocol):
    """When two answers are the same: ``key(answer)`` gives a canonical form (None: no
    canonical form, compare with ``equal``); ``equal(a, b)`` compares two answers."""

    key: Optional[Callable[[str], str]]
    equal: Callable[[str, str], bool]


def group_answers(answers: Sequence[str | None], rule: AnswerRule) -> list[int]:
    """Equivalence-class ids for majority vote: equal answers share an id (numbered in
    order of first appearance); a missing answer gets -1. ``rule``'s ``key`` (when it has
    one) groups by canonical form, else its ``equal`` compares with each class's first answer."""
    groups: list[int] = []
    reps: list[str] = []
    keys: dict[str, int] = {}
    for ans in answers:
        if ans is None:
            groups.append(-1)
            continue
        if rule.key is not None:
            groups.append(keys.setdefault(rule.key(ans), len(keys)))
            continue
        for gid, rep in enumerate(reps):
            if rule.equal(rep, ans):
                groups.append(gid)
                break
        else:
            reps.append(ans)
            groups.append(len(reps) - 1)
    return groups


def _same_text(a: str, b: str) -> bool:
    return normalize_text(a) == normalize_text(b)


@dataclass(frozen=True)
class AnswerExtractor:
    """``extract(text)`` gives a candidate's answer (None: none found); ``group(answers)``
    numbers equal answers alike, in order of first appearance (-1 for None). ``equal`` and
    ``key`` are the equivalence (default: normalised text). ``read`` gives one prompt's
    answers at once with the prompt's context; a format that needs more than each text
    (``python``: the prompt's examples, run in the sandbox) sets ``read_many``, and
    ``runs_code`` when it executes candidates."""

    name: str
    extract: AnswerFn
    equal: Callable[[str, str], bool] = _same_text
    key: Optional[Callable[[str], str]] = normalize_text
    description: str = ""
    read_many: Optional[Callable[[Sequence[str], Optional[PromptContext]], AnswerSet]] = None
    runs_code: bool = False

    def group(self, answers: Sequence[str | None]) -> list[int]:
        return group_answers(answers, self)

    def read(self, texts: Sequence[str], context: PromptContext | None = None) -> AnswerSet:
        """Every candidate's answer for one prompt (``context``: its text and explicit tests)."""
        if self.read_many is not None:
            return self.read_many(texts, context)
        return AnswerSet([self.extract(t) for t in texts])


#: the named formats (``--answer NAME``); the bench's checkers add each one's gold rule
ANSWER_FORMATS: dict[str, AnswerExtractor] = {
    "choice": AnswerExtractor("choice", extract_letter, lambda a, b: a.upper() == b.upper(), str.upper,
                              "multiple choice: option letter"),
    "exact": AnswerExtractor("exact", extract_exact, _same_text, normalize_text, "normalised exact string match"),
    "math": AnswerExtractor("math", extract_math, equal_math, None, "LaTeX answers compared by math-verify"),
    "numeric": AnswerExtractor("numeric", extract_number, equal_number, numeric_key,
                               "numbers (thousands commas, fractions, decimals)"),
    PYTHON: AnswerExtractor(PYTHON, extract_code, str.__eq__, str, "code: behaviour on the prompt's examples "
                            "(asserts, doctests or explicit tests), run in the sandbox", read_python, True),
}


#: seconds a regular expression may spend on one candidate's text (``regex``'s timeout)
REGEX_TIMEOUT = 1.0


def regex_extractor(pattern: str, *, timeout: float = REGEX_TIMEOUT) -> AnswerExtractor:
    """The last match of ``pattern`` (its first group when it has one).

    Matched by the maintained ``regex`` engine (re's syntax), which takes a ``timeout`` and
    releases the GIL while it matches: a backtracking pattern (``(a+)+$``) over a long
    candidate stops after ``timeout`` seconds with an OptionError naming ``answer_regex``,
    and the server's other requests go on meanwhile (the pattern may come from a client)."""
    import regex

    try:
        compiled = regex.compile(pattern)
    except (regex.error, ValueError, OverflowError, RecursionError) as exc:
        raise OptionError("answer_regex", f"{{@answer_regex}} {pattern!r} is not a valid regular expression: {exc}") \
            from None

    def extract(text: str) -> str | None:
        try:
            matches = list(compiled.finditer(text, timeout=timeout, concurrent=True))
        except TimeoutError:
            raise OptionError("answer_regex", f"{{@answer_regex}} {pattern[:80]!r} took longer than {timeout:g} s "
                                              f"on a {len(text)}-character candidate (catastrophic backtracking?); "
                                              "simplify the pattern.") from None
        if not matches:
            return None
        found = matches[-1].group(1) if compiled.groups else matches[-1].group(0)
        return found.strip() if found is not None and found.strip() else None

    return AnswerExtractor(f"regex:{pattern}", extract)


def get_extractor(answer: AnswerInput = None, *, regex: str | None = None) -> AnswerExtractor | None:
    """The extractor for ``answer`` (a format name or a callable) or ``regex``; None if neither."""
    if answer is not None and regex is not None:
        raise OptionError("answer", "Give either {@answer} (a format name or a callable) or {@answer_regex}, not both.")
    if regex is not None:
        return regex_extractor(regex)
    if answer is None:
        return None
    if callable(answer):
        return AnswerExtractor(getattr(answer, "__name__", "custom"), answer)
    found = ANSWER_FORMATS.get(str(answer))
    if found is None:
        raise OptionError("answer", f"Unknown answer extractor '{answer}' ({{@answer}}). Available: "
                          f"{', '.join(sorted(ANSWER_FORMATS))}, or a regex ({{@answer_regex}}).")
    if found.name == "math":
        math_verify_module()  # a missing math-verify fails now, not after sampling
    if found.runs_code:
        sandbox_ready()  # a machine that cannot contain code fails now, naming what it lacks
    return found


def sandbox_ready() -> None:
    """SandboxUnavailable (naming what is missing and how to get it) unless model-written
    code can run contained here, or the user opted out (``BON_SR_UNSAFE_NO_SANDBOX=1``)."""
    from ..sandbox import sandbox_or_opt_out

    sandbox_or_opt_out()
