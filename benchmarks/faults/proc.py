"""Processes of a fault run: the bon-sr command lines (plain or traced by ``launcher``), their
environment, waiting for and reaping child processes, and the JSONL files they read and write.

Knows nothing about which fault is injected.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[2]
ORPHAN_WAIT_S = 15.0
#: what vLLM's own output looks like on a terminal (log lines, C++ warnings, loading bars)
NOISE = ("WARNING", "INFO", "(EngineCore", "(Worker", "[W", "Loading safetensors", "Traceback",
         "exited unexpectedly", "force killing")


def cli_command(args: Sequence[str], *, traced: bool) -> list[str]:
    """``bon-sr ARGS`` as a command line. ``traced``: under ``benchmarks.faults.launcher``, which
    records the phases (HF path only: vLLM's spawned engine re-imports the main module). Untraced:
    ``-m bon_sr.cli``, which vLLM's spawned engine re-imports first (die-with-parent is armed there)."""
    module = "benchmarks.faults.launcher" if traced else "bon_sr.cli"
    return [sys.executable, "-m", module, *args]


def base_env(**extra: str) -> dict[str, str]:
    # ROOT on PYTHONPATH: the traced launcher is found from any working directory
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=path)
    env.update(extra)
    return env


def run_cli(args: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 900,
            preexec: Callable[[], None] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(args, traced=False), capture_output=True, text=True, cwd=ROOT,
                          env=env or base_env(), timeout=timeout, preexec_fn=preexec)


def read_trace(path: Path) -> list[tuple[float, str]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        t, _, event = line.partition(" ")
        out.append((float(t), event))
    return out


def descendants(pid: int) -> list[Any]:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def still_alive(procs: Sequence[Any], wait: float = ORPHAN_WAIT_S) -> list[str]:
    """Processes of ``procs`` alive (not zombies) after up to ``wait`` seconds; killed then."""
    import psutil

    deadline = time.time() + wait
    alive: list[Any] = list(procs)
    while alive and time.time() < deadline:
        alive = [p for p in alive if is_running(p)]
        if alive:
            time.sleep(0.25)
    names = []
    for p in alive:
        try:
            names.append(f"{p.name()}:{p.pid}")
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return names


def is_running(p: Any) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def complete_records(path: Path) -> list[dict[str, Any]]:
    """Records of the complete lines of a JSONL file (a torn last line is not one)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")[:-1]  # what follows the last newline is torn
    return [json.loads(x) for x in lines if x.strip()]


def write_prompts(path: Path, count: int) -> Path:
    path.write_text("".join(json.dumps({"id": f"p{k}", "prompt": f"Count from 1 to {k + 3}."}) + "\n"
                            for k in range(count)))
    return path


def write_task(path: Path, count: int) -> Path:
    path.write_text("".join(json.dumps({"id": f"t{k}", "prompt": f"What is {k} + {k}? Answer with a number.",
                                        "answer": str(2 * k), "checker": "numeric"}) + "\n" for k in range(count)))
    return path
