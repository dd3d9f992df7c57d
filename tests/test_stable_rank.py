"""Tests for bon_sr.scoring.stable_rank: hand-derived values, masks, degenerate inputs, and the
fast estimator against the float64 SVD on gapped, near-degenerate and Gaussian spectra."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

from bon_sr.scoring.stable_rank import StableRankResult, stable_rank, stable_rank_exact

BOTH = pytest.mark.parametrize("fn", [stable_rank, stable_rank_exact], ids=["fast", "exact"])


def _orthonormal(m: int, k: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))
    return q


def _with_spectrum(T: int, d: int, s: torch.Tensor, seed: int) -> torch.Tensor:
    """U diag(s) V^T with random orthonormal U (T x r), V (d x r): singular values are s."""
    gen = torch.Generator().manual_seed(seed)
    r = s.numel()
    return (_orthonormal(T, r, gen) * s) @ _orthonormal(d, r, gen).T


def _hidden_like(T: int, d: int, seed: int) -> torch.Tensor:
    """Gaussian bulk plus 3 massive-activation columns: the gap real hidden states show."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(T, d, generator=gen, dtype=torch.float64)
    cols = torch.randperm(d, generator=gen)[:3]
    h[:, cols] += 25.0 + 3.0 * torch.randn(T, 3, generator=gen, dtype=torch.float64)
    return h


def _close_top_pair(T: int, d: int, seed: int) -> torch.Tensor:
    """Top two singular values 100 and 96 (4% apart) over a decaying tail."""
    r = min(T, d)
    s = 10.0 * torch.linspace(1.0, 0.05, r, dtype=torch.float64) ** 2
    s[0], s[1] = 100.0, 96.0
    return _with_spectrum(T, d, s, seed)


def _rel_err(a: StableRankResult, b: StableRankResult) -> float:
    ref = b.stable_rank.double()
    return ((a.stable_rank.double() - ref).abs() / ref).max().item()


# --------------------------------------------------------------------- hand values


@BOTH
def test_identity_block_has_stable_rank_k(fn):
    # I_5 padded into 12 x 9: s = (1,1,1,1,1) -> SR = 5 * 1^2 / 1^2 = 5
    h = torch.zeros(12, 9)
    h[:5, :5] = torch.eye(5)
    r = fn(h)
    torch.testing.assert_close(r.stable_rank, torch.tensor(5.0))
    torch.testing.assert_close(r.frobenius_sq, torch.tensor(5.0))
    torch.testing.assert_close(r.spectral_sq, torch.tensor(1.0))
    assert r.num_tokens.item() == 12


@BOTH
def test_outer_product_has_stable_rank_one(fn):
    # u v^T has one nonzero singular value ||u|| ||v||: SR = s^2 / s^2 = 1
    u = torch.tensor([1.0, -2.0, 3.0, 0.5])
    v = torch.tensor([2.0, 0.0, 1.0, -1.0, 4.0])
    torch.testing.assert_close(fn(torch.outer(u, v)).stable_rank, torch.tensor(1.0))


@BOTH
def test_diag_3_4(fn):
    # diag(3, 4): s = (4, 3) -> SR = (9 + 16) / 16 = 1.5625
    r = fn(torch.diag(torch.tensor([3.0, 4.0])))
    torch.testing.assert_close(r.stable_rank, torch.tensor(25.0 / 16.0))
    torch.testing.assert_close(r.frobenius_sq, torch.tensor(25.0))
    torch.testing.assert_close(r.spectral_sq, torch.tensor(16.0))


@BOTH
def test_scale_invariance(fn):
    # SR(cH) = c^2 ||H||_F^2 / (c^2 ||H||_2^2) = SR(H), including huge and tiny c
    h = _hidden_like(40, 24, seed=1).float()
    base = fn(h).stable_rank
    for c in (1e-20, 3.7, 1e15):
        torch.testing.assert_close(fn(h * c).stable_rank, base, rtol=1e-5, atol=0)


# --------------------------------------------------------------------- masks, batches


@BOTH
def test_masked_rows_are_ignored_even_nan(fn):
    h = _hidden_like(20, 16, seed=2).float()
    padded = torch.cat([h, torch.full((5, 16), float("nan")), torch.full((3, 16), 1e30)])
    padded[22, 3] = float("inf")
    mask = torch.arange(28) < 20
    got, want = fn(padded, mask), fn(h)
    torch.testing.assert_close(got.stable_rank, want.stable_rank, rtol=1e-6, atol=0)
    torch.testing.assert_close(got.frobenius_sq, want.frobenius_sq, rtol=1e-6, atol=0)
    assert got.num_tokens.item() == 20


@BOTH
def test_batch_of_different_lengths_matches_items(fn):
    lengths = [7, 30, 1, 0, 18]
    T, d = 30, 12
    items = [_hidden_like(max(n, 1), d, seed=10 + i)[:n].float() for i, n in enumerate(lengths)]
    h = torch.full((len(lengths), T, d), float("nan"))
    for i, x in enumerate(items):
        h[i, : x.shape[0]] = x
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    got = fn(h, mask.long())  # integer masks count as well as bool ones
    want = torch.stack([fn(x).stable_rank for x in items])
    torch.testing.assert_close(got.stable_rank, want, rtol=1e-5, atol=0)
    assert got.num_tokens.tolist() == lengths
    assert got.stable_rank.shape == (5,) and got.stable_rank.dtype == torch.float32
    assert got.num_tokens.dtype == torch.int64 and got.iterations.dtype == torch.int64


def test_bf16_input_close_to_fp32():
    h = _hidden_like(64, 48, seed=3).float()
    got = stable_rank(h.bfloat16()).stable_rank
    # bf16 keeps 8 mantissa bits: the matrix itself moves by ~0.4%, so SR moves by < 1%.
    torch.testing.assert_close(got, stable_rank(h).stable_rank, rtol=1e-2, atol=0)
    # and against the reference on the same bf16 values the estimator is as accurate as ever
    torch.testing.assert_close(got, stable_rank_exact(h.bfloat16()).stable_rank, rtol=1e-5, atol=0)


def test_float64_input_is_fp32_accurate():
    h = _close_top_pair(50, 40, seed=4)
    assert _rel_err(stable_rank(h), stable_rank_exact(h)) <= 1e-6


# --------------------------------------------------------------------- estimator vs exact


@pytest.mark.parametrize("T,d", [(96, 64), (48, 80)])
def test_estimator_on_hidden_like_spectra(T, d):
    h = torch.stack([_hidden_like(T, d, seed=20 + i) for i in range(4)]).float()
    assert _rel_err(stable_rank(h), stable_rank_exact(h)) <= 1e-5


@pytest.mark.parametrize("T,d", [(80, 60), (40, 70)])
def test_estimator_on_top_pair_within_5_percent(T, d):
    h = torch.stack([_close_top_pair(T, d, seed=30 + i) for i in range(4)]).float()
    # plain power iteration would be several percent off here; the block is not
    assert _rel_err(stable_rank(h), stable_rank_exact(h)) <= 1e-5


def test_estimator_on_massive_columns_with_close_top_pair():
    # 3 massive columns whose top two singular values are ~3% apart plus a Gaussian bulk
    gen = torch.Generator().manual_seed(5)
    T, d = 120, 64
    h = torch.randn(T, d, generator=gen, dtype=torch.float64)
    h[:, :3] += _with_spectrum(T, 3, torch.tensor([300.0, 291.0, 150.0], dtype=torch.float64), 6)
    h = h.float()
    assert _rel_err(stable_rank(h), stable_rank_exact(h)) <= 1e-5


@pytest.mark.parametrize("B,T,d", [(3, 64, 160), (3, 200, 48), (2, 96, 96)])
def test_estimator_on_gaussian_matrices(B, T, d):
    h = torch.randn(B, T, d, generator=torch.Generator().manual_seed(T + d))
    assert _rel_err(stable_rank(h), stable_rank_exact(h)) <= 1e-3


def test_exact_fallback_rescues_unconverged_items(monkeypatch):
    # One pass can never show convergence (there is no previous Ritz value to compare),
    # so every item of this flat-spectrum batch must take the exact float64 fallback.
    module = sys.modules["bon_sr.scoring.stable_rank"]
    calls = []
    real = module.exact_top_eig
    monkeypatch.setattr(module, "exact_top_eig", lambda x: calls.append(x.shape[0]) or real(x))
    h = torch.randn(3, 60, 50, generator=torch.Generator().manual_seed(7))
    r = stable_rank(h, max_iter=1)
    assert calls == [3]
    assert r.iterations.tolist() == [1, 1, 1]
    assert _rel_err(r, stable_rank_exact(h)) <= 1e-5


def test_no_fallback_warns_and_returns_estimate(caplog):
    h = torch.randn(2, 60, 50, generator=torch.Generator().manual_seed(8))
    with caplog.at_level(logging.WARNING, logger="bon_sr.scoring.stable_rank"):
        r = stable_rank(h, max_iter=2, exact_fallback=False)
    assert "did not converge" in caplog.text
    assert r.iterations.tolist() == [2, 2]
    # two iterations underestimate the top eigenvalue (a Rayleigh quotient), so the estimate is
    # at least the SVD's SR, and for a Gaussian block already within 10% of it
    s = torch.linalg.svdvals(h.double())
    exact = (s**2).sum(-1) / s[:, 0] ** 2
    est = r.stable_rank.double()
    assert (est >= exact * (1 - 1e-6)).all() and (est <= exact * 1.1).all(), (est, exact)


def test_converged_items_report_passes():
    h = torch.stack([_hidden_like(64, 32, seed=40), _hidden_like(64, 32, seed=41)]).float()
    it = stable_rank(h).iterations
    assert ((it >= 2) & (it < 100)).all()
    assert stable_rank_exact(h).iterations.tolist() == [0, 0]


def test_deterministic_whatever_the_callers_rng_and_the_batch():
    h = torch.randn(4, 70, 50, generator=torch.Generator().manual_seed(9))
    a = stable_rank(h)
    torch.manual_seed(12345)   # the start block has its own seed: the global RNG plays no part
    torch.rand(1000)
    b = stable_rank(h)
    for name in ("stable_rank", "frobenius_sq", "spectral_sq", "num_tokens", "iterations"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    # an item's estimate does not depend on the items beside it
    alone = torch.cat([stable_rank(h[i:i + 1]).stable_rank for i in range(4)])
    torch.testing.assert_close(alone, a.stable_rank, rtol=1e-6, atol=0)
    # and a fresh interpreter computes the same bits
    code = ("import torch; from bon_sr.scoring.stable_rank import stable_rank; "
            "h = torch.randn(4, 70, 50, generator=torch.Generator().manual_seed(9)); "
            "print(' '.join(x.hex() for x in stable_rank(h).stable_rank.double().tolist()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [x.hex() for x in a.stable_rank.double().tolist()]


# --------------------------------------------------------------------- degenerate inputs


@BOTH
def test_empty_response_scores_zero(fn):
    # no counted rows: SR := 0.0, below any real SR (>= 1), so it never wins max-SR
    h = torch.randn(2, 6, 4)
    r = fn(h, torch.zeros(2, 6, dtype=torch.bool))
    assert r.stable_rank.tolist() == [0.0, 0.0]
    assert r.frobenius_sq.tolist() == [0.0, 0.0] and r.spectral_sq.tolist() == [0.0, 0.0]
    assert r.num_tokens.tolist() == [0, 0]
    assert fn(torch.zeros(0, 4)).stable_rank.item() == 0.0  # T = 0


@BOTH
def test_all_zero_rows_score_zero(fn):
    r = fn(torch.zeros(5, 7))
    assert r.stable_rank.item() == 0.0 and r.num_tokens.item() == 5
    assert not torch.isnan(r.stable_rank).any()


@BOTH
def test_single_token_is_exactly_one(fn):
    r = fn(torch.tensor([[0.3, -2.0, 7.5]]))
    assert r.stable_rank.item() == 1.0
    # 0.09 + 4 + 56.25 = 60.34 = ||h||^2 = s_1^2
    torch.testing.assert_close(r.frobenius_sq, torch.tensor(60.34))
    torch.testing.assert_close(r.spectral_sq, r.frobenius_sq)
    assert r.iterations.item() == 0


@BOTH
def test_one_column_is_exactly_one(fn):
    r = fn(torch.randn(3, 9, 1))
    assert r.stable_rank.tolist() == [1.0, 1.0, 1.0]


@BOTH
def test_mixed_degenerate_batch_has_no_nan(fn):
    h = torch.randn(4, 8, 5)
    h[1] = 0.0
    mask = torch.ones(4, 8, dtype=torch.bool)
    mask[2] = False
    mask[3, 1:] = False
    r = fn(h, mask)
    assert r.stable_rank[1:].tolist() == [0.0, 0.0, 1.0]
    s = torch.linalg.svdvals(h[0].double())   # item 0 is whole: its SR is the SVD's
    torch.testing.assert_close(r.stable_rank[0].double(), (s**2).sum() / s[0] ** 2, rtol=1e-4, atol=0)
    assert torch.isfinite(r.stable_rank).all()


# --------------------------------------------------------------------- input errors


@BOTH
def test_nan_in_counted_row_raises(fn):
    h = torch.randn(2, 5, 4)
    h[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf.*item\\(s\\) 1"):
        fn(h)
    h[1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        fn(h)


@BOTH
@pytest.mark.parametrize(
    "h,mask,match",
    [
        (torch.randn(5), None, "shape \\(T, d\\) or \\(B, T, d\\)"),
        (torch.randn(2, 3, 4, 5), None, "shape \\(T, d\\) or \\(B, T, d\\)"),
        (torch.ones(4, 3, dtype=torch.int64), None, "floating-point"),
        (torch.randn(2, 5, 4), torch.ones(2, 4, dtype=torch.bool), "mask shape"),
        (torch.randn(5, 4), torch.ones(1, 5, dtype=torch.bool), "mask shape"),
        (torch.randn(5, 4), torch.ones(5), "bool or integer"),
    ],
)
def test_bad_inputs_raise_value_error(fn, h, mask, match):
    with pytest.raises(ValueError, match=match):
        fn(h, mask)


@pytest.mark.parametrize(
    "kwargs", [{"tol": 0.0}, {"tol": float("nan")}, {"max_iter": 0}, {"block_size": 0}]
)
def test_bad_options_raise_value_error(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        stable_rank(torch.randn(4, 3), **kwargs)


# -- fallbacks are reported -------------------------------------------------------------------

def test_fell_back_flags_the_exact_fallback():
    gen = torch.Generator().manual_seed(0)
    flat = torch.randn(3, 256, 64, generator=gen)           # Gaussian: no spectral gap, slow
    r = stable_rank(flat, max_iter=5)
    assert r.fell_back.tolist() == [True, True, True]
    torch.testing.assert_close(r.stable_rank, stable_rank_exact(flat).stable_rank, rtol=1e-5, atol=0)
    # a clear top direction (as in real hidden states) converges without the fallback
    u = torch.randn(3, 256, 1, generator=gen) * 30 @ torch.randn(3, 1, 64, generator=gen)
    r = stable_rank(u + torch.randn(3, 256, 64, generator=gen))
    assert r.fell_back.tolist() == [False, False, False] and (r.iterations >= 2).all()
    assert stable_rank_exact(flat).fell_back.tolist() == [False] * 3
    # degenerate items never "fall back": they need no iteration
    assert stable_rank(torch.zeros(2, 4, 8)).fell_back.tolist() == [False, False]
    assert not bool(stable_rank(flat[0], max_iter=5, exact_fallback=False).fell_back)


def test_a_failed_cholesky_goes_to_the_fallback_and_is_reported():
    from bon_sr.scoring.sr_core import orthonormalise, start_block, subspace_iteration

    y = torch.randn(3, 8, 4)
    y[1, 2, 1] = float("nan")
    q, failed = orthonormalise(y)
    assert failed.tolist() == [False, True, False] and torch.isfinite(q[[0, 2]]).all()
    # A = diag(10, 1, ..., 1) for every item; item 1's product turns NaN on the 2nd pass
    a = torch.diag(torch.tensor([10.0] + [1.0] * 7)).expand(3, 8, 8)
    calls = [0]

    def apply(q, rows):
        calls[0] += 1
        w = a[rows] @ q
        if calls[0] == 2:
            w[(rows == 1).nonzero().flatten()] = float("nan")
        return w

    q0 = start_block(8, 4, "cpu", torch.float32).expand(3, 8, 4)
    theta, passes, unconverged = subspace_iteration(apply, q0, tol=1e-6, max_iter=50, budget=50,
                                                    give_up_early=True)
    assert unconverged.tolist() == [False, True, False]
    torch.testing.assert_close(theta[[0, 2]], torch.tensor([10.0, 10.0], dtype=torch.float64), rtol=1e-6, atol=0)
