"""Faults and bad input, measured: kill -9 and --resume, fuzzed prompt files, a full disk,
SIGTERM / Ctrl-C during vLLM sampling, and `bon-sr serve` under abuse.

    python benchmarks/faults.py                       # everything (about 30-40 min on 2 cores)
    python benchmarks/faults.py --only kill,fuzz,disk --kills 20
    python benchmarks/faults.py --only serve --requests 500

Kill -9: `bon-sr generate` runs under a launcher that records, in a trace file, when each
phase begins and ends (model load, sampling, scoring, writing a record); each kill picks
a phase and a moment inside it from a seeded RNG, SIGKILLs the process there (a kill
"while writing" writes a random prefix of the record, then kills itself: a torn line),
and then `--resume` finishes the run. Counted: records that were complete before the kill
and are missing or changed afterwards (lost), ids written twice (duplicates), runs whose
final output differs from an uninterrupted run with the same seed (HF backend: exact;
vLLM bf16 sampling on CPU is not bit-stable between runs, so there: the same ids, valid
JSON), and engine processes still alive 15 s after the kill (orphans). The same for
`bon-sr bench` (its cache) and `bon-sr ablate` (its cells).

tests/test_faults.py runs a few of each through the functions here. This script knows
nothing about bon-sr's internals beyond the class names the launcher traces.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("load", "sample", "score", "write")
ORPHAN_WAIT_S = 15.0
#: what vLLM's own output looks like on a terminal (log lines, C++ warnings, loading bars)
NOISE = ("WARNING", "INFO", "(EngineCore", "(Worker", "[W", "Loading safetensors", "Traceback",
         "exited unexpectedly", "force killing")

# Runs `bon-sr` with the traced phases (see the module docstring). Only the HF path is
# traced this way: `python -c` has no main module for vLLM's spawned engine to re-import.
LAUNCHER = r'''
import os, signal, sys, time
trace = os.environ["BON_SR_FAULT_TRACE"]
torn = int(os.environ.get("BON_SR_FAULT_TORN_WRITE", "0"))
cut = float(os.environ.get("BON_SR_FAULT_TORN_AT", "0.5"))
def mark(event):
    with open(trace, "a") as fh:
        fh.write(f"{time.time():.4f} {event}\n")
mark("start")
import json
from bon_sr import api, jsonl, scoring
from bon_sr.samplers import hf
def wrap(cls, name, phase):
    original = getattr(cls, name)
    def traced(self, *args, **kwargs):
        mark(phase + " begin")
        try:
            return original(self, *args, **kwargs)
        finally:
            mark(phase + " end")
    setattr(cls, name, traced)
wrap(api.BestOfN, "__init__", "load")
for name in ("sample", "sample_and_greedy"):
    if hasattr(hf.HFSampler, name):
        wrap(hf.HFSampler, name, "sample")
wrap(scoring.HFScorer, "score", "score")
writes = [0]
original_write = jsonl.JsonlWriter.write
def write(self, record):
    writes[0] += 1
    if writes[0] == torn:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        mark("write begin")
        self._fh.write(data[: max(1, int(len(data) * cut))])
        os.kill(os.getpid(), signal.SIGKILL)
    mark("write begin")
    original_write(self, record)
    mark("write end")
jsonl.JsonlWriter.write = write
from bon_sr.cli import main
sys.argv[0] = "bon-sr"
main()
'''


# -- processes --------------------------------------------------------------------------

def cli_command(args: Sequence[str], *, traced: bool) -> list[str]:
    # `-m bon_sr.cli`: vLLM's spawned engine re-imports it first (die-with-parent is armed there).
    return [sys.executable, "-c", LAUNCHER, *args] if traced else [sys.executable, "-m", "bon_sr.cli", *args]


def base_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
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
        alive = [p for p in alive if _running(p)]
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


def _running(p: Any) -> bool:
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


# -- kill -9 and resume -----------------------------------------------------------------

@dataclass
class KillResult:
    command: str
    target: str          # the phase the kill aimed at
    phase: str           # the phase the trace shows at the kill
    at_s: float          # seconds after start
    before: int          # complete records before the kill
    lost: int
    duplicates: int
    equal: bool | None   # final output == the uninterrupted run's (None: not comparable)
    valid: bool          # every final line is JSON, the ids are the input's
    orphans: list[str] = field(default_factory=list)
    resume_rc: int = 0
    note: str = ""


def _phase_spans(trace: list[tuple[float, str]]) -> dict[str, list[tuple[float, float]]]:
    """phase -> [(begin, end)] in seconds after "start"."""
    t0 = trace[0][0] if trace else 0.0
    spans: dict[str, list[tuple[float, float]]] = {p: [] for p in PHASES}
    open_: dict[str, float] = {}
    for t, event in trace:
        phase, _, edge = event.partition(" ")
        if edge == "begin":
            open_[phase] = t - t0
        elif edge == "end" and phase in open_:
            spans.setdefault(phase, []).append((open_.pop(phase), t - t0))
    return spans


def phase_at(trace: list[tuple[float, str]], t: float) -> str:
    """The innermost phase open at time t (absolute): the last 'begin' without its 'end'."""
    stack: list[str] = []
    for when, event in trace:
        if when > t:
            break
        phase, _, edge = event.partition(" ")
        if edge == "begin":
            stack.append(phase)
        elif edge == "end" and phase in stack:
            stack.remove(phase)
    return stack[-1] if stack else ("load" if not any(e.startswith("load end") for w, e in trace if w <= t)
                                    else "between")


def reference_run(args: Sequence[str], out: Path, trace: Path, env: dict[str, str]) -> tuple[list[dict], dict]:
    """An uninterrupted traced run: its records and phase spans."""
    for p in (out, trace):
        p.unlink(missing_ok=True)
    r = subprocess.run(cli_command([*args, "-o", str(out)], traced=True), capture_output=True, text=True,
                       cwd=ROOT, env={**env, "BON_SR_FAULT_TRACE": str(trace)}, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"reference run failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return complete_records(out), _phase_spans(read_trace(trace))


def kill_generate_once(args: Sequence[str], work: Path, ref: list[dict], spans: dict, rng: random.Random,
                       target: str, env: dict[str, str], index: int, *, exact: bool = True) -> KillResult:
    """One traced `bon-sr generate` (args without -o), SIGKILLed in ``target``, then --resume."""
    out, trace = work / f"kill{index}.jsonl", work / f"kill{index}.trace"
    for p in (out, trace):
        p.unlink(missing_ok=True)
    run_env = {**env, "BON_SR_FAULT_TRACE": str(trace)}
    delay: float | None = None
    occurrence = 1
    if target == "write":
        run_env["BON_SR_FAULT_TORN_WRITE"] = str(rng.randint(1, max(1, len(ref))))
        run_env["BON_SR_FAULT_TORN_AT"] = f"{rng.uniform(0.05, 0.95):.3f}"
    elif target == "load":
        load = spans.get("load") or [(0.0, 5.0)]
        delay = rng.uniform(0.0, load[0][1])           # from the launcher's start (imports, then load)
    else:
        occ = spans.get(target) or []
        occurrence = rng.randint(1, max(1, len(occ)))
        b, e = occ[occurrence - 1] if occ else (0.0, 0.5)
        delay = rng.uniform(0.0, max(e - b, 0.01))     # from the phase's begin
    proc = subprocess.Popen(cli_command([*args, "-o", str(out)], traced=True), cwd=ROOT, env=run_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    start = time.time()
    kids: list[Any] = []
    if delay is not None:
        # Wait for the chosen occurrence of the phase to begin ("start": the launcher's first line).
        event = "start" if target == "load" else f"{target} begin"
        while proc.poll() is None:
            if sum(1 for _, ev in read_trace(trace) if ev == event) >= occurrence:
                break
            time.sleep(0.005)
        time.sleep(delay)
        kids = descendants(proc.pid)
        killed_at = time.time()
        if proc.poll() is None:
            proc.kill()
    err = proc.communicate(timeout=1800)[1]
    if delay is None:
        killed_at = time.time()
    if proc.returncode not in (-signal.SIGKILL,):
        return KillResult("generate", target, "finished", killed_at - start, len(complete_records(out)), 0, 0,
                          None, True, note=f"run ended before the kill (rc {proc.returncode}) {err[-300:]}")
    trace_rows = read_trace(trace)
    phase = phase_at(trace_rows, killed_at) if target != "write" else "write"
    before = complete_records(out)
    orphans = still_alive(kids)
    r = run_cli([*args, "-o", str(out), "--resume"], env=env)
    final = complete_records(out)
    return _judge("generate", target, phase, killed_at - start, before, final, ref, orphans, r, exact)


def _judge(command: str, target: str, phase: str, at: float, before: list[dict], final: list[dict],
           ref: list[dict], orphans: list[str], r: subprocess.CompletedProcess, exact: bool) -> KillResult:
    ids = [str(x.get("id")) for x in final]
    lost = sum(1 for rec in before if rec not in final)
    if not exact:  # vLLM: the records' content may differ from another run; their ids may not
        lost = len({str(x["id"]) for x in before} - set(ids))
    return KillResult(command, target, phase, round(at, 2), len(before), lost, len(ids) - len(set(ids)),
                      (final == ref) if exact else None, ids == [str(x["id"]) for x in ref], orphans,
                      r.returncode, note="" if r.returncode == 0 else r.stderr[-400:])


def kill_generate(args: Sequence[str], work: Path, kills: int, seed: int, *, env: dict[str, str] | None = None,
                  phases: Sequence[str] = PHASES) -> list[KillResult]:
    """``kills`` kill -9 + --resume rounds of `bon-sr generate ARGS` (HF backend: exact)."""
    env = env or base_env()
    work.mkdir(parents=True, exist_ok=True)
    ref, spans = reference_run(args, work / "reference.jsonl", work / "reference.trace", env)
    rng = random.Random(seed)
    return [kill_generate_once(args, work, ref, spans, rng, phases[i % len(phases)], env, i)
            for i in range(kills)]


def kill_vllm_generate(args: Sequence[str], work: Path, kills: int, seed: int, *,
                       env: dict[str, str] | None = None) -> tuple[list[KillResult], float]:
    """kill -9 of `bon-sr generate --backend vllm` at seeded moments, then --resume.
    Returns the results and the reference run's wall time."""
    env = env or base_env(VLLM_LOGGING_LEVEL="INFO")
    work.mkdir(parents=True, exist_ok=True)
    ref_out = work / "vllm-reference.jsonl"
    ref_out.unlink(missing_ok=True)
    t0 = time.time()
    r = run_cli([*args, "-o", str(ref_out)], env=env)
    wall = time.time() - t0
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    ref = complete_records(ref_out)
    rng = random.Random(seed)
    results = []
    for i in range(kills):
        out = work / f"vllm-kill{i}.jsonl"
        out.unlink(missing_ok=True)
        log = out.with_name(out.stem + ".vllm.log")
        log.unlink(missing_ok=True)
        at = rng.uniform(0.1, 0.95) * wall
        proc = subprocess.Popen(cli_command([*args, "-o", str(out)], traced=False), cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(at)
        kids = descendants(proc.pid)
        text = log.read_text(errors="replace") if log.exists() else ""
        ready = "init engine (profile, create kv cache, warmup model) took" in text
        n_before = len(complete_records(out))
        phase = "load" if not ready else ("sample" if n_before == 0 else "write")
        if proc.poll() is not None:
            results.append(KillResult("generate-vllm", "random", "finished", at, n_before, 0, 0, None, True))
            continue
        proc.kill()
        proc.wait()
        before = complete_records(out)
        orphans = still_alive(kids)
        rr = run_cli([*args, "-o", str(out), "--resume"], env=env)
        final = complete_records(out)
        results.append(_judge("generate-vllm", "random", phase, at, before, final, ref, orphans, rr, exact=False))
    return results, wall


def kill_dir_command(command: str, args: Sequence[str], work: Path, kills: int, seed: int,
                     compare: Callable[[Path], Any], *, env: dict[str, str] | None = None) -> list[KillResult]:
    """kill -9 of `bon-sr bench|ablate ARGS -o DIR` at seeded moments, then a rerun: ``compare(DIR)``
    (the cache / the cells and the report) must equal the uninterrupted run's."""
    env = env or base_env()
    ref_dir = work / f"{command}-reference"
    t0 = time.time()
    r = run_cli([command, *args, "-o", str(ref_dir)], env=env)
    wall = time.time() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{command} reference failed:\n{r.stderr[-3000:]}")
    ref = compare(ref_dir)
    rng = random.Random(seed)
    results = []
    for i in range(kills):
        out_dir = work / f"{command}-kill{i}"
        at = rng.uniform(0.05, 0.98) * wall
        proc = subprocess.Popen(cli_command([command, *args, "-o", str(out_dir)], traced=False), cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(at)
        kids = descendants(proc.pid)
        if proc.poll() is not None:
            results.append(KillResult(command, "random", "finished", at, 0, 0, 0, None, True))
            continue
        proc.kill()
        proc.wait()
        before = compare(out_dir) if out_dir.exists() else None
        orphans = still_alive(kids)
        rr = run_cli([command, *args, "-o", str(out_dir)], env=env)
        final = compare(out_dir)
        lost = 0 if before is None else sum(1 for k, v in before.get("items", {}).items()
                                            if final["items"].get(k) != v)
        results.append(KillResult(command, "random", "random", round(at, 2), len((before or {}).get("items", {})),
                                  lost, final.get("duplicates", 0), final == ref, rr.returncode == 0, orphans,
                                  rr.returncode, note="" if rr.returncode == 0 else rr.stderr[-400:]))
    return results


def bench_state(out_dir: Path) -> dict[str, Any]:
    """What a bench run leaves that a rerun must reproduce: the cache by id, the results."""
    cache = sorted((out_dir / "cache").glob("*.jsonl")) if (out_dir / "cache").is_dir() else []
    recs = [r for c in cache for r in complete_records(c)]
    items = {str(r["id"]): r for r in recs}
    reports = sorted(p for p in out_dir.glob("*.json"))
    results = {p.name: json.loads(p.read_text()).get("results") for p in reports} if reports else {}
    return {"items": items, "duplicates": len(recs) - len(items), "results": results}


def ablate_state(out_dir: Path) -> dict[str, Any]:
    """The finished cells by name (unreadable ones count as missing) and the report's cells."""
    items = {}
    for p in sorted((out_dir / "cells").glob("*__L*.json")) if (out_dir / "cells").is_dir() else []:
        try:
            items[p.name] = json.loads(p.read_text())
        except json.JSONDecodeError:
            items[p.name] = "torn"
    report = out_dir / "ablate.json"
    # As JSON text: NaN cells (no mixed problems) compare equal that way.
    cells = json.dumps(json.loads(report.read_text())["cells"]) if report.exists() else None
    return {"items": {k: json.dumps(v) for k, v in items.items()}, "duplicates": 0, "cells": cells}


# -- fuzzed prompt files ----------------------------------------------------------------

@dataclass
class FuzzCase:
    name: str
    path: Path
    valid: bool = False     # a valid file (BOM, CRLF, ...): must read, not fail


def _good_line(rng: random.Random, k: int) -> str:
    words = ["alpha", "beta", "gamma", "delta", "sum", "why", "éclair", "東京", "\u2028sep"]
    if rng.random() < 0.5:
        return json.dumps({"id": f"q{k}", "prompt": " ".join(rng.choice(words) for _ in range(rng.randint(1, 8)))},
                          ensure_ascii=rng.random() < 0.5)
    return json.dumps({"id": k, "messages": [{"role": "user", "content": rng.choice(words)}]})


BAD_VALUES: list[Any] = [None, 3, 2.5, True, [], {}, [1, 2], {"a": {"b": [1]}}, ["x"], [{"role": "user"}],
                         [{"role": "robot", "content": "x"}], [{"role": "user", "content": 5}],
                         [{"role": "assistant", "content": "x"}], "", "   "]


def _mutations(rng: random.Random, lines: list[str]) -> list[tuple[str, bytes]]:
    """(kind, file bytes) for one set of good lines: each mutation makes exactly one line bad."""
    k = rng.randrange(len(lines))
    good = [x.encode() for x in lines]

    def with_line(bad: bytes) -> bytes:
        return b"\n".join(good[:k] + [bad] + good[k + 1:]) + b"\n"

    line = good[k]
    cut = rng.randint(1, max(1, len(line) - 1))
    out = [
        ("truncated-json", with_line(line[:cut])),
        ("invalid-utf8", with_line(line[:cut] + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80"])
                                   + line[cut:])),
        ("nul-byte", with_line(line[:cut] + b"\x00" + line[cut:])),
        ("wrong-type-prompt", with_line(json.dumps({"id": f"x{k}", "prompt": rng.choice(BAD_VALUES)}).encode())),
        ("wrong-type-messages", with_line(json.dumps({"id": f"x{k}",
                                                      "messages": rng.choice(BAD_VALUES[:8] + BAD_VALUES[9:13])})
                                          .encode())),
        ("wrong-type-id", with_line(json.dumps({"id": rng.choice([None, 1.5, [1], {"a": 1}, True]),
                                                "prompt": "x"}).encode())),
        ("not-an-object", with_line(json.dumps(rng.choice([[1, 2], "text", 7, None])).encode())),
        ("nested-deep", with_line(b"[" * rng.choice([50, 5000, 200000]) + b"]" * 3)),
        ("huge-number", with_line(b'{"id": ' + b"9" * 6000 + b', "prompt": "x"}')),
        ("both-fields", with_line(json.dumps({"id": "b", "prompt": "x", "messages": []}).encode())),
        ("missing-prompt", with_line(json.dumps({"id": "m", "text": "x"}).encode())),
        ("duplicate-id", b"\n".join(good + [good[k]]) + b"\n"),
        ("candidates-in-generate", with_line(json.dumps({"id": "c", "prompt": "x", "candidates": ["a"]}).encode())),
        ("crlf+truncated", with_line(line[:cut]).replace(b"\n", b"\r\n")),
        ("bom+bad", b"\xef\xbb\xbf" + with_line(line[:cut])),
    ]
    return out


def fuzz_cases(root: Path, seed: int, count: int) -> list[FuzzCase]:
    """``count`` seeded bad prompt files plus the fixed special cases, written under ``root``."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    cases: list[FuzzCase] = []
    while len(cases) < count:
        lines = [_good_line(rng, k) for k in range(rng.randint(1, 12))]
        for kind, data in _mutations(rng, lines):
            if len(cases) >= count:
                break
            p = root / f"{len(cases):04d}-{kind}.jsonl"
            p.write_bytes(data)
            cases.append(FuzzCase(kind, p))
    # Valid variants that must be read (not fail): BOM, CRLF, U+2028 inside strings.
    lines = [_good_line(rng, k) for k in range(5)]
    for kind, data in (("valid-bom", b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n"),
                       ("valid-crlf", "\r\n".join(lines).encode() + b"\r\n"),
                       ("valid-u2028", (json.dumps({"id": 1, "prompt": "a\u2028b\x0cc"}, ensure_ascii=False)
                                        + "\n").encode())):
        p = root / f"{kind}.jsonl"
        p.write_bytes(data)
        cases.append(FuzzCase(kind, p, valid=True))
    special = root / "special"
    special.mkdir(exist_ok=True)
    (special / "empty.jsonl").write_bytes(b"")
    cases.append(FuzzCase("empty-file", special / "empty.jsonl"))
    (special / "blank.txt").write_bytes(b"\n \n\t\n")
    cases.append(FuzzCase("only-blank-lines", special / "blank.txt"))
    (special / "dir.jsonl").mkdir(exist_ok=True)
    cases.append(FuzzCase("directory", special / "dir.jsonl"))
    fifo = special / "fifo.jsonl"
    if not fifo.exists():
        os.mkfifo(fifo)
    cases.append(FuzzCase("fifo", fifo))
    # Unreadable: chmod does not stop root, so a path whose read() fails (EIO) stands in.
    unreadable = special / "unreadable.jsonl"
    if not unreadable.is_symlink():
        unreadable.symlink_to("/proc/self/mem")
    cases.append(FuzzCase("unreadable", unreadable))
    dangling = special / "dangling.jsonl"
    if not dangling.is_symlink():
        dangling.symlink_to(special / "no-such-file")
    cases.append(FuzzCase("dangling-symlink", dangling))
    cases.append(FuzzCase("missing", special / "missing.jsonl"))
    big = special / "10mb-line.jsonl"
    big.write_bytes(b'{"id": "big", "prompt": "' + b"word " * (2 * 1024 * 1024) + b'"\n{"id": 2, "prompt": "x"}\n')
    cases.append(FuzzCase("10mb-line-truncated", big))
    many = special / "100k-lines.jsonl"
    body = [json.dumps({"id": k, "prompt": f"p{k}"}) for k in range(100_000)]
    body[99_990] = body[99_990][:-3]
    many.write_text("\n".join(body) + "\n")
    cases.append(FuzzCase("100k-lines-one-bad", many))
    txt = special / "nul.txt"
    txt.write_bytes(b"first prompt\nsecond\x00prompt\n")
    cases.append(FuzzCase("txt-nul", txt))
    utf16 = special / "utf16.txt"
    utf16.write_bytes("a prompt\n".encode("utf-16"))
    cases.append(FuzzCase("txt-utf16", utf16))
    return cases


@dataclass
class FuzzOutcome:
    case: str
    ok: bool
    traceback: bool
    wrong_exit: bool
    message: str


def _names_place(message: str, path: Path) -> bool:
    return str(path) in message


def fuzz_in_process(cases: Sequence[FuzzCase]) -> list[FuzzOutcome]:
    """read_prompt_file on each case: bad ones raise InputError naming the file (and line)."""
    from bon_sr.errors import InputError
    from bon_sr.prompts import read_prompt_file

    out = []
    for case in cases:
        try:
            read_prompt_file(case.path)
        except InputError as exc:
            msg = str(exc)
            ok = not case.valid and _names_place(msg, case.path) and "\n" not in msg
            out.append(FuzzOutcome(case.name, ok, False, case.valid, msg))
        except BaseException as exc:  # anything else would reach the user as a traceback
            out.append(FuzzOutcome(case.name, False, True, True, f"{type(exc).__name__}: {exc}"[:300]))
        else:
            out.append(FuzzOutcome(case.name, case.valid, False, not case.valid, "read"))
    return out


def fuzz_cli(cases: Sequence[FuzzCase], work: Path) -> list[FuzzOutcome]:
    """The real CLI on each case: a non-zero exit, one message naming the file, no
    traceback, no output file."""
    out = []
    for i, case in enumerate(cases):
        target = work / f"fuzz-out-{i}.jsonl"
        target.unlink(missing_ok=True)
        r = run_cli(["generate", str(case.path), "-o", str(target), "--backend", "hf"], timeout=300)
        err = r.stderr
        tb = "Traceback (most recent call last)" in err
        wrote = target.exists()
        lines = [x for x in err.splitlines() if x.strip()]
        one_message = len(lines) <= 3 and _names_place(" ".join(err.split()), case.path)  # rich/click may wrap
        ok = r.returncode != 0 and not tb and not wrote and one_message
        out.append(FuzzOutcome(case.name, ok, tb, r.returncode == 0, " ".join(err.split())[:300]))
    return out


# -- disk full --------------------------------------------------------------------------

def disk_full(args: Sequence[str], work: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """`bon-sr generate ARGS` under a file-size limit (RLIMIT_FSIZE: a write past it fails
    with EFBIG, as on a full disk) that leaves room for one and a half records (measured on
    an uninterrupted run first), then a rerun with room and --resume."""
    ref, out = work / "diskfull-reference.jsonl", work / "diskfull.jsonl"
    for p in (ref, out):
        p.unlink(missing_ok=True)
    first = run_cli([*args, "-o", str(ref)], env=env)
    if first.returncode != 0:
        raise RuntimeError(first.stderr[-3000:])
    sizes = [len(x) + 1 for x in ref.read_bytes().split(b"\n")[:-1]]
    limit_bytes = sizes[0] + sizes[1] // 2

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    r = run_cli([*args, "-o", str(out)], env=env, preexec=limit)
    kept_bytes = out.read_bytes() if out.exists() else b""
    kept = complete_records(out)
    torn = bool(kept_bytes) and not kept_bytes.endswith(b"\n")
    err = " ".join(r.stderr.split())
    again = run_cli([*args, "-o", str(out), "--resume"], env=env)
    final = complete_records(out)
    return {"limit_bytes": limit_bytes, "rc": r.returncode, "message": err[err.find("Error:"):][:400],
            "traceback": "Traceback (most recent" in r.stderr, "kept": len(kept), "torn_tail": torn,
            "kept_intact": final[: len(kept)] == kept, "resume_rc": again.returncode, "final": len(final),
            "final_ids": [x["id"] for x in final], "equal_to_uninterrupted": out.read_bytes() == ref.read_bytes()}


# -- SIGTERM / Ctrl-C during vLLM sampling -------------------------------------------------

def signal_during_sampling(args: Sequence[str], work: Path, sig: int, *, env: dict[str, str] | None = None,
                           after_ready_s: float = 1.0, timeout: float = 600) -> dict[str, Any]:
    """Start `bon-sr generate --backend vllm ARGS`, wait until its engine is ready (vLLM's
    log), send ``sig`` to the bon-sr process alone, and report exit status and orphans."""
    env = env or base_env(VLLM_LOGGING_LEVEL="INFO")
    out = work / f"sig{int(sig)}.jsonl"
    out.unlink(missing_ok=True)
    log = out.with_name(out.stem + ".vllm.log")
    log.unlink(missing_ok=True)
    proc = subprocess.Popen(cli_command([*args, "-o", str(out)], traced=False), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and "init engine (profile, create kv cache, warmup model) took" in log.read_text(
                errors="replace"):
            break
        time.sleep(0.2)
    time.sleep(after_ready_s)
    kids = descendants(proc.pid)
    sent = time.time()
    finished_first = proc.poll() is not None
    if not finished_first:
        proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=300)
    took = time.time() - sent
    orphans = still_alive(kids)
    return {"signal": signal.Signals(sig).name, "rc": proc.returncode, "exit_s": round(took, 1),
            "orphans": orphans, "finished_first": finished_first, "stderr": stderr,
            "log": log.read_text(errors="replace") if log.exists() else "", "records": len(complete_records(out))}


# -- bon-sr serve ---------------------------------------------------------------------------

def serve_faults(port: int, requests: int, work: Path, model: str) -> dict[str, Any]:
    """Abuse a real `bon-sr serve`: client disconnects mid-request, malformed and oversized
    bodies, a slow body, then ``requests`` sequential requests with the server's RSS sampled."""
    import socket

    import psutil

    env = base_env()
    log = (work / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "bon_sr.cli", "serve", "--model", model, "--port", str(port)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    result: dict[str, Any] = {}
    try:
        _wait_ready(base, proc, 600)
        body = {"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8, "seed": 1,
                "bon_sr": {"n": 2}}

        def post(payload: bytes, *, timeout: float = 120, headers: dict[str, str] | None = None) -> tuple[int, Any]:
            import urllib.error
            import urllib.request

            req = urllib.request.Request(base + "/v1/chat/completions", data=payload, method="POST",
                                         headers={"Content-Type": "application/json", **(headers or {})})
            try:
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    return resp.status, json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                raw = exc.read()
                try:
                    return exc.code, json.loads(raw)
                except json.JSONDecodeError:
                    return exc.code, raw[:200]

        good = json.dumps(body).encode()
        status, first = post(good)
        result["first"] = status
        reference_text = first["choices"][0]["message"]["content"] if status == 200 else None
        # Client disconnects mid-request (after sending the body, before the answer).
        for _ in range(5):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(good)}\r\n\r\n".encode() + good)
            time.sleep(0.3)
            s.close()
        bad_bodies = {"malformed": b'{"model": "x", "messages": [', "not-json": b"\xff\xfe\x00garbage",
                      "wrong-types": json.dumps({"model": model, "messages": "hi", "n": "two"}).encode(),
                      "n-too-large": json.dumps({**body, "bon_sr": {"n": 10_000}}).encode(),
                      "oversized": json.dumps({**body, "messages": [{"role": "user",
                                                                     "content": "x " * 6_000_000}]}).encode()}
        result["bad"] = {}
        for name, payload in bad_bodies.items():
            try:
                status, answer = post(payload, timeout=120)
            except Exception as exc:  # a dropped connection counts as handled if the server lives on
                status, answer = -1, f"{type(exc).__name__}: {exc}"
            result["bad"][name] = status
        # A slow body: headers promise 1000 bytes, 10 arrive, then nothing.
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n" + good[:10])
        s.settimeout(90)
        t0 = time.time()
        try:
            reply = s.recv(200)
        except socket.timeout:
            reply = b""
        result["slow_body"] = {"closed_after_s": round(time.time() - t0, 1), "reply": reply[:60].decode("latin1")}
        s.close()
        # Sequential load with RSS (server + engine processes) sampled.
        server = psutil.Process(proc.pid)
        rss, wrong, failed, differ = [], 0, 0, 0
        t0 = time.time()
        for i in range(requests):
            status, answer = post(good)
            if status != 200:
                failed += 1
                continue
            choice = (answer.get("choices") or [{}])[0]
            text = (choice.get("message") or {}).get("content")
            if not isinstance(text, str) or "bon_sr" not in answer:
                wrong += 1      # not a well-formed Best-of-N answer
            elif text != reference_text:
                differ += 1     # same seed, another pick (vLLM bf16 on CPU is not bit-stable)
            if i % 10 == 0:
                procs = [server, *server.children(recursive=True)]
                rss.append((i, sum(p.memory_info().rss for p in procs if _running(p)) / 2**20))
        result.update(requests=requests, failed=failed, wrong=wrong, differ=differ,
                      seconds=round(time.time() - t0, 1),
                      rss_mib=[round(r, 1) for _, r in rss], alive=proc.poll() is None)
        result["rss_slope_mib_per_100"] = round(_slope(rss) * 100, 2)
    finally:
        kids = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        result["orphans_after_stop"] = still_alive(kids)
        log.close()
    return result


def _wait_ready(base: str, proc: subprocess.Popen, timeout: float) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"bon-sr serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as resp:
                if resp.status == 200 and json.loads(resp.read()).get("status") in ("ok", "ready"):
                    return
        except Exception:
            pass
        time.sleep(1)
    raise RuntimeError("bon-sr serve did not become ready")


def _slope(points: Sequence[tuple[float, float]]) -> float:
    if len(points) < 2:
        return 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


# -- the report ---------------------------------------------------------------------------

def summarize_kills(results: Sequence[KillResult]) -> dict[str, Any]:
    done = [r for r in results if r.phase != "finished"]
    by_phase: dict[str, int] = {}
    for r in done:
        by_phase[r.phase] = by_phase.get(r.phase, 0) + 1
    return {"kills": len(done), "by_phase": by_phase, "records_lost": sum(r.lost for r in done),
            "duplicates": sum(r.duplicates for r in done), "orphans": sum(len(r.orphans) for r in done),
            "not_equal": sum(1 for r in done if r.equal is False), "invalid": sum(1 for r in done if not r.valid),
            "resume_failed": sum(1 for r in done if r.resume_rc != 0)}


def write_prompts(path: Path, count: int) -> Path:
    path.write_text("".join(json.dumps({"id": f"p{k}", "prompt": f"Count from 1 to {k + 3}."}) + "\n"
                            for k in range(count)))
    return path


def write_task(path: Path, count: int) -> Path:
    path.write_text("".join(json.dumps({"id": f"t{k}", "prompt": f"What is {k} + {k}? Answer with a number.",
                                        "answer": str(2 * k), "checker": "numeric"}) + "\n" for k in range(count)))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="kill,vllm,dirs,fuzz,disk,signals,serve",
                    help="comma-separated parts: kill (HF generate), vllm, dirs (bench, ablate), fuzz, disk, "
                         "signals, serve")
    ap.add_argument("--kills", type=int, default=20, help="kill -9 rounds of HF generate")
    ap.add_argument("--vllm-kills", type=int, default=6)
    ap.add_argument("--dir-kills", type=int, default=6, help="kill -9 rounds each of bench and ablate")
    ap.add_argument("--fuzz", type=int, default=300, help="generated bad prompt files")
    ap.add_argument("--fuzz-cli", type=int, default=30, help="of which this many also through the real CLI")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--port", type=int, default=18431)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="work directory (default: a fresh temporary one)")
    a = ap.parse_args()
    parts = set(a.only.split(","))
    work = Path(a.work or tempfile.mkdtemp(prefix="bon-sr-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work directory: {work}", flush=True)
    figures: dict[str, Any] = {}
    prompts = write_prompts(work / "prompts.jsonl", 4)
    hf_args = ["generate", str(prompts), "--model", a.model, "--backend", "hf", "--n", "2", "--max-new-tokens", "12",
               "--seed", str(a.seed)]
    vllm_args = ["generate", str(prompts), "--model", a.model, "--backend", "vllm", "--n", "2",
                 "--max-new-tokens", "12", "--seed", str(a.seed)]
    if "kill" in parts:
        t0 = time.time()
        res = kill_generate(hf_args, work / "kill-hf", a.kills, a.seed)
        figures["generate (hf) kill -9"] = {**summarize_kills(res), "seconds": round(time.time() - t0)}
        _print(figures, "generate (hf) kill -9", res)
    if "vllm" in parts:
        t0 = time.time()
        res, wall = kill_vllm_generate(vllm_args, work / "kill-vllm", a.vllm_kills, a.seed)
        figures["generate (vllm) kill -9"] = {**summarize_kills(res), "reference_wall_s": round(wall, 1),
                                              "seconds": round(time.time() - t0)}
        _print(figures, "generate (vllm) kill -9", res)
    if "dirs" in parts:
        task = write_task(work / "task.jsonl", 4)
        bench_args = ["--task", str(task), "--model", a.model, "--backend", "hf", "--n", "1,2",
                      "--max-new-tokens", "12", "--bootstrap", "100", "--seed", str(a.seed)]
        res = kill_dir_command("bench", bench_args, work / "dirs", a.dir_kills, a.seed, bench_state)
        figures["bench kill -9"] = summarize_kills(res)
        _print(figures, "bench kill -9", res)
        ablate_args = ["--cache", str(work / "dirs" / "bench-reference"), "--variants", "paper,center,drop-massive",
                       "--layers", "0,-1", "--norms", "post,pre", "--bootstrap", "100"]
        res = kill_dir_command("ablate", ablate_args, work / "dirs", a.dir_kills, a.seed, ablate_state)
        figures["ablate kill -9"] = summarize_kills(res)
        _print(figures, "ablate kill -9", res)
    if "fuzz" in parts:
        cases = fuzz_cases(work / "fuzz", a.seed, a.fuzz)
        t0 = time.time()
        inproc = fuzz_in_process(cases)
        sub = [c for c in cases if c.path.parent.name == "special" or c.valid] + cases[: a.fuzz_cli]
        t1 = time.time()
        viacli = fuzz_cli([c for c in sub if not c.valid], work)
        for name, outs, secs in (("fuzz, in process", inproc, t1 - t0), ("fuzz, real CLI", viacli, time.time() - t1)):
            figures[name] = {"cases": len(outs), "ok": sum(o.ok for o in outs),
                             "tracebacks": sum(o.traceback for o in outs),
                             "wrong_exits": sum(o.wrong_exit for o in outs), "seconds": round(secs, 1)}
            for o in outs:
                if not o.ok:
                    print(f"  {name}: {o.case}: {o.message}")
            print(f"{name}: {figures[name]}", flush=True)
    if "disk" in parts:
        res = disk_full(hf_args, work)
        figures["disk full"] = {k: v for k, v in res.items() if k != "final_ids"}
        print(f"disk full: {figures['disk full']}", flush=True)
    if "signals" in parts:
        for sig in (signal.SIGTERM, signal.SIGINT):
            res = signal_during_sampling(vllm_args, work, sig)
            terminal = res.pop("stderr")
            log = res.pop("log")
            res["vllm_lines_on_terminal"] = sum(1 for x in terminal.splitlines() if any(m in x for m in NOISE))
            res["unexpected_in_log"] = "exited unexpectedly" in log
            figures[f"{res['signal']} during vLLM sampling"] = res
            print(f"{res['signal']}: {res}", flush=True)
    if "serve" in parts:
        res = serve_faults(a.port, a.requests, work, a.model)
        figures["serve"] = {k: v for k, v in res.items() if k != "rss_mib"}
        figures["serve"]["rss_first_last_mib"] = (res.get("rss_mib") or [None])[0], (res.get("rss_mib") or [None])[-1]
        print(f"serve: {figures['serve']}", flush=True)
    (work / "faults.json").write_text(json.dumps(figures, indent=2, default=str))
    print("\n== figures ==")
    for name, fig in figures.items():
        print(f"{name}: {json.dumps(fig, default=str)}")


def _print(figures: dict[str, Any], name: str, results: Sequence[KillResult]) -> None:
    for r in results:
        print(f"  {name}: {json.dumps({k: v for k, v in asdict(r).items() if v not in ('', [])}, default=str)}")
    print(f"{name}: {figures[name]}", flush=True)


if __name__ == "__main__":
    main()
