"""Tests for the fused Triton stable-rank kernel (bon_sr.scoring.kernels.triton_sr).

On the CPU the kernel runs in Triton's interpreter. TRITON_INTERPRET=1 must be set
when the kernel module is imported (``triton.jit`` reads it then and decorates the kernel
as an interpreted function) and while the kernel runs (Triton reads it again at call
time). This module sets it for its import of the kernel and, through an autouse fixture,
for its own tests only: pytest imports every test module before running any, and the
variable would otherwise reach the other modules' tests and the processes they start.
Shapes stay tiny because the interpreter is slow.

triton arrives with vLLM; tests/conftest.py fails the run when it is missing. The test
marked ``gpu`` runs the compiled kernel on CUDA when present and is skipped, with the
reason shown, otherwise.
"""

from __future__ import annotations

import os

import pytest
import torch

from bon_sr.scoring.stable_rank import stable_rank, stable_rank_exact

_BEFORE = os.environ.get("TRITON_INTERPRET")


def _restore_interpret() -> None:
    if _BEFORE is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _BEFORE


os.environ["TRITON_INTERPRET"] = "1"  # for the kernel's import; see the docstring
try:
    from bon_sr.scoring.kernels.triton_sr import hthy, stable_rank_triton
finally:
    _restore_interpret()


@pytest.fixture(autouse=True, scope="module")
def _interpreter_for_this_module():
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    _restore_interpret()

HAS_CUDA = torch.cuda.is_available()


def _masked(h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.where(keep.unsqueeze(-1), h.double(), torch.zeros((), dtype=torch.float64))


def _ragged_batch(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, 40, 48) batch with lengths 40, 23, 9 and NaN in every padded row."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(3, 40, 48, generator=gen)
    keep = torch.arange(40)[None, :] < torch.tensor([40, 23, 9])[:, None]
    h = h.masked_fill(~keep.unsqueeze(-1), float("nan"))
    return h.to(dtype), keep


def _hidden_like(B: int, T: int, d: int, seed: int) -> torch.Tensor:
    """Gaussian bulk plus 3 massive-activation columns: the gap real hidden states show."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, d, generator=gen)
    cols = torch.randperm(d, generator=gen)[:3]
    h[:, :, cols] += 25.0 + 3.0 * torch.randn(B, T, 3, generator=gen)
    return h


def _close_top_pair(T: int, d: int, seed: int) -> torch.Tensor:
    """Singular values 100, 96 (4% apart) over a decaying tail, random singular vectors."""
    gen = torch.Generator().manual_seed(seed)
    r = min(T, d)
    s = 10.0 * torch.linspace(1.0, 0.05, r, dtype=torch.float64) ** 2
    s[0], s[1] = 100.0, 96.0
    u, _ = torch.linalg.qr(torch.randn(T, r, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64))
    return ((u * s) @ v.T).float()


def _rel_err(a, b) -> float:
    ref = b.stable_rank.double()
    return ((a.stable_rank.double() - ref).abs() / ref).max().item()


# ------------------------------------------------------------------ the fused product


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_product_matches_torch_with_ragged_nan_padding(dtype):
    h, keep = _ragged_batch(dtype)
    y = torch.randn(3, 48, 16, generator=torch.Generator().manual_seed(1))
    z, frob = hthy(h, y, keep, with_frob=True)
    # reference from the same (bf16-rounded) entries, in float64
    hm = _masked(h, keep)
    torch.testing.assert_close(z.double(), hm.mT @ (hm @ y.double()), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(frob.double(), hm.square().sum(dim=(1, 2)), rtol=1e-6, atol=0)
    assert torch.isfinite(z).all()


def test_product_with_odd_block_and_strided_input():
    # k = 5 columns (padded to 16 inside), d = 37 not a multiple of the column chunk, and
    # a transposed (non-contiguous) h; one expanded start block (batch stride 0)
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(2, 37, 19, generator=gen).transpose(1, 2)  # (2, 19, 37), strided
    y = torch.randn(37, 5, generator=gen).expand(2, 37, 5)
    z, frob = hthy(h, y)
    torch.testing.assert_close(z, h.mT @ (h @ y), rtol=1e-5, atol=1e-4)
    assert frob is None


def test_item_with_no_rows_gives_zero():
    h, keep = _ragged_batch(torch.float32)
    keep[2] = False
    z, frob = hthy(h, torch.ones(3, 48, 16), keep, with_frob=True)
    assert z[2].abs().max().item() == 0.0 and frob[2].item() == 0.0


# ------------------------------------------------------------------ the estimator


def test_estimator_matches_exact_on_ragged_hidden_like_batch():
    h = _hidden_like(3, 40, 48, seed=3)
    keep = torch.arange(40)[None, :] < torch.tensor([40, 31, 12])[:, None]
    h = h.masked_fill(~keep.unsqueeze(-1), float("nan"))
    r = stable_rank(h, keep, backend="triton")
    assert _rel_err(r, stable_rank_exact(h, keep)) <= 1e-5
    assert r.num_tokens.tolist() == [40, 31, 12]
    assert (r.iterations >= 2).all()


def test_estimator_on_close_top_pair():
    h = _close_top_pair(40, 36, seed=4)
    assert _rel_err(stable_rank(h, backend="triton"), stable_rank_exact(h)) <= 1e-5


def test_estimator_on_flat_gaussian_spectrum():
    h = torch.randn(2, 36, 40, generator=torch.Generator().manual_seed(5))
    assert _rel_err(stable_rank(h, backend="triton"), stable_rank_exact(h)) <= 1e-3


def test_estimator_bf16_matches_exact_of_rounded_input():
    h = _hidden_like(2, 32, 40, seed=6).bfloat16()
    assert _rel_err(stable_rank(h, backend="triton"), stable_rank_exact(h)) <= 1e-5


def test_estimator_degenerate_items_follow_the_conventions():
    # item 0 empty -> 0; item 1 one row -> 1; item 2 all-zero rows -> 0;
    # item 3 entries ~1e-30 (squares underflow float32, torch path rescales) -> SR of
    # the same matrix at scale 1
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(20, 24, generator=gen)
    h = torch.randn(4, 20, 24, generator=gen)
    h[2] = 0.0
    h[3] = base * 1e-30
    keep = torch.ones(4, 20, dtype=torch.bool)
    keep[0] = False
    keep[1, 1:] = False
    r = stable_rank(h, keep, backend="triton")
    assert r.stable_rank[:3].tolist() == [0.0, 1.0, 0.0]
    torch.testing.assert_close(r.stable_rank[3], stable_rank_exact(base).stable_rank, rtol=1e-5, atol=0)
    assert not torch.isnan(r.stable_rank).any()


def test_estimator_unbatched_and_nan_in_counted_row():
    h = _hidden_like(1, 24, 32, seed=8)[0]
    r = stable_rank(h, backend="triton")
    assert r.stable_rank.ndim == 0
    torch.testing.assert_close(r.stable_rank, stable_rank_exact(h).stable_rank, rtol=1e-5, atol=0)
    h[3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        stable_rank(h, backend="triton")


def test_unconverged_items_get_the_exact_fallback():
    h = torch.randn(2, 30, 32, generator=torch.Generator().manual_seed(9))
    r, declined = stable_rank_triton(h, max_iter=2)
    assert declined.numel() == 0
    assert _rel_err(r, stable_rank_exact(h)) <= 1e-5


def test_kernel_hands_items_it_cannot_take_back_to_the_dispatcher():
    # item 1's entries are ~1e-30: their squares underflow float32, so the kernel declines
    # it and stable_rank (the dispatcher) computes it with the torch path, which rescales
    h = torch.randn(2, 20, 24, generator=torch.Generator().manual_seed(12))
    h[1] = h[1] * 1e-30
    _, declined = stable_rank_triton(h)
    assert declined.tolist() == [1]
    torch.testing.assert_close(stable_rank(h, backend="triton").stable_rank, stable_rank_exact(h).stable_rank,
                               rtol=1e-5, atol=0)


# ------------------------------------------------------------------ dispatch


def test_auto_on_cpu_uses_torch(monkeypatch):
    import bon_sr.scoring.kernels.triton_sr as mod

    def boom(*args, **kwargs):
        raise AssertionError("auto picked the Triton kernel for a CPU tensor")

    monkeypatch.setattr(mod, "stable_rank_triton", boom)
    h = _hidden_like(2, 20, 24, seed=10)
    torch.testing.assert_close(stable_rank(h).stable_rank, stable_rank(h, backend="torch").stable_rank)


def test_forced_triton_on_cpu_runs_under_interpreter(monkeypatch):
    import bon_sr.scoring.kernels.triton_sr as mod

    calls = []
    real = mod.stable_rank_triton
    monkeypatch.setattr(mod, "stable_rank_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    h = _hidden_like(1, 20, 24, seed=11)
    r = stable_rank(h, backend="triton")
    assert calls == [1]
    assert _rel_err(r, stable_rank_exact(h)) <= 1e-5


def test_backend_errors(monkeypatch):
    h = torch.randn(4, 6)
    with pytest.raises(ValueError, match="Unknown backend 'cuda'. Available: auto, torch, triton"):
        stable_rank(h, backend="cuda")
    with pytest.raises(ValueError, match="float64"):
        stable_rank(h.double(), backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs h on a CUDA device"):
        stable_rank(h, backend="triton")
    import bon_sr.scoring.kernels

    monkeypatch.setattr(bon_sr.scoring.kernels, "triton_available", lambda: False)
    with pytest.raises(ImportError, match="needs the triton package"):
        stable_rank(h, backend="triton")


def test_import_bon_sr_does_not_import_triton():
    import subprocess
    import sys

    code = "import sys, bon_sr, bon_sr.scoring.stable_rank, bon_sr.scoring.kernels; sys.exit('triton' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "0"}).returncode == 0


# ------------------------------------------------------------------ CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (the compiled kernel); CPU runs the interpreter tests")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_compiled_kernel_on_cuda(dtype):
    # This process imported the kernel under TRITON_INTERPRET=1, so compile a fresh copy
    # in a subprocess without it: auto must pick Triton there and match the reference.
    import subprocess
    import sys

    name = str(dtype).removeprefix("torch.")
    code = f"""
import torch
dt = getattr(torch, {name!r})
from bon_sr.scoring.stable_rank import stable_rank, stable_rank_exact
import bon_sr.scoring.kernels.triton_sr as mod
calls = []
real = mod.stable_rank_triton
mod.stable_rank_triton = lambda *a, **k: calls.append(1) or real(*a, **k)
g = torch.Generator().manual_seed(0)
B, T, d = 8, 300, 520
h = torch.randn(B, T, d, generator=g)
cols = torch.randperm(d, generator=g)[:3]
h[:, :, cols] += 25.0 + 3.0 * torch.randn(B, T, 3, generator=g)
lengths = torch.tensor([300, 1, 0, 17, 299, 150, 64, 65])
keep = torch.arange(T)[None, :] < lengths[:, None]
h = h.masked_fill(~keep[..., None], float('nan')).to(dt)
hc, kc = h.cuda(), keep.cuda()
r = stable_rank(hc, kc)
assert calls == [1], 'auto did not pick the Triton kernel on CUDA'
ref = stable_rank_exact(h, keep).stable_rank.double()
got = r.stable_rank.double().cpu()
ok = ref > 0
err = ((got[ok] - ref[ok]).abs() / ref[ok]).max().item()
assert err <= 1e-5, err
assert got[~ok].eq(0).all() and got[1].item() == 1.0
g2 = torch.randn(4, 256, 384, generator=g)
r2 = stable_rank(g2.cuda().to(dt))
ref2 = stable_rank_exact(g2.to(dt)).stable_rank.double()
err2 = ((r2.stable_rank.double().cpu() - ref2).abs() / ref2).max().item()
assert err2 <= 1e-3, err2
print('ok', err, err2)
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
