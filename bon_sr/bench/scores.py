"""Per-candidate scores for the benchmark, from one teacher-forced pass of the frozen model.

For each (prompt ids, response ids) pair:
- ``sr_response`` / ``sr_full``: stable rank of the last layer's post-norm hidden states
  over the response tokens / the whole chat-formatted prompt + response (the paper's two
  readings; identical to ``HFScorer`` with ``token_set`` response / full);
- ``mean_logprob``: mean over response tokens of log p(token | context) under the model's
  own distribution (temperature 1, no top-p: the model's belief, not the sampler's);
- ``self_certainty``: mean over response tokens of KL(uniform || p(. | context))
  = -log V - mean_j log p_j over the V output logits (Kang et al. 2025);
- ``num_tokens``.
With the default hidden-state config, one forward pass gives all of them: the SR rows
are the post-norm last-layer states and the logits come from the same states through the
LM head. Another layer or norm falls back to ``HFScorer`` for SR (an extra pass).

Empty responses get NaN scores (selectors rank NaN last). This module knows nothing about
sampling, answers or selection.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import torch

from ..scoring.hidden_states import HiddenStateConfig, extract
from ..scoring.scorers import HFScorer
from ..scoring.stable_rank import stable_rank


def score_candidates(
    model: torch.nn.Module,
    prompt_token_ids: Sequence[Sequence[int]],
    response_token_ids: Sequence[Sequence[int]],
    *,
    config: HiddenStateConfig | None = None,
) -> list[dict[str, float]]:
    """One dict of scores per pair (see the module docstring). ``config`` sets layer, norm,
    window and ``max_batch_tokens`` for SR; its ``token_set`` is ignored (both are scored)."""
    if len(prompt_token_ids) != len(response_token_ids):
        raise ValueError("prompt_token_ids and response_token_ids must have the same length")
    config = config or HiddenStateConfig()
    one_pass = config.layer == -1 and config.norm == "post" and config.window is None
    nan = float("nan")
    out: list[dict[str, Any]] = [{} for _ in prompt_token_ids]
    view = ("post", -1)
    for b in extract(model, prompt_token_ids, response_token_ids, views=[view], token_set="full",
                     max_batch_tokens=config.max_batch_tokens, token_stats=True):
        # states: (b, S, d) rows 0..P+R of each pair, left-aligned; mask: (b, S)
        h, mask = b.states[view], b.mask
        if one_pass:
            resp_mask = mask.clone()
            for row, i in enumerate(b.indices):
                resp_mask[row, : len(prompt_token_ids[i])] = False
            sr_full = stable_rank(h, mask).stable_rank
            sr_resp = stable_rank(h, resp_mask).stable_rank
        for row, (i, (lp, sc)) in enumerate(zip(b.indices, b.token_stats or [])):
            r = len(response_token_ids[i])
            scores: dict[str, float] = {"num_tokens": float(r), "mean_logprob": lp, "self_certainty": sc}
            if one_pass:
                scores["sr_full"] = float(sr_full[row])
                scores["sr_response"] = float(sr_resp[row]) if r else nan
            out[i] = scores
    if not one_pass:
        for token_set, key in (("response", "sr_response"), ("full", "sr_full")):
            scorer = HFScorer(model, replace(config, token_set=token_set))
            for i, res in enumerate(scorer.score(prompt_token_ids, response_token_ids)):
                empty = key == "sr_response" and not response_token_ids[i]
                out[i][key] = nan if empty else res["stable_rank"]
    return out
