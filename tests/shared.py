"""The suite's heavy resources, one of each, shared by the tests that can share them.

A vLLM engine of the default model takes about 25 s to start on 2 CPU cores and holds
4-7 GiB of RAM, so the suite starts each kind once and never keeps two big ones alive
without need. Each is a ``Shared`` holder (registered in ``HOLDERS``): started on the first
``get()``, stopped by ``release()``, started again by a ``get()`` after that (so no test
depends on the order the tests run in; a release at the wrong time costs a restart, not a
failure). tests/conftest.py hands each holder out as a session fixture of the holder's
name and

- orders the session (``phase``): first the tests that use no holder, then the users of
  ``fp32_pooling``, then of ``serve_process``, then of ``bf16_engines`` (its engine core
  runs in the pytest process, and vLLM's CPU worker then pins the process's threads and
  turns ``torch.set_num_threads`` into a no-op, so nothing may run in-process after it);
- releases a holder right after the last test whose fixtures reach it (its fixture
  closure), so at most one of them is alive at a time in a process;
- under ``make test``'s two pytest-xdist workers, marks each holder's users with an
  ``xdist_group`` so that one worker runs them all (the float32 engines on one, the server
  and the bf16 engines on the other: two alive at once, machine RAM in use peaked at 12.5 GiB of 24 in a full run).

A fixture that only computes numbers from an engine (and is used across phases) reaches
the holder through ``HOLDERS``, not through the holder's fixture, so it does not keep the
engine alive until its last reader.

Tests that must own a process (kill -9, fault injection, a data-parallel server) keep
starting their own.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

#: the cores this machine gives the suite (read at import, before an xdist worker pins itself to its share)
MACHINE_CORES = frozenset(os.sched_getaffinity(0))

#: the offline default model's name (as `bon-sr serve --model` and BestOfN take it)
MODEL = "smollm2-135m-instruct"

# -- the shared `bon-sr serve` process's settings (tests/test_serve.py's real tests) ----------
API_KEY = "test-key"
SERVER = {"n": 3, "max_n": 8, "max_tokens": 16, "seed": 0, "max_body_bytes": 65536}
#: requests seeded FAULT_SEED fail inside the worker's hook (a test knob of bon_sr.hook.worker)
FAULT_SEED = 777


class Shared:
    """A resource started by ``start()`` on the first ``get()`` and stopped by ``stop(value)``
    on ``release()`` (idempotent). ``alive(value)`` false (a server killed by a test) makes
    the next ``get()`` start a new one. ``starts`` counts the starts."""

    def __init__(self, name: str, start: Callable[[], Any], stop: Callable[[Any], None],
                 alive: Callable[[Any], bool] = lambda value: True):
        self.name, self._start, self._stop, self._alive = name, start, stop, alive
        self.value: Any = None
        self.starts = 0

    def get(self) -> Any:
        if self.value is not None and not self._alive(self.value):
            self.release()
        if self.value is None:
            self.value = self._start()
            self.starts += 1
        return self.value

    @property
    def running(self) -> bool:
        return self.value is not None

    def release(self) -> None:
        value, self.value = self.value, None
        if value is not None:
            self._stop(value)


# -- bon-sr serve -------------------------------------------------------------------------

class ServeProcess:
    """One ``bon-sr serve`` process on a free loopback port (``args`` after ``--port``,
    ``env`` on top of this process's, vLLM's log at WARNING, on ``cores`` if given, else on
    this process's), its output in ``log_path``.
    ``wait_ready()`` polls /health (recording each status in ``health``); ``stop()`` sends
    SIGTERM, kills after ``timeout`` and returns the exit code (idempotent)."""

    def __init__(self, log_path: Path, args: tuple[str, ...] = (), env: dict[str, str] | None = None,
                 cores: set[int] | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        exe = Path(sys.executable).with_name("bon-sr")
        self.log = open(log_path, "w")
        child_env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING", **(env or {}))
        if cores is not None:   # bon-sr binds vLLM's threads to the cores it is given, not to an inherited list
            child_env.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        self.proc = subprocess.Popen([str(exe), "serve", "--port", str(self.port), *args], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=child_env,
                                     preexec_fn=None if cores is None else lambda: os.sched_setaffinity(0, cores))
        self.health: list[int] = []

    def wait_ready(self, timeout: float = 600.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bon-sr serve exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                code = httpx.get(self.base + "/health", timeout=5).status_code
                self.health.append(code)
                if code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"bon-sr serve not ready after {timeout} s:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self, timeout: float = 120.0) -> int:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self.log.closed:
            self.log.close()
        return self.proc.returncode


def module_server_args(*extra: str) -> tuple[str, ...]:
    """``bon-sr serve`` arguments with the shared server's settings (SERVER, API_KEY)."""
    return ("--model", MODEL, "--api-key", API_KEY, "--n", str(SERVER["n"]), "--max-n", str(SERVER["max_n"]),
            "--max-tokens", str(SERVER["max_tokens"]), "--seed", str(SERVER["seed"]), "--max-body-bytes",
            str(SERVER["max_body_bytes"]), *extra)


def start_server(log_dir: Path, *extra: str) -> ServeProcess:
    """A ready ``bon-sr serve`` with the shared settings; the worker's fault knob armed."""
    log_dir.mkdir(parents=True, exist_ok=True)
    srv = ServeProcess(log_dir / f"server-{time.monotonic_ns()}.log", module_server_args(*extra),
                       env={"BON_SR_HOOK_FAULT_SEED": str(FAULT_SEED)})
    try:
        srv.wait_ready()
    except BaseException:
        srv.stop()
        raise
    return srv


# -- vLLM engines -------------------------------------------------------------------------

def start_fp32_pooling() -> Any:
    """A float32 VLLMBackend with its pooling engine started (the reference scorer)."""
    from bon_sr.engines import VLLMBackend, VLLMEngineFactory
    from bon_sr.models import DEFAULT_MODEL, resolve_model

    backend = VLLMBackend(resolve_model(DEFAULT_MODEL), dtype="float32", kv_cache_memory_bytes=1 << 30,
                          pooling_kv_cache_memory_bytes=1 << 30, max_model_len=2048,
                          engine_factory=VLLMEngineFactory())
    _ = backend.pooling_llm  # starts it
    return backend


def start_bf16_engines() -> Any:
    """The bf16 hooked VLLMBackend (the product's default: backend vllm, scorer hook, the
    model's context), its generate engine's core in this process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0: the in-process path is covered by it); its pooling
    engine starts when a test asks for it."""
    from bon_sr.engines import VLLMBackend, VLLMEngineFactory
    from bon_sr.models import DEFAULT_MODEL, resolve_model

    old = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        # the real factory, whatever a test made the default (reuse_engines hands out this one)
        backend = VLLMBackend(resolve_model(DEFAULT_MODEL), hook=True, engine_factory=VLLMEngineFactory())
        _ = backend.generate_llm  # starts it and installs the hook
    finally:
        if old is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = old
    return backend


def _close_backend(backend: Any) -> None:
    import gc

    backend.close()
    gc.collect()


class SharedEngines:
    """An ``EngineFactory`` (bon_sr.engines) that hands out the shared bf16 engines instead
    of starting new ones: ``start(role)`` records the role in ``asked`` and returns the
    ``bf16_engines`` holder's engine for it; ``stop`` leaves it running (the holder owns
    it). With ``count_prompts`` the generate engine comes wrapped so that ``prompt_counts``
    records the number of prompts of each ``generate`` call."""

    def __init__(self, asked: list[str] | None = None):
        self.asked: list[str] = [] if asked is None else asked
        self.prompt_counts: list[int] | None = None

    def count_prompts(self) -> list[int]:
        self.prompt_counts = []
        return self.prompt_counts

    def start(self, role: str, kwargs: dict[str, Any]) -> Any:
        self.asked.append(role)
        backend = HOLDERS["bf16_engines"].get()
        if role == "pooling":
            return backend.pooling_llm
        llm = backend.generate_llm
        return llm if self.prompt_counts is None else _CountingLLM(llm, self.prompt_counts)

    def stop(self, llm: Any) -> None:
        return None


class _CountingLLM:
    """A vllm.LLM that records the number of prompts of each ``generate`` call."""

    def __init__(self, llm: Any, counts: list[int]):
        self.llm, self.counts = llm, counts

    def generate(self, prompts: Any, *args: Any, **kwargs: Any) -> Any:
        self.counts.append(len(prompts))
        return self.llm.generate(prompts, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.llm, name)


#: where the shared server writes its log (tests/conftest.py points it into pytest's basetemp)
LOG_DIR = Path(os.environ.get("TMPDIR", "/tmp")) / "bon-sr-tests"

HOLDERS: dict[str, Shared] = {
    "fp32_pooling": Shared("fp32_pooling", start_fp32_pooling, _close_backend),
    # the shared server runs code (tests/test_serve.py's python-answer test); every other request is unaffected
    "serve_process": Shared("serve_process", lambda: start_server(LOG_DIR, "--allow-code-execution"),
                            lambda srv: srv.stop(),
                            alive=lambda srv: srv.proc.poll() is None),
    "bf16_engines": Shared("bf16_engines", start_bf16_engines, _close_backend),
}
#: the order of the phases after the tests that use no holder (see the docstring)
PHASES = ("fp32_pooling", "serve_process", "bf16_engines")
