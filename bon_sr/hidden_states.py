"""Hidden states of the frozen model for (prompt, response) token ids, on transformers.

Teacher-forces exactly the given token ids (never re-tokenised text) through the model in
inference mode, picks the rows of the scored token set at the requested layer, and hands
them, padded with a mask, to whoever asked. Micro-batches by a padded-token budget so
memory stays bounded however many candidates come in.

This module knows nothing about sampling or selection, and nothing about stable rank
beyond the ``HFScorer`` convenience that feeds its output to ``stable_rank``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import torch

from .errors import ConfigError
from .stable_rank import stable_rank

logger = logging.getLogger(__name__)

TOKEN_SETS = ("response", "full")
NORMS = ("post", "pre")


@dataclass(frozen=True)
class HiddenStateConfig:
    """Which hidden states are scored.

    token_set: ``response`` (response tokens only, the default) or ``full`` (chat-formatted
        prompt + response).
    layer: decoder layer, Python indexing over the layers (-1 = last, the method).
    norm: ``post`` applies the model's final norm (for layer -1 this equals HF
        ``hidden_states[-1]``); ``pre`` takes the decoder layer's raw output.
    window: score at most the first ``window`` tokens of the token set (None = all).
    max_batch_tokens: padded tokens per forward pass; bounds activation memory.
    """

    token_set: str = "response"
    layer: int = -1
    norm: str = "post"
    window: int | None = None
    max_batch_tokens: int = 8192

    def __post_init__(self) -> None:
        if self.token_set not in TOKEN_SETS:
            raise ConfigError(f"Unknown token set '{self.token_set}'. Available: {', '.join(TOKEN_SETS)}")
        if self.norm not in NORMS:
            raise ConfigError(f"Unknown norm '{self.norm}'. Available: {', '.join(NORMS)}")
        if self.window is not None and self.window < 1:
            raise ConfigError(f"window must be >= 1 or None, got {self.window}")
        if self.max_batch_tokens < 1:
            raise ConfigError(f"max_batch_tokens must be >= 1, got {self.max_batch_tokens}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def scored_span(prompt_len: int, response_len: int, config: HiddenStateConfig) -> tuple[int, int]:
    """[start, end) of the scored rows inside the concatenated prompt+response ids."""
    start = prompt_len if config.token_set == "response" else 0
    end = prompt_len + response_len
    if config.window is not None:
        end = min(end, start + config.window)
    return start, end


def _decoder_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, Sequence[torch.nn.Module], torch.nn.Module]:
    """(base decoder, its layer list, its final norm) for HF decoder-only models."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(base, "layers", None)
    norm = getattr(base, "norm", None) or getattr(base, "final_layernorm", None)
    if layers is None or norm is None:
        raise ConfigError(
            f"Cannot find the decoder layers and final norm of {type(model).__name__}; "
            "bon-sr supports Llama/Qwen/Mistral/Phi-style decoder-only models."
        )
    return base, layers, norm


def _first_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def iter_hidden_states(
    model: torch.nn.Module,
    prompt_token_ids: Sequence[Sequence[int]],
    response_token_ids: Sequence[Sequence[int]],
    config: HiddenStateConfig,
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Yield ``(indices, h, mask)`` per micro-batch.

    indices: positions of the pairs in this batch (pairs are length-sorted, so batches
        come out of order). h: ``(b, S, d)`` in the model's dtype, rows of the scored
        span left-aligned; mask: ``(b, S)`` bool, True where a row is real.
    """
    if len(prompt_token_ids) != len(response_token_ids):
        raise ValueError("prompt_token_ids and response_token_ids must have the same length")
    base, layers, final_norm = _decoder_parts(model)
    num_layers = len(layers)
    if not -num_layers <= config.layer < num_layers:
        raise ConfigError(f"layer {config.layer} is out of range for a model with {num_layers} layers "
                          f"(use -{num_layers}..{num_layers - 1})")
    layer_idx = config.layer % num_layers
    device = next(model.parameters()).device
    lengths = [len(p) + len(r) for p, r in zip(prompt_token_ids, response_token_ids)]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))

    captured: dict[str, torch.Tensor] = {}
    hooks = []
    use_last = layer_idx == num_layers - 1 and config.norm == "post"
    if not use_last:
        if layer_idx == num_layers - 1:
            hooks.append(final_norm.register_forward_pre_hook(
                lambda mod, args: captured.__setitem__("h", args[0])))
        else:
            hooks.append(layers[layer_idx].register_forward_hook(
                lambda mod, args, out: captured.__setitem__("h", _first_tensor(out))))
    try:
        pos = 0
        while pos < len(order):
            width = max(lengths[order[pos]], 1)
            count = max(1, config.max_batch_tokens // width)
            batch = order[pos:pos + count]
            pos += count
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            attn = torch.zeros(len(batch), width, dtype=torch.long)
            for row, i in enumerate(batch):
                seq = list(prompt_token_ids[i]) + list(response_token_ids[i])
                if seq:
                    ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                    attn[row, : len(seq)] = 1
            with torch.inference_mode():
                out = base(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False)
                if use_last:
                    h_all = out.last_hidden_state
                else:
                    h_all = captured.pop("h")
                    if config.norm == "post" and layer_idx != num_layers - 1:
                        h_all = final_norm(h_all)
            spans = [scored_span(len(prompt_token_ids[i]), len(response_token_ids[i]), config) for i in batch]
            span_len = max([e - s for s, e in spans] + [1])
            h = h_all.new_zeros(len(batch), span_len, h_all.shape[-1])
            mask = torch.zeros(len(batch), span_len, dtype=torch.bool, device=h_all.device)
            for row, (s, e) in enumerate(spans):
                if e > s:
                    h[row, : e - s] = h_all[row, s:e]
                    mask[row, : e - s] = True
            yield batch, h, mask
    finally:
        for hook in hooks:
            hook.remove()


class HFScorer:
    """Stable rank of a transformers model's hidden states for each (prompt, response) pair."""

    def __init__(self, model: torch.nn.Module, config: HiddenStateConfig | None = None):
        self.model = model
        self.config = config or HiddenStateConfig()

    def score(
        self, prompt_token_ids: Sequence[Sequence[int]], response_token_ids: Sequence[Sequence[int]]
    ) -> list[dict[str, float]]:
        results: list[dict[str, float]] = [{} for _ in prompt_token_ids]
        for batch, h, mask in iter_hidden_states(self.model, prompt_token_ids, response_token_ids, self.config):
            res = stable_rank(h, mask)
            for row, i in enumerate(batch):
                results[i] = {
                    "stable_rank": float(res.stable_rank[row]),
                    "frobenius_sq": float(res.frobenius_sq[row]),
                    "spectral_sq": float(res.spectral_sq[row]),
                    "scored_tokens": float(res.num_tokens[row]),
                }
        return results
