"""The benchmark layer: tasks, answer checkers, bench-only selectors, the Best-of-N runner
and its reports, and the pairwise ``rank-eval``.

Importing it loads no model and touches no network; data and models are fetched on first
use by the runner. The click commands live in ``bon_sr.bench.cli``.
"""

from __future__ import annotations

from .checkers import CHECKERS, Checker, get_checker, register_checker
from .rank_eval import run_rank_eval
from .runner import BenchConfig, evaluate_records, run_bench
from .selectors import BENCH_SELECTORS, get_bench_selector
from .tasks import BUILTIN_TASKS, Problem, Task, load_task

__all__ = [
    "BENCH_SELECTORS",
    "BUILTIN_TASKS",
    "BenchConfig",
    "CHECKERS",
    "Checker",
    "Problem",
    "Task",
    "evaluate_records",
    "get_bench_selector",
    "get_checker",
    "load_task",
    "register_checker",
    "run_bench",
    "run_rank_eval",
]
