"""Hidden states of the frozen model for (prompt, response) token ids, on transformers.

Teacher-forces exactly the given token ids (never re-tokenised text) through the model in
inference mode, picks the rows of the scored token set at the requested layer, and hands
them, padded with a mask, to whoever asked. Micro-batches by a padded-token budget so
memory stays bounded however many candidates come in. The token set ``response+eot``
appends the model's end-of-turn token (:func:`end_of_turn_id`) to every response that does
not already end with it, since sampled responses are stored without it.

``extract`` is the one extraction path: several (norm, layer) views from ONE forward
pass, the scored token set and window, and optionally each pair's token log-prob and
self-certainty from the same pass's last-layer logits. The HF scorer (``bon_sr.scoring.scorers``),
the benchmark, the ablation and the SR reward all read hidden states through it.

This module knows nothing about sampling, stable rank or selection.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch

from ..errors import ConfigError, OptionError
from .variants import parse_variant

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
    transform: a row-transform spec of :mod:`bon_sr.scoring.variants` applied to the scored rows
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
            raise OptionError("token_set", f"Unknown token set '{self.token_set}'. Available: {', '.join(TOKEN_SETS)}")
        if self.norm not in NORMS:
            raise OptionError("norm", f"Unknown norm '{self.norm}'. Available: {', '.join(NORMS)}")
        if self.window is not None and self.window < 1:
            raise OptionError("window", f"{{@window}} must be >= 1 or None, got {self.window}")
        if self.max_batch_tokens < 1:
            raise OptionError("max_batch_tokens", f"{{@max_batch_tokens}} must be >= 1, got {self.max_batch_tokens}")
        if parse_variant(self.transform).length_correction:
            raise OptionError("transform", "'length' corrects a candidate group's scores, not one candidate's H; "
                              "apply bon_sr.scoring.variants.length_corrected to each group's scores instead.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def scored_span(prompt_len: int, response_len: int, config: HiddenStateConfig) -> tuple[int, int]:
    """[start, end) of the scored rows inside the concatenated prompt+response ids."""
    start = 0 if config.token_set == "full" else prompt_len
    end = prompt_len + response_len
    if config.window is not None:
        end = min(end, start + config.window)
    return start, end


def _eos_ids(model: torch.nn.Module) -> list[int]:
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(source, "eos_token_id", None)
        ids = [e for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if isinstance(e, int)]
        if ids:
            return ids
    return []


def _ids(rendered: Any) -> list[int]:
    return list(rendered["input_ids"] if isinstance(rendered, Mapping) else rendered)


def end_of_turn_id(model: torch.nn.Module, tokenizer: Any = None) -> int:
    """The token that ends an assistant turn.

    Models that list several end-of-sequence ids (Llama-3 Instruct: ``<|end_of_text|>``,
    ``<|eom_id|>``, ``<|eot_id|>``) end a turn with only one of them, so with a tokenizer
    the chat template decides: the first of the eos ids that the template writes after an
    assistant message. Otherwise (or when the template shows none) the first eos id."""
    eos = _eos_ids(model)
    if not eos:
        raise ConfigError(f"{type(model).__name__} declares no eos_token_id; token set 'response+eot' needs one.")
    if len(eos) > 1 and tokenizer is not None and getattr(tokenizer, "chat_template", None):
        try:
            user = [{"role": "user", "content": "hi"}]
            head = _ids(tokenizer.apply_chat_template(user, tokenize=True, add_generation_prompt=True))
            full = _ids(tokenizer.apply_chat_template(user + [{"role": "assistant", "content": "ok"}],
                                                      tokenize=True))
        except Exception:  # a template that cannot render this chat: keep the config's order
            head, full = [], []
        if full[:len(head)] == head:
            for t in full[len(head):]:      # what the template writes after the reply starts
                if t in eos:
                    return int(t)
    return eos[0]


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


def decoder_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, Sequence[torch.nn.Module], torch.nn.Module]:
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


@dataclass
class StateBatch:
    """One micro-batch from ``extract``.

    indices: positions of its pairs in the input (pairs are length-sorted, so batches come
        out of order). states: ``{(norm, layer): h (b, S, d)}`` in the model's dtype, the
        scored span's rows left-aligned. mask: ``(b, S)`` bool, True where a row is real.
    token_stats: when asked, per pair ``(mean log p(token), mean KL(uniform || p))`` over
        its response tokens under the model's own distribution (temperature 1), from this
        pass's last-layer logits; NaN for an empty response.
    embeddings: when asked, per pair ``{"last": ..., "mean": ...}`` float32 tuples from the
        last layer's post-norm rows of its response tokens (``embedding_summary``).
    """

    indices: list[int]
    states: dict[tuple[str, int], torch.Tensor]
    mask: torch.Tensor
    token_stats: list[tuple[float, float]] | None = None
    embeddings: list[Mapping[str, tuple[float, ...]]] | None = None


#: logit rows turned into log-softmax at once: bounds memory at rows x vocab x 4 bytes
_LOGIT_CHUNK = 256


def token_log_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``logits: (R, V)``: log p(``targets: (R,)``) and KL(uniform || p)
    = -log V - mean_j log p_j (self-certainty, Kang et al. 2025), both float32 ``(R,)``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return (logp.gather(-1, targets[:, None].to(logp.device)).squeeze(-1),
            -math.log(logp.shape[-1]) - logp.mean(dim=-1))


def _mean_token_stats(lm_head: torch.nn.Module, h: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """Means over rows ``h: (R, d)`` that predict ``targets: (R,)``, chunked over rows."""
    total_lp = total_kl = 0.0
    for start in range(0, h.shape[0], _LOGIT_CHUNK):
        lp, kl = token_log_stats(lm_head(h[start:start + _LOGIT_CHUNK]), targets[start:start + _LOGIT_CHUNK])
        total_lp += float(lp.sum())
        total_kl += float(kl.sum())
    return total_lp / h.shape[0], total_kl / h.shape[0]


def embedding_summary(rows: torch.Tensor) -> Mapping[str, tuple[float, ...]]:
    """A candidate's embeddings for the consensus utilities (``bon_sr.selection.consensus``) from its
    response rows ``(r, d)`` of the last layer, post-norm: ``{"last": row r-1, "mean": the
    mean over the r rows}`` computed in float32, as Python floats; NaN vectors for an empty
    response (its similarities are then NaN)."""
    rows = rows.float()
    if rows.shape[0] == 0:
        nan = (math.nan,) * int(rows.shape[-1])
        return {"last": nan, "mean": nan}
    return {"last": tuple(rows[-1].tolist()), "mean": tuple(rows.mean(dim=0).tolist())}


def _layer_index(layer: int, num_layers: int) -> int:
    if not -num_layers <= layer < num_layers:
        raise ConfigError(f"layer {layer} is out of range for a model with {num_layers} layers "
                          f"(use -{num_layers}..{num_layers - 1})")
    return layer % num_layers


def extract(
    model: torch.nn.Module,
    prompt_token_ids: Sequence[Sequence[int]],
    response_token_ids: Sequence[Sequence[int]],
    *,
    views: Sequence[tuple[str, int]] = (("post", -1),),
    token_set: str = "response",
    window: int | None = None,
    max_batch_tokens: int = 8192,
    token_stats: bool = False,
    stat_lengths: Sequence[int] | None = None,
    embeddings: bool = False,
) -> Iterator[StateBatch]:
    """Hidden states of every ``(norm, layer)`` view for each (prompt, response) pair, from
    one forward pass per micro-batch (see ``StateBatch``).

    ``norm="post"`` applies the final norm (for the last layer: HF ``hidden_states[-1]``),
    ``"pre"`` is the decoder layer's raw output. ``token_set`` is ``response`` or ``full``
    (callers append the end-of-turn token for ``response+eot``). ``stat_lengths``: score the
    token statistics and the embeddings over only the first k response tokens of each pair
    (default: all). ``embeddings``: each pair's last-response-token row and mean response
    row of the last layer, post-norm (the consensus utilities), from the same pass.
    """
    if len(prompt_token_ids) != len(response_token_ids):
        raise ValueError("prompt_token_ids and response_token_ids must have the same length")
    for norm, _ in views:
        if norm not in NORMS:
            raise ConfigError(f"Unknown norm '{norm}'. Available: {', '.join(NORMS)}")
    base, layers, final_norm = decoder_parts(model)
    last = len(layers) - 1
    index = {view: _layer_index(view[1], len(layers)) for view in views}
    span_cfg = HiddenStateConfig(token_set="full" if token_set == "full" else "response", window=window)
    lm_head = model.get_output_embeddings() if token_stats else None
    device = next(model.parameters()).device
    captured: dict[int, torch.Tensor] = {}
    # Hooks record only during the model's own forward: the post-norm states of other
    # layers below call ``final_norm`` again, which would overwrite the last layer's input.
    live = [False]

    def keep(layer: int, value: torch.Tensor) -> None:
        if live[0]:
            captured[layer] = value

    hooks = []
    for layer in sorted({index[v] for v in views if not (index[v] == last and v[0] == "post")}):
        if layer == last:
            hooks.append(final_norm.register_forward_pre_hook(lambda mod, args: keep(last, args[0])))
        else:
            hooks.append(layers[layer].register_forward_hook(
                lambda mod, args, out, _l=layer: keep(_l, _first_tensor(out))))
    try:
        for batch, ids, attn in padded_batches(prompt_token_ids, response_token_ids, max_batch_tokens):
            captured.clear()
            with torch.inference_mode():
                live[0] = True
                try:
                    out = base(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False)
                finally:
                    live[0] = False
                full: dict[tuple[str, int], torch.Tensor] = {}
                for view in views:
                    layer = index[view]
                    if layer == last and view[0] == "post":
                        full[view] = out.last_hidden_state
                    elif view[0] == "post":
                        full[view] = final_norm(captured[layer])
                    else:
                        full[view] = captured[layer]
                stats = None
                if lm_head is not None:
                    stats = []
                    for row, i in enumerate(batch):
                        p, r = len(prompt_token_ids[i]), len(response_token_ids[i])
                        r = r if stat_lengths is None else min(r, stat_lengths[i])
                        if r and p:
                            targets = torch.tensor(list(response_token_ids[i][:r]), dtype=torch.long)
                            stats.append(_mean_token_stats(lm_head, out.last_hidden_state[row, p - 1:p + r - 1],
                                                           targets))
                        else:
                            stats.append((math.nan, math.nan))
                summaries = None
                if embeddings:
                    summaries = []
                    for row, i in enumerate(batch):
                        p, r = len(prompt_token_ids[i]), len(response_token_ids[i])
                        r = r if stat_lengths is None else min(r, stat_lengths[i])
                        summaries.append(embedding_summary(out.last_hidden_state[row, p:p + r]))
            spans = [scored_span(len(prompt_token_ids[i]), len(response_token_ids[i]), span_cfg) for i in batch]
            span_len = max([e - s for s, e in spans] + [1])
            mask = torch.zeros(len(batch), span_len, dtype=torch.bool, device=out.last_hidden_state.device)
            for row, (s, e) in enumerate(spans):
                mask[row, : max(e - s, 0)] = True
            picked = {}
            for view, h_all in full.items():
                h = h_all.new_zeros(len(batch), span_len, h_all.shape[-1])
                for row, (s, e) in enumerate(spans):
                    if e > s:
                        h[row, : e - s] = h_all[row, s:e]
                picked[view] = h
            yield StateBatch(list(batch), picked, mask, stats, summaries)
    finally:
        for hook in hooks:
            hook.remove()


def iter_hidden_states(
    model: torch.nn.Module,
    prompt_token_ids: Sequence[Sequence[int]],
    response_token_ids: Sequence[Sequence[int]],
    config: HiddenStateConfig,
    tokenizer: Any = None,
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Yield ``(indices, h, mask)`` per micro-batch for the config's one layer and norm
    (``extract`` with a single view; ``response+eot`` appends the end-of-turn token)."""
    if config.token_set == "response+eot":
        response_token_ids = with_end_of_turn(response_token_ids, end_of_turn_id(model, tokenizer))
    view = (config.norm, config.layer)
    for b in extract(model, prompt_token_ids, response_token_ids, views=[view], token_set=config.token_set,
                     window=config.window, max_batch_tokens=config.max_batch_tokens):
        yield b.indices, b.states[view], b.mask


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
