"""Stable rank on CUDA with a fused Triton kernel: one read of H per subspace-iteration pass.

This module is imported only when the Triton backend is asked for (``stable_rank(...,
backend="triton")`` or ``"auto"`` on a CUDA tensor); it imports triton at the top, so
``import bon_sr`` never does. It knows nothing about models or what the rows mean: like
``bon_sr.scoring.stable_rank`` it sees a tensor and a row mask.

Input layout: the padded batch exactly as the model returns it, ``h: (B, T, d)`` with any
strides, float16/bfloat16/float32, plus an optional ``mask: (B, T)`` (nonzero = row counts).
No packing and no padding copy: rows whose mask is 0 are never loaded (their loads are
masked off, so NaN padding cannot leak), and row tiles past an item's last counted row
exit at once, so a short candidate in a long batch costs what its own rows cost.

The kernel computes Z = H^T (H Y) for a d x k block Y (k = block_size, 16 by default),
one program per (item, tile of rows): it forms P = H_tile Y over the row tile, then
re-reads the same tile (from L2) to add H_tile^T P into Z with atomics, so HBM sees each
counted row of H once per pass. The first pass also sums ||H||_F^2. Entries are upcast to
float32 in registers; the dots run as 3xTF32 on tensor cores (float32-grade products, the
accuracy contract needs better than TF32's 1e-3), accumulation is float32. Atomic adds
make the last bits depend on scheduling (run-to-run differences ~1e-7 relative).

The iteration itself is ``bon_sr.scoring.sr_core.subspace_iteration``, the driver the torch
path runs too (one convergence rule, give-up rule, Cholesky-failure detection and exact
float64 fallback); this module supplies only the product. Its small steps, Cholesky-QR
of the d x k block and Rayleigh-Ritz on the k x k matrix, run in float64 on the CPU (a
few KiB each way per pass; no batched QR/SVD on the GPU). Items whose ||H||_F^2 falls
outside the range float32 handles safely are handed back to the caller, the dispatcher
``bon_sr.scoring.stable_rank.stable_rank``, which computes them with the torch path; this module
never calls the torch estimator.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import triton
import triton.language as tl

from bon_sr.scoring.sr_core import (
    StableRankResult,
    check_finite,
    exact_top_eig,
    finish,
    finish_unconverged,
    start_block,
    subspace_iteration,
    validate,
)

__all__ = ["SUPPORTED_DTYPES", "hthy", "stable_rank_triton"]

logger = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Row tile x column chunk of H held by one program. 64 x 64 keeps P (64 x 16), the tile
# and the Frobenius accumulator in registers; a larger row tile means fewer atomic adds
# into Z (d x k per tile) per byte of H read.
BLOCK_T = 64
BLOCK_D = 64
# 3xTF32: float32-grade products on tensor cores. Plain "tf32" costs ~1e-3 relative.
DOT_PRECISION = "tf32x3"
# ||H||_F^2 inside this range means no float32 square, product or sum in the kernel can
# overflow (||Z|| <= s_1^2 <= ||H||_F^2) or lose digits to underflow; items outside it
# (and NaN/inf) go to the torch path, which rescales or raises.
_FROB_LO, _FROB_HI = 2.0**-60, 2.0**100


@triton.jit
def _hthy_kernel(
    h_ptr, keep_ptr, row_end_ptr, y_ptr, z_ptr, frob_ptr,
    d, K,
    s_hb, s_ht, s_hd, s_kb, s_kt, s_yb, s_yd, s_yk, s_zb, s_zd, s_zk,
    HAS_MASK: tl.constexpr, WITH_FROB: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    t0 = tl.program_id(1) * BLOCK_T
    end = tl.load(row_end_ptr + b)
    if t0 < end:
        rows = t0 + tl.arange(0, BLOCK_T)
        row_ok = rows < end
        if HAS_MASK:
            keep = tl.load(keep_ptr + b.to(tl.int64) * s_kb + rows * s_kt, mask=row_ok, other=0)
            row_ok = row_ok & (keep != 0)
        ks = tl.arange(0, BLOCK_K)
        k_ok = ks < K
        # int64 offsets: B * T * d passes 2^31 at real sizes
        h_rows = h_ptr + b.to(tl.int64) * s_hb + rows.to(tl.int64)[:, None] * s_ht
        y_item = y_ptr + b.to(tl.int64) * s_yb
        z_item = z_ptr + b.to(tl.int64) * s_zb
        p = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
        if WITH_FROB:
            sq = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            c_ok = cols < d
            ht = tl.load(h_rows + cols[None, :] * s_hd, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
            ht = ht.to(tl.float32)
            if WITH_FROB:
                sq += ht * ht
            yt = tl.load(y_item + cols[:, None] * s_yd + ks[None, :] * s_yk,
                         mask=c_ok[:, None] & k_ok[None, :], other=0.0)
            p = tl.dot(ht, yt, p, input_precision=PRECISION)
        # second sweep over the same tile: it was just read, so it comes from L2
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            c_ok = cols < d
            ht = tl.load(h_rows + cols[None, :] * s_hd, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
            zt = tl.dot(tl.trans(ht.to(tl.float32)), p, input_precision=PRECISION)
            tl.atomic_add(z_item + cols[:, None] * s_zd + ks[None, :] * s_zk, zt,
                          mask=c_ok[:, None] & k_ok[None, :])
        if WITH_FROB:
            tl.atomic_add(frob_ptr + b, tl.sum(tl.sum(sq, axis=1), axis=0))


def _row_end(keep: torch.Tensor | None, B: int, T: int, device: torch.device) -> torch.Tensor:
    """(B,) int32: one past each item's last counted row (0 when it has none)."""
    if keep is None or T == 0:
        return torch.full((B,), T, dtype=torch.int32, device=device)
    pos = torch.arange(1, T + 1, dtype=torch.int32, device=device)
    return torch.where(keep, pos, 0).amax(dim=1).to(torch.int32)


def hthy(
    h: torch.Tensor,
    y: torch.Tensor,
    keep: torch.Tensor | None = None,
    row_end: torch.Tensor | None = None,
    *,
    with_frob: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Z = H^T (H Y) per item, reading each counted row of H once; optionally ||H||_F^2.

    h: (B, T, d) float16/bfloat16/float32, any strides. y: (B, d, k) float32 (a batch
    stride of 0, i.e. one block expanded over the batch, is fine). keep: None or (B, T)
    bool, True = row counts; rows that do not count are never loaded. row_end: None or
    (B,) int32, rows at or past it are skipped (0 skips the item: its Z stays 0).
    Returns (z: (B, d, k) float32, frob: (B,) float32 or None).
    """
    if h.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"the Triton kernel takes float16, bfloat16 or float32 h, got {h.dtype}")
    if y.dtype != torch.float32 or y.ndim != 3 or y.shape[0] != h.shape[0] or y.shape[1] != h.shape[2]:
        raise ValueError(f"y must be float32 (B, d, k) matching h {tuple(h.shape)}, got {y.dtype} {tuple(y.shape)}")
    B, T, d = h.shape
    k = y.shape[2]
    device = h.device
    if row_end is None:
        row_end = _row_end(keep, B, T, device)
    z = torch.zeros(B, d, k, dtype=torch.float32, device=device)
    frob = torch.zeros(B, dtype=torch.float32, device=device) if with_frob else None
    if B == 0 or T == 0 or d == 0 or k == 0:
        return z, frob
    # a bool tensor viewed as bytes: no copy, and the kernel compares with 0
    keep_u8 = keep.view(torch.uint8) if keep is not None else row_end
    s_kb, s_kt = keep_u8.stride() if keep is not None else (0, 0)
    grid = (B, triton.cdiv(T, BLOCK_T))
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _hthy_kernel[grid](
            h, keep_u8, row_end, y, z, frob if frob is not None else z,
            d, k,
            *h.stride(), s_kb, s_kt, *y.stride(), *z.stride(),
            HAS_MASK=keep is not None, WITH_FROB=with_frob,
            BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, BLOCK_K=max(16, triton.next_power_of_2(k)),
            PRECISION=DOT_PRECISION,
        )
    return z, frob


# --------------------------------------------------------------------------- estimator


def _inputs(h: torch.Tensor, mask: torch.Tensor | None):
    """Validate like ``stable_rank``'s, without copying h. Returns (h3, keep, n, unbatched)."""
    # The dtype rule is the kernel's own; it is checked where stable_rank's validation would
    # have let a float64 h through, so the error order matches the torch path's.
    if (isinstance(h, torch.Tensor) and h.ndim in (2, 3) and h.is_floating_point()
            and h.dtype not in SUPPORTED_DTYPES):
        raise ValueError(
            f"backend='triton' takes float16, bfloat16 or float32 h, got {h.dtype}; "
            "use backend='torch' (float64 input is computed in float64 there)"
        )
    h3, keep, n, unbatched = validate(h, mask)
    return h3, (keep.contiguous() if keep is not None else None), n, unbatched


def _masked64(h3: torch.Tensor, keep: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor:
    """float64 copy of items idx with non-counted rows zeroed (for the few odd items' checks)."""
    sub = h3[idx].to(torch.float64)
    if keep is not None:
        sub = torch.where(keep[idx].unsqueeze(-1), sub, sub.new_zeros(()))
    return sub


def stable_rank_triton(
    h: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    tol: float = 1e-6,
    max_iter: int = 100,
    block_size: int = 16,
    exact_fallback: bool = True,
) -> tuple[StableRankResult, torch.Tensor]:
    """``stable_rank`` with each pass's H^T (H Y) (and ||H||_F^2) from the fused kernel.

    Same arguments and conventions as :func:`bon_sr.scoring.stable_rank.stable_rank` (call it as
    ``stable_rank(h, mask, backend="triton")``, which completes the result); h must be
    float16, bfloat16 or float32 on CUDA (or on the CPU under ``TRITON_INTERPRET=1``, for
    tests). The iteration always runs on H^T H with a d x k block (the kernel reads H once
    either way), k = min(block_size, d).

    Returns ``(result, declined)``: declined (K,) int64, the batch indices (0 for 2-D h)
    of the finite items whose ||H||_F^2 lies outside the range float32 handles safely
    (zero, tiny or huge); their entries in ``result`` are placeholders for the caller to
    replace. NaN or inf in a counted row raises ``ValueError`` here.
    """
    h3, keep, n, unbatched = _inputs(h, mask)
    B, T, d = h3.shape
    device = h3.device
    frob = torch.zeros(B, dtype=torch.float32, device=device)
    spec = torch.zeros(B, dtype=torch.float64, device=device)
    iters = torch.zeros(B, dtype=torch.int64, device=device)
    if B == 0 or T == 0 or d == 0:
        return finish(frob, spec, n, iters, d, unbatched), torch.zeros(0, dtype=torch.int64)

    row_end = _row_end(keep, B, T, device)
    k = min(block_size, d)
    q0 = start_block(d, k, "cpu", torch.float32).to(device)
    z, frob = hthy(h3, q0.expand(B, d, k), keep, row_end, with_frob=True)

    n_cpu, frob_cpu = n.cpu(), frob.cpu()
    odd = (n_cpu > 0) & ~((frob_cpu >= _FROB_LO) & (frob_cpu <= _FROB_HI))
    declined = torch.nonzero(odd).flatten()
    if declined.numel():
        sub = _masked64(h3, keep, declined.to(device))
        if sub.numel():
            check_finite(torch.isfinite(sub).flatten(1).all(dim=1), declined)

    todo = torch.nonzero((n_cpu >= 2) & ~odd & (frob_cpu > 0)).flatten() if d >= 2 else n_cpu.new_zeros(0)
    spec = torch.zeros(B, dtype=torch.float64)
    iters = torch.zeros(B, dtype=torch.int64)
    fell = torch.zeros(B, dtype=torch.bool)
    if todo.numel():
        todo_dev = todo.to(device)

        def apply(q: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            # Items that left keep a zero row_end, so the kernel skips them at once.
            items = todo_dev[rows]
            full_q = q0.expand(B, d, k).clone()
            full_q[items] = q
            live_end = torch.zeros_like(row_end)
            live_end[items] = row_end[items]
            return hthy(h3, full_q, keep, live_end)[0][items]

        # The k x k steps run in float64 on the CPU (a few KiB each way per pass); on a GPU
        # only max_iter bounds the iteration (its float64 fallback is comparatively slow).
        theta, it_todo, unconverged = subspace_iteration(
            apply, q0.expand(todo.numel(), d, k), tol=tol, max_iter=max_iter, budget=max_iter,
            give_up_early=exact_fallback, small_device="cpu", first=z[todo_dev])
        theta = finish_unconverged(theta, unconverged,
                                   lambda idx: exact_top_eig(_masked64(h3, keep, todo_dev[idx.to(device)])).cpu(),
                                   exact_fallback=exact_fallback, tol=tol, max_iter=max_iter)
        spec[todo], iters[todo], fell[todo] = theta, it_todo, unconverged & exact_fallback
    return finish(frob, spec.to(device), n, iters.to(device), d, unbatched, fell.to(device)), declined
