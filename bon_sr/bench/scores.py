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

import math
from dataclasses import replace
from typing import Any, Sequence

import torch

from ..hidden_states import HFScorer, HiddenStateConfig, iter_hidden_states
from ..stable_rank import stable_rank

#: logits rows turned into log-softmax at once: bounds memory at rows x vocab x 4 bytes
_LOGIT_CHUNK = 256


def _token_stats(lm_head: torch.nn.Module, h: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """(mean log p(target), mean KL(U || p)) for rows ``h: (R, d)`` predicting ``targets: (R,)``."""
    total_lp = 0.0
    total_kl = 0.0
    for start in range(0, h.shape[0], _LOGIT_CHUNK):
        with torch.inference_mode():
            lp, kl = _chunk_stats(lm_head, h[start:start + _LOGIT_CHUNK], targets[start:start + _LOGIT_CHUNK])
        total_lp += lp
        total_kl += kl
    return total_lp / h.shape[0], total_kl / h.shape[0]


def _chunk_stats(lm_head: torch.nn.Module, h: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    logp = torch.log_softmax(lm_head(h).float(), dim=-1)
    vocab = logp.shape[-1]
    return (float(logp.gather(-1, targets[:, None].to(logp.device)).sum()),
            float((-math.log(vocab) - logp.mean(dim=-1)).sum()))


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
    full = replace(config, token_set="full", layer=-1, norm="post", window=None)
    one_pass = config.layer == -1 and config.norm == "post" and config.window is None
    lm_head = model.get_output_embeddings()
    nan = float("nan")
    out: list[dict[str, Any]] = [{} for _ in prompt_token_ids]
    for batch, h, mask in iter_hidden_states(model, prompt_token_ids, response_token_ids, full):
        # h: (b, S, d) rows 0..P+R of each pair, left-aligned; mask: (b, S)
        if one_pass:
            resp_mask = mask.clone()
            for row, i in enumerate(batch):
                resp_mask[row, : len(prompt_token_ids[i])] = False
            sr_full = stable_rank(h, mask).stable_rank
            sr_resp = stable_rank(h, resp_mask).stable_rank
        for row, i in enumerate(batch):
            p, r = len(prompt_token_ids[i]), len(response_token_ids[i])
            scores: dict[str, float] = {"num_tokens": float(r)}
            if one_pass:
                scores["sr_full"] = float(sr_full[row])
                scores["sr_response"] = float(sr_resp[row]) if r else nan
            if r and p:
                targets = torch.tensor(list(response_token_ids[i]), dtype=torch.long)
                lp, sc = _token_stats(lm_head, h[row, p - 1:p + r - 1], targets)
                scores.update(mean_logprob=lp, self_certainty=sc)
            else:
                scores.update(mean_logprob=nan, self_certainty=nan)
            out[i] = scores
    if not one_pass:
        for token_set, key in (("response", "sr_response"), ("full", "sr_full")):
            scorer = HFScorer(model, replace(config, token_set=token_set))
            for i, res in enumerate(scorer.score(prompt_token_ids, response_token_ids)):
                empty = key == "sr_response" and not response_token_ids[i]
                out[i][key] = nan if empty else res["stable_rank"]
    return out
