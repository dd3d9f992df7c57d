"""The pooling scorer: stable rank from a second vLLM engine run with the pooling runner.

vLLM's ``generate`` returns no hidden states and one engine cannot both generate and encode,
so this scorer encodes each (prompt, response) with an engine started with
``runner="pooling"``, ``convert="embed"``, token-wise ``ALL`` pooling and activation off
(``bon_sr.engines`` starts it): the last layer's post-final-norm rows, one per token (HF's
``hidden_states[-1]``; 2e-6 relative in float32). vLLM is imported inside the functions
only. This module knows nothing about sampling, engines' start-up or selection.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch

from ..errors import InputError
from .hidden_states import HiddenStateConfig, scored_span
from .scorers import store_scores
from .stable_rank import stable_rank


def _chunks(order: Sequence[int], lengths: Sequence[int], budget: int) -> Iterator[list[int]]:
    batch: list[int] = []
    used = 0
    for i in order:
        if batch and used + lengths[i] > budget:
            yield batch
            batch, used = [], 0
        batch.append(i)
        used += lengths[i]
    if batch:
        yield batch


def iter_pooled_hidden_states(
    llm: Any,
    prompt_token_ids: Sequence[Sequence[int]],
    response_token_ids: Sequence[Sequence[int]],
    config: HiddenStateConfig,
    *,
    max_model_len: int | None = None,
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Yield ``(indices, h, mask)`` per chunk, like ``hidden_states.iter_hidden_states``.

    h: ``(b, S, d)`` float32, the scored span's rows left-aligned; mask: ``(b, S)`` bool.
    Each chunk holds at most ``config.max_batch_tokens`` tokens (one longer pair alone),
    so the float32 states vLLM hands back stay bounded. Only ids up to the end of the
    scored span are encoded: the model is causal, so later tokens cannot change them.
    """
    from vllm import PoolingParams
    from vllm.inputs import TokensPrompt

    if len(prompt_token_ids) != len(response_token_ids):
        raise ValueError("prompt_token_ids and response_token_ids must have the same length")
    spans = [scored_span(len(p), len(r), config) for p, r in zip(prompt_token_ids, response_token_ids)]
    ends = [e if e > s else 0 for s, e in spans]  # nothing to score -> nothing to encode
    for i, end in enumerate(ends):
        if max_model_len is not None and end > max_model_len:
            raise InputError(f"pair {i}: {end} tokens to encode but the pooling engine's context is "
                             f"{max_model_len}; raise vllm_options 'max_model_len' or set a scoring window.")
    order = sorted(range(len(spans)), key=lambda i: (-ends[i], i))
    params = PoolingParams(use_activation=False)
    for batch in _chunks(order, ends, max(config.max_batch_tokens, 1)):
        todo = [i for i in batch if ends[i] > 0]
        rows: dict[int, torch.Tensor] = {}
        if todo:
            seqs = [[int(t) for t in [*prompt_token_ids[i], *response_token_ids[i]][: ends[i]]] for i in todo]
            prompts = [TokensPrompt(prompt_token_ids=seq) for seq in seqs]
            outputs = llm.encode(prompts, pooling_params=params, pooling_task="token_embed", use_tqdm=False)
            for i, out in zip(todo, outputs):
                data = out.outputs.data
                if data.ndim != 2 or data.shape[0] != ends[i]:
                    raise RuntimeError(f"vLLM returned hidden states of shape {tuple(data.shape)} for {ends[i]} "
                                       "tokens; the pooling engine must use token_embed / ALL pooling without "
                                       "prefix caching")
                s, e = spans[i]
                rows[i] = data[s:e].float()
        width = max([e - s for s, e in (spans[i] for i in batch)] + [1])
        dim = next(iter(rows.values())).shape[-1] if rows else 1
        h = torch.zeros(len(batch), width, dim, dtype=torch.float32)
        mask = torch.zeros(len(batch), width, dtype=torch.bool)
        for row, i in enumerate(batch):
            if i in rows:
                h[row, : rows[i].shape[0]] = rows[i]
                mask[row, : rows[i].shape[0]] = True
        yield batch, h, mask


class VLLMScorer:
    """Stable rank of the pooling engine's last-layer post-norm states per (prompt, response)."""

    def __init__(self, llm: Any, config: HiddenStateConfig | None = None, *, max_model_len: int | None = None):
        self.llm = llm
        self.config = config or HiddenStateConfig()
        self.max_model_len = max_model_len

    def score(
        self, prompt_token_ids: Sequence[Sequence[int]], response_token_ids: Sequence[Sequence[int]]
    ) -> list[dict[str, float]]:
        results: list[dict[str, float]] = [{} for _ in prompt_token_ids]
        for batch, h, mask in iter_pooled_hidden_states(self.llm, prompt_token_ids, response_token_ids,
                                                        self.config, max_model_len=self.max_model_len):
            res = stable_rank(h, mask)
            store_scores(results, batch, res)
        return results
