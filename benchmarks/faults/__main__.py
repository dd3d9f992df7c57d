"""Faults and bad input, measured: kill -9 and --resume, fuzzed prompt files, a full disk,
SIGTERM / Ctrl-C during vLLM sampling, and `bon-sr serve` under abuse.

    python -m benchmarks.faults                       # everything (about 30-40 min on 2 cores)
    python -m benchmarks.faults --only kill,fuzz,disk --kills 20
    python -m benchmarks.faults --only serve --requests 500

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

One module per fault family (kill, fuzz, disk, serve), the processes they share (proc) and
the launcher that traces a run's phases (launcher); tests/test_faults.py imports them and runs
a few of each. Knows nothing about bon-sr's internals beyond the classes the launcher traces.
"""

from __future__ import annotations

import argparse
import json
import signal
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from .disk import disk_full
from .fuzz import fuzz_cases, fuzz_cli, fuzz_in_process
from .kill import (KillResult, ablate_state, bench_state, kill_dir_command, kill_generate, kill_vllm_generate,
                   signal_during_sampling, summarize_kills)
from .proc import NOISE, write_prompts, write_task
from .serve import serve_faults


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
