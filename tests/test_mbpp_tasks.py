"""The MBPP development task files (benchmarks/tasks/mbpp.py, mbpp_doctest.py): prompts, the
signature derived from the first test, doctest examples, the kept tests, and the checker that
grades a problem's candidates with all its tests in one sandbox batch (or, where no sandbox
can be built, refuses: the bench then caches the samples ungraded)."""

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


def test_code_extraction_is_the_products():
    text = "Here:\n```python\nimport math\n```\nand\n```python\ndef f(a, b):\n    return a + sum(b)\n```\nDone."
    assert mbpp.candidate_code(text) == "def f(a, b):\n    return a + sum(b)\n"
    # the block that defines what the tests call, before an earlier helper
    two = "```python\ndef helper(x):\n    return x\n```\n```python\ndef f(a, b):\n    return a\n```"
    assert mbpp.candidate_code(two, {"f"}).startswith("def f(") and mbpp.candidate_code(two).startswith("def helper(")
    assert mbpp.candidate_code("```\nx = 1\n```") == "x = 1\n"
    assert mbpp.candidate_code("def f(a):\n    return a\n") == "def f(a):\n    return a\n"
    assert mbpp.candidate_code("") is None and mbpp.candidate_code("```python\n\n```") is None


GOOD = "```python\ndef f(a, b):\n    return a + sum(b)\n```"
WRONG = "```python\ndef f(a, b):\n    return a + len(b)\n```"  # passes the first test only
RAISES = "```python\ndef f(a, b):\n    return a + b\n```"  # TypeError on every test
HOSTILE = ("```python\nimport os\ntry:\n    open({path!r}, 'w').write('pwned')\nexcept OSError:\n    pass\n"
           "def f(a, b):\n    while True:\n        pass\n```")  # writes outside, then loops


def test_checker_grades_all_tests_in_one_sandbox_batch(tmp_path, monkeypatch):
    outside = tmp_path / "outside.txt"
    hostile = HOSTILE.format(path=str(outside))
    calls = []
    real = mbpp.run_programs

    def counted(programs, **kw):
        calls.append(len(programs))
        return real(programs, **kw)

    monkeypatch.setattr(mbpp, "run_programs", counted)
    monkeypatch.setattr(mbpp, "GRADING_LIMITS", mbpp.Limits(cpu_s=1.0, wall_s=10.0))
    code = GOOD + "  "  # the same code: one answer group
    rec = {"id": "400", "gold": mbpp.gold(ITEM), "checker": "mbpp-exec",
           "candidates": [{"text": GOOD}, {"text": code}, {"text": WRONG}, {"text": RAISES}, {"text": hostile},
                          {"text": ""}],
           "greedy": {"text": GOOD}}
    check_record(rec)
    assert "ungraded" not in rec
    assert [c["correct"] for c in rec["candidates"]] == [True, True, False, False, False, False]
    assert rec["greedy"]["correct"] is True and rec["greedy"]["answer"].startswith("def f(")
    assert [c["group"] for c in rec["candidates"]] == [0, 0, 1, 2, 3, -1]
    assert calls == [6]  # the 5 programs and the greedy decode (no code: nothing to run), one batch
    assert not outside.exists()  # the hostile candidate wrote nothing outside its sandbox
    checker = get_checker("mbpp-exec")
    assert checker.is_correct("def f(a, b):\n    return a + sum(b)", mbpp.gold(ITEM))
    assert not checker.is_correct(None, mbpp.gold(ITEM))


def test_checker_grades_as_mbpp_setup_code_float_equality_and_assert_messages():
    item = {**ITEM, "test_list": ["assert g(n) == 0.30000000000000004", "assert g(n) == 0.3, 'exact'",
                                  "assert h() == 1,2"], "test_setup_code": "n = 1 \r\nn = n + 1"}
    code = "```python\ndef g(n):\n    return 0.1 * n + 0.1\ndef h():\n    return 1\n```"
    answers, correct = mbpp.grade([code], mbpp.gold(item))
    assert correct == [False]  # 0.1 * 2 + 0.1 != 0.3: the exact comparison fails, as in MBPP
    answers, correct = mbpp.grade([code], mbpp.gold({**item, "test_list": [item["test_list"][0],
                                                                         item["test_list"][2]]}))
    assert correct == [True]  # the setup ran first (n == 2); 'assert h() == 1,2' has message 2


def test_checker_without_a_sandbox_leaves_records_ungraded(monkeypatch):
    def refuse(programs, **kw):
        raise mbpp.SandboxUnavailable("no user namespaces here")

    monkeypatch.setattr(mbpp, "run_programs", refuse)
    rec = {"id": "400", "gold": mbpp.gold(ITEM), "checker": "mbpp-exec",
           "candidates": [{"text": GOOD}, {"text": GOOD + "  "}, {"text": ""}], "greedy": {"text": GOOD}}
    check_record(rec)
    assert "sandbox" in rec["ungraded"] and "no user namespaces" in rec["ungraded"]
    assert [c["correct"] for c in rec["candidates"]] == [None, None, None] and rec["greedy"]["correct"] is None
    assert [c["group"] for c in rec["candidates"]] == [0, 0, -1]
    with pytest.raises(GradingUnavailable, match="sandbox"):
        get_checker("mbpp-exec").is_correct("def f(a, b):\n    return 0", mbpp.gold(ITEM))
