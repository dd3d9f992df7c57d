"""Hidden states of the frozen model for (prompt, response) token ids, on transformers.

Teacher-forces exactly the given token ids (never re-tokenised text) through the model in
inference mode, picks the rows of the scored token set at the requested layer, and hands
them, padded with a mask, to whoever asked. Micro-batches by a padded-token budget so
memory stays bounded however many candidates come in. The token set ``response+eot``
appends the model's end-of-turn token (:func:`end_of_turn_id`) to every response that does
not already end with it, since sampled responses are stored without it.

This module knows nothing about sampling or selection, and nothing about stable rank
beyond the ``HFScorer`` convenience that applies the configured transform of H
(:mod:`bon_sr.variants`) and feeds the rows to ``stable_rank``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import torch

from .errors import ConfigError
from .stable_rank import StableRankResult, stable_rank
from .variants import CalibrationStats, TransformContext, parse_variant

logger = logging.getLogger(__name__)

TOKEN_SETS = ("response", "response+eot", "full")
NORMS = ("post", "pre")


@dataclass(frozen=True)
class HiddenStateConfig:
    """Which hidden states are scored.

    token_set: ``response`` (response tokens only, the default), ``response+eot`` (response
        tokens plus the end-of-turn token) or ``full`` (chat-formatted prompt + response).
    layer: decoder layer, Python indexing over the layers (-1 = last, the method).
    norm: ``post`` applies the model's final norm (for layer -1 this equals HF
        ``hidden_states[-1]``); ``pre`` takes the decoder layer's raw output.
    window: score at most the first ``window`` tokens of the token set (None = all).
    max_batch_tokens: padded tokens per forward pass; bounds activation memory.
    transform: a row-transform spec of :mod:`bon_sr.variants` applied to the scored rows
        before stable rank (``raw`` = the paper, the default; e.g. ``center``,
        ``center+drop-massive-seq``). Calibrated ones (``drop-massive``, ``standardize``)
        need ``HFScorer(..., calibration=...)``. Only ``HFScorer`` applies it.
    """

    token_set: str = "response"
    layer: int = -1
    norm: str = "post"
    window: int | None = None
    max_batch_tokens: int = 8192
    transform: str = "raw"

    def __post_init__(self) -> None:
        if self.token_set not in TOKEN_SETS:
            raise ConfigError(f"Unknown token set '{self.token_set}'. Available: {', '.join(TOKEN_SETS)}")
        if self.norm not in NORMS:
            raise ConfigError(f"Unknown norm '{self.norm}'. Available: {', '.join(NORMS)}")
        if self.window is not None and self.window < 1:
            raise ConfigError(f"window must be >= 1 or None, got {self.window}")
        if self.max_batch_tokens < 1:
            raise ConfigError(f"max_batch_tokens must be >= 1, got {self.max_batch_tokens}")
        if parse_variant(self.transform).length_correction:
            raise ConfigError("'length' corrects a candidate group's scores, not one candidate's H; "
                              "apply bon_sr.variants.length_corrected to each group's scores instead.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def scored_span(prompt_len: int, response_len: int, config: HiddenStateConfig) -> tuple[int, int]:
    """[start, end) of the scored rows inside the concatenated prompt+response ids."""
    start = 0 if config.token_set == "full" else prompt_len
    end = prompt_len + response_len
    if config.window is not None:
        end = min(end, start + config.window)
    return start, end


def end_of_turn_id(model: torch.nn.Module) -> int:
    """The token that ends an assistant turn: the first of the generation config's
    ``eos_token_id`` (chat models list their end-of-turn token there), else the config's."""
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        if isinstance(eos, int):
            return eos
    raise ConfigError(f"{type(model).__name__} declares no eos_token_id; token set 'response+eot' needs one.")


def with_end_of_turn(response_token_ids: Sequence[Sequence[int]], eot: int) -> list[list[int]]:
    """Each response with ``eot`` appended unless it already ends with it."""
    return [list(r) if len(r) and r[-1] == eot else [*r, eot] for r in response_token_ids]


def scored_token_ids(
    prompt_token_ids: Sequence[Sequence[int]],
    response_token_ids: Sequence[Sequence[int]],
    batch: Sequence[int],
    width: int,
    config: HiddenStateConfig,
) -> torch.Tensor:
    """``(len(batch), width)`` ids of the rows ``iter_hidden_states`` yielded for ``batch``
    (-1 on padding). For ``response+eot`` pass the responses through ``with_end_of_turn``
    first (it is idempotent, so ``iter_hidden_states`` may get either)."""
    out = torch.full((len(batch), width), -1, dtype=torch.long)
    for row, i in enumerate(batch):
        resp = list(response_token_ids[i])
        seq = list(prompt_token_ids[i]) + resp
        s, e = scored_span(len(prompt_token_ids[i]), len(resp), config)
        if e > s:
            out[row, : e - s] = torch.tensor(seq[s:e], dtype=torch.long)
    return out


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



def padded_batches(
    prompt_token_ids: Sequence[Sequence[int]], response_token_ids: Sequence[Sequence[int]], max_batch_tokens: int
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Length-sorted micro-batches of right-padded prompt+response ids.

    Yields ``(indices, input_ids (b, T), attention_mask (b, T))`` with ``b * T`` at most
    ``max_batch_tokens`` (one sequence per batch when a single one is longer).
    """
    lengths = [len(p) + len(r) for p, r in zip(prompt_token_ids, response_token_ids)]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    pos = 0
    while pos < len(order):
        width = max(lengths[order[pos]], 1)
        batch = order[pos:pos + max(1, max_batch_tokens // width)]
        pos += len(batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        attn = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            seq = list(prompt_token_ids[i]) + list(response_token_ids[i])
            if seq:
                ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                attn[row, : len(seq)] = 1
        yield batch, ids, attn

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
    if config.token_set == "response+eot":
        response_token_ids = with_end_of_turn(response_token_ids, end_of_turn_id(model))
    device = next(model.parameters()).device

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
        for batch, ids, attn in padded_batches(prompt_token_ids, response_token_ids, config.max_batch_tokens):
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


def model_special_ids(model: torch.nn.Module) -> frozenset[int]:
    """BOS, EOS (all of them) and pad ids that the model's configs declare."""
    ids: set[int] = set()
    for source in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(source, key, None)
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(v, int):
                    ids.add(v)
    return frozenset(ids)



def store_scores(results: list[dict[str, float]], batch: Sequence[int], res: StableRankResult) -> None:
    """Write one micro-batch's stable-rank parts into ``results`` at the pairs' positions
    (the score dict every scorer returns)."""
    for row, i in enumerate(batch):
        results[i] = {
            "stable_rank": float(res.stable_rank[row]),
            "frobenius_sq": float(res.frobenius_sq[row]),
            "spectral_sq": float(res.spectral_sq[row]),
            "scored_tokens": float(res.num_tokens[row]),
        }

class HFScorer:
    """Stable rank of a transformers model's hidden states for each (prompt, response) pair.

    calibration: statistics for calibrated transforms (``drop-massive``, ``standardize``)
        at the config's layer and norm. special_ids: rows ``drop-special`` removes
        (default: the model config's BOS/EOS/pad ids).
    """

    def __init__(self, model: torch.nn.Module, config: HiddenStateConfig | None = None, *,
                 calibration: CalibrationStats | None = None, special_ids: frozenset[int] | None = None):
        self.model = model
        self.config = config or HiddenStateConfig()
        self.variant = parse_variant(self.config.transform)
        if self.variant.needs_calibration and calibration is None:
            raise ConfigError(f"Transform '{self.config.transform}' needs calibration statistics: pass "
                              "HFScorer(..., calibration=CalibrationAccumulator().finish()) from a calibration set.")
        self.calibration = calibration
        self.special_ids = model_special_ids(model) if special_ids is None else frozenset(special_ids)

    def score(
        self, prompt_token_ids: Sequence[Sequence[int]], response_token_ids: Sequence[Sequence[int]]
    ) -> list[dict[str, float]]:
        results: list[dict[str, float]] = [{} for _ in prompt_token_ids]
        if self.config.token_set == "response+eot":
            response_token_ids = with_end_of_turn(response_token_ids, end_of_turn_id(self.model))
        for batch, h, mask in iter_hidden_states(self.model, prompt_token_ids, response_token_ids, self.config):
            if not self.variant.is_identity:
                ids = (scored_token_ids(prompt_token_ids, response_token_ids, batch, h.shape[1], self.config)
                       if self.variant.needs_token_ids else None)
                ctx = TransformContext(stats=self.calibration, token_ids=ids, special_ids=self.special_ids)
                h, mask = self.variant.apply(h, mask, ctx)
            res = stable_rank(h, mask)
            store_scores(results, batch, res)
        return results
