"""What every bon-sr command shares at run time: signals that stop a run cleanly, vLLM's
output sent to a log file, the "rerun with --resume" message, ``KEY=VALUE`` options and
rich progress bars.

Every CLI module (``bon_sr.cli``, ``bench.cli``, ``bench.ablate_cli``, ``serve.cli``,
``scale.cli``) imports its run-time pieces from here, and none imports another CLI module,
so registering the sub-commands in ``bon_sr.cli`` makes no import circle. This module knows
nothing about which command runs, how candidates are sampled or scored, or what a run writes.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, NoReturn

import click

from . import __version__


class Stopped(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM, raised in the main thread so that a run stops cleanly: the
    finished records stay, the engines are shut down, the exit status is 128 + the signal.
    Not a KeyboardInterrupt: vLLM 0.32 swallows KeyboardInterrupt while its engine starts
    (``zmq_socket_ctx``), and the run would carry on as if nothing had been asked."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.code = 128 + signum
        self.what = "Interrupted" if signum == signal.SIGINT else f"Stopped by {signal.Signals(signum).name}"

    @staticmethod
    def of(exc: BaseException) -> "Stopped":
        """A Stopped for ``exc`` (a KeyboardInterrupt raised outside the handler is Ctrl-C)."""
        return exc if isinstance(exc, Stopped) else Stopped(signal.SIGINT)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Inside: SIGINT and SIGTERM raise ``Stopped`` in the main thread (elsewhere: nothing
    changes); the previous handlers come back on the way out."""
    def stop(signum: int, frame: Any) -> None:
        # A second signal during the shutdown acts at once (engines die with us, see vllm_plugin).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise Stopped(signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig, handler in previous.items():
        if handler is not signal.SIG_IGN:  # `nohup`-style ignoring stays ignored
            signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def engine_log_path(output: str) -> Path:
    """Where a run's vLLM output goes unless --verbose: beside the output file (in the temp
    folder when the output is no regular file, such as /dev/stdout)."""
    out = Path(output)
    if out.is_file():
        return out.with_name(out.stem + ".vllm.log")
    import tempfile

    return Path(tempfile.gettempdir()) / f"bon-sr-{os.getpid()}.vllm.log"


@contextmanager
def engine_output_to(log_path: Path | None, console: Any) -> Iterator[None]:
    """Send everything written to file descriptor 2 (vLLM's logs from every engine process,
    C++ warnings, loading bars) to ``log_path``, while ``console`` and bon-sr's own log
    records keep the terminal. Engine processes started inside inherit the log file as
    their stderr. ``None``: change nothing (--verbose, or no vLLM engine)."""
    if log_path is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as exc:
        raise click.ClickException(f"Cannot write vLLM's log '{log_path}': {exc.strerror}. Rerun with --verbose "
                                   "to see vLLM's output on the terminal instead.") from exc
    os.write(log_fd, f"--- bon-sr {__version__} {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}\n".encode())
    saved = os.dup(2)
    terminal = os.fdopen(saved, "w", buffering=1, encoding=sys.stderr.encoding or "utf-8",
                         errors="backslashreplace")
    console.file = terminal
    own = _NotVLLM()
    moved = [h for h in logging.getLogger().handlers
             if type(h) is logging.StreamHandler and h.stream is sys.stderr]
    for handler in moved:
        handler.setStream(terminal)
        handler.addFilter(own)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        for handler in moved:
            handler.setStream(sys.stderr)
            handler.removeFilter(own)
        console.file = sys.stderr
        terminal.close()


class _NotVLLM(logging.Filter):
    """vLLM's records that reach the root logger belong in the engine log, not the terminal."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith("vllm")


def click_error(exc: BaseException) -> click.ClickException:
    """A bon-sr error as the command line says it: an option error names the CLI flag."""
    from .errors import OptionError

    return click.ClickException(exc.render("cli") if isinstance(exc, OptionError) else str(exc))


@contextmanager
def stopped_runs_resume(console: Any, writer: Any, done: list[int]) -> Iterator[None]:
    """A run that stops early (a prompt's error, Ctrl-C, SIGTERM) says how many records are
    in the output and that ``--resume`` continues; ``done[0]`` counts them as they are written.
    One place for the single-process and the Ray paths."""
    from .errors import BonSRError

    try:
        yield
    except BonSRError as exc:
        raise click.ClickException(f"{click_error(exc).message}\n{done[0]} prompts were written to {writer.path}; "
                                   "fix the problem and rerun with --resume.") from exc
    except (Stopped, KeyboardInterrupt) as exc:
        exit_stopped(console, exc, f"{done[0]} prompts written to {writer.path}; rerun with --resume to continue.")


def exit_stopped(console: Any, exc: BaseException, kept: str) -> NoReturn:
    """End a command that Ctrl-C or SIGTERM stopped (``exc``: the Stopped or KeyboardInterrupt)
    with exit status 128 + the signal, after one line on ``console`` saying what is ``kept``."""
    stop = Stopped.of(exc)
    console.print(f"[yellow]{stop.what}: {kept}[/]")
    raise SystemExit(stop.code) from None


def parse_options(items: tuple[str, ...]) -> dict[str, Any]:
    """KEY=VALUE pairs; values parsed as JSON when they are JSON (numbers, true/false)."""
    import json

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--vllm-opt")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def uses_vllm(options: dict[str, Any]) -> bool:
    from .options import resolve_backend
    from .errors import BonSRError

    try:
        backend = resolve_backend(options["backend"])
    except BonSRError:
        return False  # BestOfN reports it
    return backend == "vllm" or options.get("scorer") in ("hook", "pooling", "vllm")


@contextmanager
def progress_bars(console: Any = None) -> Iterator[Any]:
    """A ``ProgressFn`` drawing one rich task per stage message, on ``console`` (stderr)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = console or Console(stderr=True)
    bars: dict[str, Any] = {}
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        def update(message: str, done: int | None, total: int | None) -> None:
            # Byte counters (downloads, checksums) share one bar per message; a stage with no
            # known size is marked finished when the next stage starts.
            if message not in bars:
                for bar in bars.values():
                    if progress.tasks[bar].total is None:
                        progress.update(bar, total=1, completed=1)
                bars[message] = progress.add_task(message, total=total)
            progress.update(bars[message], completed=done or 0, total=total)

        yield update
