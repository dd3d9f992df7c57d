"""``bon-sr rank-eval``: pairwise accuracy of each scorer on preference pairs (chosen vs
rejected), with the frozen model scoring both responses of every pair (cached, resumable).

This module knows nothing about sampling or Best-of-N selection.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import ConfigError, InputError
from ..jsonl import JsonlWriter
from ..models import DEFAULT_MODEL, ProgressFn
from .runner import cache_paths, read_cache
from .scores import score_candidates


#: scorer name in reports -> score key; "length" prefers the longer response
RANK_SCORERS = {"sr-response": "sr_response", "sr-full": "sr_full", "mean-logprob": "mean_logprob",
                "self-certainty": "self_certainty", "length": "num_tokens"}


def pair_outcome(chosen: float, rejected: float) -> float:
    """1 if chosen scores higher, 0 if lower, 1/2 for a tie or a missing (NaN) score."""
    if chosen is None or rejected is None or math.isnan(chosen) or math.isnan(rejected) or chosen == rejected:
        return 0.5
    return 1.0 if chosen > rejected else 0.0


def run_rank_eval(
    pairs: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    *,
    model: str = DEFAULT_MODEL,
    dtype: str = "auto",
    device: str | None = None,
    max_batch_tokens: int = 8192,
    chunk_size: int = 16,
    bootstrap: int = 1000,
    seed: int = 0,
    source: str = "",
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Score both responses of every pair with the frozen model (cached, resumable), then
    report each scorer's pairwise accuracy overall and per category."""
    from ..scoring.hidden_states import HiddenStateConfig
    from ..models import load_hf_model, resolve_model
    from ..sampling.prompts import encode_prompt, encode_response
    from .report import summarize_pairs, write_rank_report

    report = progress or (lambda msg, done, total: None)
    out_dir = Path(out_dir)
    cache_path, meta_path = cache_paths(out_dir, "rank_eval")
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    records = read_cache(cache_path)
    identity = {"model": model, "dtype": dtype}
    if records and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if any(meta.get(k) != v for k, v in identity.items()):
            raise ConfigError(f"{cache_path} was scored with {meta}; use another output directory for {identity}.")
    ids = [str(p["id"]) for p in pairs]
    if len(set(ids)) != len(ids):
        raise InputError("Pair ids must be unique (the cache is keyed by them).")
    todo = [p for p in pairs if str(p["id"]) not in records]
    if todo:
        meta_path.write_text(json.dumps(identity, indent=2))
        report(f"loading {model}", None, None)
        hf_model, tokenizer = load_hf_model(resolve_model(model, progress=progress), device=device, dtype=dtype)
        scoring = HiddenStateConfig(max_batch_tokens=max_batch_tokens)
        done = 0
        # the generate command's writer: locked, a torn tail cut, one fsynced line per pair
        with JsonlWriter(cache_path, mode="resume") as fh:
            for start in range(0, len(todo), chunk_size):
                chunk = todo[start:start + chunk_size]
                prompt_ids = [encode_prompt(tokenizer, p["prompt"]) for p in chunk]
                flat_p = [ids for ids in prompt_ids for _ in range(2)]
                flat_r = [encode_response(tokenizer, p[k]) for p in chunk for k in ("chosen", "rejected")]
                scores = score_candidates(hf_model, flat_p, flat_r, config=scoring)
                for j, p in enumerate(chunk):
                    rec = {"id": str(p["id"]), "category": p["category"], "chosen": scores[2 * j],
                           "rejected": scores[2 * j + 1]}
                    fh.write(rec)
                    records[rec["id"]] = rec
                done += len(chunk)
                report("scoring pairs", done, len(todo))
    chosen = [records[i] for i in ids]
    outcomes = {name: [pair_outcome(r["chosen"][key], r["rejected"][key]) for r in chosen]
                for name, key in RANK_SCORERS.items()}
    summary = summarize_pairs(outcomes, [str(r["category"]) for r in chosen], bootstrap=bootstrap, seed=seed)
    summary["config"] = {"model": model, "dtype": dtype, "pairs": source or f"{len(pairs)} pairs"}
    write_rank_report(summary, out_dir)
    return summary
