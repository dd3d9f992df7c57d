"""MBPP development problems (task ids 311-510) as a bon-sr bench task, MBPP's prompt style.

Use it through the bench's custom-task interface::

    bon-sr bench --task benchmarks/tasks/mbpp.py --backend vllm --scorer hook ...

Items: ``shared/data/mbpp-dev.jsonl`` (its README says where they come from; override the
path with ``BON_SR_MBPP_DEV``). These 200 are the only MBPP problems the project develops,
tunes or reports on; this file refuses any other task id.

Prompt (a chat user message): the task text, the problem's FIRST test as an ``assert`` line
(and its setup code, where it has one), and a request for the function in one ```python
block. One of the three tests is shown; grading runs all three.

Checker ``mbpp-exec``: the answer is the candidate's code, as the product's ``python`` answer
format finds it (``bon_sr.selection.code.extract_code``: with fenced blocks, the first that
defines a name the tests call, else the first that defines a function, else the first block;
without fences, the whole text; None when empty); identical code (trailing whitespace aside)
is one answer group. The gold is the problem's tests as JSON (``test_setup_code`` and
``test_list``): a candidate is right when its code, then the setup code, then each of the
three asserts runs without error, as MBPP grades (an assert compares exactly, floats too;
``assert f(x) == 1, 2`` is an assert with a message). A problem's candidates and its greedy
decode are graded together, one ``bon_sr.sandbox.run_programs`` batch (``grade``), each in its
own sandbox with ``GRADING_LIMITS``; never in this process. A machine that cannot build the
sandbox makes it raise ``GradingUnavailable``: the bench then caches the samples ungraded
(``--no-generate --recheck`` grades them later).

Each problem's ``meta`` keeps ``task_id``, ``test_list``, ``test_setup_code``, the function
name the tests call (``entry_point``) and ``shown_tests`` (1).

This file knows nothing about models or selection.
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path
from typing import Any, Sequence

from bon_sr.bench.checkers import CHECKERS, Checker, GradingUnavailable
from bon_sr.bench.tasks import Problem, Task
from bon_sr.errors import InputError
from bon_sr.sandbox import Example, Limits, Program, SandboxUnavailable, run_programs
from bon_sr.selection.code import examples_from_tests, extract_code

#: the development problems: MBPP test ids 311-510, nothing else
DEV_IDS = range(311, 511)
DATA_ENV = "BON_SR_MBPP_DEV"
MAX_NEW_TOKENS = 512
SHOWN_TESTS = 1
#: per candidate when grading: MBPP's harnesses allow a few seconds per problem; the wall limit
#: leaves room for a loaded machine (it counts the sandbox's start), the CPU limit stops a loop
GRADING_LIMITS = Limits(cpu_s=3.0, wall_s=20.0)


def data_path() -> Path:
    """``$BON_SR_MBPP_DEV``, else ``shared/data/mbpp-dev.jsonl`` beside the repository."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "mbpp-dev.jsonl"


def load_items(path: Path | None = None) -> list[dict[str, Any]]:
    """The development problems in file order; any other MBPP task id is refused."""
    path = path or data_path()
    if not path.is_file():
        raise InputError(f"MBPP development data not found at {path}; set {DATA_ENV} to mbpp-dev.jsonl.")
    items = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for it in items:
        if int(it["task_id"]) not in DEV_IDS:
            raise InputError(f"{path}: task {it['task_id']} is not one of the MBPP development problems 311-510.")
        if len(it["test_list"]) < 1:
            raise InputError(f"{path}: task {it['task_id']} has no tests.")
    return items


# -- the shown test -----------------------------------------------------------------------

def parse_test(test: str) -> tuple[str, str, list[str], Any]:
    """``assert name(args) == expected[, msg]`` -> (name, call source, argument sources,
    expected value). The expected side is a literal in every development problem."""
    node = ast.parse(test.strip()).body[0]
    if not isinstance(node, ast.Assert):
        raise ValueError(f"not an assert line: {test!r}")
    cmp = node.test
    if not (isinstance(cmp, ast.Compare) and len(cmp.ops) == 1 and isinstance(cmp.ops[0], ast.Eq)
            and isinstance(cmp.left, ast.Call) and isinstance(cmp.left.func, ast.Name)):
        raise ValueError(f"not of the form 'assert name(...) == expected': {test!r}")
    call = cmp.left
    src = test.strip()
    args = [ast.get_source_segment(src, a) or ast.unparse(a) for a in call.args]
    args += [f"{k.arg}={ast.get_source_segment(src, k.value) or ast.unparse(k.value)}" for k in call.keywords]
    expected = ast.literal_eval(cmp.comparators[0])
    return call.func.id, ast.get_source_segment(src, call) or ast.unparse(call), args, expected


def entry_point(item: dict[str, Any]) -> str:
    return parse_test(item["test_list"][0])[0]


def setup_lines(item: dict[str, Any]) -> list[str]:
    return [ln.rstrip() for ln in (item.get("test_setup_code") or "").splitlines() if ln.strip()]


def gold(item: dict[str, Any]) -> str:
    """What grading needs, as one string (a checker's gold): setup code and every test."""
    return json.dumps({"test_setup_code": item.get("test_setup_code") or "", "test_list": list(item["test_list"])})


def meta(item: dict[str, Any]) -> dict[str, Any]:
    return {"task_id": int(item["task_id"]), "entry_point": entry_point(item), "test_list": list(item["test_list"]),
            "test_setup_code": item.get("test_setup_code") or "", "shown_tests": SHOWN_TESTS}


# -- the checker ----------------------------------------------------------------------------

def code_key(code: str) -> str:
    return "\n".join(line.rstrip() for line in code.strip("\n").splitlines())


def _tests(gold_json: str) -> tuple[list[str], str]:
    tests = json.loads(gold_json)
    return [t.strip() for t in tests["test_list"]], "\n".join((tests.get("test_setup_code") or "").splitlines())


def candidate_code(response: str, calls: Sequence[str] = ()) -> str | None:
    """The candidate's program (the product's ``extract_code``); None when there is none."""
    code = extract_code(response, calls)
    return code if code.strip() else None


def grade(responses: Sequence[str], gold_json: str) -> tuple[list[str | None], list[bool]]:
    """Each response's code and whether it passes every test of ``gold_json``: one sandbox
    batch for the problem (``Program(code, one Example(stmt=assert) per test, setup=...)``)."""
    tests, _setup = _tests(gold_json)
    calls = set().union(*(ex.calls for ex in examples_from_tests(tests)))
    answers = [candidate_code(r, calls) for r in responses]
    return answers, run_tests_many(gold_json, answers)


def run_tests_many(gold_json: str, codes: Sequence[str | None]) -> list[bool]:
    """Whether each code passes every test of ``gold_json`` (None: no code, wrong), run together
    in the sandbox."""
    tests, setup = _tests(gold_json)
    examples = tuple(Example(stmt=t) for t in tests)
    todo = [i for i, code in enumerate(codes) if code is not None]
    try:
        results = run_programs([Program(codes[i], examples, setup=setup) for i in todo], limits=GRADING_LIMITS)
    except SandboxUnavailable as exc:
        raise GradingUnavailable(f"grading MBPP runs each candidate's code with the problem's three tests in "
                                 f"bon-sr's sandbox, which this machine cannot build: {exc}") from exc
    passed = [False] * len(codes)
    for i, res in zip(todo, results):
        passed[i] = res.passed
    return passed


def run_tests(gold_json: str, code: str) -> bool:
    """Whether ``code`` passes every test of ``gold_json`` (run in the sandbox)."""
    return run_tests_many(gold_json, [code])[0]


CHECKER = Checker("mbpp-exec", "MBPP: the candidate's code passes all of the problem's tests (run in the sandbox)",
                  candidate_code, lambda reference: reference, run_tests, key=code_key, grade_many=grade)
CHECKERS.setdefault(CHECKER.name, CHECKER)


# -- the task -------------------------------------------------------------------------------

def prompt(item: dict[str, Any]) -> str:
    shown = "\n".join(t.strip() for t in item["test_list"][:SHOWN_TESTS])
    setup = setup_lines(item)
    setup_text = ("\n\nThe test runs after this setup code:\n```python\n" + "\n".join(setup) + "\n```"
                  if setup else "")
    return (f"{item['text'].strip()}\n\nYour function must pass this test:\n```python\n{shown}\n```{setup_text}\n\n"
            f"Write the Python function `{entry_point(item)}` and reply with it in one ```python code block.")


def task() -> Task:
    problems = tuple(Problem(str(it["task_id"]), prompt(it), gold(it), CHECKER.name, meta(it))
                     for it in load_items())
    return Task("mbpp", problems, MAX_NEW_TOKENS,
                "MBPP development problems 311-510, MBPP style (task text and its first test shown); "
                "graded by running all three tests")
