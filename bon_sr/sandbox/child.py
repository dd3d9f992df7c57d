"""The sandbox's child side: a standalone script, run by ``bon_sr.sandbox.runner`` once per
batch as ``python -S -s -B -X utf8 child.py SOCKET_FD CALLER_PID`` with an empty environment
(only PYTHONHASHSEED=0 and a fixed PATH/HOME/LC_ALL). That process, the zygote, receives one
message per program on a unix socket: three descriptors, the job's pipe (one JSON object), the
results pipe (JSON lines from the program's runner) and the control pipe (JSON lines from the
sandbox itself: set-up errors, how the run ended), and forks a monitor for it. Forking a
started interpreter costs a fraction of starting one, which every program would pay.

This module owns the processes: who forks whom, who dies with whom, the wall clock, the
reports. What a sandbox is made of (namespaces, root, limits, privileges) is confine.py's; how
a program and its examples run, evaluate.py's. The three import only the standard library and
nothing of bon_sr: inside the sandbox only the interpreter's own prefix and the system
directories exist. They know nothing about prompts, candidates or selection.

Process tree (sandboxed)::

    zygote      (the caller's child) one per batch; forks a monitor per program
     └ monitor  (host namespaces) writes the user namespace's id maps
        └ keeper  (host pid namespace, in the new user/mount/net/ipc/uts/cgroup namespaces) wall clock
           └ init    pid 1 of a new pid namespace: builds the root, pivots, reaps
              └ runner  pid 2: limits, drops every privilege, runs the program and its examples

Each link dies with its parent (PR_SET_PDEATHSIG, checked against a pipe or the parent's pid
for the race at start); when init dies the kernel kills everything left in its pid namespace,
double-forked and setsid descendants included, before init's parent can reap it. The control
pipe is held by the monitor, the keeper and init (never by the program): it closes once the
keeper has reaped init, that is once nothing the program started is alive.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys
import time

if __package__:  # imported as bon_sr.sandbox.child (tools, tests): the package's modules
    from . import confine, evaluate
else:
    # Run as the sandbox's script: its two helpers by file name from this directory, which then
    # leaves sys.path, and their names sys.modules: a program can import neither them nor
    # anything else of bon_sr.
    import confine
    import evaluate

    if sys.path and sys.path[0] == os.path.dirname(os.path.abspath(__file__)):
        del sys.path[0]
    del sys.modules["confine"], sys.modules["evaluate"]


def report(obj: dict) -> None:
    """One line on the control channel (stderr), which the program itself never holds."""
    try:
        evaluate.send(2, obj)
    except OSError:
        pass


def die_with_parent(alive_fd: int | None = None, parent: int | None = None) -> None:
    """SIGKILL when the parent exits. The parent may already be gone when this runs: then the
    pipe whose write end only the parent held reads as closed, or getppid() changed."""
    confine.prctl(confine.PR_SET_PDEATHSIG, signal.SIGKILL, "prctl(PR_SET_PDEATHSIG)")
    if parent is not None and os.getppid() != parent:
        os._exit(1)
    if alive_fd is not None:
        ready, _, _ = select.select([alive_fd], [], [], 0)
        if ready:  # EOF: the parent is gone
            os._exit(1)


def monitor(job: dict) -> None:
    die_with_parent(parent=job["parent_pid"])
    to_keeper_r, to_keeper_w = os.pipe()
    from_keeper_r, from_keeper_w = os.pipe()
    keeper_pid = os.fork()
    if keeper_pid == 0:
        os.close(to_keeper_w)
        os.close(from_keeper_r)
        code = 1
        try:
            keeper(job, to_keeper_r, from_keeper_w)
        except confine.SetupError as e:
            report({"setup_error": str(e), "step": e.step, "errno": e.err})
        except BaseException as e:  # noqa: BLE001 - the report is the only way out
            report({"setup_error": f"keeper: {type(e).__name__}: {e}", "step": "keeper", "errno": 0})
        os._exit(code)
    os.close(to_keeper_r)
    os.close(from_keeper_w)
    os.close(1)  # the results pipe belongs to the runner
    try:
        if os.read(from_keeper_r, 1) == b"u":
            confine.write_id_maps(keeper_pid)
            os.write(to_keeper_w, b"g")
    except confine.SetupError as e:
        report({"setup_error": str(e), "step": e.step, "errno": e.err})
    except OSError:
        pass
    os.close(to_keeper_w)
    os.waitpid(keeper_pid, 0)
    os._exit(0)


def keeper(job: dict, from_monitor: int, to_monitor: int) -> None:
    die_with_parent(alive_fd=from_monitor)
    confine.unshare()
    os.write(to_monitor, b"u")
    if os.read(from_monitor, 1) != b"g":
        raise confine.SetupError("uid/gid maps", detail="the monitor could not write them")
    os.close(to_monitor)
    init_alive_r, init_alive_w = os.pipe()
    init_pid = os.fork()
    if init_pid == 0:
        os.close(init_alive_w)
        try:
            init(job, init_alive_r)
        except confine.SetupError as e:
            report({"setup_error": str(e), "step": e.step, "errno": e.err})
        except BaseException as e:  # noqa: BLE001
            report({"setup_error": f"init: {type(e).__name__}: {e}", "step": "init", "errno": 0})
        os._exit(1)
    os.close(init_alive_r)
    os.close(1)
    report({"init_pid": init_pid})

    if wait_or_kill(init_pid, job) is None:
        report({"end": "timeout", "why": f"wall time limit ({job['limits']['wall_s']} s)"})
    os._exit(0)


def wait_or_kill(pid: int, job: dict) -> tuple | None:
    """Wait for our child ``pid`` until the job's wall deadline, then kill it. Return its
    (pid, status, rusage) if it ended by itself, None if it was killed. Killing by pid is safe:
    an unreaped child's pid cannot be reused. For init, the wait returns only once the kernel
    has emptied its pid namespace."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError) as e:
        raise confine.SetupError("pidfd_open (Linux 5.3 or later)", getattr(e, "errno", 0) or 0) from None
    remaining = job["limits"]["wall_s"] - (time.time() - job["started"])
    ended, _, _ = select.select([pidfd], [], [], max(remaining, 0.0))
    os.close(pidfd)
    if not ended:
        os.kill(pid, signal.SIGKILL)
        os.wait4(pid, 0)
        return None
    return os.wait4(pid, 0)


def init(job: dict, keeper_alive: int) -> None:
    die_with_parent(alive_fd=keeper_alive)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as pid 1, a signal without a handler is ignored
    confine.enter(job["limits"])
    confine.prctl(confine.PR_SET_DUMPABLE, 0, "prctl(PR_SET_DUMPABLE)")
    runner_pid = os.fork()
    if runner_pid == 0:
        runner_main(job, sandboxed=True)
    os.close(1)
    while True:
        try:
            pid, status, usage = os.wait4(-1, 0)
        except ChildProcessError:
            os._exit(0)
        if pid == runner_pid:
            report(end_record(status, usage, job["limits"]))
            os._exit(0)  # the kernel kills whatever the program left in this namespace


def end_record(status: int, usage, limits: dict) -> dict:
    cpu = usage.ru_utime + usage.ru_stime
    rec = {"cpu_s": round(cpu, 4), "maxrss_kb": usage.ru_maxrss}
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= limits["cpu_s"]):
            return {**rec, "end": "timeout", "why": f"CPU time limit ({limits['cpu_s']} s)"}
        return {**rec, "end": "signal", "signal": signal.Signals(sig).name}
    return {**rec, "end": "exit", "code": os.WEXITSTATUS(status)}


def runner_main(job: dict, *, sandboxed: bool) -> None:
    """Never returns. Set-up failures are reported on the control channel (still fd 2 here)."""
    try:
        results = os.dup(1)
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.dup2(results, 3)
        os.closerange(4, 1 << 16)
    except OSError as e:
        os._exit(70 + (e.errno or 0) % 50)
    try:
        confine.set_limits(job["limits"], sandboxed=sandboxed)
        if sandboxed:
            confine.drop_privileges()
            confine.prctl(confine.PR_SET_PDEATHSIG, signal.SIGKILL)  # changing uid cleared it
            os.chdir("/tmp")
        os.umask(0o077)
    except confine.SetupError as e:
        evaluate.send(3, {"kind": "setup_error", "error": str(e)})
        os._exit(3)
    os._exit(evaluate.run_job(job, 3))


def unsandboxed(job: dict) -> None:
    import shutil
    import tempfile

    die_with_parent(parent=job["parent_pid"])
    workdir = tempfile.mkdtemp(prefix="bon-sr-unsandboxed-")
    pid = os.fork()
    if pid == 0:
        os.chdir(workdir)
        os.environ["HOME"] = os.environ["TMPDIR"] = workdir
        runner_main(job, sandboxed=False)
    os.close(1)
    ended = wait_or_kill(pid, job)
    shutil.rmtree(workdir, ignore_errors=True)
    if ended is None:
        report({"end": "timeout", "why": f"wall time limit ({job['limits']['wall_s']} s)"})
    else:
        report(end_record(ended[1], ended[2], job["limits"]))
    os._exit(0)


def zygote(sock_fd: int, caller: int) -> None:
    """Fork a monitor per message until the caller closes the socket, then wait for them all.
    A kill message (the caller's last resort past a wall limit) kills one monitor: its keeper
    and init follow by their death signals."""
    die_with_parent(parent=caller)
    sock = socket.socket(fileno=sock_fd)
    monitors: dict[int, int] = {}  # job id -> pid, until reaped (so a kill never hits a reused pid)
    while True:
        msg, ancdata, _, _ = sock.recvmsg(64, socket.CMSG_LEN(3 * 4))
        if not msg:
            break
        kind, _, job_id = msg.decode().partition(" ")
        fds = [int.from_bytes(data[i:i + 4], sys.byteorder) for level, typ, data in ancdata
               if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS for i in range(0, len(data) - 3, 4)]
        if kind == "run" and len(fds) == 3:
            pid = os.fork()
            if pid == 0:
                sock.close()
                for target, fd in enumerate(fds):
                    os.dup2(fd, target)
                os.closerange(3, 1 << 16)
                run_one()
            monitors[int(job_id)] = pid
        elif kind == "kill" and int(job_id) in monitors:
            os.kill(monitors[int(job_id)], signal.SIGKILL)
        for fd in fds:
            os.close(fd)
        reap(monitors, block=False)
    reap(monitors, block=True)
    os._exit(0)


def reap(monitors: dict[int, int], *, block: bool) -> None:
    for job_id, pid in list(monitors.items()):
        if os.waitpid(pid, 0 if block else os.WNOHANG)[0] == pid:
            del monitors[job_id]


def run_one() -> None:
    """In a fresh monitor: the job from fd 0, then stdin becomes /dev/null."""
    data = b""
    while chunk := os.read(0, 1 << 16):
        data += chunk
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    try:
        job = json.loads(data)
    except ValueError:
        report({"setup_error": "the job could not be read", "step": "job", "errno": 0})
        os._exit(1)
    (monitor if job["sandboxed"] else unsandboxed)(job)


if __name__ == "__main__":
    zygote(int(sys.argv[1]), int(sys.argv[2]))
