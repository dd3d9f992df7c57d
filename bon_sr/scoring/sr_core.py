"""The stable-rank iteration core both estimators share: input checks, result packaging,
the fixed-seed start block, the block subspace-iteration driver and the exact float64
fallback.

``bon_sr.scoring.stable_rank`` (pure torch) and ``bon_sr.scoring.kernels.triton_sr`` (the fused Triton
product) each supply only the product A Q and call ``subspace_iteration`` here, so one
convergence rule, give-up rule, Cholesky-failure detection and fallback serve both. The
conventions (shapes, masks, degenerate inputs) are documented in ``bon_sr.scoring.stable_rank``.
This module knows nothing about backends, dispatch, models or what the rows mean.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["ApplyFn", "StableRankResult", "check_finite", "exact_top_eig", "finish", "finish_unconverged", "orthonormalise",
           "start_block", "subspace_iteration", "validate"]

logger = logging.getLogger(__name__)

# Every item is seeded identically so the same matrix gets the same estimate whatever
# batch it sits in, on whatever device.
_START_SEED = 0x5EED
# Give-up rule: after this many passes an item whose Ritz value is predicted to need more
# passes than the budget allows goes to the exact fallback at once instead of finishing
# a hopeless iteration first.
_MIN_PASSES_BEFORE_GIVING_UP = 4


@dataclass(frozen=True)
class StableRankResult:
    """Per-item stable rank and its parts. Every field is (B,), or 0-dim for 2-D ``h``.

    stable_rank:  float32, frobenius_sq / spectral_sq (0.0 for empty/all-zero inputs).
    frobenius_sq: float32, ||H||_F^2 over the counted rows.
    spectral_sq:  float32, ||H||_2^2 = s_1^2.
    num_tokens:   int64, rows that counted (mask sum).
    iterations:   int64, subspace-iteration passes run; 0 for the exact reference and
                  for degenerate items (empty, zero, rank <= 1). An item handed to the
                  exact fallback reports the passes run before it was handed over.
    fell_back:    bool, True where s_1^2 came from the exact float64 fallback (slow
                  convergence, or a Cholesky factorisation that failed) instead of the
                  iteration; always False for the exact reference.
    """

    stable_rank: torch.Tensor
    frobenius_sq: torch.Tensor
    spectral_sq: torch.Tensor
    num_tokens: torch.Tensor
    iterations: torch.Tensor
    fell_back: torch.Tensor

    FIELDS = ("stable_rank", "frobenius_sq", "spectral_sq", "num_tokens", "iterations", "fell_back")


def validate(
    h: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, bool]:
    """Check ``h`` and ``mask`` without copying h.

    Returns ``(h3, keep, n, unbatched)``: h3 (B, T, d) (a view of h), keep (B, T) bool or
    None (every row counts), n (B,) int64 counted rows, and whether h was 2-D.
    """
    if not isinstance(h, torch.Tensor):
        raise ValueError(f"h must be a torch.Tensor of shape (T, d) or (B, T, d), got {type(h).__name__}")
    if h.ndim not in (2, 3):
        raise ValueError(
            f"h must have shape (T, d) or (B, T, d), got {h.ndim} dimension(s) {tuple(h.shape)}"
        )
    if not h.is_floating_point():
        raise ValueError(f"h must be a floating-point tensor, got dtype {h.dtype}")
    unbatched = h.ndim == 2
    given_shape = tuple(h.shape)
    if unbatched:
        h = h.unsqueeze(0)
    B, T, _ = h.shape
    if mask is None:
        return h, None, torch.full((B,), T, dtype=torch.int64, device=h.device), unbatched
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.is_floating_point() or mask.is_complex():
        raise ValueError(f"mask must be bool or integer (True = row counts), got dtype {mask.dtype}")
    expected = (T,) if unbatched else (B, T)
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match h shape {given_shape}: "
            f"expected {expected} (one entry per row of h)"
        )
    keep = (mask.to(device=h.device) != 0).reshape(B, T)
    return h, keep, keep.sum(dim=1, dtype=torch.int64), unbatched


def check_finite(finite: torch.Tensor, items: torch.Tensor | None = None) -> None:
    """Raise ``ValueError`` naming the batch items whose counted rows hold NaN or inf.

    finite: (K,) bool, one flag per item checked; items: (K,) their batch indices
    (default 0..K-1).
    """
    if bool(finite.all()):
        return
    bad = torch.nonzero(~finite.cpu()).flatten()
    bad = (items.cpu()[bad] if items is not None else bad).tolist()
    shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
    raise ValueError(
        f"h has NaN or inf in counted rows of batch item(s) {shown}; "
        "fix the hidden states or mask those rows out"
    )


def finish(
    frob: torch.Tensor,
    spec: torch.Tensor,
    n: torch.Tensor,
    iters: torch.Tensor,
    d: int,
    unbatched: bool,
    fell_back: torch.Tensor | None = None,
) -> StableRankResult:
    """Apply the degenerate-input conventions and package the result."""
    frob = frob.to(torch.float64)
    spec = spec.to(torch.float64)
    zero = (n == 0) | (frob <= 0)
    rank_one = ~zero & ((n == 1) | (d == 1))
    spec = torch.where(rank_one, frob, spec)
    spec = torch.where(zero, torch.zeros_like(spec), spec)
    frob = torch.where(zero, torch.zeros_like(frob), frob)
    safe = torch.where(zero, torch.ones_like(spec), spec)
    sr = torch.where(zero, torch.zeros_like(frob), (frob / safe).clamp_min(1.0))
    iters = torch.where(zero | rank_one, torch.zeros_like(iters), iters)
    fell = torch.zeros_like(n, dtype=torch.bool) if fell_back is None else fell_back.to(n.device) & ~(zero | rank_one)
    out = [sr.float(), frob.float(), spec.float(), n, iters, fell]
    if unbatched:
        out = [t.squeeze(0) for t in out]
    return StableRankResult(*out)


def orthonormalise(y: torch.Tensor, small_device: torch.device | str | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal basis of the columns of y: (b, m, k), by two shifted Cholesky-QR rounds;
    returns ``(basis, failed)`` with ``failed: (b,)`` bool where a factorisation failed.

    Matmuls and a k x k Cholesky only (no batched Householder QR in the loop). Columns
    are normalised first; the small shift keeps Cholesky alive when the block has more
    columns than the item has rank (zero columns stay zero and only add Ritz values 0),
    and the second round removes the loss of orthogonality the first one leaves.
    The first column of the result is the first input column normalised, so the
    leading Ritz direction passes through untouched. ``small_device``: where the k x k
    factorisations run (the Triton path puts them on the CPU: batched small solves are
    slow on a GPU); default y's device. A failed item's basis is garbage: the caller must
    hand it to the exact fallback.
    """
    small = y.device if small_device is None else torch.device(small_device)
    failed = torch.zeros(y.shape[0], dtype=torch.bool, device=small)
    for shift in (1e-6, 1e-9):
        norms = y.norm(dim=1, keepdim=True)
        y = y / norms.clamp_min(torch.finfo(y.dtype).tiny)
        g = (y.mT @ y).to(device=small, dtype=torch.float64)
        g = 0.5 * (g + g.mT)
        g.diagonal(dim1=-2, dim2=-1).add_(shift)
        chol, info = torch.linalg.cholesky_ex(g)
        failed |= (info != 0) | ~torch.isfinite(chol).flatten(1).all(dim=1)
        # a failed factor is replaced by the identity so the rest of the batch stays finite
        eye = torch.eye(chol.shape[-1], dtype=chol.dtype, device=small)
        chol = torch.where(failed[:, None, None], eye, chol)
        # Inverting the k x k factor and multiplying is one batched matmul; a batched
        # triangular solve against the tall block is an order of magnitude slower on CPU.
        chol_inv = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)
        y = y @ chol_inv.mT.to(device=y.device, dtype=y.dtype)
    return y, failed


def exact_top_eig(hs: torch.Tensor) -> torch.Tensor:
    """s_1^2 for each item of hs: (b, T, d), from the float64 Gram on the smaller side."""
    h64 = hs.to(torch.float64)
    if h64.shape[1] <= h64.shape[2]:
        gram = h64 @ h64.mT
    else:
        gram = h64.mT @ h64
    return torch.linalg.eigvalsh(gram)[:, -1]


def finish_unconverged(theta: torch.Tensor, unconverged: torch.Tensor, exact: Callable[[torch.Tensor], torch.Tensor],
                       *, exact_fallback: bool, tol: float, max_iter: int) -> torch.Tensor:
    """theta with the unconverged items' values from ``exact(indices)`` (float64 Gram
    eigenvalues), or left as they are with a warning when ``exact_fallback`` is off."""
    idx = torch.nonzero(unconverged).flatten()
    if not idx.numel():
        return theta
    if not exact_fallback:
        logger.warning("stable_rank: %d of %d item(s) did not converge to tol=%g within max_iter=%d passes; "
                       "returning the last estimate (raise max_iter or set exact_fallback=True)",
                       idx.numel(), theta.numel(), tol, max_iter)
        return theta
    theta = theta.clone()
    theta[idx] = exact(idx.to(theta.device)).to(device=theta.device, dtype=theta.dtype)
    return theta


def start_block(m: int, k: int, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """The fixed-seed orthonormal (1, m, k) start block every item shares, so that an item's
    estimate does not depend on its batch."""
    gen = torch.Generator(device="cpu").manual_seed(_START_SEED)
    start = torch.randn(m, k, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    return orthonormalise(start.unsqueeze(0))[0]


ApplyFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def subspace_iteration(
    apply: ApplyFn,
    q: torch.Tensor,
    *,
    tol: float,
    max_iter: int,
    budget: int,
    give_up_early: bool,
    small_device: torch.device | str | None = None,
    first: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top eigenvalue of a PSD operator A for each of b items: the one iteration driver of
    both backends (``bon_sr.scoring.stable_rank`` and the Triton kernel supply only the product).

    apply(q, rows) -> A q for the items ``rows`` (original indices, on q's device), with
        q: (len(rows), m, k); rows only ever shrink. first: A q for the first pass when the
        caller already has it. small_device: where Rayleigh-Ritz and the k x k
        factorisations run (default q's device).
    Returns (theta (b,) float64, passes (b,) int64, unconverged (b,) bool) on
    ``small_device``; unconverged items (slow, predicted hopeless within ``budget``
    passes when ``give_up_early``, or a failed Cholesky factorisation) need the exact
    fallback.
    """
    b, _, k = q.shape
    device, dtype = q.device, q.dtype
    small = device if small_device is None else torch.device(small_device)
    theta_out = torch.zeros(b, dtype=torch.float64, device=small)
    iters_out = torch.zeros(b, dtype=torch.int64, device=small)
    unconverged = torch.zeros(b, dtype=torch.bool, device=small)
    rows = torch.arange(b, device=small)  # original item index of each row still in play
    live = torch.ones(b, dtype=torch.bool, device=small)  # rows whose answer is still open
    prev = torch.full((b,), float("nan"), dtype=torch.float64, device=small)
    prev_change = torch.full_like(prev, float("nan"))

    for it in range(1, max_iter + 1):
        w = first if it == 1 and first is not None else apply(q, rows.to(device))
        rr = (q.mT @ w).to(device=small, dtype=torch.float64)
        # a non-finite product is a breakdown (overflow in the iteration): exact fallback
        # (rows that already left may still ride along with it: keep them out of eigh too)
        bad = ~torch.isfinite(rr).flatten(1).all(dim=1)
        broken = live & bad
        rr = torch.where(bad[:, None, None], torch.eye(k, dtype=rr.dtype, device=small), rr)
        evals, evecs = torch.linalg.eigh(0.5 * (rr + rr.mT))
        evals, evecs = evals.flip(-1), evecs.flip(-1)
        theta = evals[:, 0]
        s = evecs.to(device=device, dtype=dtype)
        y = w @ s
        resid = (y[:, :, 0] - theta.to(device, dtype)[:, None] * (q @ s[:, :, :1]).squeeze(-1)).norm(dim=1)
        resid = resid.to(device=small, dtype=torch.float64)
        gap = (evals[:, 0] - evals[:, 1]) if k > 1 else torch.zeros_like(theta)
        quad = torch.where(gap > 0, resid.square() / gap.clamp_min(1e-300), torch.full_like(resid, math.inf))
        bound = torch.minimum(resid, quad) / theta.clamp_min(1e-300)
        change = (theta - prev).abs() / theta.clamp_min(1e-300)
        leave = live & (change <= tol) & (bound <= tol)
        unconverged[rows[broken]] = True
        leave |= broken

        if it == max_iter:
            unconverged[rows[live & ~leave]] = True
            leave = live.clone()
        elif give_up_early and it >= _MIN_PASSES_BEFORE_GIVING_UP:
            # Ritz values approach s_1^2 geometrically; from the last two changes predict
            # the passes still needed and hand items that cannot make it within the
            # budget to the exact fallback now rather than after many wasted passes.
            rate = (change / prev_change).clamp(max=1.0)
            needed = torch.log(tol / change.clamp_min(1e-300)) / torch.log(rate.clamp(1e-12, 1 - 1e-12))
            stalled = (rate >= 1 - 1e-12) | (needed > budget - it)
            # a change at rounding level is noise, not a rate: judge only real movement
            hopeless = live & ~leave & stalled & (change > 10 * tol)
            unconverged[rows[hopeless]] = True
            leave |= hopeless

        theta_out[rows[leave]] = theta[leave]
        iters_out[rows[leave]] = it
        live &= ~leave
        if not bool(live.any()):
            break
        prev, prev_change = theta, change
        # Finished rows keep riding along until they are half the batch: one extra pass
        # over them is cheaper than copying the rest of the batch at every departure.
        if 2 * int(live.sum()) <= rows.numel():
            keep = live
            rows, y, theta = rows[keep], y[keep.to(device)], theta[keep]
            prev, prev_change, live = prev[keep], prev_change[keep], live[keep]
        q, failed = orthonormalise(y, small)
        failed &= live
        if bool(failed.any()):
            # a breakdown of the block (not seen on real hidden states): the exact fallback
            # (or, without it, the last Ritz value)
            unconverged[rows[failed]] = True
            theta_out[rows[failed]] = theta[failed]
            iters_out[rows[failed]] = it
            live &= ~failed
            if not bool(live.any()):
                break
    return theta_out, iters_out, unconverged
