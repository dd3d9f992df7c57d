"""The sandbox (bon_sr.sandbox): benign programs give the right results, and hostile ones are
contained. Every hostile run is checked the same way (``contained``): it ended within its limit,
nothing outside the sandbox changed (the test's directory, 0600 file, host /tmp and /dev/shm),
no secret (an environment variable, a 0600 file, another process's command line) appears in
its results, the test's TCP and abstract-socket listeners saw no connection, the test's own
process still lives, no process of the run is left, and the next run succeeds.

A machine that cannot build the sandbox FAILS these tests (the module fixture calls
check_sandbox(), which raises): CI must run them, as root, as `make test` does. The tests run
as root there; ``test_unprivileged_user`` runs the same checks as uid 65534.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

import bon_sr.errors
import bon_sr.sandbox
from bon_sr.errors import BonSRError, ConfigError
from bon_sr.sandbox import (UNSAFE_ENV, Example, ExampleResult, Limits, Program, RunResult, SandboxUnavailable,
                            check_sandbox, run_programs)
from bon_sr.sandbox import runner as sandbox_runner

SECRET = "bonsr-secret-" + uuid.uuid4().hex
CHILD = str(Path(bon_sr.sandbox.__file__).with_name("child.py"))
#: small limits keep the hostile tests fast; the program's CPU limit is 1 s
LIMITS = Limits(cpu_s=1, wall_s=3, memory_mb=256, file_size_mb=4, tmpfs_mb=8, tmpfs_files=256, processes=32,
                value_chars=300, stdout_chars=1000, output_bytes=64 << 10)
#: a run may take its wall limit, the caller's grace, and some slack for a loaded 2-core machine
SLACK_S = 3.0


def tagged(source: str, tag: str) -> str:
    """The program first names its process ``tag`` (forks inherit it), so the test can find
    any process of it left behind."""
    return f"import ctypes as _c\n_c.CDLL(None).prctl(15, {tag.encode()!r}, 0, 0, 0)\n" + textwrap.dedent(source)


def new_tag() -> str:
    return "bsr" + uuid.uuid4().hex[:10]


def processes_of(tag: str) -> list[str]:
    """Processes named ``tag`` or running this tree's child.py for this process (its last
    argument is the caller's pid: another pytest-xdist worker's sandboxes are not this run's):
    what a run may leave behind."""
    found, mine = [], str(os.getpid())
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            comm = Path(f"/proc/{entry}/comm").read_text().strip()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if comm == tag or (CHILD in cmdline and cmdline.split()[-1:] == [mine]):
            found.append(f"{entry} {comm} {cmdline[:120]}")
    return found


class Host:
    """What a candidate must not reach or change, set up once for the module."""

    def __init__(self, base: Path):
        self.dir = base / "outside"
        self.dir.mkdir()
        self.dir.chmod(0o777)  # writable by anyone: only the sandbox's view keeps the program out
        self.secret_file = base / "secret.txt"
        self.secret_file.write_text(SECRET)
        self.secret_file.chmod(0o600)
        self.tcp = socket.create_server(("0.0.0.0", 0))
        self.tcp.setblocking(False)
        self.port = self.tcp.getsockname()[1]
        self.abstract_name = f"\0bon-sr-test-{uuid.uuid4().hex}"
        self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.unix.bind(self.abstract_name)
        self.unix.listen()
        self.unix.setblocking(False)
        for sock in (self.tcp, self.unix):
            os.set_inheritable(sock.fileno(), True)  # as a careless server's would be
        # a process of the test's with the secret in its command line (`bon-sr serve --api-key KEY`)
        self.sleeper = subprocess.Popen(["sh", "-c", "sleep 600", SECRET], stdin=subprocess.DEVNULL)
        self.host_ip = self._host_ip()

    @staticmethod
    def _host_ip() -> str:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.connect(("10.255.255.255", 1))  # no packet is sent; it picks the outgoing address
                return s.getsockname()[0]
            except OSError:
                return "127.0.0.1"

    def unchanged(self) -> None:
        assert list(self.dir.iterdir()) == [], "the program wrote into the test's directory"
        assert self.secret_file.read_text() == SECRET and stat.S_IMODE(self.secret_file.stat().st_mode) == 0o600
        for sock in (self.tcp, self.unix):
            with pytest.raises(BlockingIOError):
                sock.accept()  # nothing ever connected
        assert self.sleeper.poll() is None, "the test's process was killed"

    def close(self) -> None:
        self.sleeper.kill()
        self.sleeper.wait()
        self.tcp.close()
        self.unix.close()


@pytest.fixture(scope="module", autouse=True)
def sandbox_required():
    """No skip: a machine without user/pid/net/mount namespaces fails here, naming the fix."""
    check_sandbox()


@pytest.fixture(scope="module")
def host():
    base = Path(tempfile.mkdtemp(prefix="bon-sr-host-"))
    old = os.environ.get("BON_SR_TEST_API_KEY")
    os.environ["BON_SR_TEST_API_KEY"] = SECRET
    h = Host(base)
    yield h
    h.close()
    shutil.rmtree(base)
    if old is None:
        os.environ.pop("BON_SR_TEST_API_KEY")
    else:
        os.environ["BON_SR_TEST_API_KEY"] = old


BENIGN = Program("def add(a, b):\n    return a + b\n", (Example(expr="add(2, 3)", expected="5"),
                                                      Example(stmt="assert add(1, 1) == 2")))


def contained(host: Host, source: str, examples: tuple[Example, ...] = (), limits: Limits = LIMITS, *,
              tag: str | None = None) -> RunResult:
    """Run one hostile program and check everything the sandbox promises."""
    tag = tag or new_tag()
    start = time.monotonic()
    [result] = run_programs([Program(tagged(source, tag), examples)], limits=limits)
    elapsed = time.monotonic() - start
    left = processes_of(tag)
    assert left == [], f"processes left after the run: {left}"
    assert elapsed < limits.wall_s + SLACK_S, f"the run took {elapsed:.1f} s (wall limit {limits.wall_s} s)"
    assert result.sandboxed
    assert SECRET not in json.dumps(result.to_dict()), "a secret reached the results"
    assert not Path("/tmp", tag).exists() and not Path("/dev/shm", tag).exists()
    host.unchanged()
    [after] = run_programs([BENIGN], limits=limits)
    assert after.passed, f"the next run failed: {after}"
    return result


def values(result: RunResult) -> list[str | None]:
    return [e.value_repr if e.status == "pass" else e.error_type for e in result.examples]


# ---------------------------------------------------------------------------------------------
# benign programs


def test_results_per_example_kind():
    src = "def f(x):\n    if x < 0:\n        raise ValueError('negative')\n    print('called', x)\n    return x * 2\n"
    examples = (Example(expr="f(2)", expected="4"), Example(expr="f(2)", expected="5"), Example(expr="f(-1)"),
                Example(stmt="assert f(3) == 6"), Example(stmt="assert f(3) == 7, 'wrong'"),
                Example(doctest="f(4)\n", want="called 4\n8\n"), Example(doctest="f(4)\n", want="8\n"),
                Example(doctest="[f(i) for i in range(40)]\n", want="called 0\n...[..., 78]\n", flags=("ELLIPSIS",)),
                Example(expr="f(2.5)"), Example(expr="undefined_name"))
    [r] = run_programs([Program(src, examples)])
    assert r.status == "ok" and r.sandboxed and not r.passed and r.n_passed == 5
    got = [(e.status, e.error_type, e.value_repr, e.stdout) for e in r.examples]
    assert got == [("pass", None, "4", "called 2\n"), ("fail", None, "4", "called 2\n"),
                   ("error", "ValueError", None, ""), ("pass", None, None, "called 3\n"),
                   ("fail", "AssertionError", None, "called 3\n"), ("pass", None, None, "called 4\n8\n"),
                   ("fail", None, None, "called 4\n8\n"), ("pass", None, None, r.examples[7].stdout),
                   ("pass", None, "5.0", "called 2.5\n"), ("error", "NameError", None, "")]
    assert r.examples[2].error == "negative" and r.examples[4].error == "wrong"
    assert r.to_dict()["examples"][0] == {"status": "pass", "value_repr": "4", "stdout": "called 2\n"}
    assert RunResult.from_dict(json.loads(json.dumps(r.to_dict()))) == dataclasses.replace(r, wall_s=round(r.wall_s, 4))


def test_doctest_tracebacks_and_crashes():
    src = "def f(x):\n    if x < 0:\n        raise ValueError('negative')\n    return x\n"
    tb = "Traceback (most recent call last):\n  ...\n"
    [r, crash] = run_programs([
        Program(src, (Example(doctest="f(-1)\n", want=tb + "ValueError: negative\n"),
                      Example(doctest="f(-1)\n", want=tb + "ValueError: other\n"),
                      Example(doctest="f(-1)\n", want="-1\n"))),
        Program("import os\n", (Example(expr="1"), Example(expr="os.abort()"), Example(expr="2")))])
    assert [e.status for e in r.examples] == ["pass", "fail", "error"]
    assert (crash.status, crash.error_type) == ("crashed", "SIGABRT")
    assert values(crash) == ["1", "SIGABRT", "SIGABRT"]


def test_behaviour_groups_alike_programs_and_splits_others():
    examples = (Example(expr="sq(3)"), Example(expr="sq(-2)"))
    same_a = Program("def sq(x):\n    return x * x\n", examples)
    same_b = Program("sq = lambda x: x ** 2\n", examples)
    other = Program("def sq(x):\n    return abs(x) * 3\n", examples)
    broken = Program("def sq(x):\n    return x.nope\n", examples)
    a, b, c, d = run_programs([same_a, same_b, other, broken])
    assert a.behaviour == b.behaviour != c.behaviour
    assert values(a) == ["9", "4"] and values(d) == ["AttributeError", "AttributeError"]
    assert len({a.behaviour, b.behaviour, c.behaviour, d.behaviour}) == 3


def test_set_order_is_fixed_across_runs():
    """PYTHONHASHSEED=0 in every child: a set of strings prints alike in every run and as a
    PYTHONHASHSEED=0 interpreter prints it, so identical programs are not split by set order."""
    src = "def words():\n    return {'pear', 'apple', 'fig', 'kiwi', 'plum', 'lime', 'date'}\n"
    runs = run_programs([Program(src, (Example(expr="words()"), Example(expr="hash('abc')")))] * 4)
    assert len({r.behaviour for r in runs}) == 1
    ref = subprocess.run([sys.executable, "-c", src + "print(repr(words())); print(hash('abc'))"], text=True,
                         capture_output=True, env={"PYTHONHASHSEED": "0"}, check=True).stdout.splitlines()
    assert values(runs[0]) == ref


def test_module_name_stdin_and_cwd():
    src = "if __name__ == '__main__':\n    raise SystemExit('ran as a script')\n"
    examples = (Example(expr="__name__"), Example(expr="input()"), Example(expr="__import__('os').getcwd()"),
                Example(expr="__import__('sys').stdin.read()"), Example(stmt="import confine"),
                Example(stmt="import evaluate"), Example(stmt="import bon_sr"))
    [r] = run_programs([Program(src, examples)])
    assert r.status == "ok"
    assert values(r) == ["'candidate'", "EOFError", "'/tmp'", "''"] + ["ModuleNotFoundError"] * 3, \
        "the sandbox's own modules stay out of the program's reach"


def test_program_and_setup_failures_fill_every_example():
    ex = (Example(expr="1"), Example(stmt="pass"))
    syntax, raises, setup_fails, exits = run_programs([
        Program("def f(:\n", ex), Program("raise KeyError('k')\n", ex),
        Program("x = 1\n", ex, setup="import not_a_module_anywhere"), Program("raise SystemExit(3)\n", ex)])
    assert (syntax.status, syntax.error_type) == ("error", "SyntaxError")
    assert [e.error_type for e in syntax.examples] == ["SyntaxError"] * 2
    assert raises.error_type == "KeyError" and all(e.status == "error" for e in raises.examples)
    assert setup_fails.error_type == "ModuleNotFoundError"
    assert exits.error_type == "SystemExit" and not exits.passed


def test_batch_keeps_order_and_runs_in_parallel():
    # parallel = the programs' run intervals overlap (read from the wall clock inside each
    # sandbox), which holds on a loaded machine where an elapsed-time bound would not
    progs = [Program(f"import time\nT0 = time.time()\ntime.sleep(0.5)\nT1 = time.time()\nN = {i}\n",
                     (Example(expr="N * 10"), Example(expr="(T0, T1)"))) for i in range(6)]
    results = run_programs(progs, max_workers=6)
    assert [values(r)[0] for r in results] == [str(i * 10) for i in range(6)]
    spans = sorted(ast.literal_eval(values(r)[1]) for r in results)
    assert any(nxt[0] < cur[1] for cur, nxt in zip(spans, spans[1:])), f"no two programs overlapped: {spans}"
    assert run_programs([]) == []


def test_value_and_output_caps():
    limits = Limits(value_chars=50, stdout_chars=20)
    [r] = run_programs([Program("s = 'x' * 1000\nprint('y' * 500)\n",
                                (Example(expr="s"), Example(expr="print('z' * 100)")))], limits=limits)
    assert r.examples[0].value_repr == "'" + "x" * 49 + "...[+952 chars]"
    assert r.examples[1].stdout == "z" * 20 + "...[+81 chars]"


def test_invalid_inputs_say_what_to_change():
    with pytest.raises(ConfigError, match="exactly one of expr=, stmt=, doctest="):
        Example(expr="1", stmt="pass")
    with pytest.raises(ConfigError, match="give expr= as well"):
        Example(stmt="pass", expected="1")
    with pytest.raises(ConfigError, match="come together"):
        Example(doctest="1\n")
    with pytest.raises(ConfigError, match="doctest option flags"):
        Example(doctest="1\n", want="1\n", flags=("SKIP",))
    with pytest.raises(ConfigError, match="Unknown Example field"):
        Example.from_dict({"expr": "1", "expect": "1"})
    assert Example.from_dict({"doctest": "1\n", "want": "1\n", "flags": ["ELLIPSIS"]}).flags == ("ELLIPSIS",)
    with pytest.raises(ConfigError, match="tuple of Example"):
        Program("x = 1", [Example(expr="x")])
    with pytest.raises(ConfigError, match="cpu_s must be a positive number"):
        Limits(cpu_s=0)
    with pytest.raises(ConfigError, match="memory_mb is a whole number"):
        Limits(memory_mb=100.5)
    with pytest.raises(ConfigError, match="max_workers"):
        run_programs([BENIGN], max_workers=0)
    with pytest.raises(ConfigError, match="list of Program"):
        run_programs(["print(1)"])


def test_public_surface():
    assert bon_sr.sandbox.__all__ == sorted(bon_sr.sandbox.__all__)
    assert issubclass(SandboxUnavailable, BonSRError)
    assert ExampleResult("pass").to_dict() == {"status": "pass"}


# ---------------------------------------------------------------------------------------------
# the opt-out and the refusal


def test_refusal_names_the_fix_and_the_opt_out(monkeypatch):
    reads = {"/proc/sys/kernel/apparmor_restrict_unprivileged_userns": "1", "/proc/sys/user/max_user_namespaces": "0"}
    monkeypatch.setattr(sandbox_runner, "read_setting", reads.get)
    monkeypatch.setattr(sandbox_runner.os, "geteuid", lambda: 1000)
    text = sandbox_runner.explain_refusal("unshare(user, ...)", 1, "unshare: Operation not permitted")
    assert "kernel.apparmor_restrict_unprivileged_userns=0" in text and "user.max_user_namespaces" in text
    assert UNSAFE_ENV + "=1" in text and "allow_unsandboxed=True" in text


def test_no_namespaces_fails_with_the_reason(tmp_path):
    """A real refusal: inside a user namespace that allows no nested one, check_sandbox raises,
    naming the limit and the opt-out."""
    code = ("from bon_sr.sandbox import check_sandbox, SandboxUnavailable\n"
            "try:\n    check_sandbox()\nexcept SandboxUnavailable as e:\n    print(e)\nelse:\n    print('NO ERROR')\n")
    stage = standalone_package(tmp_path)
    out = subprocess.run(["unshare", "--user", "--map-root-user", "sh", "-c",
                          'echo 0 > /proc/sys/user/max_user_namespaces && exec "$0" -c "$1"',
                          os.path.realpath(sys.executable), code],
                         env={"PYTHONPATH": str(stage), "PATH": os.environ["PATH"]}, cwd=stage, capture_output=True, text=True,
                         timeout=60)
    assert "unshare(user, mount, pid, net, ipc, uts, cgroup namespaces)" in out.stdout, out.stdout + out.stderr
    assert "user.max_user_namespaces" in out.stdout and UNSAFE_ENV in out.stdout


def test_opt_out_runs_unsandboxed_only_where_no_sandbox(monkeypatch, caplog):
    def unavailable():
        raise SandboxUnavailable("no namespaces here")

    monkeypatch.setattr(sandbox_runner, "check_sandbox", unavailable)
    monkeypatch.setattr(sandbox_runner, "warned_unsandboxed", False)
    workdirs = set(Path(tempfile.gettempdir()).glob("bon-sr-unsandboxed-*"))
    monkeypatch.delenv(UNSAFE_ENV, raising=False)
    with pytest.raises(SandboxUnavailable, match="no namespaces here"):
        run_programs([BENIGN])
    [r] = run_programs([BENIGN], allow_unsandboxed=True)
    assert r.passed and not r.sandboxed
    assert "WITHOUT A SANDBOX" in caplog.text
    monkeypatch.setenv(UNSAFE_ENV, "1")
    [slow] = run_programs([Program("while True:\n    pass\n", (Example(expr="1"),))], limits=Limits(cpu_s=1, wall_s=2))
    assert slow.status == "timeout" and not slow.sandboxed
    assert set(Path(tempfile.gettempdir()).glob("bon-sr-unsandboxed-*")) == workdirs, "a fresh directory was left"
    monkeypatch.undo()
    [r] = run_programs([BENIGN], allow_unsandboxed=True)
    assert r.sandboxed, "where a sandbox works the opt-out must not bypass it"


# ---------------------------------------------------------------------------------------------
# hostile programs


def test_infinite_loop(host):
    r = contained(host, "while True:\n    pass\n", (Example(expr="1"),))
    # the CPU limit stops it, or the wall limit first when the machine is busy
    assert r.status == "timeout" and r.error_type == "Timeout" and ("CPU" in r.error or "wall" in r.error)
    spin = "def f():\n    while True:\n        pass\n"
    r = contained(host, spin, (Example(expr="1 + 1"), Example(expr="f()"), Example(expr="2")))
    assert values(r) == ["2", "Timeout", "Timeout"], "examples before the loop keep their results"
    r = contained(host, "import time\ntime.sleep(60)\n", (Example(expr="1"),))
    assert r.status == "timeout" and "wall" in r.error


@pytest.mark.parametrize("ends", ["exits", "times out"])
def test_forked_sleepers_all_die(host, ends):
    src = f"""
    import os, time
    def spawn(n):
        made = 0
        for i in range(n):
            pid = os.fork()
            if pid == 0:
                if i % 3 == 0:
                    os.setsid()
                    if os.fork():
                        os._exit(0)
                time.sleep(600)
                os._exit(0)
            made += 1
        time.sleep(0.3)
        {'' if ends == 'exits' else 'time.sleep(600)'}
        return made
    """
    limits = Limits(cpu_s=2, wall_s=4, memory_mb=256, processes=400)
    r = contained(host, src, (Example(expr="spawn(200)"),), limits)
    assert values(r) == (["200"] if ends == "exits" else ["Timeout"])


def test_process_limit_binds(host):
    src = """
    import os, time
    def spawn(n):
        made = 0
        for i in range(n):
            try:
                pid = os.fork()
            except BlockingIOError:
                return ('limited', made)
            if pid == 0:
                time.sleep(600)
                os._exit(0)
            made += 1
        return ('unlimited', made)
    """
    limits = Limits(cpu_s=1, wall_s=3, memory_mb=256, processes=8)
    r = contained(host, src, (Example(expr="spawn(50)"),), limits)
    assert r.examples[0].value_repr == "('limited', 7)", "the runner plus 7 children make 8 processes"


def test_memory(host):
    src = """
    def grow():
        chunks = []
        while True:
            chunks.append(bytearray(64 << 20))
    """
    r = contained(host, src, (Example(expr="bytearray(4 << 30)"), Example(expr="grow()"), Example(expr="'still here'")))
    assert values(r) == ["MemoryError", "MemoryError", "'still here'"]


def test_files(host):
    tag = new_tag()
    src = """
    import os
    def big(path):
        with open(path, 'wb') as fh:
            for _ in range(2048):  # 2 GB in 1 MB writes
                fh.write(b'x' * (1 << 20))
    def many(path):
        os.makedirs(path, exist_ok=True)
        for i in range(100000):
            with open(f'{path}/{i}', 'w') as fh:
                fh.write('x')
    """
    examples = (Example(expr=f"big('/tmp/{tag}')"), Example(expr="os.path.getsize(" + repr(f"/tmp/{tag}") + ")"),
                Example(expr="big('/dev/shm/big')"), Example(expr=f"many('/tmp/{tag}-many')"),
                Example(expr="len(os.listdir(" + repr(f"/tmp/{tag}-many") + "))"))
    r = contained(host, src, examples, tag=tag)
    assert r.status == "ok"
    assert [e.error_type for e in r.examples] == ["OSError", None, "OSError", "OSError", None]
    assert "File too large" in r.examples[0].error and "No space left" in r.examples[3].error
    assert r.examples[1].value_repr == str(4 << 20), "the file stopped at the 4 MB file-size limit"
    assert 0 < int(r.examples[4].value_repr) < LIMITS.tmpfs_files
    assert not list(Path("/tmp").glob(f"{tag}*"))


def test_writes_outside_fail(host):
    tag = new_tag()
    prefix = os.path.realpath(sys.base_prefix)
    targets = [str(host.dir), "/", "/usr", "/usr/lib", prefix, "/etc", "/root", "/dev", "/proc", "/tmp", "/dev/shm"]
    src = f"""
    import os
    def write(d):
        path = os.path.join(d, {tag!r})
        try:
            with open(path, 'w') as fh:
                fh.write('x')
        except OSError as e:
            return type(e).__name__
        return 'wrote'
    """
    r = contained(host, src, tuple(Example(expr=f"write({d!r})") for d in targets), tag=tag)
    got = dict(zip(targets, values(r)))
    assert got.pop("/tmp") == "'wrote'" and got.pop("/dev/shm") == "'wrote'", "its own tmpfs are writable"
    assert all(v in ("'FileNotFoundError'", "'PermissionError'", "'OSError'") for v in got.values()), got
    for d in targets:
        assert not os.path.exists(os.path.join(d, tag)), f"{d}/{tag} exists on the host"


def test_secret_file_and_environment_unreadable(host):
    world_dir = Path(tempfile.mkdtemp(prefix="bon-sr-readable-"))
    world_dir.chmod(0o755)
    try:
        other = world_dir / "key"
        other.write_text(SECRET)
        other.chmod(0o600)
        src = """
        import os
        def read(path):
            try:
                return open(path).read()
            except OSError as e:
                return type(e).__name__
        def proc_environ():
            out = []
            for p in os.listdir('/proc'):
                if p.isdigit() or p == 'self':
                    out.append(read(f'/proc/{p}/environ'))
            return out
        """
        examples = (Example(expr=f"read({str(host.secret_file)!r})"), Example(expr=f"read({str(other)!r})"),
                    Example(expr="dict(os.environ)"), Example(expr="proc_environ()"))
        r = contained(host, src, examples)
        assert values(r)[:2] == ["'FileNotFoundError'"] * 2
        assert eval(r.examples[2].value_repr) == sandbox_runner.CHILD_ENV
    finally:
        shutil.rmtree(world_dir)


def test_other_processes_invisible(host):
    src = """
    import os
    def cmdlines():
        out = {}
        for p in os.listdir('/proc'):
            if p.isdigit():
                try:
                    out[int(p)] = open(f'/proc/{p}/cmdline', 'rb').read().decode(errors='replace')
                except OSError as e:
                    out[int(p)] = type(e).__name__
        return out
    """
    r = contained(host, src, (Example(expr="sorted(cmdlines())"), Example(expr="cmdlines()")))
    assert r.examples[0].value_repr == "[1, 2]", "only its init and itself"
    assert "sleep 600" not in r.examples[1].value_repr


def test_network_unreachable(host):
    src = f"""
    import socket
    def tcp(addr):
        family = socket.AF_INET6 if ':' in addr else socket.AF_INET
        try:
            with socket.socket(family) as s:
                s.settimeout(1)
                s.connect((addr, {host.port}))
        except OSError as e:
            return type(e).__name__
        return 'connected'
    def unix():
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect({host.abstract_name!r})
        except OSError as e:
            return type(e).__name__
        return 'connected'
    def interfaces():
        return sorted(name for _, name in socket.if_nameindex())
    """
    addrs = ["127.0.0.1", "::1", host.host_ip, "8.8.8.8"]
    r = contained(host, src, tuple(Example(expr=f"tcp({a!r})") for a in addrs)
                  + (Example(expr="unix()"), Example(expr="interfaces()")))
    assert all(v != "'connected'" for v in values(r)), values(r)
    assert values(r)[-1] == "['lo']"


def test_signals_reach_no_host_process(host):
    src = """
    import os, signal
    def kill(pid, sig=signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except OSError as e:
            return type(e).__name__
        return 'sent'
    """
    examples = (Example(expr=f"kill({host.sleeper.pid})"), Example(expr=f"kill({os.getpid()})"),
                Example(expr=f"kill(-{os.getpgrp()})"), Example(expr="kill(1)"), Example(expr="kill(-1)"))
    r = contained(host, src, examples)
    assert values(r)[:3] == ["'ProcessLookupError'"] * 3
    assert values(r)[3] == "'PermissionError'", "its init is not its to signal"
    assert host.sleeper.poll() is None


def test_stdout_flood(host):
    src = """
    import os, sys
    def prints():
        while True:
            print('x' * 1000)
    """
    r = contained(host, src, (Example(expr="sys.stdout.write('y' * 10**7)"), Example(expr="os.write(1, b'z' * 10**6)"),
                              Example(expr="os.write(2, b'w' * 10**6)"), Example(expr="prints()")))
    assert r.status == "timeout"
    first = r.examples[0]
    assert first.status == "pass" and first.stdout.startswith("y" * LIMITS.stdout_chars) and len(first.stdout) < 1100
    assert values(r)[1:3] == ["1000000", "1000000"], "fd 1 and 2 are /dev/null"
    # the results channel itself: a program that writes past the output limit is stopped
    r = contained(host, "import os\nwhile True:\n    os.write(3, b'{}\\n' * 4096)\n", (Example(expr="1"),))
    assert r.status == "output_limit" and r.error_type == "OutputLimit"


def test_no_inherited_descriptors_no_privileges(host):
    src = """
    import ctypes, os
    libc = ctypes.CDLL(None, use_errno=True)
    def status():
        fields = dict(line.split(':', 1) for line in open('/proc/self/status'))
        return {k: fields[k].strip() for k in ('Uid', 'Gid', 'CapEff', 'CapPrm', 'CapBnd', 'NoNewPrivs')}
    def call(ret):
        return 'ok' if ret == 0 else os.strerror(ctypes.get_errno())
    """
    examples = (Example(expr="sorted(os.listdir('/proc/self/fd'))"), Example(expr="status()"),
                Example(expr="call(libc.unshare(0x10000000))"), Example(expr="call(libc.setuid(0))"),
                Example(expr="call(libc.mount(b'none', b'/tmp', b'tmpfs', 0, None))"))
    r = contained(host, src, examples)
    assert eval(r.examples[0].value_repr) == ["0", "1", "2", "3", "4"], "0-2 /dev/null, 3 results, 4 the listing"
    status = eval(r.examples[1].value_repr)
    uid = "65534" if os.geteuid() == 0 else "0"  # a normal user is uid 0 of its namespace, without capabilities
    assert status["Uid"].split() == [uid] * 4 and status["Gid"].split() == [uid] * 4
    assert {status[k] for k in ("CapEff", "CapPrm", "CapBnd")} == {"0000000000000000"} and status["NoNewPrivs"] == "1"
    assert all(v != "'ok'" for v in values(r)[2:]), values(r)


def test_caller_killed_takes_the_sandbox_with_it(tmp_path):
    """The caller dies mid-run (SIGKILL: no cleanup code runs): every process of the sandbox,
    double-forked and setsid sleepers included, dies with it."""
    tag = new_tag()
    src = tagged("""
    import os, time
    for i in range(20):
        if os.fork() == 0:
            if i % 2:
                os.setsid()
                if os.fork():
                    os._exit(0)
            time.sleep(600)
            os._exit(0)
    time.sleep(600)
    """, tag)
    stage = standalone_package(tmp_path)
    code = ("from bon_sr.sandbox import Program, Limits, run_programs\n"
            f"run_programs([Program({src!r})], limits=Limits(cpu_s=30, wall_s=60, processes=64))\n")
    caller = subprocess.Popen([os.path.realpath(sys.executable), "-c", code], env={"PYTHONPATH": str(stage)}, cwd=stage)
    try:
        deadline = time.monotonic() + 20
        while len([p for p in processes_of(tag) if tag in p]) < 21 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len([p for p in processes_of(tag) if tag in p]) >= 21, "the sleepers never started"
    finally:
        caller.kill()
        caller.wait()
    deadline = time.monotonic() + 5
    while processes_of(tag) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_of(tag) == []


def test_caller_kills_past_the_deadline(host, monkeypatch):
    """The caller's last resort, were a sandbox's own wall clock to fail: past the deadline it
    has the zygote kill that sandbox, and returns only once its pid namespace is empty."""
    monkeypatch.setattr(sandbox_runner, "GRACE_S", -1.5)  # the caller's deadline before the keeper's
    src = """
    import os, time
    for i in range(10):
        if os.fork() == 0:
            os.setsid()
            time.sleep(600)
            os._exit(0)
    time.sleep(600)
    """
    r = contained(host, src, (Example(expr="1"),), Limits(cpu_s=1, wall_s=3, memory_mb=256, processes=32))
    assert r.status == "timeout" and "killed by the caller" in r.error


def test_ctrl_c_mid_batch_leaves_nothing(host):
    """Ctrl-C (a real SIGINT to this process) while sandboxes run, after the program forked
    its sleepers: every sandbox of the batch is killed before the KeyboardInterrupt propagates."""
    tag = new_tag()
    src = tagged("""
    import os, time
    for i in range(10):
        if os.fork() == 0:
            os.setsid()
            time.sleep(600)
            os._exit(0)
    time.sleep(600)
    """, tag)
    seen: list[int] = []

    def interrupt_when_forked():
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            seen[:] = [sum(1 for p in processes_of(tag) if p.split(" ")[1] == tag)]
            if seen[0] >= 11:  # the program and its 10 sleepers
                break
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        watcher = threading.Thread(target=interrupt_when_forked, daemon=True)
        watcher.start()
        with pytest.raises(KeyboardInterrupt):
            run_programs([Program(src), BENIGN, BENIGN], limits=Limits(cpu_s=5, wall_s=20, processes=32))
        watcher.join()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert seen and seen[0] >= 11, seen
    assert processes_of(tag) == []
    host.unchanged()
    assert run_programs([BENIGN])[0].passed


# ---------------------------------------------------------------------------------------------
# as a normal user


def standalone_package(dest: Path) -> Path:
    """bon_sr.sandbox and bon_sr.errors under ``dest`` with an empty bon_sr/__init__ (no torch):
    a fast import for a child interpreter, readable by any user."""
    pkg = dest / "pkg" / "bon_sr"
    (pkg / "sandbox").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    shutil.copy(bon_sr.errors.__file__, pkg / "errors.py")
    for f in Path(bon_sr.sandbox.__file__).parent.glob("*.py"):
        shutil.copy(f, pkg / "sandbox" / f.name)
    for path in [dest, *dest.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dest / "pkg"


def hidden_ancestor(path: str) -> str | None:
    """The highest directory above ``path`` that other users cannot enter (/root for a pyenv)."""
    parts = Path(path).parts
    for i in range(2, len(parts)):
        d = Path(*parts[:i])
        if not d.stat().st_mode & stat.S_IXOTH:
            return str(d)
    return None


def test_unprivileged_user():
    """The normal-user path (a user namespace mapping one uid): as root, the test becomes uid
    65534 with the interpreter made reachable in a private mount namespace (as a normal user it
    runs as itself); the sandbox still hides the user's own 0600 file and directory, drops
    every capability, binds the process count, and leaves nothing behind."""
    base = Path(tempfile.mkdtemp(prefix="bon-sr-user-"))
    try:
        base.chmod(0o755)
        stage = standalone_package(base)
        own = base / "own"
        own.mkdir()
        (own / "key").write_text(SECRET)
        user = 65534 if os.geteuid() == 0 else os.geteuid()
        os.chown(own, user, user)
        os.chown(own / "key", user, user)
        (own / "key").chmod(0o600)
        tag = new_tag()
        prog = tagged(f"""
        import os, time
        def read():
            try:
                return open({str(own / 'key')!r}).read()
            except OSError as e:
                return type(e).__name__
        def write():
            try:
                open({str(own / 'new')!r}, 'w').write('x')
            except OSError as e:
                return type(e).__name__
            return 'wrote'
        def spawn(n):
            made = 0
            for i in range(n):
                try:
                    pid = os.fork()
                except BlockingIOError:
                    return made
                if pid == 0:
                    time.sleep(600)
                    os._exit(0)
                made += 1
            return made
        def status():
            fields = dict(line.split(':', 1) for line in open('/proc/self/status'))
            return [fields[k].strip() for k in ('CapEff', 'CapBnd', 'NoNewPrivs')]
        """, tag)
        code = textwrap.dedent(f"""
            import json, os
            from bon_sr.sandbox import Example, Limits, Program, check_sandbox, run_programs
            check_sandbox()
            ex = [Example(expr=e) for e in ("sorted(int(p) for p in os.listdir('/proc') if p.isdigit())", "read()",
                                            "write()", "spawn(50)", "status()")]
            [r] = run_programs([Program({prog!r}, tuple(ex))], limits=Limits(processes=8))
            print(json.dumps({{"uid": os.getuid(), "result": r.to_dict()}}))
        """)
        exe = os.path.realpath(sys.executable)
        prefix = os.path.realpath(sys.base_prefix)
        hide = hidden_ancestor(prefix)
        script = 'set -e\n'
        if os.geteuid() != 0:
            script = 'exec "$@"\n'
        elif hide:  # show the interpreter's prefix, and only it, to the other user
            script += (f'mkdir -p {base}/prefix && mount --bind {prefix} {base}/prefix\n'
                       f'mount -t tmpfs -o mode=755 tmpfs {hide}\nmkdir -p {prefix}\n'
                       f'mount --bind {base}/prefix {prefix}\n')
        if os.geteuid() == 0:
            script += 'exec setpriv --reuid=65534 --regid=65534 --clear-groups -- "$@"\n'
        wrap = ["unshare", "--mount", "--propagation", "private"] if os.geteuid() == 0 else []
        out = subprocess.run([*wrap, "sh", "-c", script, "sh",
                              exe, "-c", code], env={"PYTHONPATH": str(stage), "PATH": os.environ["PATH"],
                                                    "HOME": "/tmp"}, cwd=stage, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr[-3000:]
        rec = json.loads(out.stdout.splitlines()[-1])
        assert rec["uid"] == user
        got = [e.get("value_repr") or e.get("error_type") for e in rec["result"]["examples"]]
        assert got[0] == "[1, 2]"
        assert got[1] == "'FileNotFoundError'" and got[2] == "'FileNotFoundError'"
        assert got[3] == "7", "the runner plus 7 children make 8 processes"
        assert got[4] == str(["0000000000000000", "0000000000000000", "1"])
        assert SECRET not in out.stdout and not (own / "new").exists()
        assert processes_of(tag) == []
    finally:
        shutil.rmtree(base)
