"""The caller's side: run a batch of programs, each in its own sandbox, in parallel bounded by
the cores (twice their number); read each one's capped JSON lines and hand back RunResults;
check that the machine can do it.

A batch starts one fresh interpreter (``subprocess``: fork + exec, so nothing of the caller's
memory, threads or file descriptors crosses; never ``multiprocessing``) with an empty
environment, in its own session: child.py's zygote. For each program the caller makes three
pipes (job, results, control), passes their far ends over a unix socket, and the zygote forks a
sandbox for it. All of it is driven from the calling thread with one selector: the zygote dies
with that thread (PR_SET_PDEATHSIG), and the sandboxes with the zygote, so ``run_programs``
blocks the thread until every sandbox is gone, and a caller on an event loop runs it in a
worker thread.

Knows nothing about prompts, candidates or how results are used; what happens inside a
sandbox is child.py's.
"""

from __future__ import annotations

import array
import json
import logging
import os
import select
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Sequence

from bon_sr.errors import BonSRError, ConfigError

from .spec import CRASHED, ERROR, FAIL, OK, OUTPUT_LIMIT, PASS, RAISED, TIMEOUT, Example, ExampleResult, Limits, Program, RunResult

log = logging.getLogger(__name__)

CHILD = Path(__file__).with_name("child.py")
#: the loudly named opt-out: "1" lets code run without a sandbox where none can be built
UNSAFE_ENV = "BON_SR_UNSAFE_NO_SANDBOX"
#: the child's whole environment: none of the caller's variables (API keys live there)
CHILD_ENV = {"PYTHONHASHSEED": "0", "PATH": "/usr/bin:/bin", "HOME": "/tmp", "LC_ALL": "C.UTF-8"}
#: beyond the wall limit, how long the caller waits for the child's own timer before killing it
GRACE_S = 2.0
CONTROL_CAP = 1 << 16
OPT_OUT = (f"To run model-written code WITHOUT a sandbox anyway (unsafe: it then runs with your user's rights, "
           f"sees your files, environment, processes and network), set {UNSAFE_ENV}=1 or pass allow_unsandboxed=True.")


class SandboxUnavailable(BonSRError, RuntimeError):
    """This machine cannot build the sandbox; the message names what is missing and the fix."""


def check_sandbox() -> None:
    """Raise SandboxUnavailable unless a program can run here fully contained: it runs a probe
    in the sandbox and checks what the probe sees (its own pids only, no capabilities,
    no_new_privs, not root when the caller is root, only a loopback interface, its own cwd).
    A success is remembered for the process; a failure is checked again next time."""
    global _checked
    with _check_lock:
        if _checked:
            return
        started = time.monotonic()
        run = _Child(0, Program("x = 1", (Example(expr="x + 1"),)), Limits(), probe=True)
        _drive([run], workers=1, sandboxed=True)
        result = run.result()
        probe = next((r for r in run.records if r.get("kind") == "probe"), None)
        problems = _probe_problems(probe, result)
        if problems:
            raise SandboxUnavailable(explain_refusal("probe", 0, "the sandbox started but " + "; ".join(problems)))
        _checked = True
        log.debug("sandbox available (probe took %.3f s)", time.monotonic() - started)


def run_programs(programs: Sequence[Program], *, limits: Limits = Limits(), max_workers: int | None = None,
                 allow_unsandboxed: bool = False) -> list[RunResult]:
    """Run each program and its examples in its own sandbox; return one RunResult per program,
    in order. At most ``max_workers`` run at once; by default twice the cores this process may
    use: building and tearing down a sandbox waits on the kernel about as long as it computes,
    so with one per core the cores idle half the time (a 16-program batch takes 0.25 s instead
    of 0.45 s on 2 cores), and the default wall limit (2.5 times the CPU limit) leaves a program
    sharing its core the time to use its CPU limit.

    Where the machine cannot build a sandbox this raises SandboxUnavailable, unless
    ``allow_unsandboxed=True`` or BON_SR_UNSAFE_NO_SANDBOX=1: then the programs run with the
    limits, an empty environment and a fresh directory only (``RunResult.sandboxed`` is
    False), and a warning is logged. Where a sandbox works, it is always used.
    """
    programs = list(programs)
    if not all(isinstance(p, Program) for p in programs):
        raise ConfigError("run_programs takes a list of Program (source + examples).")
    if not isinstance(limits, Limits):
        raise ConfigError(f"limits must be a Limits, not {type(limits).__name__}.")
    if max_workers is not None and (isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1):
        raise ConfigError(f"max_workers must be a positive int or None (twice the cores), got {max_workers!r}.")
    if not programs:
        return []
    sandboxed = sandbox_or_opt_out(allow_unsandboxed)
    children = [_Child(i, p, limits) for i, p in enumerate(programs)]
    _drive(children, workers=max_workers or 2 * _cores(), sandboxed=sandboxed)
    return [child.result() for child in children]


_check_lock = threading.Lock()
_checked = False
#: set once the no-sandbox warning was logged (one per process; a test may reset it)
warned_unsandboxed = False


def sandbox_or_opt_out(allow_unsandboxed: bool = False) -> bool:
    """True where a sandbox works; False (with one loud warning) where none can be built and
    the caller opted out (``allow_unsandboxed`` or BON_SR_UNSAFE_NO_SANDBOX=1); else raises
    SandboxUnavailable naming what is missing and the fix."""
    global warned_unsandboxed
    try:
        check_sandbox()
        return True
    except SandboxUnavailable as e:
        if not (allow_unsandboxed or os.environ.get(UNSAFE_ENV) == "1"):
            raise
        if not warned_unsandboxed:
            warned_unsandboxed = True
            log.warning("RUNNING MODEL-WRITTEN CODE WITHOUT A SANDBOX (%s): it has this user's rights, files, "
                        "processes and network. Why no sandbox: %s",
                        "allow_unsandboxed=True" if allow_unsandboxed else f"{UNSAFE_ENV}=1", e)
        return False


class _Zygote:
    """The batch's interpreter (child.py): it forks one sandbox per program it is sent."""

    def __init__(self, sel: selectors.BaseSelector, *, sandboxed: bool):
        self.sandboxed = sandboxed
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [os.path.realpath(sys.executable), "-S", "-s", "-B", "-X", "utf8", str(CHILD), str(theirs.fileno()),
                 str(os.getpid())], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                pass_fds=(theirs.fileno(),), close_fds=True, env=CHILD_ENV, cwd="/", start_new_session=True)
        finally:
            theirs.close()
        self.err = bytearray()
        os.set_blocking(self.proc.stderr.fileno(), False)
        sel.register(self.proc.stderr, selectors.EVENT_READ, (self, "err"))

    def spawn(self, job_id: int, job: bytes) -> tuple[int, int]:
        """Start a sandbox for one job; return the read ends of its results and control pipes."""
        pipes = [os.pipe() for _ in range(3)]
        (job_r, job_w), (out_r, out_w), (err_r, err_w) = pipes
        try:
            self.sock.sendmsg([f"run {job_id}".encode()],
                              [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [job_r, out_w, err_w]))])
        except OSError:
            for fd in (job_w, out_r, err_r):
                os.close(fd)
            raise
        finally:
            for fd in (job_r, out_w, err_w):
                os.close(fd)
        try:
            with open(job_w, "wb") as fh:  # the monitor reads it at once, whatever its size
                fh.write(job)
        except BrokenPipeError:
            pass  # the monitor died first: its control pipe will say so
        return out_r, err_r

    def kill(self, job_id: int) -> None:
        try:
            self.sock.send(f"kill {job_id}".encode())
        except OSError:
            self.kill_all()

    def kill_all(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def on_event(self, sel: selectors.BaseSelector, what: str) -> None:
        data = _read_pipe(self.proc.stderr.fileno())
        if data:
            self.err += data[:max(0, CONTROL_CAP - len(self.err))]
        elif data is not None:
            sel.unregister(self.proc.stderr)

    def close(self, sel: selectors.BaseSelector) -> None:
        """No more jobs: the zygote waits for its sandboxes and exits."""
        self.sock.close()
        try:
            self.proc.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            self.kill_all()
            self.proc.wait()
        if self.proc.stderr.fileno() in sel.get_map():
            sel.unregister(self.proc.stderr)
        self.proc.stderr.close()


class _Child:
    """One program, from its job to its RunResult."""

    def __init__(self, index: int, program: Program, limits: Limits, *, probe: bool = False):
        self.index, self.program, self.limits, self.probe = index, program, limits, probe
        self.sandboxed = True
        self.zygote: _Zygote | None = None
        self.fds: dict[str, int] = {}
        self.init_pidfd: int | None = None
        self.out, self.err = bytearray(), bytearray()
        self.killed = self.output_exceeded = False
        self.started = self.deadline = self.finished_at = 0.0
        self.control_closed_at: float | None = None
        self.records: list[dict] = []
        self.control: list[dict] = []

    def start(self, sel: selectors.BaseSelector, zygote: _Zygote) -> None:
        self.zygote, self.sandboxed = zygote, zygote.sandboxed
        self.started = time.monotonic()
        self.deadline = self.started + self.limits.wall_s + GRACE_S
        job = {"sandboxed": self.sandboxed, "parent_pid": zygote.proc.pid, "started": time.time(),
               "probe": self.probe, "limits": self.limits.to_job(), "source": self.program.source,
               "setup": self.program.setup, "examples": [e.to_job() for e in self.program.examples]}
        out_r, err_r = zygote.spawn(self.index, json.dumps(job).encode())
        for name, fd in (("out", out_r), ("err", err_r)):
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ, (self, name))
            self.fds[name] = fd

    def on_event(self, sel: selectors.BaseSelector, what: str) -> None:
        data = _read_pipe(self.fds[what])
        if data is None:
            return
        if not data:
            self.close_pipe(sel, what)
            return
        if what == "out":
            self.out += data
            if len(self.out) > self.limits.output_bytes:
                # closing our end stops the writer (EPIPE) instead of draining a flood
                self.output_exceeded = True
                del self.out[self.limits.output_bytes:]
                self.close_pipe(sel, "out")
        else:
            self.err += data[:max(0, CONTROL_CAP - len(self.err))]
            self.watch_init()

    def watch_init(self) -> None:
        """Hold a pidfd on the sandbox's init (its pid is reported first): if the caller ever has
        to kill the sandbox, init's exit is what proves its pid namespace is empty."""
        if self.init_pidfd is not None or not self.sandboxed:
            return
        for line in bytes(self.err).splitlines():
            rec = _json(line)
            if rec and isinstance(rec.get("init_pid"), int):
                try:
                    self.init_pidfd = os.pidfd_open(rec["init_pid"])
                except (AttributeError, OSError):
                    self.init_pidfd = -1
                return

    def close_pipe(self, sel: selectors.BaseSelector, what: str) -> None:
        fd = self.fds.pop(what, None)
        if fd is not None:
            sel.unregister(fd)
            os.close(fd)
        if what == "err":
            self.control_closed_at = time.monotonic()

    def done(self, now: float) -> bool:
        # The control pipe closes when the sandbox is empty. Without a sandbox a process that
        # escaped the run may hold the results pipe: give up on it shortly after.
        return self.control_closed_at is not None and ("out" not in self.fds or now - self.control_closed_at > 1.0)

    def kill(self) -> None:
        """Past the wall limit and the grace: the sandbox's own timer failed."""
        self.killed = True
        self.zygote.kill(self.index)

    def close(self, sel: selectors.BaseSelector, *, killed: bool = False) -> None:
        for what in list(self.fds):
            self.close_pipe(sel, what)
        if (killed or self.killed) and self.init_pidfd is not None and self.init_pidfd >= 0:
            select.select([self.init_pidfd], [], [], 10.0)
        if self.init_pidfd is not None and self.init_pidfd >= 0:
            os.close(self.init_pidfd)
        self.init_pidfd = None
        self.finished_at = self.finished_at or time.monotonic()

    def result(self) -> RunResult:
        self.records = [r for r in (_json(line) for line in bytes(self.out).splitlines()) if r is not None]
        self.control = [r for r in (_json(line) for line in bytes(self.err).splitlines()) if r is not None]
        setup_error = next((r for r in self.control if "setup_error" in r), None)
        runner_error = next((r for r in self.records if r.get("kind") == "setup_error"), None)
        if setup_error is not None or runner_error is not None:
            rec = setup_error or {"setup_error": str(runner_error.get("error")), "step": "runner", "errno": 0}
            raise SandboxUnavailable(explain_refusal(str(rec.get("step")), int(rec.get("errno") or 0),
                                                     str(rec["setup_error"])))
        # init's report (the program ended) comes before the keeper's (wall clock): the first wins
        end = next((r for r in self.control if "end" in r), None)
        wall = (self.finished_at or time.monotonic()) - self.started
        cpu = end.get("cpu_s") if end else None
        if end is None and not self.killed:
            text = (bytes(self.err) + bytes(self.zygote.err if self.zygote else b"")).decode(errors="replace")
            raise SandboxUnavailable(explain_refusal("start", 0, "the sandbox ended without a report: "
                                                     + (text.strip()[-2000:] or "no output")))
        status, error_type, error = OK, None, None
        phases = {r["kind"]: r for r in self.records if r.get("kind") in ("program", "setup")}
        raised = next((phases[k] for k in ("program", "setup") if phases.get(k, {}).get("status") == "error"), None)
        if self.output_exceeded:
            status, error_type, error = OUTPUT_LIMIT, "OutputLimit", f"results exceeded {self.limits.output_bytes} bytes"
        elif self.killed or end["end"] == "timeout":
            status, error_type = TIMEOUT, "Timeout"
            error = end.get("why") if end else f"wall time limit ({self.limits.wall_s} s), killed by the caller"
        elif end["end"] == "signal":
            status, error_type, error = CRASHED, str(end.get("signal")), f"killed by {end.get('signal')}"
        elif end["end"] == "exit" and end.get("code") != 0:
            status, error_type, error = CRASHED, "ExitCode", f"the program exited with code {end.get('code')}"
        elif raised is not None:
            status, error_type, error = RAISED, _str(raised.get("error_type")), _str(raised.get("error"))
        examples = self.example_results()
        if status == OK and len([e for e in examples if e is not None]) < len(self.program.examples):
            status, error_type, error = CRASHED, "Exited", "the program exited before its examples were all run"
        filler = ExampleResult(ERROR, error_type=error_type, error=f"not run: {error}")
        return RunResult(status=status, examples=tuple(e if e is not None else filler for e in examples),
                         error_type=error_type, error=error, sandboxed=self.sandboxed, wall_s=wall,
                         cpu_s=cpu if isinstance(cpu, (int, float)) else None)

    def example_results(self) -> list[ExampleResult | None]:
        out: list[ExampleResult | None] = [None] * len(self.program.examples)
        for rec in self.records:
            i = rec.get("index")
            if rec.get("kind") != "example" or not isinstance(i, int) or not 0 <= i < len(out) or out[i] is not None:
                continue
            status = rec.get("status")
            out[i] = ExampleResult(status=status if status in (PASS, FAIL, ERROR) else ERROR,
                                   error_type=_str(rec.get("error_type")), error=_str(rec.get("error")),
                                   value_repr=_str(rec.get("value_repr")), stdout=_str(rec.get("stdout")) or "")
        return out


def _drive(children: list[_Child], *, workers: int, sandboxed: bool) -> None:
    """Run the children, at most ``workers`` at once, until each sandbox has ended and been
    read. Whatever happens (an error, Ctrl-C in the caller), nothing is left running."""
    queue, running = deque(children), []
    with selectors.DefaultSelector() as sel:
        zygote = _Zygote(sel, sandboxed=sandboxed)
        try:
            while queue or running:
                while queue and len(running) < workers:
                    child = queue.popleft()
                    running.append(child)
                    try:
                        child.start(sel, zygote)
                    except OSError as e:
                        raise SandboxUnavailable(explain_refusal(
                            "start", e.errno or 0,
                            f"the sandbox's zygote is gone ({e}): {zygote.err.decode(errors='replace')[-2000:]}"))
                now = time.monotonic()
                timeout = max(0.0, min(c.deadline for c in running) - now)
                if any(c.control_closed_at is not None for c in running):
                    timeout = min(timeout, 0.05)
                for key, _ in sel.select(timeout):
                    owner, what = key.data
                    owner.on_event(sel, what)
                now = time.monotonic()
                for child in list(running):
                    if now > child.deadline and not child.killed:
                        child.kill()
                    if child.done(now):
                        child.finished_at = now
                        child.close(sel)
                        running.remove(child)
        finally:
            if running:
                zygote.kill_all()
            zygote.close(sel)
            for child in running:
                child.close(sel, killed=True)


def _read_pipe(fd: int) -> bytes | None:
    """What a non-blocking pipe holds: b"" at its end, None when nothing is there yet."""
    try:
        return os.read(fd, 1 << 16)
    except BlockingIOError:
        return None


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use, not the machine's
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _json(line: bytes) -> dict[str, Any] | None:
    try:
        rec = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    return rec if isinstance(rec, dict) else None


def _str(value: Any) -> str | None:
    # a lone surrogate (JSON allows its escape) would break the caller's UTF-8 output later
    return value.encode("utf-8", "replace").decode("utf-8") if isinstance(value, str) else None


def _probe_problems(probe: dict | None, result: RunResult) -> list[str]:
    if probe is None or not result.examples or result.examples[0].value_repr != "2":
        return [f"the probe program did not run ({result.status}: {result.error})"]
    problems = []
    if probe.get("pids") != [1, 2]:
        problems.append(f"it sees other processes (pids {probe.get('pids')})")
    if probe.get("caps") != "0000000000000000" or probe.get("no_new_privs") != "1":
        problems.append("it keeps capabilities or lacks no_new_privs")
    if os.geteuid() == 0 and probe.get("uid") == 0:
        problems.append("it runs as root")
    if probe.get("interfaces") != ["lo"]:
        problems.append(f"it sees network interfaces {probe.get('interfaces')}")
    if probe.get("cwd") != "/tmp":
        problems.append(f"its directory is {probe.get('cwd')}")
    return problems


def read_setting(path: str) -> str | None:
    """A /proc setting's value (stripped), None where it cannot be read."""
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def explain_refusal(step: str, err: int, detail: str) -> str:
    """The error a user sees: what failed, the likely cause on this machine and its fix."""
    lines = [f"bon-sr cannot run model-written code in a sandbox on this machine ({detail})."]
    if read_setting("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1" and os.geteuid() != 0:
        lines.append("AppArmor restricts unprivileged user namespaces (Ubuntu 23.10 and later, 24.04): "
                     "`sudo sysctl kernel.apparmor_restrict_unprivileged_userns=0`, or an AppArmor profile "
                     "that allows `userns` for this Python.")
    if read_setting("/proc/sys/kernel/unprivileged_userns_clone") == "0" and os.geteuid() != 0:
        lines.append("Unprivileged user namespaces are switched off: `sudo sysctl kernel.unprivileged_userns_clone=1`.")
    if read_setting("/proc/sys/user/max_user_namespaces") == "0":
        lines.append("User namespaces are limited to 0: `sudo sysctl user.max_user_namespaces=15000`.")
    if Path("/.dockerenv").exists() or Path("/run/.containerenv").exists():
        lines.append("This looks like a container: Docker's and Podman's default seccomp profile blocks "
                     "unshare() and mount(), and /proc is partly masked; run the container with "
                     "`--security-opt seccomp=unconfined --security-opt systempaths=unconfined` "
                     "(or `--privileged`).")
    if step.startswith("mount proc"):
        lines.append("Mounting /proc for the sandbox's pid namespace was refused: the kernel allows it only "
                     "where the host's /proc is fully visible (no masked paths).")
    lines.append("The sandbox needs user, mount, pid, network, ipc, uts and cgroup namespaces (Linux 5.3 or later); "
                 "`unshare --user --map-root-user --mount --pid --net --fork true` is a quick test.")
    lines.append(OPT_OUT)
    return "\n".join(lines)
