"""The scoring layer: hidden states -> stable rank (+ token statistics) -> one score dict.

Every scorer returns, per (prompt ids, response ids) pair, one dict with the same keys:

- ``stable_rank``, ``frobenius_sq``, ``spectral_sq``, ``scored_tokens``: the stable rank
  of the scored rows and its parts (``bon_sr.scoring.stable_rank``);
- ``mean_logprob`` and ``self_certainty`` when asked for (``logit_stats=True``): the mean
  over the response tokens of log p(token) and of KL(uniform || p) under the frozen
  model's own distribution (temperature 1), from the SAME forward pass as the states.

``HFScorer`` reads the states through ``hidden_states.extract``; the vLLM scorers (the
in-pass hook and the pooling engine, ``bon_sr.engines``) fill the same dict.
``HFScorer.score_and_embed`` also returns each pair's embeddings for the hidden consensus
utilities (``bon_sr.selection.consensus``) from the same forward; ``EMBEDDING_SCORERS`` names the
scorers that can.
``SCORERS`` names them; ``SCORE_SOURCES`` says where each score comes from on each, so a
caller can validate a selector against a scorer before anything is loaded.

This module knows nothing about sampling or selection.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import torch

from ..errors import ConfigError
from .hidden_states import HiddenStateConfig, end_of_turn_id, extract, model_special_ids, scored_token_ids, \
    with_end_of_turn
from .stable_rank import StableRankResult, stable_rank
from .variants import CalibrationStats, TransformContext, parse_variant

if TYPE_CHECKING:
    from ..selection.selectors import SelectorSpec

SR_KEYS = ("stable_rank", "frobenius_sq", "spectral_sq", "scored_tokens")
STAT_KEYS = ("mean_logprob", "self_certainty")

#: scorer name -> what it is
SCORERS = {
    "hf": "transformers forward of the frozen model (any layer, norm, transform)",
    "hook": "inside vLLM's sampling pass (one engine; last layer, post-norm, raw)",
    "pooling": "a second vLLM engine with the pooling runner (last layer, post-norm, raw)",
}

#: scorer -> score key -> where the value comes from (absent: that scorer cannot give it)
SCORE_SOURCES = {
    "hf": {**{k: "hf forward" for k in SR_KEYS}, **{k: "hf forward logits" for k in STAT_KEYS}},
    "hook": {**{k: "vllm hook" for k in SR_KEYS}, **{k: "vllm hook logits" for k in STAT_KEYS}},
    "pooling": {**{k: "vllm pooling engine" for k in SR_KEYS}, "mean_logprob": "vllm sampled-token logprobs"},
}


#: scorers that return per-candidate embeddings (``Candidate.embeddings``) for the hidden
#: consensus utilities (the hook from its sampling pass, or its teacher-forced prefill for
#: caller-supplied candidates); the pooling engine returns none
EMBEDDING_SCORERS = ("hf", "hook")


def sr_scores(res: StableRankResult, row: int) -> dict[str, float]:
    """The stable-rank part of a score dict for one row of a batched result."""
    return {
        "stable_rank": float(res.stable_rank[row]),
        "frobenius_sq": float(res.frobenius_sq[row]),
        "spectral_sq": float(res.spectral_sq[row]),
        "scored_tokens": float(res.num_tokens[row]),
    }


def store_scores(results: list[dict[str, float]], batch: Sequence[int], res: StableRankResult) -> None:
    """Merge one micro-batch's stable-rank parts into ``results`` at the pairs' positions."""
    for row, i in enumerate(batch):
        results[i].update(sr_scores(res, row))


def score_keys(selector: "SelectorSpec", *, score: bool | None = None, logit_stats: bool = False) -> frozenset[str]:
    """The scores to compute for ``selector``: what it needs (a user callable without
    ``needs_scores``: stable rank), plus stable rank when ``score`` is True, plus the logit
    statistics when asked; nothing when ``score`` is False (refused if the selector needs
    scores). An empty set means no scoring pass at all."""
    needed = selector.needs_scores
    if score is False:
        if needed:
            raise ConfigError(f"Selector '{selector.name}' needs the scores {', '.join(sorted(needed))}; "
                              "drop score=False (--no-score).")
        return frozenset()
    keys = set(needed or ())
    if score is True or needed is None or keys & set(SR_KEYS):
        keys |= set(SR_KEYS)
    if logit_stats or keys & set(STAT_KEYS):
        keys |= set(STAT_KEYS)
    return frozenset(keys)


def check_scores(scorer: str, keys: frozenset[str] | set[str]) -> None:
    """ConfigError unless ``scorer`` can compute every score in ``keys``."""
    sources = SCORE_SOURCES.get(scorer)
    if sources is None:
        raise ConfigError(f"Unknown scorer '{scorer}'. Available: {', '.join(sorted(SCORERS))}")
    missing = sorted(set(keys) - set(sources))
    if missing:
        able = sorted(s for s, src in SCORE_SOURCES.items() if set(keys) <= set(src))
        raise ConfigError(f"The {scorer} scorer cannot compute {', '.join(missing)}; use scorer "
                          f"{' or '.join(repr(s) for s in able)}.")


class HFScorer:
    """Stable rank of a transformers model's hidden states for each (prompt, response) pair.

    logit_stats: also return ``mean_logprob`` and ``self_certainty`` from the same pass.
    calibration: statistics for calibrated transforms (``drop-massive``, ``standardize``)
        at the config's layer and norm. special_ids: rows ``drop-special`` removes
        (default: the model config's BOS/EOS/pad ids). tokenizer: finds the end-of-turn
        token of multi-EOS models for ``response+eot`` (``hidden_states.end_of_turn_id``).
    """

    name = "hf"

    def __init__(self, model: torch.nn.Module, config: HiddenStateConfig | None = None, *,
                 logit_stats: bool = False, calibration: CalibrationStats | None = None,
                 special_ids: frozenset[int] | None = None, tokenizer: object = None):
        self.model = model
        self.config = config or HiddenStateConfig()
        self.logit_stats = bool(logit_stats)
        self.variant = parse_variant(self.config.transform)
        if self.variant.needs_calibration and calibration is None:
            raise ConfigError(f"Transform '{self.config.transform}' needs calibration statistics: pass "
                              "HFScorer(..., calibration=CalibrationAccumulator().finish()) from a calibration set.")
        self.calibration = calibration
        self.special_ids = model_special_ids(model) if special_ids is None else frozenset(special_ids)
        self.tokenizer = tokenizer

    def score(
        self, prompt_token_ids: Sequence[Sequence[int]], response_token_ids: Sequence[Sequence[int]]
    ) -> list[dict[str, float]]:
        return self._run(prompt_token_ids, response_token_ids, embed=False)[0]

    def score_and_embed(
        self, prompt_token_ids: Sequence[Sequence[int]], response_token_ids: Sequence[Sequence[int]]
    ) -> tuple[list[dict[str, float]], list[Mapping[str, tuple[float, ...]]]]:
        """``score``'s dicts and, from the same forward, each pair's embeddings
        ``{"last": (d,), "mean": (d,)}``: its response rows of the last layer, post-norm,
        float32, whatever layer, norm and token set the stable rank reads."""
        return self._run(prompt_token_ids, response_token_ids, embed=True)

    def _run(self, prompt_token_ids: Sequence[Sequence[int]], response_token_ids: Sequence[Sequence[int]], *,
             embed: bool) -> tuple[list[dict[str, float]], list[Mapping[str, tuple[float, ...]]]]:
        cfg = self.config
        results: list[dict[str, float]] = [{} for _ in prompt_token_ids]
        embeddings: list[Mapping[str, tuple[float, ...]]] = [{} for _ in prompt_token_ids]
        lengths = [len(r) for r in response_token_ids]
        if cfg.token_set == "response+eot":
            response_token_ids = with_end_of_turn(response_token_ids, end_of_turn_id(self.model, self.tokenizer))
        view = (cfg.norm, cfg.layer)
        for b in extract(self.model, prompt_token_ids, response_token_ids, views=[view], token_set=cfg.token_set,
                         window=cfg.window, max_batch_tokens=cfg.max_batch_tokens, token_stats=self.logit_stats,
                         stat_lengths=lengths, embeddings=embed):
            h, mask = b.states[view], b.mask
            if not self.variant.is_identity:
                ids = (scored_token_ids(prompt_token_ids, response_token_ids, b.indices, h.shape[1], cfg)
                       if self.variant.needs_token_ids else None)
                ctx = TransformContext(stats=self.calibration, token_ids=ids, special_ids=self.special_ids)
                h, mask = self.variant.apply(h, mask, ctx)
            store_scores(results, b.indices, stable_rank(h, mask))
            if b.token_stats is not None:
                for i, (lp, sc) in zip(b.indices, b.token_stats):
                    results[i].update(mean_logprob=lp, self_certainty=sc)
            for i, e in zip(b.indices, b.embeddings or ()):
                embeddings[i] = e
        return results, embeddings
