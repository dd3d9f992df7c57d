"""The sandbox's child side: a standalone script, run by ``bon_sr.sandbox.runner`` once per
batch as ``python -S -s -B -X utf8 child.py SOCKET_FD CALLER_PID`` with an empty environment
(only PYTHONHASHSEED=0 and a fixed PATH/HOME/LC_ALL). That process, the zygote, receives one
message per program on a unix socket: three descriptors, the job's pipe (marshal: it comes
from the caller, never from a program), the results pipe (JSON lines from the program's
runner) and the control pipe (JSON lines from the sandbox itself: set-up errors, how the run
ended), and forks a monitor for it. Forking a started interpreter costs a fraction of starting
one, which every program would pay.

It imports only the standard library and nothing from bon_sr: inside the sandbox only the
interpreter's own prefix and the system directories exist. It avoids the modules that pull in
``re`` and ``enum`` (json, signal, socket: their C halves serve), which would lengthen the
zygote's start and every program's namespace. It knows nothing about prompts, candidates or
selection; it runs programs and their examples.

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

# The C halves of json, signal and socket: the Python halves import re and enum, about a third of
# this script's start-up, which every program pays.
import _json  # noqa: PLC2701
import _signal as signal  # noqa: PLC2701
import _socket  # noqa: PLC2701
import ctypes
import errno
import marshal
import os
import resource
import select
import sys
import time

if sys.path and sys.path[0] == os.path.dirname(os.path.abspath(__file__)):
    # The script's own directory is the caller's bon_sr/sandbox: candidates must not import from it.
    del sys.path[0]

# Linux constants (include/uapi/linux/{sched,mount,prctl,capability}.h)
CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x02000000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 16384, 1 << 18, 1 << 21, 1 << 24
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP = 1, 4, 24
PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 28, 38, 47, 4
# NOROOT (+locked), KEEP_CAPS locked off, NO_CAP_AMBIENT_RAISE (+locked): no way back to capabilities
SECUREBITS = (1 << 0) | (1 << 1) | (1 << 5) | (1 << 6) | (1 << 7)
LINUX_CAPABILITY_VERSION_3 = 0x20080522
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}

SANDBOX_UID = 65534  # "nobody": the program's uid when the caller is root
SIGNAL_NAMES: dict[int, str] = {}
for _name in sorted(n for n in dir(signal) if n.startswith("SIG") and not n.startswith("SIG_")):
    SIGNAL_NAMES.setdefault(getattr(signal, _name), _name)  # SIGABRT before its alias SIGIOT

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
libc.unshare.argtypes = [ctypes.c_int]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
libc.syscall.restype = ctypes.c_long


class SetupError(Exception):
    """A step of building the sandbox failed; ``step`` names it, ``err`` is the errno."""

    def __init__(self, step: str, err: int = 0, detail: str = ""):
        self.step, self.err = step, err
        text = detail or (os.strerror(err) if err else "failed")
        super().__init__(f"{step}: {text}" + (f" ({errno.errorcode.get(err, err)})" if err else ""))


def encode(obj) -> str:
    """JSON for what the child sends: dicts with str keys, lists, str, int, float, bool, None."""
    if isinstance(obj, str):
        return _json.encode_basestring_ascii(obj)
    if obj is None or isinstance(obj, bool):
        return {None: "null", True: "true", False: "false"}[obj]
    if isinstance(obj, (int, float)):
        return repr(obj) if obj == obj and obj not in (float("inf"), float("-inf")) else "null"
    if isinstance(obj, dict):
        return "{" + ",".join(f"{encode(str(k))}:{encode(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, (list, tuple)):
        return "[" + ",".join(encode(v) for v in obj) + "]"
    return encode(str(obj))


def send(fd: int, obj: dict) -> None:
    os.write(fd, (encode(obj) + "\n").encode())


def report(obj: dict) -> None:
    """One line on the control channel (stderr), which the program itself never holds."""
    try:
        send(2, obj)
    except OSError:
        pass


def check(ret: int, step: str) -> int:
    if ret == -1:
        raise SetupError(step, ctypes.get_errno())
    return ret


def prctl(option: int, arg: int = 0, step: str = "prctl") -> None:
    check(libc.prctl(option, arg, 0, 0, 0), step)


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {fstype or source} on {target}")


def die_with_parent(alive_fd: int | None = None, parent: int | None = None) -> None:
    """SIGKILL when the parent exits. The parent may already be gone when this runs: then the
    pipe whose write end only the parent held reads as closed, or getppid() changed."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "prctl(PR_SET_PDEATHSIG)")
    if parent is not None and os.getppid() != parent:
        os._exit(1)
    if alive_fd is not None:
        ready, _, _ = select.select([alive_fd], [], [], 0)
        if ready:  # EOF: the parent is gone
            os._exit(1)


# ---------------------------------------------------------------------------------------------
# the monitor (host namespaces)


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
        except SetupError as e:
            report({"setup_error": str(e), "step": e.step, "errno": e.err})
        except BaseException as e:  # noqa: BLE001 - the report is the only way out
            report({"setup_error": f"keeper: {type(e).__name__}: {e}", "step": "keeper", "errno": 0})
        os._exit(code)
    os.close(to_keeper_r)
    os.close(from_keeper_w)
    os.close(1)  # the results pipe belongs to the runner
    try:
        if os.read(from_keeper_r, 1) == b"u":
            write_id_maps(keeper_pid)
            os.write(to_keeper_w, b"g")
    except SetupError as e:
        report({"setup_error": str(e), "step": e.step, "errno": e.err})
    except OSError:
        pass
    os.close(to_keeper_w)
    os.waitpid(keeper_pid, 0)
    os._exit(0)


def write_id_maps(pid: int) -> None:
    """Root maps itself (to set the sandbox up) and 'nobody' (to run the program as); a normal
    user may map only its own ids, onto 0 inside."""
    uid, gid = os.geteuid(), os.getegid()
    if uid == 0:
        maps = {"uid_map": f"0 0 1\n{SANDBOX_UID} {SANDBOX_UID} 1\n", "gid_map": f"0 0 1\n{SANDBOX_UID} {SANDBOX_UID} 1\n"}
    else:
        write_proc(pid, "setgroups", "deny")
        maps = {"uid_map": f"0 {uid} 1\n", "gid_map": f"0 {gid} 1\n"}
    for name, text in maps.items():
        write_proc(pid, name, text)


def write_proc(pid: int, name: str, text: str) -> None:
    try:
        fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
    except OSError as e:
        raise SetupError(f"write /proc/<pid>/{name}", e.errno or 0) from None


# ---------------------------------------------------------------------------------------------
# the keeper (new namespaces, host pid namespace): unshare, then hold the wall clock over init


def keeper(job: dict, from_monitor: int, to_monitor: int) -> None:
    die_with_parent(alive_fd=from_monitor)
    flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP
    check(libc.unshare(flags), "unshare(user, mount, pid, net, ipc, uts, cgroup namespaces)")
    os.write(to_monitor, b"u")
    if os.read(from_monitor, 1) != b"g":
        raise SetupError("uid/gid maps", detail="the monitor could not write them")
    os.close(to_monitor)
    init_alive_r, init_alive_w = os.pipe()
    init_pid = os.fork()
    if init_pid == 0:
        os.close(init_alive_w)
        try:
            init(job, init_alive_r)
        except SetupError as e:
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
        raise SetupError("pidfd_open (Linux 5.3 or later)", getattr(e, "errno", 0) or 0) from None
    remaining = job["limits"]["wall_s"] - (time.time() - job["started"])
    ended, _, _ = select.select([pidfd], [], [], max(remaining, 0.0))
    os.close(pidfd)
    if not ended:
        os.kill(pid, signal.SIGKILL)
        os.wait4(pid, 0)
        return None
    return os.wait4(pid, 0)


# ---------------------------------------------------------------------------------------------
# init: pid 1 of the new pid namespace


def init(job: dict, keeper_alive: int) -> None:
    die_with_parent(alive_fd=keeper_alive)
    os.umask(0o022)  # the directories of the new root must be traversable by the program's uid
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as pid 1, a signal without a handler is ignored
    build_root(job["limits"])
    _socket.sethostname("sandbox")
    try:
        with open("/proc/sys/user/max_user_namespaces", "w") as fh:
            # no nested user namespace: it would hand the program capabilities over a fresh one
            fh.write("0")
    except OSError as e:
        raise SetupError("write /proc/sys/user/max_user_namespaces", e.errno or 0) from None
    prctl(PR_SET_DUMPABLE, 0, "prctl(PR_SET_DUMPABLE)")
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
        return {**rec, "end": "signal", "signal": SIGNAL_NAMES.get(sig, f"signal {sig}")}
    return {**rec, "end": "exit", "code": os.WEXITSTATUS(status)}


# ---------------------------------------------------------------------------------------------
# the root file system


def build_root(limits: dict) -> None:
    """A tmpfs root holding read-only binds of the system directories and of the interpreter's
    prefix (at its own path, so its rpath and sys.prefix still hold), a minimal /dev, a fresh
    /proc and size-limited /tmp and /dev/shm. Nothing else of the host is visible: no /home,
    no /root beyond the interpreter's prefix, no /work, no /run (sockets), no /sys."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    # The tmpfs goes on /tmp only to become the root: after pivot_root the host's tree is under
    # /oldroot, its /tmp uncovered again, and every bind source is read from there.
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=4096,mode=755")
    os.mkdir("/tmp/oldroot")
    os.chdir("/tmp")
    machine = os.uname().machine
    if machine not in SYS_PIVOT_ROOT:
        raise SetupError("pivot_root", detail=f"its system call number on {machine} is not known here")
    check(libc.syscall(SYS_PIVOT_ROOT[machine], b".", b"oldroot"), "pivot_root")
    os.chdir("/")
    old = "/oldroot"
    bound: list[str] = []
    for path in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache"):
        if os.path.islink(old + path):
            make_parents(path)
            os.symlink(os.readlink(old + path), path)
        elif os.path.exists(old + path):
            bind_ro(old + path, path)
            bound.append(path)
    for path in interpreter_paths():
        if not any(path == b or path.startswith(b + "/") for b in bound):
            bind_ro(old + path, path)
            bound.append(path)
    os.makedirs("/dev/shm", mode=0o755)
    for dev in ("null", "zero", "full", "random", "urandom"):
        open(f"/dev/{dev}", "w").close()
        mount(f"{old}/dev/{dev}", f"/dev/{dev}", None, MS_BIND)
        mount(None, f"/dev/{dev}", None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NOEXEC | kept_flags(f"/dev/{dev}"))
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"/dev/{name}")
    os.mkdir("/proc")
    os.mkdir("/tmp")
    # before the old root goes: in a user namespace the kernel mounts a proc only while another
    # one is fully visible
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    tmpfs = f"size={limits['tmpfs_mb']}m,nr_inodes={limits['tmpfs_files']},mode=1777"
    for d in ("/tmp", "/dev/shm"):
        mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, tmpfs)
    check(libc.umount2(old.encode(), MNT_DETACH), "umount the old root")
    os.rmdir(old)
    mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def interpreter_paths() -> list[str]:
    """Where the interpreter's files are: its prefix(es), and its binary's directory if apart."""
    paths: list[str] = []
    for path in (sys.base_prefix, sys.base_exec_prefix, os.path.dirname(os.path.realpath(sys.executable))):
        path = os.path.realpath(path)
        if not any(path == p or path.startswith(p + "/") for p in paths):
            paths.append(path)
    return paths


def make_parents(path: str) -> None:
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)


def bind_ro(source: str, target: str) -> None:
    if os.path.isdir(source):
        os.makedirs(target, mode=0o755, exist_ok=True)
    else:
        make_parents(target)
        open(target, "w").close()
    mount(source, target, None, MS_BIND | MS_REC)
    # every mount under the bind (a recursive bind copies submounts) becomes read-only; a
    # remount must keep the flags the kernel locked from the host's mount (nosuid, atime...)
    for point in mounts_under(target):
        mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | kept_flags(point))


def mounts_under(target: str) -> list[str]:
    points = []
    with open("/oldroot/proc/self/mountinfo") as fh:
        for line in fh:
            point = line.split()[4].replace("\\040", " ")
            if point == target or point.startswith(target + "/"):
                points.append(point)
    return sorted(set(points), key=len)


def kept_flags(path: str) -> int:
    f = os.statvfs(path).f_flag
    flags = MS_NOEXEC if f & os.ST_NOEXEC else 0
    if f & os.ST_NOATIME:
        flags |= MS_NOATIME
    elif f & os.ST_RELATIME:
        flags |= MS_RELATIME
    else:
        flags |= MS_STRICTATIME
    if f & os.ST_NODIRATIME:
        flags |= MS_NODIRATIME
    return flags


# ---------------------------------------------------------------------------------------------
# the runner: limits, privileges, then the program


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
        set_limits(job["limits"], sandboxed=sandboxed)
        if sandboxed:
            drop_privileges()
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # changing uid cleared it
            os.chdir("/tmp")
        os.umask(0o077)
    except SetupError as e:
        send(3, {"kind": "setup_error", "error": str(e)})
        os._exit(3)
    os._exit(run_job(job, 3))


def set_limits(limits: dict, *, sandboxed: bool) -> None:
    cpu = max(1, int(-(-limits["cpu_s"] // 1)))
    mem = limits["memory_mb"] << 20
    fsize = limits["file_size_mb"] << 20
    table = [(resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_AS, mem, mem), (resource.RLIMIT_FSIZE, fsize, fsize),
             (resource.RLIMIT_NOFILE, limits["open_files"], limits["open_files"]), (resource.RLIMIT_CORE, 0, 0),
             (resource.RLIMIT_MEMLOCK, 0, 0), (resource.RLIMIT_MSGQUEUE, 0, 0)]
    if sandboxed:
        # counted per (user namespace, uid): this sandbox's processes and threads alone. For a
        # normal user the keeper and init share the program's uid there: two more.
        nproc = limits["processes"] + (0 if sandbox_uid_mapped() else 2)
        table.append((resource.RLIMIT_NPROC, nproc, nproc))
    for which, soft, hard in table:
        try:
            resource.setrlimit(which, (soft, hard))
        except (OSError, ValueError) as e:
            raise SetupError(f"setrlimit({which})", getattr(e, "errno", 0) or 0) from None


class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_privileges() -> None:
    """Root (of the host, mapped into this user namespace): become 'nobody'. A normal user
    stays the one uid it maps, with no capabilities. Either way: no bounding set, no ambient
    capabilities, no_new_privs, so no exec can give any back."""
    prctl(PR_SET_SECUREBITS, SECUREBITS, "prctl(PR_SET_SECUREBITS)")
    with open("/proc/sys/kernel/cap_last_cap") as fh:
        last = int(fh.read())
    for cap in range(last + 1):
        prctl(PR_CAPBSET_DROP, cap, "prctl(PR_CAPBSET_DROP)")
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, "prctl(PR_CAP_AMBIENT_CLEAR_ALL)")
    if sandbox_uid_mapped():
        try:
            os.setgroups([])
            os.setresgid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)
            os.setresuid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)
        except OSError as e:
            raise SetupError("drop to uid/gid 65534", e.errno or 0) from None
    header, data = CapHeader(LINUX_CAPABILITY_VERSION_3, 0), (CapData * 2)()
    check(libc.capset(ctypes.byref(header), data), "capset (drop every capability)")
    prctl(PR_SET_NO_NEW_PRIVS, 1, "prctl(PR_SET_NO_NEW_PRIVS)")
    status = proc_status()
    if any(int(status[k], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")) or status["NoNewPrivs"] != "1":
        raise SetupError("verify dropped privileges", detail=f"still holding: {status}")


def sandbox_uid_mapped() -> bool:
    with open("/proc/self/uid_map") as fh:
        return any(line.split()[0] == str(SANDBOX_UID) for line in fh)


def proc_status() -> dict[str, str]:
    with open("/proc/self/status") as fh:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in fh)}


# ---------------------------------------------------------------------------------------------
# the program and its examples


class CappedText:
    """A text stream that keeps the first ``cap`` characters and counts the rest."""

    encoding, errors = "utf-8", "strict"

    def __init__(self, cap: int):
        self.cap, self.parts, self.kept, self.dropped = cap, [], 0, 0

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        room = self.cap - self.kept
        if room > 0:
            self.parts.append(s[:room])
            self.kept += min(room, len(s))
        self.dropped += max(0, len(s) - max(room, 0))
        return len(s)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def getvalue(self) -> str:
        text = "".join(self.parts)
        return text + (f"...[+{self.dropped} chars]" if self.dropped else "")


def capped(text: str, cap: int) -> str:
    return text if len(text) <= cap else text[:cap] + f"...[+{len(text) - cap} chars]"


def safe_repr(value, cap: int) -> str:
    try:
        text = repr(value)
    except BaseException as e:  # noqa: BLE001 - a candidate's __repr__ may raise anything
        return f"<repr raised {type(e).__name__}>"
    return capped(text, cap)


def error_fields(e: BaseException, cap: int) -> dict:
    try:
        msg = str(e)
    except BaseException:  # noqa: BLE001
        msg = ""
    return {"error_type": type(e).__name__, "error": capped(msg, cap)}


def doctest_match(want: str, got: str, flags: list[str]) -> bool:
    """doctest's comparison: exact, or with <BLANKLINE> for empty lines, True/False for 1/0,
    and the ELLIPSIS and NORMALIZE_WHITESPACE option flags when asked."""
    if got == want or {got, want} in ({"True\n", "1\n"}, {"False\n", "0\n"}):
        return True
    import re

    want = re.sub(r"(?m)^<BLANKLINE>\s*?$", "", want)
    got = re.sub(r"(?m)^[^\S\n]+$", "", got)
    if "NORMALIZE_WHITESPACE" in flags:
        want, got = " ".join(want.split()), " ".join(got.split())
    if got == want:
        return True
    if "ELLIPSIS" in flags:
        pattern = ".*".join(re.escape(part) for part in want.split("..."))
        return re.fullmatch(pattern, got, re.DOTALL) is not None
    return False


def run_job(job: dict, out: int) -> int:
    limits = job["limits"]
    cap, out_cap = limits["value_chars"], limits["stdout_chars"]
    emit = lambda rec: send(out, rec)  # noqa: E731
    if job.get("probe"):
        emit({"kind": "probe", **probe()})
    namespace = {"__name__": "candidate", "__builtins__": __builtins__}
    real_stdout, real_displayhook = sys.stdout, sys.displayhook
    phases = [("program", job["source"])] + ([("setup", job["setup"])] if job.get("setup") else [])
    for phase, code in phases:
        captured = CappedText(out_cap)
        sys.stdout = captured
        try:
            exec(compile(code, f"<{phase}>", "exec"), namespace)
            rec = {"kind": phase, "status": "ok"}
        except BaseException as e:  # noqa: BLE001 - SystemExit and KeyboardInterrupt are behaviour too
            rec = {"kind": phase, "status": "error", **error_fields(e, cap)}
        finally:
            sys.stdout = real_stdout
        emit({**rec, "stdout": captured.getvalue()})
        if rec["status"] != "ok":
            return 0
    for i, ex in enumerate(job["examples"]):
        captured = CappedText(out_cap)
        sys.stdout = captured
        rec: dict = {"kind": "example", "index": i}
        try:
            rec.update(run_example(ex, namespace, cap))
        except BaseException as e:  # noqa: BLE001
            rec.update(status="error", **error_fields(e, cap))
        finally:
            sys.stdout, sys.displayhook = real_stdout, real_displayhook
        got = captured.getvalue()
        if "want" in ex and rec["status"] == "ran":
            rec["status"] = "pass" if doctest_match(ex["want"], got, ex.get("flags", [])) else "fail"
        elif "want" in ex and ex["want"].startswith("Traceback (most recent call last):"):
            # doctest compares only the exception's last line(s), after the traceback's stack
            lines = ex["want"].splitlines()[1:]
            while lines and (lines[0][:1].isspace() or lines[0].startswith("...")):
                lines.pop(0)
            shown = rec["error_type"] + (f": {rec['error']}" if rec.get("error") else "")
            rec["status"] = "pass" if doctest_match("\n".join(lines) + "\n", shown + "\n", ex.get("flags", [])) else "fail"
        rec["stdout"] = got
        emit(rec)
    return 0


def run_example(ex: dict, namespace: dict, cap: int) -> dict:
    if "stmt" in ex:
        try:
            exec(compile(ex["stmt"], "<example>", "exec"), namespace)
        except AssertionError as e:
            return {"status": "fail", **error_fields(e, cap)}
        return {"status": "pass"}
    if "doctest" in ex:
        exec(compile(ex["doctest"], "<doctest>", "single"), namespace)  # prints values as doctest does
        return {"status": "ran"}
    value = eval(compile(ex["expr"], "<example>", "eval"), namespace)
    rec = {"status": "pass", "value_repr": safe_repr(value, cap)}
    if "expected" in ex:
        expected = eval(compile(ex["expected"], "<expected>", "eval"), namespace)
        if not bool(value == expected):
            rec["status"] = "fail"
    return rec


def probe() -> dict:
    """What the program sees, for check_sandbox(): who it is and what is around it."""
    status = proc_status()
    try:
        with open("/proc/net/dev") as fh:
            interfaces = sorted(line.split(":")[0].strip() for line in fh.readlines()[2:])
    except OSError:
        interfaces = []
    return {"uid": os.getuid(), "caps": status.get("CapEff"), "no_new_privs": status.get("NoNewPrivs"),
            "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()), "interfaces": interfaces,
            "cwd": os.getcwd()}


# ---------------------------------------------------------------------------------------------
# without a sandbox (the caller's explicit, unsafe opt-out): limits and a fresh directory only


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
    sock = _socket.socket(fileno=sock_fd)
    monitors: dict[int, int] = {}  # job id -> pid, until reaped (so a kill never hits a reused pid)
    while True:
        msg, ancdata, _, _ = sock.recvmsg(64, _socket.CMSG_LEN(3 * 4))
        if not msg:
            break
        kind, _, job_id = msg.decode().partition(" ")
        fds = [int.from_bytes(data[i:i + 4], sys.byteorder) for level, typ, data in ancdata
               if level == _socket.SOL_SOCKET and typ == _socket.SCM_RIGHTS for i in range(0, len(data) - 3, 4)]
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
        job = marshal.loads(data)
    except (EOFError, ValueError, TypeError):
        report({"setup_error": "the job could not be read", "step": "job", "errno": 0})
        os._exit(1)
    (monitor if job["sandboxed"] else unsandboxed)(job)


if __name__ == "__main__":
    zygote(int(sys.argv[1]), int(sys.argv[2]))
