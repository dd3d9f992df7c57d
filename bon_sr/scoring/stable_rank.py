"""Stable rank of hidden-state matrices: an exact reference and a fast SVD-free estimator.

SR(H) = ||H||_F^2 / ||H||_2^2 = sum_i s_i^2 / s_1^2 for H of shape (T, d), one row per
token. This module is pure torch math on tensors: it knows nothing about models, tokens,
chat templates or which rows a caller chose; a boolean mask says which rows count.

Two entry points return the same :class:`StableRankResult`:

- :func:`stable_rank_exact`: float64 ``torch.linalg.svdvals``; the reference.
- :func:`stable_rank`: exact Frobenius norm plus a block subspace iteration for s_1^2
  with Rayleigh-Ritz, per-candidate convergence and an exact float64 fallback for
  candidates that do not converge, so it never returns an unconverged value silently.
  It dispatches to the Triton kernel (``bon_sr.scoring.kernels.triton_sr``) where that runs, and
  computes the items the kernel declines here. The iteration itself, the input checks and
  the result's packaging live in ``bon_sr.scoring.sr_core``, which both backends share.

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

import math
import os

import torch

from .sr_core import StableRankResult, check_finite, exact_top_eig, finish, finish_unconverged, start_block, \
    subspace_iteration, validate

__all__ = ["StableRankResult", "stable_rank", "stable_rank_exact"]


# --------------------------------------------------------------------------- inputs


def _prepare(
    h: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Validate, mask and upcast.

    Returns ``(hm, n, amax, unbatched)``: hm (B, T, d) in float32 (float64 for float64
    input) with non-counted rows zeroed, n (B,) int64 counted rows, amax (B,) the largest
    |entry| of each item (0 when it has none).
    """
    h, keep, n, unbatched = validate(h, mask)
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
    check_finite(torch.isfinite(amax))
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
    return finish(frob, spec, n, iters, h.shape[-1], unbatched)


# --------------------------------------------------------------------------- fast


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
    :mod:`bon_sr.scoring.kernels.triton_sr` when h is a float16/bfloat16/float32 CUDA tensor and
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
    options = dict(tol=tol, max_iter=max_iter, block_size=block_size, exact_fallback=exact_fallback)
    if _use_triton(h, backend):
        from bon_sr.scoring.kernels.triton_sr import stable_rank_triton

        res, declined = stable_rank_triton(h, mask, **options)
        return _with_torch_items(res, declined, h, mask, **options) if declined.numel() else res

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
        spec_todo = finish_unconverged(spec_todo, unconverged, lambda idx: exact_top_eig(h_todo[idx]),
                                       exact_fallback=exact_fallback, tol=tol, max_iter=max_iter)
        spec[todo] = spec_todo.to(spec.dtype)
        iters[todo] = it_todo
        fell[todo] = unconverged & exact_fallback
    # float64 for the unscaling: SR stays right even where the norms overflow float32
    scale_sq = scale.to(torch.float64).square()
    frob64, spec64 = frob.to(torch.float64) * scale_sq, spec.to(torch.float64) * scale_sq
    return finish(frob64, spec64, n, iters, d, unbatched, fell)


def _with_torch_items(res: StableRankResult, idx: torch.Tensor, h: torch.Tensor, mask: torch.Tensor | None,
                      **options: object) -> StableRankResult:
    """``res`` with the items ``idx`` that the Triton kernel declined (||H||_F^2 outside the
    range its float32 handles: zero, tiny or huge) computed here in float64, which rescales
    (SR is scale invariant)."""
    h3 = h if h.ndim == 3 else h.unsqueeze(0)
    idx = idx.to(h3.device)
    keep = None if mask is None else mask.to(h3.device).reshape(h3.shape[:2])[idx]
    part = stable_rank(h3[idx].to(torch.float64), keep, backend="torch", **options)  # type: ignore[arg-type]
    fields = []
    for name in StableRankResult.FIELDS:
        whole = getattr(res, name)
        flat = whole.reshape(-1).clone()
        flat[idx.to(flat.device)] = getattr(part, name).to(device=flat.device, dtype=flat.dtype)
        fields.append(flat.reshape(whole.shape))
    return StableRankResult(*fields)


_BACKENDS = ("auto", "torch", "triton")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _use_triton(h: torch.Tensor, backend: str) -> bool:
    """Resolve ``backend`` for this h; raise if a forced Triton backend cannot run."""
    if backend not in _BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}. Available: {', '.join(_BACKENDS)}")
    if backend == "torch":
        return False
    from bon_sr.scoring.kernels import triton_available

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
