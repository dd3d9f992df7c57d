"""Prompts/s of ``bon-sr generate --ray`` with 1 and 2 replicas on the same prompts.

Runs the pipeline bon-sr's CLI runs (``bon_sr.scale.ray_data.iter_records``) on a local Ray
started here, transformers backend (default model), one torch thread and one Ray CPU per
replica, and prints per replica count the median over --repeats of:
  end-to-end prompts/s  all prompts / wall time from submitting the dataset to the last
                        record, model loading in every replica included (what one run pays);
  steady prompts/s      (prompts - 1) / time from the first record to the last, i.e. with the
                        replicas loaded (what a long run approaches);
and the 2-replica / 1-replica ratio of each. A no-Ray baseline (one BestOfN in this
process, model loaded before the clock starts, 1 thread) shows what Ray adds.

    python benchmarks/ray_throughput.py              # 8 prompts, n=4, 32 tokens, 3 repeats
    python benchmarks/ray_throughput.py --replicas 1,2,4 --num-cpus 4 --repeats 5

On 2 cores shared with other jobs expect little gain: two one-thread replicas can at best
use both cores, which one two-thread process mostly does already.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from throughput import DEFAULT_PROMPTS as PROMPTS  # the same 8 questions as benchmarks/throughput.py


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="model id, directory or built-in alias")
    p.add_argument("--num-prompts", type=int, default=8, help="prompts per run (the built-in 8, repeated)")
    p.add_argument("--n", type=int, default=4, help="candidates per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--replicas", default="1,2", help="comma-separated replica counts")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.replicas = [int(k) for k in args.replicas.split(",") if k.strip()]
    return args


def main() -> None:
    args = parse_args()
    import ray
    import torch

    from bon_sr import BestOfN
    from bon_sr.models import resolve_model
    from bon_sr.prompts import PromptRecord
    from bon_sr.scale.ray_data import RayConfig, iter_records

    resolve_model(args.model)                     # convert/cache once, outside every timing
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(args.num_prompts)]
    records = [PromptRecord(id=str(i), prompt=t, line=i + 1) for i, t in enumerate(texts)]
    options = dict(model=args.model, backend="hf", n=args.n, max_new_tokens=args.max_new_tokens, seed=args.seed)

    torch.set_num_threads(1)
    bon = BestOfN(**options)
    t0 = time.perf_counter()
    list(bon.select_many(texts, ids=[r.id for r in records]))
    base = len(texts) / (time.perf_counter() - t0)
    del bon

    ray.init(num_cpus=args.num_cpus, object_store_memory=256 * 2**20, include_dashboard=False,
             log_to_driver=False)
    results: dict[int, tuple[float, float]] = {}
    try:
        for k in args.replicas:
            e2e, steady = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                arrivals = []
                for _rec in iter_records(records, options, RayConfig(replicas=k)):
                    arrivals.append(time.perf_counter())
                assert len(arrivals) == len(records)
                e2e.append(len(records) / (arrivals[-1] - t0))
                steady.append((len(records) - 1) / max(arrivals[-1] - arrivals[0], 1e-9))
            results[k] = (statistics.median(e2e), statistics.median(steady))
            print(f"replicas={k}: end-to-end {results[k][0]:.3f} prompts/s, steady {results[k][1]:.3f} prompts/s "
                  f"(runs: {', '.join(f'{x:.3f}' for x in e2e)} / {', '.join(f'{x:.3f}' for x in steady)})",
                  flush=True)
    finally:
        ray.shutdown()

    load = os.getloadavg()
    print(f"\n{args.num_prompts} prompts x n={args.n} x {args.max_new_tokens} new tokens, {args.model}, hf backend, "
          f"1 thread per replica, local Ray with {args.num_cpus} CPUs, median of {args.repeats}; "
          f"{os.cpu_count()} cores, load average now {load[0]:.1f} / 5 min {load[1]:.1f} (other jobs share them)")
    print(f"{'replicas':>8} {'end-to-end p/s':>15} {'steady p/s':>11} {'e2e ratio':>10} {'steady ratio':>13}")
    first = results[args.replicas[0]]
    for k, (e, s) in results.items():
        print(f"{k:>8} {e:>15.3f} {s:>11.3f} {e / first[0]:>10.2f} {s / first[1]:>13.2f}")
    print(f"{'no Ray':>8} {'':>15} {base:>11.3f}   (one in-process BestOfN, 1 thread, model preloaded)")


if __name__ == "__main__":
    main()
