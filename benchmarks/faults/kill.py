"""kill -9 at seeded moments of `bon-sr generate` (traced phases), `bench` and `ablate`, then
--resume or a rerun; SIGTERM / Ctrl-C during vLLM sampling. Counted: records lost, ids written
twice, final outputs unequal to an uninterrupted run, engine processes left alive.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .proc import ROOT, base_env, cli_command, complete_records, descendants, read_trace, run_cli, still_alive

PHASES = ("load", "sample", "score", "write")

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


def summarize_kills(results: Sequence[KillResult]) -> dict[str, Any]:
    done = [r for r in results if r.phase != "finished"]
    by_phase: dict[str, int] = {}
    for r in done:
        by_phase[r.phase] = by_phase.get(r.phase, 0) + 1
    return {"kills": len(done), "by_phase": by_phase, "records_lost": sum(r.lost for r in done),
            "duplicates": sum(r.duplicates for r in done), "orphans": sum(len(r.orphans) for r in done),
            "not_equal": sum(1 for r in done if r.equal is False), "invalid": sum(1 for r in done if not r.valid),
            "resume_failed": sum(1 for r in done if r.resume_rc != 0)}
