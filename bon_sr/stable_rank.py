"""Stable rank of hidden-state matrices: an exact reference and a fast SVD-free estimator.

SR(H) = ||H||_F^2 / ||H||_2^2 = sum_i s_i^2 / s_1^2 for H of shape (T, d), one row per
token. This module is pure torch math on tensors: it knows nothing about models, tokens,
chat templates or which rows a caller chose; a boolean mask says which rows count.

Two entry points return the same :class:`StableRankResult`:

- :func:`stable_rank_exact`: float64 ``torch.linalg.svdvals``; the reference.
- :func:`stable_rank`: exact Frobenius norm plus a block subspace iteration for s_1^2
  with Rayleigh-Ritz, per-candidate convergence and an exact float64 fallback for
  candidates that do not converge, so it never returns an unconverged value silently.

Conventions shared by both (documented once, tested):

- ``h``: (T, d) or (B, T, d), any float dtype; products run in float32 (float64 input in
  float64). ``mask``: None (every row counts) or (T,) / (B, T) bool or integer, nonzero =
  the row counts. Rows that do not count are replaced by zeros with ``torch.where``, so
  their content (even NaN/inf padding) never reaches the result.
- NaN or inf in a counted row raises ``ValueError``.
- No counted rows, or only all-zero counted rows: stable_rank = 0.0 (and both norms 0).
  0.0 lies below every real stable rank (SR >= 1 for any nonzero H), so an empty
  response can never win a max-SR selection.
- One counted row or d == 1 (rank <= 1): stable_rank = 1.0 exactly.
- Otherwise 1 <= stable_rank <= min(num_tokens, d); the result is clamped to >= 1
  because rounding may put the estimate a hair below.
- Outputs are (B,) tensors, or 0-dim tensors when ``h`` is 2-D.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["StableRankResult", "stable_rank", "stable_rank_exact"]

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


# --------------------------------------------------------------------------- inputs


def _validate(
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


def _prepare(
    h: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Validate, mask and upcast.

    Returns ``(hm, n, amax, unbatched)``: hm (B, T, d) in float32 (float64 for float64
    input) with non-counted rows zeroed, n (B,) int64 counted rows, amax (B,) the largest
    |entry| of each item (0 when it has none).
    """
    h, keep, n, unbatched = _validate(h, mask)
    B = h.shape[0]
    cdtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    hm = h.to(cdtype)
    if keep is not None:
        # torch.where rather than a multiply: 0 * NaN in a padded row would be NaN.
        hm = torch.where(keep.unsqueeze(-1), hm, hm.new_zeros(()))
    if hm.numel():
        # max |h| propagates NaN and inf, so one reduction is also the finiteness check
        amax = torch.linalg.vector_norm(hm, ord=math.inf, dim=(1, 2))
    else:
        amax = hm.new_zeros(B)
    finite = torch.isfinite(amax)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten().tolist()
        shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
        raise ValueError(
            f"h has NaN or inf in counted rows of batch item(s) {shown}; "
            "fix the hidden states or mask those rows out"
        )
    return hm, n, amax, unbatched


def _rescale(hm: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Divide items whose squares could overflow or underflow by their largest entry.

    SR is scale invariant, so this changes nothing but the range; returns (hs, scale)
    with hm = hs * scale. Items in the safe range (the usual case) are not copied.
    """
    # squares of entries within 2^+-40 summed over up to 2^40 terms stay inside float32
    lo, hi = 2.0**-40, 2.0**40
    nonzero = amax > 0
    risky = nonzero & ((amax < lo) | (amax > hi))
    scale = torch.ones_like(amax)
    if bool(risky.any()):
        scale = torch.where(risky, amax, scale)
        hm = hm / scale[:, None, None]
    return hm, scale


def _finish(
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


# --------------------------------------------------------------------------- exact


def stable_rank_exact(h: torch.Tensor, mask: torch.Tensor | None = None) -> StableRankResult:
    """Reference stable rank from float64 singular values (``torch.linalg.svdvals``).

    h: (T, d) or (B, T, d); mask: None, (T,) or (B, T), nonzero = row counts.
    Slow (a full SVD per item) and memory-hungry (a float64 copy); meant for tests,
    benchmarks and spot checks. ``iterations`` is always 0.
    """
    hm, n, amax, unbatched = _prepare(h, mask)
    hs, scale = _rescale(hm.to(torch.float64), amax.to(torch.float64))
    frob = hs.square().sum(dim=(1, 2))
    s1 = torch.linalg.svdvals(hs)[:, 0] if min(hs.shape[1:]) > 0 else torch.zeros_like(frob)
    frob, spec = frob * scale.square(), s1.square() * scale.square()
    iters = torch.zeros_like(n)
    return _finish(frob, spec, n, iters, h.shape[-1], unbatched)


# --------------------------------------------------------------------------- fast


def _orthonormalise(y: torch.Tensor, small_device: torch.device | str | None = None
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


def _exact_top_eig(hs: torch.Tensor) -> torch.Tensor:
    """s_1^2 for each item of hs: (b, T, d), from the float64 Gram on the smaller side."""
    h64 = hs.to(torch.float64)
    if h64.shape[1] <= h64.shape[2]:
        gram = h64 @ h64.mT
    else:
        gram = h64.mT @ h64
    return torch.linalg.eigvalsh(gram)[:, -1]


def stable_rank(
    h: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    tol: float = 1e-6,
    max_iter: int = 100,
    block_size: int = 16,
    exact_fallback: bool = True,
    backend: str = "auto",
) -> StableRankResult:
    """Stable rank without an SVD: exact ||H||_F^2 and a block subspace iteration for s_1^2.

    h: (T, d) or (B, T, d), any float dtype; mask: None, (T,) or (B, T), nonzero = row
    counts. Returns (B,) tensors (0-dim for 2-D ``h``); see :class:`StableRankResult`.

    Algorithm. The iteration runs on A = H H^T when T <= d and on A = H^T H otherwise,
    always applied as two thin products (H (H^T Y) or H^T (H Y)), so no Gram matrix is
    ever formed and a pass costs 4 T d k flops for a block of k = min(block_size, T, d)
    columns on the smaller side. Each pass: W = A Q, Rayleigh-Ritz on the k x k matrix
    Q^T W (float64 ``eigh``), next block = W times the Ritz vectors, re-orthonormalised by
    Cholesky-QR. The top Ritz vector converges at rate (s_{k+1}/s_1)^2 per pass and its
    Ritz value at the square of that, so a near-degenerate top pair that stalls plain
    power iteration (rate (s_2/s_1)^2) converges as fast as a well-separated one. The
    start block is drawn from a fixed-seed generator, so results are reproducible and
    do not depend on the batch an item sits in.

    Convergence, per item: the relative change of the top Ritz value between passes is
    <= ``tol`` and the residual bound min(||r||, ||r||^2 / (theta_1 - theta_2)) / theta_1
    of the top Ritz pair is <= ``tol``. Converged items stop counting (they are dropped
    from the batch once they make up half of it). Items predicted
    (from the observed contraction rate) not to converge within ``max_iter`` passes (on
    CPU: within the passes that cost as much as the exact fallback), and
    items still unconverged at ``max_iter``, get s_1^2 from the float64 eigenvalues of
    their small Gram when ``exact_fallback`` is True. With ``exact_fallback=False`` they
    keep the last Ritz value, report ``iterations == max_iter``, and a warning is logged.
    With float32 arithmetic a ``tol`` below about 1e-7 cannot be met and sends every
    item to the fallback.

    Backend. ``"auto"`` (default) runs the fused Triton kernel of
    :mod:`bon_sr.kernels.triton_sr` when h is a float16/bfloat16/float32 CUDA tensor and
    triton is importable, and this pure-torch code otherwise (always on the CPU).
    ``"torch"`` forces this code; ``"triton"`` forces the kernel and raises ImportError
    without triton, ValueError for float64 input or a CPU tensor (outside Triton's
    interpreter, ``TRITON_INTERPRET=1``, which is for tests). Both backends keep the
    same accuracy contract; the kernel always iterates on H^T H.
    """
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a positive finite number, got {tol!r}")
    if not (isinstance(max_iter, int) and max_iter >= 1):
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
    if not (isinstance(block_size, int) and block_size >= 1):
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    if _use_triton(h, backend):
        from bon_sr.kernels.triton_sr import stable_rank_triton

        return stable_rank_triton(h, mask, tol=tol, max_iter=max_iter, block_size=block_size,
                                  exact_fallback=exact_fallback)

    hm, n, amax, unbatched = _prepare(h, mask)
    B, T, d = hm.shape
    hs, scale = _rescale(hm, amax)
    # sum() accumulates pairwise; vector_norm accumulates float32 naively (~1e-5 off)
    frob = hs.square().sum(dim=(1, 2))
    spec = torch.zeros_like(frob)
    iters = torch.zeros(B, dtype=torch.int64, device=hm.device)
    fell = torch.zeros(B, dtype=torch.bool, device=hm.device)

    todo = torch.nonzero((n >= 2) & (frob > 0)).flatten() if d >= 2 else n.new_zeros(0)
    if todo.numel():
        # indexing copies the whole batch; skip it in the usual all-items case
        h_todo = hs if todo.numel() == B else hs[todo]
        spec_todo, it_todo, unconverged = _torch_top_eig(h_todo, tol=tol, max_iter=max_iter,
                                                         block_size=block_size, give_up_early=exact_fallback)
        spec_todo = finish_unconverged(spec_todo, unconverged, lambda idx: _exact_top_eig(h_todo[idx]),
                                       exact_fallback=exact_fallback, tol=tol, max_iter=max_iter)
        spec[todo] = spec_todo.to(spec.dtype)
        iters[todo] = it_todo
        fell[todo] = unconverged & exact_fallback
    # float64 for the unscaling: SR stays right even where the norms overflow float32
    scale_sq = scale.to(torch.float64).square()
    frob64, spec64 = frob.to(torch.float64) * scale_sq, spec.to(torch.float64) * scale_sq
    return _finish(frob64, spec64, n, iters, d, unbatched, fell)


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


_BACKENDS = ("auto", "torch", "triton")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _use_triton(h: torch.Tensor, backend: str) -> bool:
    """Resolve ``backend`` for this h; raise if a forced Triton backend cannot run."""
    if backend not in _BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}. Available: {', '.join(_BACKENDS)}")
    if backend == "torch":
        return False
    from bon_sr.kernels import triton_available

    if backend == "auto":
        # the interpreter is for tests only: auto never picks Triton for a CPU tensor
        return (isinstance(h, torch.Tensor) and h.is_cuda and h.dtype in _TRITON_DTYPES
                and triton_available())
    if not triton_available():
        raise ImportError(
            "backend='triton' needs the triton package (it ships with CUDA builds of "
            "PyTorch; or pip install triton), or use backend='torch'"
        )
    if isinstance(h, torch.Tensor) and not h.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend='triton' needs h on a CUDA device, got a {h.device.type} tensor; use "
            "backend='torch' or 'auto' (TRITON_INTERPRET=1 runs the kernel on the CPU, for tests)"
        )
    if isinstance(h, torch.Tensor) and h.dtype not in _TRITON_DTYPES:
        raise ValueError(
            f"backend='triton' takes float16, bfloat16 or float32 h, got {h.dtype}; "
            "use backend='torch' (float64 input is computed in float64 there)"
        )
    return True


def start_block(m: int, k: int, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """The fixed-seed orthonormal (1, m, k) start block every item shares, so that an item's
    estimate does not depend on its batch."""
    gen = torch.Generator(device="cpu").manual_seed(_START_SEED)
    start = torch.randn(m, k, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    return _orthonormalise(start.unsqueeze(0))[0]


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
    both backends (the torch code below and the Triton kernel supply only the product).

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
        q, failed = _orthonormalise(y, small)
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


def _torch_top_eig(hs: torch.Tensor, *, tol: float, max_iter: int, block_size: int,
                   give_up_early: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top eigenvalue of H H^T (or H^T H) for every item of hs: (b, T, d), all nonzero,
    by ``subspace_iteration`` with two thin torch products per pass."""
    b, T, d = hs.shape
    small_side_is_t = T <= d
    m = T if small_side_is_t else d
    k = min(block_size, m)
    # Passes worth one exact fallback (float64 Gram on the smaller side + eigvalsh, counted
    # as ~4 m^3 because it is BLAS2-bound). On CPU a slowly converging item is handed
    # over once its predicted passes cost more than that; GPUs run the float64
    # eigensolver comparatively slowly, so there only max_iter bounds the iteration.
    if hs.device.type == "cpu":
        budget = min(max_iter, int((2 * T * d * m + 4 * m**3) / (4 * T * d * k)))
    else:
        budget = max_iter
    state = {"n": b, "h": hs}

    def apply(q: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if rows.numel() != state["n"]:  # rows only shrink: re-index once per shrink
            state["n"], state["h"] = rows.numel(), hs[rows]
        ha = state["h"]
        return ha @ (ha.mT @ q) if small_side_is_t else ha.mT @ (ha @ q)

    q = start_block(m, k, hs.device, hs.dtype).expand(b, m, k)
    return subspace_iteration(apply, q, tol=tol, max_iter=max_iter, budget=budget, give_up_early=give_up_early)
