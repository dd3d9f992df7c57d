"""Scorer variants: transforms of the hidden-state matrix H before its stable rank is taken.

The paper scores SR(H) = ||H||_F^2 / ||H||_2^2 of the raw post-norm last-layer states of
the response tokens. In small models a few massive-activation dimensions (mean |h| several
times the median) make one direction dominate H and pin SR near 2; the variants here test
whether the signal hides under them. Each variant is one entry of :data:`VARIANTS`; a
spec joins names with ``+`` and applies them left to right, e.g. ``center+drop-massive``.

Row transforms, ``fn(h, mask, ctx) -> (h, mask)`` with ``h: (B, T, d)`` and
``mask: (B, T)`` bool (True = the row counts):

- ``paper`` / ``raw``: identity. ``paper`` at the default :class:`HiddenStateConfig`
  (post-norm, last layer, response tokens) is the paper's definition.
- ``center``: subtract each sequence's mean counted row. H whose counted rows are all
  equal (in particular a single row) becomes all-zero, whose stable rank is 0.0 by the
  degenerate rule of :mod:`bon_sr.scoring.stable_rank`: such a candidate ranks last.
- ``drop-first``: the first counted row stops counting (the attention sink in ``full``;
  the first response token otherwise).
- ``drop-special``: rows whose token id is in ``ctx.special_ids`` stop counting (BOS,
  end-of-turn, pad, the tokenizer's special tokens).
- ``drop-massive``: zero the ``MASSIVE_K`` columns with the largest mean |h| over a
  calibration set (``ctx.stats``; the same columns for every candidate).
- ``drop-massive-seq``: zero the ``MASSIVE_K`` columns with the largest mean |h| over each
  sequence's own counted rows (no calibration; columns may differ between candidates).
- ``standardize``: (h - mean) / std per dimension, with mean and std from a calibration
  set (``ctx.stats``); std is floored at ``STD_FLOOR`` so dead dimensions stay finite.

Zeroing a column drops that dimension from both norms, so it is the same as deleting it.
Calibration statistics are unsupervised (no correctness labels): they come from the
hidden states of some set of candidates at the same layer and norm
(:class:`CalibrationAccumulator`). Transforms run in float32 (float64 input stays float64).

Score transform, on a candidate group's scores after SR:

- ``length``: the residual of a least-squares fit SR ~ a + b * log(num_tokens) within the
  group (:func:`length_corrected`), removing the group's SR-vs-length trend.

This module is pure torch math: it knows nothing about models, tokenizers or how the rows
were chosen; callers pass calibration statistics and token ids in a :class:`TransformContext`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..errors import ConfigError

__all__ = ["CalibrationAccumulator", "CalibrationStats", "MASSIVE_K", "ScorerVariant", "TransformContext",
           "VARIANTS", "Variant", "length_corrected", "parse_variant"]

#: massive-activation dimensions dropped by ``drop-massive`` / ``drop-massive-seq``
MASSIVE_K = 3
#: smallest per-dimension std used by ``standardize``
STD_FLOOR = 1e-6


@dataclass(frozen=True)
class CalibrationStats:
    """Per-dimension statistics of counted rows at one layer and norm; each (d,) float64."""

    mean: torch.Tensor
    std: torch.Tensor
    mean_abs: torch.Tensor
    rows: int

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "mean_abs": self.mean_abs.tolist(),
                "rows": self.rows}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CalibrationStats":
        def t(key: str) -> torch.Tensor:
            return torch.tensor(data[key], dtype=torch.float64)

        return cls(mean=t("mean"), std=t("std"), mean_abs=t("mean_abs"), rows=int(data["rows"]))


class CalibrationAccumulator:
    """Running float64 sums over counted rows; ``update`` per batch, ``finish`` once."""

    def __init__(self) -> None:
        self._sum: torch.Tensor | None = None
        self._sq: torch.Tensor | None = None
        self._abs: torch.Tensor | None = None
        self.rows = 0

    def update(self, h: torch.Tensor, mask: torch.Tensor) -> None:
        """``h: (B, T, d)``, ``mask: (B, T)``."""
        rows = h[mask.bool()].to(torch.float64).cpu()          # (R, d)
        if self._sum is None:
            d = h.shape[-1]
            self._sum, self._sq, self._abs = (torch.zeros(d, dtype=torch.float64) for _ in range(3))
        self._sum += rows.sum(0)
        self._sq += (rows * rows).sum(0)
        self._abs += rows.abs().sum(0)
        self.rows += rows.shape[0]

    def finish(self) -> CalibrationStats:
        if self._sum is None or self.rows == 0:
            raise ConfigError("No calibration rows: the calibration set has no scored tokens.")
        n = self.rows
        mean = self._sum / n
        var = (self._sq / n - mean * mean).clamp_min(0.0)
        return CalibrationStats(mean=mean, std=var.sqrt(), mean_abs=self._abs / n, rows=n)


@dataclass(frozen=True)
class TransformContext:
    """What a row transform may need besides H.

    stats: calibration statistics at the same layer and norm (``drop-massive``,
        ``standardize``). token_ids: ``(B, T)`` ids of the rows of H (``drop-special``).
    special_ids: ids whose rows ``drop-special`` removes.
    """

    stats: CalibrationStats | None = None
    token_ids: torch.Tensor | None = None
    special_ids: frozenset[int] = field(default_factory=frozenset)


RowTransform = Callable[[torch.Tensor, torch.Tensor, TransformContext], "tuple[torch.Tensor, torch.Tensor]"]


def _work(h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = mask.bool()
    h = h.to(torch.float64 if h.dtype == torch.float64 else torch.float32)
    return torch.where(m[..., None], h, h.new_zeros(())), m


def _raw(h: torch.Tensor, mask: torch.Tensor, ctx: TransformContext) -> tuple[torch.Tensor, torch.Tensor]:
    return h, mask


def _center(h: torch.Tensor, mask: torch.Tensor, ctx: TransformContext) -> tuple[torch.Tensor, torch.Tensor]:
    h, m = _work(h, mask)
    n = m.sum(-1, keepdim=True).clamp_min(1).to(h.dtype)           # (B, 1)
    mu = h.sum(-2) / n                                                # (B, d)
    return torch.where(m[..., None], h - mu[:, None, :], h.new_zeros(())), m


def _drop_first(h: torch.Tensor, mask: torch.Tensor, ctx: TransformContext) -> tuple[torch.Tensor, torch.Tensor]:
    m = mask.bool()
    first = m & (m.long().cumsum(-1) == 1)
    return h, m & ~first


def _drop_special(h: torch.Tensor, mask: torch.Tensor, ctx: TransformContext) -> tuple[torch.Tensor, torch.Tensor]:
    if ctx.token_ids is None:
        raise ConfigError("Variant 'drop-special' needs the token ids of the rows (TransformContext.token_ids).")
    m = mask.bool()
    if not ctx.special_ids:
        return h, m
    special = torch.tensor(sorted(ctx.special_ids), dtype=torch.long, device=ctx.token_ids.device)
    return h, m & ~torch.isin(ctx.token_ids.long(), special).to(m.device)


def _need_stats(ctx: TransformContext, name: str) -> CalibrationStats:
    if ctx.stats is None:
        raise ConfigError(f"Variant '{name}' needs calibration statistics (bon_sr.scoring.variants.CalibrationAccumulator) "
                          "at the scored layer and norm; pass them as TransformContext.stats.")
    return ctx.stats


def _zero_columns(h: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``cols``: (d,) or (B, d) bool, True = zero the column."""
    keep = ~cols
    return h * (keep[None, None, :] if keep.dim() == 1 else keep[:, None, :]).to(h.dtype)


def _top_k_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, values.shape[-1])
    idx = values.topk(k, dim=-1).indices
    return torch.zeros_like(values, dtype=torch.bool).scatter(-1, idx, True)


def _drop_massive(h: torch.Tensor, mask: torch.Tensor, ctx: TransformContext) -> tuple[torch.Tensor, torch.Tensor]:
    stats = _need_stats(ctx, "drop-massive")
    h, m = _work(h, mask)
    return _zero_columns(h, _top_k_mask(stats.mean_abs, MASSIVE_K).to(h.device)), m


def _drop_massive_seq(h: torch.Tensor, mask: torch.Tensor, ctx: TransformContext) -> tuple[torch.Tensor, torch.Tensor]:
    h, m = _work(h, mask)
    mean_abs = h.abs().sum(-2) / m.sum(-1, keepdim=True).clamp_min(1).to(h.dtype)   # (B, d)
    return _zero_columns(h, _top_k_mask(mean_abs, MASSIVE_K)), m


def _standardize(h: torch.Tensor, mask: torch.Tensor, ctx: TransformContext) -> tuple[torch.Tensor, torch.Tensor]:
    stats = _need_stats(ctx, "standardize")
    h, m = _work(h, mask)
    mean = stats.mean.to(h.device, h.dtype)
    std = stats.std.clamp_min(STD_FLOOR).to(h.device, h.dtype)
    return torch.where(m[..., None], (h - mean) / std, h.new_zeros(())), m


@dataclass(frozen=True)
class Variant:
    """One registry entry: a row transform (``fn``) or the group-level ``length`` step."""

    name: str
    description: str
    fn: RowTransform | None = None
    needs_calibration: bool = False
    needs_token_ids: bool = False


LENGTH = "length"

VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("paper", "the paper: raw H (post-norm, last layer, response tokens at the default config)", _raw),
    Variant("raw", "raw H, no transform (same as paper at any layer/norm)", _raw),
    Variant("center", "subtract each sequence's mean row", _center),
    Variant("drop-first", "drop the first scored row", _drop_first),
    Variant("drop-special", "drop rows of special tokens (BOS, end-of-turn, pad)", _drop_special,
            needs_token_ids=True),
    Variant("drop-massive", f"zero the {MASSIVE_K} dims of largest mean |h| on a calibration set", _drop_massive,
            needs_calibration=True),
    Variant("drop-massive-seq", f"zero each sequence's own {MASSIVE_K} dims of largest mean |h|", _drop_massive_seq),
    Variant("standardize", "per-dimension (h - mean) / std with calibration-set statistics", _standardize,
            needs_calibration=True),
    Variant(LENGTH, "residual of the group's least-squares fit of SR on log(length)"),
]}


@dataclass(frozen=True)
class ScorerVariant:
    """A parsed spec: row transforms applied left to right, then optionally ``length``."""

    spec: str
    parts: tuple[Variant, ...]

    @property
    def row_parts(self) -> tuple[Variant, ...]:
        return tuple(p for p in self.parts if p.fn is not None)

    @property
    def length_correction(self) -> bool:
        return any(p.name == LENGTH for p in self.parts)

    @property
    def needs_calibration(self) -> bool:
        return any(p.needs_calibration for p in self.parts)

    @property
    def needs_token_ids(self) -> bool:
        return any(p.needs_token_ids for p in self.parts)

    @property
    def is_identity(self) -> bool:
        return all(p.fn is _raw for p in self.row_parts)

    def apply(self, h: torch.Tensor, mask: torch.Tensor,
              ctx: TransformContext | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Row transforms of ``h: (B, T, d)`` / ``mask: (B, T)``; returns the pair to score."""
        ctx = ctx or TransformContext()
        for part in self.row_parts:
            h, mask = part.fn(h, mask, ctx)  # type: ignore[misc]
        return h, mask


def parse_variant(spec: str) -> ScorerVariant:
    """``"center+drop-massive"`` -> :class:`ScorerVariant`; unknown names raise ConfigError."""
    names = [s.strip() for s in str(spec).split("+")]
    parts = []
    for name in names:
        if name not in VARIANTS:
            raise ConfigError(f"Unknown variant '{name}'. Available: {', '.join(sorted(VARIANTS))} "
                              "(join several with '+', e.g. center+drop-massive)")
        parts.append(VARIANTS[name])
    return ScorerVariant(spec="+".join(names), parts=tuple(parts))


def length_corrected(scores: Sequence[float], lengths: Sequence[float]) -> list[float]:
    """Residuals of one candidate group's least-squares fit ``score ~ a + b * log(length)``.

    NaN scores (and lengths < 1) stay out of the fit and come back NaN. With fewer than two
    fitted points or no spread in log length, b = 0 and the residual is score - mean.
    A per-group shift does not change a within-group ranking, so only the slope matters.
    """
    if len(scores) != len(lengths):
        raise ValueError("scores and lengths must have the same length")
    ok = [i for i, (s, n) in enumerate(zip(scores, lengths))
          if s is not None and not math.isnan(s) and n is not None and n >= 1]
    out = [float("nan")] * len(scores)
    if not ok:
        return out
    x = [math.log(lengths[i]) for i in ok]
    y = [float(scores[i]) for i in ok]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxx = sum((xi - mx) ** 2 for xi in x)
    b = sum((xi - mx) * (yi - my) for xi, yi in zip(x, y)) / sxx if sxx > 1e-12 else 0.0
    for i, xi, yi in zip(ok, x, y):
        out[i] = yi - (my + b * (xi - mx))
    return out
