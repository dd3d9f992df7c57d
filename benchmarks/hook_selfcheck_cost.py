"""What the hook's start-up checks cost: the static probe of vLLM's internals and the
self-check (bon_sr.hook.selfcheck) against the whole start of a hooked engine.

Each round starts ``VLLMBackend(hook=True)`` on the model as a user would (engine core in
its own process, bon-sr's CPU defaults), times ``generate_llm`` (engine start + hook
install + self-check), the self-check inside it (the start path's call, wrapped), and the
self-check once more on the warm engine; then closes the engine. The probe is timed
uncached, in this process, before the rounds, beside what it cost before it read vLLM's
source statically (importing the V1 runner). Prints medians and writes JSON, with the
machine's load average (the timings are only comparable on a quiet machine).

    python benchmarks/hook_selfcheck_cost.py                     # SmolLM2-135M, 3 rounds
    python benchmarks/hook_selfcheck_cost.py --rounds 5 --out /tmp/cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "hook_selfcheck_cost-cpu.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model alias or directory (default: bon-sr's default model)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()

    import vllm

    from bon_sr import engines
    from bon_sr.hook import selfcheck, worker
    from bon_sr.models import DEFAULT_MODEL, resolve_model

    model = resolve_model(args.model or DEFAULT_MODEL)
    probe = []
    for _ in range(args.rounds):
        t = time.perf_counter()
        worker.probe_vllm.__wrapped__()
        probe.append(time.perf_counter() - t)

    # what the probe cost before it read the source: importing vLLM's V1 runner on the driver
    # (each in a fresh process that has already imported vllm, as the driver has)
    code = ("import time, vllm; t = time.perf_counter(); import vllm.v1.worker.gpu_model_runner; "
            "print(time.perf_counter() - t)")
    runner_import = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                          check=True).stdout.split()[-1]) for _ in range(args.rounds)]

    at_start: list[float] = []
    real = selfcheck.run_selfcheck

    def timed(llm):
        t = time.perf_counter()
        report = real(llm)
        at_start.append(time.perf_counter() - t)
        return report

    engines.run_selfcheck = timed
    starts, warm, loads = [], [], []
    for r in range(args.rounds):
        backend = engines.VLLMBackend(model, hook=True)
        loads.append(os.getloadavg()[0])
        t = time.perf_counter()
        llm = backend.generate_llm
        starts.append(time.perf_counter() - t)
        t = time.perf_counter()
        real(llm)
        warm.append(time.perf_counter() - t)
        backend.close()
        print(f"round {r + 1}: start {starts[-1]:.1f} s, self-check at start {at_start[-1]:.2f} s, "
              f"warm {warm[-1]:.2f} s (load average {loads[-1]:.1f})", file=sys.stderr, flush=True)

    med = statistics.median
    result = {
        "model": Path(str(model)).name, "vllm": vllm.__version__, "rounds": args.rounds,
        "probe_s": probe, "runner_import_s": runner_import, "start_s": starts, "selfcheck_at_start_s": at_start,
        "selfcheck_warm_s": warm,
        "load_average_1min": loads,
        "median": {"probe_s": med(probe), "runner_import_s": med(runner_import), "start_s": med(starts),
                   "selfcheck_at_start_s": med(at_start),
                   "selfcheck_warm_s": med(warm), "selfcheck_share_of_start": med(at_start) / med(starts)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    m = result["median"]
    print(f"vLLM {vllm.__version__}, {Path(str(model)).name}, median of {args.rounds}: engine start (with the "
          f"self-check) {m['start_s']:.1f} s; self-check at start {m['selfcheck_at_start_s']:.2f} s "
          f"({100 * m['selfcheck_share_of_start']:.1f}% of the start), warm {m['selfcheck_warm_s']:.2f} s; "
          f"static probe {m['probe_s']:.2f} s (importing the V1 runner, as the probe did before: "
          f"{m['runner_import_s']:.1f} s). JSON: {args.out}")


if __name__ == "__main__":
    main()
