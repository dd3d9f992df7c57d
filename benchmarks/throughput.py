"""Throughput of Best-of-N on vLLM against plain vLLM sampling and the HF-only path.

For each N in --n-values, on the same prompts and per-prompt seeds:
  (a)  plain vLLM: one llm.generate with SamplingParams(n=N) per prompt, nothing else;
  (b)  bon-sr, vLLM sampler + vLLM pooling scorer (the second engine);
  (b') bon-sr, vLLM sampler + HF scorer (transformers forward on the same device);
  (c)  bon-sr, HF sampler + HF scorer (no vLLM at all).
(b) and (b') run the calls ``BestOfN`` makes per chunk (sampler.sample over all prompts,
scorer.score over all candidates, the selector), on engines started once: engine start-up
and model loading are left out of every timing, as a long-running user pays them once.
Printed: generated tokens/s (candidate tokens / wall time; (a) also counts the EOS token
vLLM returns, which bon-sr candidates drop) and the wall time as a ratio to
(a), so "score/a" is the scoring overhead on top of sampling.

    python benchmarks/throughput.py --quick              # a few minutes on 2 CPU cores
    python benchmarks/throughput.py --n-values 4,16 --num-prompts 32 --max-new-tokens 256

Runs unchanged on CUDA (vLLM + torch pick the device; the engines get the backend's
per-engine memory split).
"""

from __future__ import annotations

import argparse
import gc
import time
from typing import Any

DEFAULT_PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "What is 12 * 7? Show your work briefly.",
    "Write a haiku about the sea.",
    "Give one tip for writing clear Python code.",
    "A train travels 60 km in 45 minutes. What is its average speed in km/h?",
    "Name three prime numbers greater than 20.",
    "Explain in two sentences why the sky is blue.",
    "If a shirt costs $20 after a 20% discount, what was the original price?",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="model id, directory or built-in alias")
    p.add_argument("--prompts", default=None, help="prompt file (.jsonl or .txt); default: 8 built-in questions")
    p.add_argument("--num-prompts", type=int, default=None, help="use only the first K prompts")
    p.add_argument("--n-values", default="4,16", help="comma-separated N values (default 4,16)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens per candidate (default 128)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    p.add_argument("--modes", default="a,b,b',c", help="subset of a,b,b',c to run")
    p.add_argument("--quick", action="store_true",
                   help="4 prompts, 48 new tokens: a few minutes on a 2-core CPU")
    args = p.parse_args()
    if args.quick:
        args.num_prompts = args.num_prompts or 4
        args.max_new_tokens = 48
    args.n_values = [int(v) for v in args.n_values.split(",") if v.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(args.modes) - {"a", "b", "b'", "c"}
    if unknown:
        p.error(f"unknown modes {sorted(unknown)}; use a, b, b', c")
    return args


def load_prompts(args: argparse.Namespace) -> list[Any]:
    if args.prompts:
        from bon_sr.prompts import read_prompt_file

        prompts = [r.prompt for r in read_prompt_file(args.prompts)]
    else:
        prompts = list(DEFAULT_PROMPTS)
    return prompts[: args.num_prompts] if args.num_prompts else prompts


def timed(fn: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bon_round(sampler: Any, scorer: Any, selector: Any, prompt_ids: list[list[int]], n: int,
              seeds: list[int]) -> tuple[int, float, float]:
    """What BestOfN._run does for one chunk: sample, score every candidate, select."""
    groups, t_sample = timed(lambda: sampler.sample(prompt_ids, n=n, seeds=seeds))
    flat_p = [ids for ids, g in zip(prompt_ids, groups) for _ in g]
    flat_r = [c.token_ids for g in groups for c in g]
    scores, t_score = timed(lambda: scorer.score(flat_p, flat_r))
    it = iter(scores)
    for g, seed in zip(groups, seeds):
        selector(tuple(c.with_scores(**next(it)) for c in g), seed=seed)
    return sum(len(r) for r in flat_r), t_sample, t_score


def main() -> None:
    args = parse_args()
    import torch

    from bon_sr.api import load_hf_model
    from bon_sr.hidden_states import HFScorer, HiddenStateConfig
    from bon_sr.models import resolve_model
    from bon_sr.prompts import derive_seed, encode_prompt
    from bon_sr.samplers import SamplingConfig
    from bon_sr.samplers.hf import HFSampler
    from bon_sr.selectors import get_selector

    path = resolve_model(args.model)
    prompts = load_prompts(args)
    seeds = [derive_seed(args.seed, str(i)) for i in range(len(prompts))]
    selector = get_selector("stable-rank")
    scoring = HiddenStateConfig()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"model {path} | device {device} | {len(prompts)} prompts | max_new_tokens {args.max_new_tokens} | "
          f"N {args.n_values} | dtype {args.dtype}", flush=True)

    rows: list[dict[str, Any]] = []
    need_vllm = any(m in args.modes for m in ("a", "b", "b'"))
    need_hf = any(m in args.modes for m in ("b'", "c"))
    hf_model, tokenizer = load_hf_model(path, dtype=args.dtype) if need_hf else (None, None)
    backend = None
    if need_vllm:
        from bon_sr.vllm_backend import VLLMBackend

        backend = VLLMBackend(path, dtype=args.dtype, seed=args.seed)
        tokenizer = backend.tokenizer
        (_, t_start) = timed(lambda: backend.generate_llm)
        print(f"vLLM generate engine started in {t_start:.1f}s", flush=True)
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]

    def cfg(n: int) -> SamplingConfig:
        return SamplingConfig(n=n, temperature=args.temperature, top_p=args.top_p,
                              max_new_tokens=args.max_new_tokens, seed=args.seed)

    def record(mode: str, n: int, tokens: int, t_sample: float, t_score: float) -> None:
        rows.append(dict(mode=mode, n=n, tokens=tokens, sample_s=t_sample, score_s=t_score))
        print(f"  done {mode:<3} N={n:<3} {tokens} tokens, sample {t_sample:.1f}s, score {t_score:.1f}s", flush=True)

    warm = prompt_ids[:1]
    if need_vllm:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        llm = backend.generate_llm
        token_prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]
        llm.generate(token_prompts[:1], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
        vllm_scorer = hf_scorer = None
        for n in args.n_values:
            sampler = backend.sampler(cfg(n))
            if "a" in args.modes:
                params = [SamplingParams(n=n, temperature=args.temperature, top_p=args.top_p,
                                         max_tokens=args.max_new_tokens, seed=s) for s in seeds]
                outs, t = timed(lambda: llm.generate(token_prompts, params, use_tqdm=False))
                record("a", n, sum(len(c.token_ids) for o in outs for c in o.outputs), t, 0.0)
            if "b'" in args.modes:
                if hf_scorer is None:
                    hf_scorer = HFScorer(hf_model, scoring)
                    hf_scorer.score(warm, [[1, 2, 3]])
                record("b'", n, *bon_round(sampler, hf_scorer, selector, prompt_ids, n, seeds))
            if "b" in args.modes:
                if vllm_scorer is None:
                    vllm_scorer = backend.scorer(scoring)
                    (_, t_start) = timed(lambda: vllm_scorer.score(warm, [[1, 2, 3]]))
                    print(f"vLLM pooling engine started in {t_start:.1f}s", flush=True)
                record("b", n, *bon_round(sampler, vllm_scorer, selector, prompt_ids, n, seeds))
        backend.close()
        gc.collect()
    if "c" in args.modes:
        hf_scorer = HFScorer(hf_model, scoring)
        HFSampler(hf_model, tokenizer, cfg(1)).sample(warm, n=1, seeds=[0])  # warm-up
        for n in args.n_values:
            sampler = HFSampler(hf_model, tokenizer, cfg(n))
            record("c", n, *bon_round(sampler, hf_scorer, selector, prompt_ids, n, seeds))

    print()
    print(f"{'N':>3} {'mode':<28} {'tokens':>7} {'sample s':>9} {'score s':>8} {'total s':>8} "
          f"{'tok/s':>7} {'total/a':>8} {'score/a':>8}")
    names = {"a": "(a)  vLLM sampling only", "b": "(b)  vLLM + vLLM pooling SR", "b'": "(b') vLLM + HF SR",
             "c": "(c)  HF sampling + HF SR"}
    for n in args.n_values:
        base = next((r for r in rows if r["mode"] == "a" and r["n"] == n), None)
        for r in (r for r in rows if r["n"] == n):
            total = r["sample_s"] + r["score_s"]
            ratio = f"{total / base['sample_s']:8.2f}" if base else f"{'-':>8}"
            score_ratio = f"{r['score_s'] / base['sample_s']:8.2f}" if base else f"{'-':>8}"
            print(f"{n:>3} {names[r['mode']]:<28} {r['tokens']:>7} {r['sample_s']:>9.1f} {r['score_s']:>8.1f} "
                  f"{total:>8.1f} {r['tokens'] / total:>7.0f} {ratio} {score_ratio}")


if __name__ == "__main__":
    main()
