"""A program and its examples, run in the current process: the program's source (then its
set-up code) in a fresh namespace, each example after it, what each printed captured, every
value's repr, error message and output capped; one JSON line per phase and per example.

Standard library only, imported by child.py by file name inside the sandbox (never by bon_sr's
other modules). It knows nothing about namespaces, limits or privileges (confine.py, child.py):
by the time it runs, the process is already contained.
"""

from __future__ import annotations

import json
import os
import sys


def send(fd: int, obj: dict) -> None:
    os.write(fd, (json.dumps(obj) + "\n").encode())


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
    with open("/proc/self/status") as fh:
        status = {k: v.strip() for k, _, v in (line.partition(":") for line in fh)}
    try:
        with open("/proc/net/dev") as fh:
            interfaces = sorted(line.split(":")[0].strip() for line in fh.readlines()[2:])
    except OSError:
        interfaces = []
    return {"uid": os.getuid(), "caps": status.get("CapEff"), "no_new_privs": status.get("NoNewPrivs"),
            "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()), "interfaces": interfaces,
            "cwd": os.getcwd()}
