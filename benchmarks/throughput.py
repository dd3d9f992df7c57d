"""Throughput and memory of Best-of-N on vLLM against plain vLLM sampling and the HF-only path.

For each N in --n-values, on the same prompts and per-prompt seeds:
  (a)  plain vLLM: one llm.generate with SamplingParams(n=N) per prompt, nothing else;
  (h)  bon-sr, vLLM sampler with the in-pass hook (bon_sr.vllm_hook): one engine, the
       candidates come back scored (extra decoded token, any fill and the collect RPC timed);
  (a') (a)'s requests on (h)'s engine, run right before each (h) round: on a machine
       shared with other work, h/a' (same process, interleaved) is the fair overhead;
  (b)  bon-sr, vLLM sampler + vLLM pooling scorer (the second engine);
  (b') bon-sr, vLLM sampler + HF scorer (transformers forward on the same device);
  (c)  bon-sr, HF sampler + HF scorer (no vLLM at all).
(b) and (b') run the calls ``BestOfN`` makes per chunk (sampler.sample over all prompts,
scorer.score over all candidates, the selector), on engines started once: engine start-up
and model loading are left out of every timing, as a long-running user pays them once.
Printed: generated tokens/s (candidate tokens / wall time; (a) also counts the EOS token
vLLM returns, which bon-sr candidates drop) and the wall time as a ratio to
(a), so "score/a" is the scoring overhead on top of sampling. Each (mode, N) runs
--repeats times; the table shows medians.

Each mode runs in its own child process (``--isolate``, the default), so its peak RSS is
its own: the child and all its descendants (vLLM's engine-core and worker processes),
sampled every 0.1 s with psutil. GPU memory is not measured.

    python benchmarks/throughput.py --quick                       # a few minutes on 2 CPU cores
    python benchmarks/throughput.py --modes a,h,b --n-values 4,16 --repeats 3
    python benchmarks/throughput.py --n-values 4,16 --num-prompts 32 --max-new-tokens 256

Runs unchanged on CUDA (vLLM + torch pick the device; the engines get the backend's
per-engine memory split, or vLLM's 0.9 for the hook's single engine).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from typing import Any

MODES = ("a", "a'", "h", "b", "b'", "c")
NAMES = {"a": "(a)  vLLM sampling only", "a'": "(a') vLLM sampling, hook engine",
         "h": "(h)  vLLM + hook SR (1 engine)", "b": "(b)  vLLM + vLLM pooling SR",
         "b'": "(b') vLLM + HF SR", "c": "(c)  HF sampling + HF SR"}

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
    p.add_argument("--modes", default="a,h,b,b',c", help="subset of a,h,b,b',c to run")
    p.add_argument("--repeats", type=int, default=1, help="runs per (mode, N); medians are printed")
    p.add_argument("--no-isolate", dest="isolate", action="store_false",
                   help="run every mode in this process (no per-mode peak RSS)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one mode, print JSON
    p.add_argument("--quick", action="store_true",
                   help="4 prompts, 48 new tokens: a few minutes on a 2-core CPU")
    args = p.parse_args()
    if args.quick:
        args.num_prompts = args.num_prompts or 4
        args.max_new_tokens = 48
    args.n_values = [int(v) for v in args.n_values.split(",") if v.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if "h" in args.modes and "a'" not in args.modes:
        args.modes.insert(args.modes.index("h"), "a'")  # h's interleaved baseline
    unknown = set(args.modes) - set(MODES)
    if unknown:
        p.error(f"unknown modes {sorted(unknown)}; use {', '.join(MODES)}")
    return args


def load_prompts(args: argparse.Namespace) -> list[Any]:
    if args.prompts:
        from bon_sr.sampling.prompts import read_prompt_file

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
    from bon_sr.selection.selectors import select as run_selector

    groups, t_sample = timed(lambda: sampler.sample(prompt_ids, n=n, seeds=seeds))
    flat_p = [ids for ids, g in zip(prompt_ids, groups) for _ in g]
    flat_r = [c.token_ids for g in groups for c in g]
    if scorer is None:  # the hook: candidates arrive scored
        scores, t_score = [dict(c.scores) for g in groups for c in g], 0.0
    else:
        scores, t_score = timed(lambda: scorer.score(flat_p, flat_r))
    it = iter(scores)
    for g, seed in zip(groups, seeds):
        run_selector(selector, tuple(c.with_scores(**next(it)) for c in g), seed=seed)
    return sum(len(r) for r in flat_r), t_sample, t_score


def tree_rss(proc: Any) -> int:
    """RSS of a process and all its descendants (vLLM's engine core and workers), bytes."""
    import psutil

    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_isolated(mode: str) -> tuple[list[dict[str, Any]], int]:
    """Run this script for one mode in a child process; its rows and peak tree RSS."""
    import psutil

    argv = [a for a in sys.argv[1:] if a != "--no-isolate"]
    child = subprocess.Popen([sys.executable, sys.argv[0], *argv, "--child", mode], stdout=subprocess.PIPE,
                             text=True)
    proc = psutil.Process(child.pid)
    peak = 0
    while child.poll() is None:
        try:
            peak = max(peak, tree_rss(proc))
        except psutil.Error:
            pass
        time.sleep(0.1)
    out = child.stdout.read() if child.stdout else ""
    if child.returncode != 0:
        raise SystemExit(f"mode {mode} failed (exit {child.returncode})")
    rows = [json.loads(line[5:]) for line in out.splitlines() if line.startswith("ROWS ")]
    for line in out.splitlines():
        if not line.startswith("ROWS "):
            print(line, flush=True)
    return (rows[-1] if rows else []), peak


def run_modes(args: argparse.Namespace, modes: list[str]) -> list[dict[str, Any]]:
    """Time ``modes`` in this process; one row per (mode, N, repeat)."""
    import torch

    from bon_sr.scoring.hidden_states import HiddenStateConfig
    from bon_sr.models import load_hf_model, resolve_model
    from bon_sr.sampling.prompts import derive_seed, encode_prompt
    from bon_sr.sampling import SamplingConfig
    from bon_sr.sampling.hf import HFSampler
    from bon_sr.scoring.scorers import HFScorer
    from bon_sr.selection.selectors import get_selector

    path = resolve_model(args.model)
    prompts = load_prompts(args)
    seeds = [derive_seed(args.seed, str(i)) for i in range(len(prompts))]
    selector = get_selector("stable-rank")
    scoring = HiddenStateConfig()
    rows: list[dict[str, Any]] = []
    need_hf = any(m in modes for m in ("b'", "c"))
    hf_model, tokenizer = load_hf_model(path, dtype=args.dtype) if need_hf else (None, None)

    def cfg(n: int) -> SamplingConfig:
        return SamplingConfig(n=n, temperature=args.temperature, top_p=args.top_p,
                              max_new_tokens=args.max_new_tokens, seed=args.seed)

    def record(mode: str, n: int, tokens: int, t_sample: float, t_score: float) -> None:
        rows.append(dict(mode=mode, n=n, tokens=tokens, sample_s=t_sample, score_s=t_score))
        print(f"  done {mode:<3} N={n:<3} {tokens} tokens, sample {t_sample:.1f}s, score {t_score:.1f}s", flush=True)

    for engine_modes, hook in ((["a", "b", "b'"], False), (["a'", "h"], True)):
        todo = [m for m in engine_modes if m in modes]
        if not todo:
            continue
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from bon_sr.engines import VLLMBackend

        backend = VLLMBackend(path, dtype=args.dtype, seed=args.seed, hook=hook)
        tokenizer = backend.tokenizer
        (llm, t_start) = timed(lambda: backend.generate_llm)
        caching = llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
        print(f"vLLM generate engine{' with the hook' if hook else ''} started in {t_start:.1f}s "
              f"(prefix caching {'on' if caching else 'off'})", flush=True)
        prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
        token_prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]
        llm.generate(token_prompts[:1], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
        warm = prompt_ids[:1]
        vllm_scorer = hf_scorer = None
        for n in args.n_values:
            for _ in range(args.repeats):
                for plain in ("a", "a'"):
                    if plain not in todo:
                        continue
                    params = [SamplingParams(n=n, temperature=args.temperature, top_p=args.top_p,
                                             max_tokens=args.max_new_tokens, seed=s) for s in seeds]
                    outs, t = timed(lambda: llm.generate(token_prompts, params, use_tqdm=False))
                    record(plain, n, sum(len(c.token_ids) for o in outs for c in o.outputs), t, 0.0)
                if "h" in todo:
                    sampler = backend.sampler(cfg(n), scoring)
                    record("h", n, *bon_round(sampler, None, selector, prompt_ids, n, seeds))
                if "b'" in todo:
                    if hf_scorer is None:
                        hf_scorer = HFScorer(hf_model, scoring)
                        hf_scorer.score(warm, [[1, 2, 3]])
                    record("b'", n, *bon_round(backend.sampler(cfg(n)), hf_scorer, selector, prompt_ids, n, seeds))
                if "b" in todo:
                    if vllm_scorer is None:
                        vllm_scorer = backend.scorer(scoring)
                        (_, t_start) = timed(lambda: vllm_scorer.score(warm, [[1, 2, 3]]))
                        print(f"vLLM pooling engine started in {t_start:.1f}s", flush=True)
                    record("b", n, *bon_round(backend.sampler(cfg(n)), vllm_scorer, selector, prompt_ids, n, seeds))
        backend.close()
        gc.collect()
    if "c" in modes:
        prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
        hf_scorer = HFScorer(hf_model, scoring)
        HFSampler(hf_model, tokenizer, cfg(1)).sample(prompt_ids[:1], n=1, seeds=[0])  # warm-up
        for n in args.n_values:
            for _ in range(args.repeats):
                sampler = HFSampler(hf_model, tokenizer, cfg(n))
                record("c", n, *bon_round(sampler, hf_scorer, selector, prompt_ids, n, seeds))
    return rows


def main() -> None:
    args = parse_args()
    if args.child:
        print("ROWS " + json.dumps(run_modes(args, args.child.split(","))), flush=True)
        return
    import torch

    from bon_sr.models import resolve_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"model {resolve_model(args.model)} | device {device} | {len(load_prompts(args))} prompts | "
          f"max_new_tokens {args.max_new_tokens} | N {args.n_values} | dtype {args.dtype} | repeats {args.repeats}",
          flush=True)
    rows: list[dict[str, Any]] = []
    peaks: dict[str, int] = {}
    if args.isolate:
        for mode in args.modes:
            if mode == "a'":
                continue  # runs inside h's process
            group = "a',h" if mode == "h" else mode
            print(f"mode {group}: own process", flush=True)
            mode_rows, peaks[mode] = run_isolated(group)
            rows += mode_rows
    else:
        rows = run_modes(args, args.modes)

    def med(mode: str, n: int, key: str) -> float | None:
        vals = [r[key] for r in rows if r["mode"] == mode and r["n"] == n]
        return statistics.median(vals) if vals else None

    print()
    print(f"{'N':>3} {'mode':<31} {'tokens':>7} {'sample s':>9} {'score s':>8} {'total s':>8} "
          f"{'tok/s':>7} {'total/a':>8} {'score/a':>8}")
    for n in args.n_values:
        base = med("a", n, "sample_s")
        for mode in (m for m in MODES if m in args.modes):
            sample, score, tokens = med(mode, n, "sample_s"), med(mode, n, "score_s"), med(mode, n, "tokens")
            if sample is None:
                continue
            total = sample + score
            ratio = f"{total / base:8.2f}" if base else f"{'-':>8}"
            score_ratio = f"{score / base:8.2f}" if base else f"{'-':>8}"
            print(f"{n:>3} {NAMES[mode]:<31} {tokens:>7.0f} {sample:>9.1f} {score:>8.1f} {total:>8.1f} "
                  f"{tokens / total:>7.0f} {ratio} {score_ratio}")
    for n in args.n_values:
        hook = [r for r in rows if r["mode"] == "h" and r["n"] == n]
        plain = [r for r in rows if r["mode"] == "a'" and r["n"] == n]
        if hook and plain:
            ratios = [h["sample_s"] / a["sample_s"] for h, a in zip(hook, plain)]
            best = min(h["sample_s"] for h in hook) / min(a["sample_s"] for a in plain)
            print(f"N={n}: hook / plain vLLM on the same engine, interleaved: median {statistics.median(ratios):.3f}, "
                  f"fastest/fastest {best:.3f} (per repeat {', '.join(f'{x:.3f}' for x in ratios)})")
    if peaks:
        print()
        base_rss = peaks.get("a")
        print(f"{'mode':<31} {'peak RSS GiB':>12} {'RSS/a':>7}   (process + engine children)")
        for mode in (m for m in MODES if m in peaks):
            rel = f"{peaks[mode] / base_rss:7.2f}" if base_rss else f"{'-':>7}"
            print(f"{NAMES[mode]:<31} {peaks[mode] / 2**30:>12.2f} {rel}")


if __name__ == "__main__":
    main()
