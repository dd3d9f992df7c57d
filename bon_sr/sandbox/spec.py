"""What the sandbox runs and what comes back: programs, their examples, limits and results.

Plain frozen dataclasses. An example is one of three kinds, evaluated in the namespace the
program's source (then its ``setup``) left behind:

    Example(expr="f(1)")                       the value's repr (behaviour only: status pass)
    Example(expr="f(1)", expected="2")         pass when ``f(1) == 2`` (both evaluated in the child)
    Example(stmt="assert f(1) == 2, 'msg'")    pass when it runs, fail on AssertionError
    Example(doctest="f(1)\\n", want="2\\n")     pass when the interactive output matches, as doctest
                                               compares (``flags``: "ELLIPSIS", "NORMALIZE_WHITESPACE";
                                               a want that is a traceback matches the exception's
                                               "Type: message" line)

Each gives an ExampleResult: status ``pass`` | ``fail`` | ``error``, the exception's type and
message when one was raised, the value's repr (``expr``), what it printed; all capped.
``RunResult.behaviour`` is the tuple selection groups candidates by.

Knows nothing about processes or namespaces (runner.py, child.py) nor about prompts and
selection.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from bon_sr.errors import ConfigError

#: ExampleResult.status
PASS, FAIL, ERROR = "pass", "fail", "error"
#: RunResult.status: the program ran to the end (its examples may still fail) | raised while
#: defining itself or in ``setup`` | hit the CPU or wall limit | was killed by a signal (memory,
#: a crash) | wrote more than the output limit
OK, RAISED, TIMEOUT, CRASHED, OUTPUT_LIMIT = "ok", "error", "timeout", "crashed", "output_limit"
DOCTEST_FLAGS = frozenset({"ELLIPSIS", "NORMALIZE_WHITESPACE"})


@dataclass(frozen=True)
class Example:
    """One call to evaluate after the program: exactly one of ``expr``, ``stmt``, ``doctest``."""

    expr: str | None = None
    expected: str | None = None
    stmt: str | None = None
    doctest: str | None = None
    want: str | None = None
    flags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        kinds = [k for k in ("expr", "stmt", "doctest") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ConfigError(f"An Example needs exactly one of expr=, stmt=, doctest= (got {kinds or 'none'}).")
        for name in ("expr", "expected", "stmt", "doctest", "want"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"Example.{name} must be a str of Python source, not {type(value).__name__}.")
        if self.expected is not None and self.expr is None:
            raise ConfigError("Example(expected=...) compares an expr's value: give expr= as well.")
        if (self.want is None) != (self.doctest is None):
            raise ConfigError("Example(doctest=..., want=...) come together: want is the expected output text.")
        unknown = set(self.flags) - DOCTEST_FLAGS
        if unknown or (self.flags and self.doctest is None):
            raise ConfigError(f"Example.flags are doctest option flags ({', '.join(sorted(DOCTEST_FLAGS))}) "
                              f"for a doctest example; got {sorted(self.flags)}.")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Example:
        """{"expr": ..., "expected": ...} | {"stmt": ...} | {"doctest": ..., "want": ...}."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"Unknown Example field(s) {sorted(unknown)}. Available: {', '.join(sorted(known))}")
        return cls(**{**data, "flags": tuple(data.get("flags", ()))})

    def to_job(self) -> dict[str, Any]:
        return {k: (list(v) if k == "flags" else v) for k, v in asdict(self).items() if v not in (None, ())}


@dataclass(frozen=True)
class Program:
    """A candidate's source, optional set-up code run after it (a benchmark's imports or
    fixtures: its failure is the program's), and the examples to evaluate."""

    source: str
    examples: tuple[Example, ...] = ()
    setup: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not isinstance(self.setup, str):
            raise ConfigError("Program.source and Program.setup are Python source text (str).")
        if not isinstance(self.examples, tuple) or not all(isinstance(e, Example) for e in self.examples):
            raise ConfigError("Program.examples is a tuple of Example (Example.from_dict turns a dict into one).")


@dataclass(frozen=True)
class Limits:
    """Per program. The defaults suit the examples of a code prompt (milliseconds each); the
    wall limit counts the sandbox's start (tens of milliseconds, more when the cores are busy).
    CPU time is counted in whole seconds (rounded up) per process; wall time for the whole
    run; memory (address space) per process, so a program's tree may hold up to
    ``processes * memory_mb``."""

    cpu_s: float = 2.0
    wall_s: float = 5.0
    memory_mb: int = 512
    #: the largest file it may write, and the size and file count of each of its /tmp and /dev/shm
    file_size_mb: int = 16
    tmpfs_mb: int = 16
    tmpfs_files: int = 1024
    #: processes and threads, the runner itself included
    processes: int = 16
    open_files: int = 64
    #: caps on each value's repr, each error message, each example's printed output, and all of
    #: a program's results together (bytes of JSON)
    value_chars: int = 1000
    stdout_chars: int = 4000
    output_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"Limits.{f.name} must be a positive number, got {value!r}.")
            if f.type == "int" and not isinstance(value, int):
                raise ConfigError(f"Limits.{f.name} is a whole number, got {value!r}.")
        if self.memory_mb < 64:
            raise ConfigError(f"Limits.memory_mb={self.memory_mb} is below what the interpreter needs; use 64 or more.")
        if self.processes < 2:
            raise ConfigError("Limits.processes counts the runner itself: use 2 or more.")
        if self.open_files < 16:
            raise ConfigError("Limits.open_files must leave the interpreter its own files: use 16 or more.")

    def to_job(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ExampleResult:
    status: str
    error_type: str | None = None
    error: str | None = None
    value_repr: str | None = None
    stdout: str = ""

    @property
    def behaviour(self) -> tuple[str, str | None, str | None, str]:
        """What two programs must share to behave alike on this example."""
        return (self.status, self.error_type, self.value_repr, self.stdout)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, "")}


@dataclass(frozen=True)
class RunResult:
    """One program's run: how it ended, then one ExampleResult per example, in order (those it
    never reached have status ``error`` and the reason as error_type: ``Timeout``, the
    program's own exception, ...)."""

    status: str
    examples: tuple[ExampleResult, ...]
    error_type: str | None = None
    error: str | None = None
    sandboxed: bool = True
    wall_s: float = 0.0
    cpu_s: float | None = None

    @property
    def passed(self) -> bool:
        """Ran to the end and passed every example (a program with no examples passes)."""
        return self.status == OK and all(e.status == PASS for e in self.examples)

    @property
    def n_passed(self) -> int:
        return sum(e.status == PASS for e in self.examples)

    @property
    def behaviour(self) -> tuple:
        """Hashable: equal for two programs that behaved alike on every example."""
        return tuple(e.behaviour for e in self.examples)

    def to_dict(self) -> dict[str, Any]:
        out = {"status": self.status, "passed": self.passed, "examples": [e.to_dict() for e in self.examples],
               "sandboxed": self.sandboxed, "wall_s": round(self.wall_s, 4)}
        if self.cpu_s is not None:
            out["cpu_s"] = self.cpu_s
        out.update({k: v for k, v in (("error_type", self.error_type), ("error", self.error)) if v is not None})
        return out
