"""What a sandbox is made of, for child.py: its namespaces and user id maps, its root file
system, its resource limits and the dropping of every privilege. Linux system calls through
ctypes (Python 3.11 has no os.unshare, os.mount or os.pivot_root).

Standard library only, imported by child.py by file name inside the sandbox's own process tree
(never by bon_sr's other modules). It knows nothing about the processes' roles (child.py) nor
about programs and their examples (evaluate.py).
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import socket
import sys

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

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
libc.unshare.argtypes = [ctypes.c_int]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
libc.syscall.restype = ctypes.c_long
#: the namespaces a sandbox gets: user, mount, pid, network, IPC, UTS, cgroup
NAMESPACES = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP


class SetupError(Exception):
    """A step of building the sandbox failed; ``step`` names it, ``err`` is the errno."""

    def __init__(self, step: str, err: int = 0, detail: str = ""):
        self.step, self.err = step, err
        text = detail or (os.strerror(err) if err else "failed")
        super().__init__(f"{step}: {text}" + (f" ({errno.errorcode.get(err, err)})" if err else ""))


def check(ret: int, step: str) -> int:
    if ret == -1:
        raise SetupError(step, ctypes.get_errno())
    return ret


def prctl(option: int, arg: int = 0, step: str = "prctl") -> None:
    check(libc.prctl(option, arg, 0, 0, 0), step)


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {fstype or source} on {target}")


def unshare() -> None:
    """Move the calling process into new namespaces (its next child is pid 1 of the new pid
    namespace); it holds every capability in the new user namespace until the maps are written."""
    check(libc.unshare(NAMESPACES), "unshare(user, mount, pid, net, ipc, uts, cgroup namespaces)")


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


def enter(limits: dict) -> None:
    """In init, before the program: build and enter the root, name the host, and allow no
    nested user namespace (it would hand the program capabilities over a fresh one)."""
    os.umask(0o022)  # the directories of the new root must be traversable by the program's uid
    build_root(limits)
    socket.sethostname("sandbox")
    try:
        with open("/proc/sys/user/max_user_namespaces", "w") as fh:
            fh.write("0")
    except OSError as e:
        raise SetupError("write /proc/sys/user/max_user_namespaces", e.errno or 0) from None


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
