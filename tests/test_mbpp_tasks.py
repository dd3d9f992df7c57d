"""The MBPP development task files (benchmarks/tasks/mbpp.py, mbpp_doctest.py): prompts, the
signature derived from the first test, doctest examples, the kept tests, and the checker that
refuses to grade without the sandbox (the bench then caches the samples ungraded)."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import pytest

from bon_sr.bench.checkers import CHECKERS, GradingUnavailable, get_checker
from bon_sr.bench.runner import check_record
from bon_sr.bench.tasks import load_task

ROOT = Path(__file__).resolve().parents[1]
MBPP = ROOT / "benchmarks" / "tasks" / "mbpp.py"
DOCTEST = ROOT / "benchmarks" / "tasks" / "mbpp_doctest.py"


def _load(path: Path):
    import importlib.util
    import sys

    name = f"bon_sr_task_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# A task file registers its checker when imported; this module's tests see it, the rest of
# the suite (which lists the checkers) does not.
_BEFORE = set(CHECKERS)
mbpp = _load(MBPP)
mbpp_doctest = _load(DOCTEST)
_ADDED = {k: CHECKERS.pop(k) for k in set(CHECKERS) - _BEFORE}


@pytest.fixture(autouse=True, scope="module")
def _task_checkers():
    CHECKERS.update(_ADDED)
    yield
    for name in _ADDED:
        CHECKERS.pop(name, None)

ITEM = {"task_id": 400, "text": "Write a function to add a number to a list's sum.",
        "test_list": ["assert f(1, [2]) == 3", "assert f(0, []) == 0", "assert f(2, [2, 2]) == 6"],
        "test_setup_code": ""}


def _docstring(prompt: str) -> str:
    return prompt.split('"""')[1]


def _data_or_skip() -> Path:
    path = mbpp.data_path()
    if not path.is_file():
        pytest.skip(f"MBPP development data not at {path}")
    return path


def test_mbpp_prompt_shows_the_first_assert_only():
    text = mbpp.prompt(ITEM)
    assert "Write a function to add a number to a list's sum." in text
    assert "assert f(1, [2]) == 3" in text
    assert "assert f(0, []) == 0" not in text and "assert f(2, [2, 2]) == 6" not in text
    assert "```python" in text and "`f`" in text


def test_doctest_signature_from_the_first_call():
    assert mbpp_doctest.signature("assert f(1, [2]) == 3") == "def f(a, b):"
    assert mbpp_doctest.signature("assert g() == []") == "def g():"
    assert mbpp_doctest.signature("assert h('x', n=2) == 'xx'") == "def h(a, n):"
    # an assert with a message (MBPP 313): the expected value is the comparison's right side
    assert mbpp.parse_test("assert pos_nos([-1,-2,1,2]) == 1,2") == ("pos_nos", "pos_nos([-1,-2,1,2])",
                                                                       ["[-1,-2,1,2]"], 1)


def test_doctest_prompt_example_parses_with_the_standard_parser():
    text = mbpp_doctest.prompt(ITEM)
    assert "def f(a, b):" in text
    examples = doctest.DocTestParser().get_examples(_docstring(text))
    assert [(e.source, e.want) for e in examples] == [("f(1, [2])\n", "3\n")]


def test_doctest_none_and_setup_code():
    item = {**ITEM, "test_list": ["assert g(root) == None"], "test_setup_code": "root = Node(1) \r\nroot.left = 2"}
    examples = doctest.DocTestParser().get_examples(_docstring(mbpp_doctest.prompt(item)))
    assert [(e.source, e.want) for e in examples] == [("root = Node(1)\n", ""), ("root.left = 2\n", ""),
                                                      ("g(root) is None\n", "True\n")]
    assert "root = Node(1)" in mbpp.prompt(item)


def test_every_development_problem_yields_both_prompts():
    _data_or_skip()
    parser = doctest.DocTestParser()
    for path, name in ((MBPP, "mbpp"), (DOCTEST, "mbpp-doctest")):
        task = load_task(str(path))
        assert task.name == name and len(task.problems) == 200
        assert sorted(int(p.id) for p in task.problems) == list(range(311, 511))
        for p in task.problems:
            first = p.meta["test_list"][0].strip()
            assert p.meta["task_id"] == int(p.id) and len(p.meta["test_list"]) == 3
            assert "test_setup_code" in p.meta and p.meta["shown_tests"] == 1
            assert json.loads(p.answer) == {"test_setup_code": p.meta["test_setup_code"],
                                            "test_list": p.meta["test_list"]}
            if name == "mbpp":
                assert first in p.prompt
            else:
                examples = parser.get_examples(_docstring(p.prompt))
                call = mbpp.parse_test(first)[1].expandtabs()  # the parser expands tabs (MBPP 408's call has one)
                assert examples and examples[-1].source.strip() in (call, f"{call} is None")
                assert examples[-1].want.strip()
                assert f"def {p.meta['entry_point']}(" in p.prompt


def test_other_mbpp_problems_are_refused(tmp_path):
    path = tmp_path / "other.jsonl"
    path.write_text(json.dumps({**ITEM, "task_id": 11}) + "\n")
    with pytest.raises(Exception, match="not one of the MBPP development problems"):
        mbpp.load_items(path)


def test_code_extraction():
    text = "Here:\n```python\nimport math\n```\nand\n```python\ndef f(a, b):\n    return a + sum(b)\n```\nDone."
    assert mbpp.extract_code(text) == "def f(a, b):\n    return a + sum(b)"
    assert mbpp.extract_code("```\nx = 1\n```") == "x = 1"
    assert mbpp.extract_code("def f(a):\n    return a\n") == "def f(a):\n    return a"
    assert mbpp.extract_code("") is None


def test_checker_never_runs_code_and_leaves_records_ungraded():
    checker = get_checker("mbpp-exec")
    gold = mbpp.gold(ITEM)
    with pytest.raises(GradingUnavailable, match="sandbox"):
        checker.is_correct("def f(a, b):\n    return a + sum(b)", gold)
    code = "```python\ndef f(a, b):\n    return a + sum(b)\n```"
    rec = {"id": "400", "gold": gold, "checker": "mbpp-exec",
           "candidates": [{"text": code}, {"text": code + "  "}, {"text": ""}], "greedy": {"text": code}}
    check_record(rec)
    assert "sandbox" in rec["ungraded"]
    assert [c["correct"] for c in rec["candidates"]] == [None, None, None] and rec["greedy"]["correct"] is None
    assert [c["group"] for c in rec["candidates"]] == [0, 0, -1]
