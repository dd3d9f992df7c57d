"""The bench's embedding pass: hidden-state similarities for cached candidates.

``bon-sr bench --embeddings`` (with or without ``--no-generate``) runs the frozen model once,
teacher-forced with transformers, over the cached candidates of every problem with MIXED
correctness that the similarity sidecar (``bench.consensus``) does not hold yet, and stores
each problem's Gram matrices of the "last" and "mean" response embeddings: the product's
own ``HFScorer.score_and_embed`` (last layer, post-norm, float32), so the bench measures
what ``--utility hidden-*`` picks. Elsewhere every candidate is equally right and no
selector changes the result, so those problems are skipped. The sidecar is rewritten after
every problem: an interrupted pass resumes where it stopped.

This module knows nothing about selection or reports.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping, Sequence

from ..models import ProgressFn
from .consensus import ConsensusCache, gram_matrix

logger = logging.getLogger(__name__)


def embed_records(
    records: Sequence[Mapping[str, Any]],
    cache: ConsensusCache,
    *,
    model: str,
    dtype: str = "auto",
    device: str | None = None,
    max_batch_tokens: int = 8192,
    progress: ProgressFn | None = None,
) -> int:
    """Fill ``cache`` for the ``records`` it lacks (the caller passes the problems with mixed
    correctness); return how many problems were embedded now."""
    from ..scoring.hidden_states import HiddenStateConfig
    from ..models import load_hf_model, resolve_model
    from ..scoring.scorers import HFScorer

    report = progress or (lambda msg, done, total: None)
    todo = [r for r in records if not cache.has(str(r["id"]))]
    if not todo:
        return 0
    info = {"model": model, "dtype": dtype, "embeddings": "last and mean response row, last layer, post-norm, "
            "teacher-forced transformers pass over the cached token ids; Gram matrices of the float32 vectors",
            "problems": "mixed correctness only"}
    known = cache.data.get("info", {}).get("model")
    if known not in (None, model):
        from ..errors import ConfigError

        raise ConfigError(f"{cache.path} holds embeddings from {known}, not {model}; pass --model {known} or "
                          "delete the file.")
    report(f"loading {model}", None, None)
    hf_model, _ = load_hf_model(resolve_model(model, progress=progress), device=device, dtype=dtype)
    scorer = HFScorer(hf_model, HiddenStateConfig(max_batch_tokens=max_batch_tokens))
    label = f"embedding {len(todo)} mixed problems"
    start = time.perf_counter()
    tokens = 0
    for done, rec in enumerate(todo):
        report(label, done, len(todo))
        prompt = rec["prompt_token_ids"]
        responses = [c["token_ids"] for c in rec["candidates"]]
        _, embs = scorer.score_and_embed([prompt] * len(responses), responses)
        grams = {key: gram_matrix([e[key] for e in embs]) for key in ("last", "mean")}
        tokens += sum(len(prompt) + len(r) for r in responses)
        cache.put(str(rec["id"]), grams, info)
        cache.save()
    report(label, len(todo), len(todo))
    seconds = time.perf_counter() - start
    logger.info("Embedded %d problems (%d tokens) in %.0f s", len(todo), tokens, seconds)
    return len(todo)
