"""MBPP development problems (task ids 311-510) as a bon-sr bench task, doctest style.

Use it through the bench's custom-task interface::

    bon-sr bench --task benchmarks/tasks/mbpp_doctest.py --backend vllm --scorer hook ...

The same 200 problems, data, checker (``mbpp-exec``: all three tests, run in the sandbox)
and ``meta`` as ``mbpp.py`` beside this file; only the prompt differs. The data file has no
reference code, so the function's signature is derived from the FIRST test's call: its name,
and one parameter per argument (``a``, ``b``, ...; a keyword argument keeps its name). The
docstring holds the task text and a doctest example from that test: ``>>> call`` (after the
setup code's lines, where the problem has some) and the expected value's repr as the output
line (``>>> call is None`` / ``True`` when the expected value is None, which prints nothing).
The model is asked to complete the function in one ```python block. One test is shown;
grading runs all three.

This file knows nothing about models or selection.
"""

from __future__ import annotations

import importlib.util
import string
import sys
from pathlib import Path
from typing import Any

from bon_sr.bench.tasks import Problem, Task


def _load_mbpp() -> Any:
    """``mbpp.py`` beside this file (task files are loaded by path, not as a package)."""
    name = "bon_sr_task_mbpp"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("mbpp.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


mbpp = _load_mbpp()
CHECKER = mbpp.CHECKER


def signature(test: str) -> str:
    """``assert f(1, [2]) == 3`` -> ``def f(a, b):``."""
    name, _call, args, _expected = mbpp.parse_test(test)
    letters = iter(string.ascii_lowercase)
    params = [a.split("=", 1)[0] if _is_keyword(a) else next(letters) for a in args]
    return f"def {name}({', '.join(params)}):"


def _is_keyword(arg: str) -> bool:
    head, sep, _ = arg.partition("=")
    return bool(sep) and head.isidentifier() and not arg.startswith(head + "==")


def doctest_example(item: dict[str, Any]) -> str:
    """The ``>>>`` lines and expected output of the first test (setup lines first)."""
    _name, call, _args, expected = mbpp.parse_test(item["test_list"][0])
    lines = [f">>> {ln.strip()}" for ln in mbpp.setup_lines(item)]
    if expected is None:
        lines += [f">>> {call} is None", "True"]
    else:
        lines += [f">>> {call}", repr(expected)]
    return "\n".join(lines)


def function_stub(item: dict[str, Any]) -> str:
    body = "\n".join(f"    {ln}" if ln else "" for ln in
                     [*item["text"].strip().splitlines(), "", *doctest_example(item).splitlines()])
    quote = 'r"""' if "\\" in body else '"""'
    return f"{signature(item['test_list'][0])}\n    {quote}\n{body}\n    \"\"\"\n"


def prompt(item: dict[str, Any]) -> str:
    return ("Complete the following Python function:\n```python\n" + function_stub(item) + "```\n\n"
            "Reply with the complete function in one ```python code block.")


def task() -> Task:
    problems = tuple(Problem(str(it["task_id"]), prompt(it), mbpp.gold(it), CHECKER.name, mbpp.meta(it))
                     for it in mbpp.load_items())
    return Task("mbpp-doctest", problems, mbpp.MAX_NEW_TOKENS,
                "MBPP development problems 311-510, doctest style (a signature from the first test's call and "
                "a docstring with its example); graded by running all three tests")
