"""The ``python`` answer format: a candidate's answer is its behaviour on its prompt's examples.

``read_python`` finds the examples (the caller's explicit ``tests``, else the asserts and
doctest examples the prompt shows: ``selection.code``), extracts each candidate's program,
runs every program once in ``bon_sr.sandbox`` (one batch per prompt, in parallel, never in
this process), and returns per candidate:

- its answer: a canonical text of its behaviour (per example: pass/fail/error, the error type,
  the value's repr, what it printed), so identical programs, and different programs that
  behave alike, share a group;
- whether it passed every example (``passed``): the selectors put passing candidates first;
- its per-example results (``checks``, capped), for the output record and ``bon-sr show``.

No examples found: no answers (the selectors' fallbacks decide, as for text without an
answer). This module knows nothing about models, scores or which candidate wins.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .code import Example, examples_from_prompt, examples_from_tests, extract_code

#: the answer format's name (``--answer python``, ``answer="python"``, ``bon_sr.answer``)
PYTHON = "python"


@dataclass(frozen=True)
class PromptContext:
    """What an answer format may read besides a candidate's text: the prompt's text (a chat
    prompt's user turns, joined) and tests the caller passed explicitly (assert lines or
    doctest text; they replace the prompt's own examples)."""

    prompt: str | None = None
    tests: tuple[str, ...] | None = None

    @classmethod
    def of(cls, prompt: Any, tests: str | Sequence[str] | None = None) -> PromptContext:
        if isinstance(prompt, str):
            text = prompt
        elif isinstance(prompt, Sequence):
            text = "\n".join(str(m.get("content", "")) for m in prompt
                             if isinstance(m, Mapping) and m.get("role") != "assistant")
        else:
            text = None
        if isinstance(tests, str):
            tests = (tests,)
        return cls(text, tuple(tests) if tests is not None else None)


@dataclass(frozen=True)
class AnswerSet:
    """One prompt's answers. ``passed``/``checks`` only for formats that run code (None
    otherwise, and when no examples were found); ``note`` says where the examples came from."""

    answers: list[str | None]
    passed: list[bool] | None = None
    checks: list[list[dict[str, Any]]] | None = None
    examples: int = 0
    note: str = ""
    #: what to show as each candidate's answer (default: the answer itself)
    labels: list[str | None] | None = None


def sandbox_examples(examples: Sequence[Example]) -> tuple[Any, ...]:
    """``selection.code`` examples as the sandbox's: an assert ``x == y`` compares values (its
    behaviour is x's repr), another assert runs as a statement, a doctest compares output."""
    from ..sandbox import Example as Run

    out = []
    for ex in examples:
        if ex.want is not None:
            out.append(Run(doctest=ex.expr + "\n", want=ex.want + "\n", flags=("NORMALIZE_WHITESPACE",)))
        elif ex.expected is not None:
            out.append(Run(expr=ex.expr, expected=ex.expected))
        else:
            out.append(Run(stmt=f"assert {ex.expr}"))
    return tuple(out)


def find_examples(context: PromptContext | None) -> tuple[list[Example], str]:
    if context is None:
        return [], "no prompt"
    if context.tests is not None:
        found = examples_from_tests(context.tests)
        return found, f"{len(found)} explicit test{'s' if len(found) != 1 else ''}"
    if context.prompt is None:
        return [], "no prompt text (token ids only: pass tests explicitly)"
    found = examples_from_prompt(context.prompt)
    return found, f"the prompt's {len(found)} example{'s' if len(found) != 1 else ''}"


def read_python(texts: Sequence[str], context: PromptContext | None, *, setup: str = "",
                limits: Any = None) -> AnswerSet:
    """Run each candidate's program on the examples (see the module docstring)."""
    examples, where = find_examples(context)
    if not examples:
        return AnswerSet([None] * len(texts), note=f"no examples ({where})")
    from ..sandbox import Limits, Program, run_programs

    calls = set().union(*(ex.calls for ex in examples))
    runs = sandbox_examples(examples)
    programs = [Program(extract_code(t, calls), runs, setup=setup) for t in texts]
    results = run_programs(programs, limits=limits or Limits())
    answers, passed, checks, labels = [], [], [], []
    for res in results:
        answers.append(json.dumps(res.behaviour, ensure_ascii=False, separators=(",", ":")))
        passed.append(bool(res.passed))
        checks.append(res.to_dict()["examples"])
        labels.append(_label(res))
    return AnswerSet(answers, passed, checks, len(examples), where, labels)


def _label(result: Any, cap: int = 160) -> str:
    """A short text of a run's behaviour: per example its status and value (or error type)."""
    parts = [f"{e.status} {e.value_repr if e.value_repr is not None else e.error_type or ''}".strip()
             for e in result.examples]
    text = "; ".join(parts) if parts else result.status
    return text if len(text) <= cap else text[:cap - 3] + "..."
