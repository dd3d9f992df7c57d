"""Code answers: a candidate's program and the examples its prompt shows, as plain data.

The ``python`` answer format compares candidates by their *behaviour on the prompt's
examples*. This module finds the two halves, without running anything:

- :func:`examples_from_prompt`: the checks a prompt shows: ``assert call == expected`` lines
  (parsed with ``ast``; ``assert f(x) == 1, "msg"`` is an assert with a message) and doctest
  examples (``>>> call`` and the expected output line, read by the standard library's doctest
  parser).
- :func:`examples_from_tests`: tests a caller passes explicitly (assert lines or doctest text);
  they replace the parsed ones.
- :func:`extract_code`: a candidate's program: a fenced block, else the whole text; with
  several blocks, the one that defines what the examples call.

An :class:`Example` is an expression whose value is the behaviour (``expr``) and, where the
prompt gives one, what it should equal (``expected``, a Python expression) or print
(``want``, doctest's expected output). Running them is ``bon_sr.sandbox``'s job.

This module knows nothing about models, scores, sandboxes or which candidate wins.
"""

from __future__ import annotations

import ast
import doctest
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_CODE_LANGS = {"", "python", "py", "python3"}
_PROMPT = re.compile(r"^(\s*)>>>(?: |$)")


@dataclass(frozen=True)
class Example:
    """One check. ``expr``: an expression (its value is the behaviour compared across
    candidates); ``expected``: a Python expression it must equal (an assert's right side),
    or ``want``: the output doctest expects (``repr`` of the value, or what it prints);
    neither: ``expr`` itself must be true (a plain assert). ``source``: the line as shown."""

    expr: str
    expected: str | None = None
    want: str | None = None
    source: str = ""

    @property
    def calls(self) -> set[str]:
        """The names this example calls (what the candidate must define)."""
        return _called_names(self.expr)


def _called_names(source: str) -> set[str]:
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError:
        return set()
    return {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}


def _from_assert(node: ast.Assert, line: str) -> Example:
    test = node.test
    if isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq):
        return Example(expr=ast.unparse(test.left), expected=ast.unparse(test.comparators[0]), source=line)
    return Example(expr=ast.unparse(test), source=line)


def _asserts(text: str) -> list[Example]:
    """Every line (or fenced/indented block line) that parses as an ``assert`` statement."""
    out: list[Example] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line.startswith("assert"):
            continue
        try:
            tree = ast.parse(line)
        except SyntaxError:
            continue
        if len(tree.body) == 1 and isinstance(tree.body[0], ast.Assert):
            out.append(_from_assert(tree.body[0], line))
    return out


def _doctests(text: str) -> list[Example]:
    """Each ``>>>`` example with its expected output, read by doctest's own parser one
    example at a time (a prompt is not a docstring: a closing fence or quote right after
    the output would make the parser refuse the whole text)."""
    out: list[Example] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _PROMPT.match(lines[i])
        if not m:
            i += 1
            continue
        indent, j = m.group(1), i + 1
        while (j < len(lines) and lines[j].startswith(indent) and lines[j].strip()
               and not _PROMPT.match(lines[j]) and not lines[j].strip().startswith(('"""', "'''", "```"))):
            j += 1
        chunk = "\n".join(line[len(indent):] for line in lines[i:j]) + "\n"
        i = j
        try:
            parsed = doctest.DocTestParser().get_examples(chunk)
        except ValueError:
            continue
        for ex in parsed:
            source = ex.source.strip()
            try:
                ast.parse(source, mode="eval")
            except SyntaxError:
                continue  # a statement (an import, an assignment): nothing to compare
            out.append(Example(expr=source, want=ex.want.strip() or None, source=f">>> {source}"))
    return out


def examples_from_prompt(prompt: str) -> list[Example]:
    """The examples a prompt's text shows: its assert lines, then its doctest examples."""
    seen: set[tuple[str, str | None, str | None]] = set()
    out = []
    for ex in [*_asserts(prompt), *_doctests(prompt)]:
        key = (ex.expr, ex.expected, ex.want)
        if key not in seen:
            seen.add(key)
            out.append(ex)
    return out


def examples_from_tests(tests: str | Sequence[str]) -> list[Example]:
    """Explicit tests: assert lines and/or doctest text (one string, or a list of them)."""
    text = tests if isinstance(tests, str) else "\n".join(tests)
    return examples_from_prompt(text)


def _blocks(text: str) -> list[str]:
    return [body for lang, body in _FENCE.findall(text) if lang.lower() in _CODE_LANGS]


def _defines(code: str) -> set[str]:
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return {a or b for a, b in re.findall(r"^\s*(?:async\s+)?def\s+([A-Za-z_]\w*)|^\s*class\s+([A-Za-z_]\w*)",
                                              code, re.M)}
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def extract_code(text: str, calls: Iterable[str] = ()) -> str:
    """The program in a candidate's text: with fenced blocks, the first that defines a name
    the examples call (else the first that defines any function, else the first block);
    without fences, the whole text."""
    blocks = _blocks(text)
    if not blocks:
        return text
    wanted = set(calls)
    if wanted:
        for body in blocks:
            if _defines(body) & wanted:
                return body
    for body in blocks:
        if re.search(r"^\s*(?:async\s+)?def\s", body, re.M):
            return body
    return blocks[0]
