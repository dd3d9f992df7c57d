"""What consensus selection (``--selector mbr``) costs next to sampling the candidates.

Times the product's selection step, ``bon_sr.selection.decide.decide`` with the ``mbr`` selector
(the N x N similarity, each candidate's utility, the pick), at N = 16 and 64:

  lexical   chrF between real model outputs: the candidate texts of the committed GSM8K
            cache (Qwen2.5-Coder-0.5B, about 1,200 characters each), N of them
  hidden-*  cosine of (N, d) float32 embeddings held on the candidates as the HF scorer
            leaves them (tuples of floats), d = 576 / 896 / 1536 (SmolLM2-135M,
            Qwen2.5-0.5B, Qwen2.5-1.5B), raw and centred

and prints, per row, the median milliseconds over ``--repeats`` calls beside:

  - the sampling time of the same N candidates, measured with ``--sample`` (the default
    model on the default backend, ``--max-new-tokens`` tokens each, one prompt, the median
    of ``--sample-repeats`` runs after a warm-up) as a percentage;
  - the FLOP share: the similarity's 2 N^2 d multiply-adds (hidden) against sampling's
    2 P N T (P parameters of the model with that width, T = prompt + new tokens), which is
    what the cost would be on a GPU, where both run as matmuls (chrF runs on the CPU
    wherever the model runs).

    python benchmarks/consensus_cost.py                      # selection only, FLOP shares
    python benchmarks/consensus_cost.py --sample             # + measured sampling (loads the model)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from bon_sr.selection.consensus import get_utility
from bon_sr.selection.decide import decide
from bon_sr.selection.selectors import get_selector
from bon_sr.types import Candidate

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks/results/gsm8k-qwen2.5-coder-0.5b/cache/gsm8k.jsonl"
SIZES = (16, 64)
#: width -> (model, parameters) for the FLOP share
MODELS = {576: ("SmolLM2-135M", 135e6), 896: ("Qwen2.5-0.5B", 494e6), 1536: ("Qwen2.5-1.5B", 1.54e9)}
PROMPT = "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for " \
         "her friends every day with four. She sells the remainder at the farmers' market daily for $2 per " \
         "fresh duck egg. How much in dollars does she make every day? Reason step by step."


def cached_texts(n: int) -> list[str]:
    """The first ``n`` candidate texts of the committed GSM8K cache (prompt after prompt)."""
    texts: list[str] = []
    with CACHE.open(encoding="utf-8") as fh:
        for line in fh:
            texts += [c["text"] for c in json.loads(line)["candidates"]]
            if len(texts) >= n:
                return texts[:n]
    raise SystemExit(f"{CACHE} holds fewer than {n} candidate texts")


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: imports, first allocation
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def selection_rows(repeats: int, seed: int) -> list[dict]:
    spec = get_selector("mbr")
    rows = []
    gen = torch.Generator().manual_seed(seed)
    for n in SIZES:
        texts = cached_texts(n)
        cands = [Candidate(text=t, token_ids=(0,), index=i) for i, t in enumerate(texts)]
        lexical = get_utility("lexical")
        rows.append({"n": n, "utility": "lexical", "d": None, "chars": statistics.mean(map(len, texts)),
                     "ms": median_ms(lambda c=cands, u=lexical: decide(c, spec, utility=u), repeats)})
        for d in MODELS:
            vectors = torch.randn(n, d, generator=gen)
            embedded = [Candidate(text="", token_ids=(0,), index=i,
                                  embeddings={"mean": tuple(v.tolist()), "last": tuple(v.tolist())})
                        for i, v in enumerate(vectors)]
            for name in ("hidden-mean", "hidden-mean-centred"):
                utility = get_utility(name)
                rows.append({"n": n, "utility": name, "d": d, "chars": None,
                             "ms": median_ms(lambda c=embedded, u=utility: decide(c, spec, utility=u), repeats)})
    return rows


def sampling_seconds(n: int, max_new_tokens: int, repeats: int) -> tuple[float, int, str]:
    """Median wall seconds of sampling ``n`` candidates for one prompt (no scoring pass),
    the prompt + generated tokens per candidate, and the backend."""
    from bon_sr import BestOfN

    with BestOfN(n=n, max_new_tokens=max_new_tokens, selector="first", seed=0) as bon:
        bon.select("Say hi.", seed=99)                          # warm-up: engine, first batch
        times, tokens = [], 0
        for k in range(repeats):
            t0 = time.perf_counter()
            sel = bon.select(PROMPT, seed=k)
            times.append(time.perf_counter() - t0)
            tokens = len(sel.prompt_token_ids) + round(statistics.mean(c.num_tokens for c in sel.candidates))
        return statistics.median(times), tokens, bon.backend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per row (median)")
    parser.add_argument("--sample", action="store_true", help="also measure sampling the N candidates")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--sample-repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args()

    rows = selection_rows(args.repeats, args.seed)
    sampled: dict[int, tuple[float, int, str]] = {}
    if args.sample:
        for n in SIZES:
            sampled[n] = sampling_seconds(n, args.max_new_tokens, args.sample_repeats)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; median of {args.repeats} calls of selection.decide(mbr)")
    if sampled:
        for n, (s, tokens, backend) in sampled.items():
            print(f"# sampling N={n}: {s:.2f} s (SmolLM2-135M, {backend} backend, {tokens} prompt+response "
                  f"tokens per candidate, median of {args.sample_repeats})")
    print(f"{'N':>3} {'utility':<20} {'d':>5} {'select ms':>10} {'% of sampling':>14} {'FLOP share':>11}")
    for row in rows:
        n, d = row["n"], row["d"]
        share = ""
        tokens = sampled[n][1] if n in sampled else 100 + args.max_new_tokens
        if d is not None:
            _, params = MODELS[d]
            share = f"{(2 * n * n * d) / (2 * params * n * tokens):.1e}"
            row["flop_share"] = (2 * n * n * d) / (2 * params * n * tokens)
        pct = ""
        if n in sampled:
            row["sampling_s"] = sampled[n][0]
            row["pct_of_sampling"] = 100 * row["ms"] / 1e3 / sampled[n][0]
            pct = f"{row['pct_of_sampling']:.3f}%"
        label = row["utility"] + (f" ({row['chars']:.0f} ch)" if row["chars"] else "")
        print(f"{n:>3} {label:<20} {d or '':>5} {row['ms']:>10.2f} {pct:>14} {share:>11}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "sampling": {str(k): v for k, v in sampled.items()}},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
