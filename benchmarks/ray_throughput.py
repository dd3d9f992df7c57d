"""Prompts/s of ``bon-sr generate --ray`` with 1 and 2 replicas on the same prompts.

Runs the pipeline bon-sr's CLI runs (``bon_sr.scale.ray_data.iter_records``) on a local Ray
started here, transformers backend (default model), one torch thread and one Ray CPU per
replica. Per replica count, the median over --repeats of:
  end-to-end prompts/s  P prompts / wall time from submitting the dataset to its last record,
                        actor start and model loading in every replica included (one run);
  marginal prompts/s    (P - P0) / (T(P) - T(P0)) from a run on P and one on the first P0
                        prompts: the fixed start-up cost cancels, leaving the rate a long run
                        approaches (timestamps of single records would mislead: Ray Data hands
                        finished blocks to the driver in bunches);
and the ratio of each to the first replica count. A no-Ray baseline (one BestOfN in this
process, 1 thread, the same P/P0 difference) shows what Ray costs.

    python benchmarks/ray_throughput.py              # P=12, P0=4, n=4, 32 tokens, 3 repeats
    python benchmarks/ray_throughput.py --replicas 1,2,4 --num-cpus 4 --repeats 5

On 2 cores shared with other jobs expect little gain: two one-thread replicas can at best
use both cores, and the other jobs already compete for them (the load average is printed).
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
    p.add_argument("--num-prompts", type=int, default=12, help="P: prompts in the long run (the built-in 8, cycled)")
    p.add_argument("--base-prompts", type=int, default=4, help="P0: prompts in the short run")
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
    from bon_sr.sampling.prompts import PromptRecord
    from bon_sr.scale.ray_data import RayConfig, iter_records

    resolve_model(args.model)                     # convert/cache once, outside every timing
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(args.num_prompts)]
    records = [PromptRecord(id=str(i), prompt=t, line=i + 1) for i, t in enumerate(texts)]
    options = dict(model=args.model, backend="hf", n=args.n, max_new_tokens=args.max_new_tokens, seed=args.seed)

    torch.set_num_threads(1)
    bon = BestOfN(**options)

    def in_process(k: int) -> float:
        t0 = time.perf_counter()
        list(bon.select_many(texts[:k], ids=[r.id for r in records[:k]]))
        return time.perf_counter() - t0

    in_process(1)                                  # first-call warm-up, as a long run pays once
    base = statistics.median((args.num_prompts - args.base_prompts) / (in_process(args.num_prompts) -
                                                                         in_process(args.base_prompts))
                             for _ in range(args.repeats))

    def on_ray(k: int, replicas: int) -> float:
        t0 = time.perf_counter()
        got = sum(1 for _ in iter_records(records[:k], options, RayConfig(replicas=replicas)))
        assert got == k
        return time.perf_counter() - t0

    ray.init(num_cpus=args.num_cpus, object_store_memory=256 * 2**20, include_dashboard=False,
             log_to_driver=False)
    results: dict[int, tuple[float, float]] = {}
    try:
        for k in args.replicas:
            e2e, marginal = [], []
            for _ in range(args.repeats):
                t_long, t_short = on_ray(args.num_prompts, k), on_ray(args.base_prompts, k)
                e2e.append(args.num_prompts / t_long)
                marginal.append((args.num_prompts - args.base_prompts) / max(t_long - t_short, 1e-9))
            results[k] = (statistics.median(e2e), statistics.median(marginal))
            print(f"replicas={k}: end-to-end {results[k][0]:.3f} prompts/s, marginal {results[k][1]:.3f} prompts/s "
                  f"(runs: {', '.join(f'{x:.3f}' for x in e2e)} / {', '.join(f'{x:.3f}' for x in marginal)})",
                  flush=True)
    finally:
        ray.shutdown()

    load = os.getloadavg()
    print(f"\n{args.num_prompts} (and {args.base_prompts}) prompts x n={args.n} x {args.max_new_tokens} new tokens, "
          f"{args.model}, hf backend, 1 thread per replica, local Ray with {args.num_cpus} CPUs, median of {args.repeats}; "
          f"{os.cpu_count()} cores, load average now {load[0]:.1f} / 5 min {load[1]:.1f} (other jobs share them)")
    print(f"{'replicas':>8} {'end-to-end p/s':>15} {'marginal p/s':>13} {'e2e ratio':>10} {'marginal ratio':>15}")
    first = results[args.replicas[0]]
    for k, (e, s) in results.items():
        print(f"{k:>8} {e:>15.3f} {s:>13.3f} {e / first[0]:>10.2f} {s / first[1]:>15.2f}")
    print(f"{'no Ray':>8} {'':>15} {base:>13.3f}   (one in-process BestOfN, 1 thread, marginal)")


if __name__ == "__main__":
    main()
