"""Run model-written Python in a sandbox: each program in its own contained process tree, its
examples evaluated there, the results back as capped JSON.

    spec.py     Program, Example, Limits in; RunResult, ExampleResult out (plain dataclasses)
    runner.py   run_programs(): a batch in parallel (twice the cores); check_sandbox()
    child.py    the sandbox side (a standalone script, standard library only): a zygote per
                batch forks each program's process tree, wall clock and reports
    confine.py  namespaces, id maps, the root file system, limits, dropping privileges
    evaluate.py the program and its examples, run inside: results as JSON lines

    results = run_programs([Program(source, (Example(expr="f(1)", expected="2"),))])
    results[0].passed, results[0].behaviour, results[0].to_dict()

Infrastructure: it knows nothing about prompts, candidates, answers or selection, and imports
nothing of bon_sr but its errors.

Threat model. Each program runs as its own process tree in new user, mount, pid, network,
IPC, UTS and cgroup namespaces, with:
  - a root of its own: read-only binds of /usr, /bin, /lib* and the interpreter's prefix, a
    minimal /dev, its own /proc, size- and file-count-limited tmpfs /tmp (its cwd) and
    /dev/shm. The host's /home, /root (beyond the interpreter), /tmp, /run, /sys and the
    project are not there: it cannot read what the invoking user can read (a 0600 file, a
    key) nor write anywhere outside its tmpfs;
  - an empty environment, no inherited file descriptors, stdin from /dev/null;
  - no network: a fresh network namespace whose only interface, its own loopback, is down:
    no host listener (loopback included) and no abstract unix socket is reachable;
  - its own pid namespace: it sees and can signal only its own processes, not the caller's
    command lines (`bon-sr serve --api-key KEY`) nor any other process;
  - no privilege: when the caller is root the program runs as uid/gid 65534; for a normal
    user it stays that user, mapped onto uid 0 of its namespace. Either way no capabilities
    (bounding and ambient sets empty, securebits locked), no_new_privs, and no nested user
    namespace (its namespace allows 0);
  - limits: CPU time and address space per process, wall time for the whole tree, file size,
    open files, processes and threads (RLIMIT_NPROC, counted per sandbox), result bytes. At a
    limit, or when the caller (or its thread) dies, the pid namespace's init dies and the
    kernel kills every process in it, double-forked and setsid ones included.
Not covered: kernel vulnerabilities (the program can make any system call an unprivileged
process can: there is no seccomp filter); CPU side channels (Spectre-class) and timing;
the shared CPU, memory bandwidth and page cache (a program can slow its neighbours within
its limits; memory is bounded per process, so a tree may hold up to processes x memory_mb);
per-uid kernel state shared by all sandboxes run as root, which all are uid 65534 (keyrings,
inotify counts); and the truth of a program's own report: it runs in the interpreter that
evaluates its examples, so a hostile program can forge its own results (not another's).
Without a sandbox (the explicit ``allow_unsandboxed=True`` / BON_SR_UNSAFE_NO_SANDBOX=1
opt-out, honoured only where none can be built) none of this holds beyond the CPU, memory,
file-size and wall limits, the empty environment and a fresh directory.
"""

from .runner import UNSAFE_ENV, SandboxUnavailable, check_sandbox, run_programs, sandbox_or_opt_out
from .spec import Example, ExampleResult, Limits, Program, RunResult

__all__ = [
    "Example",
    "ExampleResult",
    "Limits",
    "Program",
    "RunResult",
    "SandboxUnavailable",
    "UNSAFE_ENV",
    "check_sandbox",
    "run_programs",
    "sandbox_or_opt_out",
]
