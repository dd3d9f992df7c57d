"""The CPU top-p plugin (bon_sr.sampling.vllm_plugin) against vLLM's own sort-based top-p.

No engine is started: the plugin's mask is compared with vLLM's reference function on
logits shaped like a real decode step, and the entry-point wiring is checked.
"""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
import torch
from vllm.v1.sample.ops import topk_topp_sampler

from bon_sr.sampling import vllm_plugin

pytestmark = pytest.mark.vllm


def _reference(rows: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return topk_topp_sampler.apply_top_k_top_p_pytorch(rows.clone(), None, p, allow_cpu_sync=True)


def _decode_like_logits(batch: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, vocab, generator=g) * 2
    head = torch.randn(batch, 40, generator=g) * 5 + 10  # a peaked head, as real LMs have
    x[:, :40] += head
    x[: batch // 4] = torch.randn(batch // 4, vocab, generator=g) * 0.3  # flat rows: fallback path
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_equals_vllm_sort(dtype):
    x = _decode_like_logits(24, 20000, seed=1).to(dtype)
    p = torch.tensor([0.9] * 20 + [1.0, 0.5, 0.99, 0.1])
    ours = vllm_plugin.top_p_mask(x, p, _reference)
    ref = _reference(x, p)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    assert torch.equal(ours[~torch.isinf(ours)], ref[~torch.isinf(ref)])
    kept = (~torch.isinf(ours)).sum(dim=1)
    assert kept[6:20].max() <= vllm_plugin.TOP_K  # peaked rows were decided by top-k
    assert kept[20] == x.shape[1]  # p = 1 keeps everything


def test_fallback_used_only_for_uncovered_rows():
    x = _decode_like_logits(8, 5000, seed=2)
    p = torch.full((8,), 0.9)
    seen: list[int] = []

    def spy(rows, p_rows):
        seen.append(rows.shape[0])
        return _reference(rows, p_rows)

    vllm_plugin.top_p_mask(x, p, spy)
    assert seen == [2]  # the two flat rows (batch // 4)


def test_rows_at_the_boundary_take_vllms_path():
    # Row 0: the third token's above-mass is 0.9 - 2e-6, where float32 rounding decides.
    probs = torch.full((2, 1000), 0.05 / 997)
    probs[:, :3] = torch.tensor([0.5, 0.4 - 2e-6, 0.05 + 2e-6])
    probs[1, :3] = torch.tensor([0.6, 0.25, 0.1])
    x = probs.log()
    seen: list[int] = []

    def spy(rows, p_rows):
        seen.append(rows.shape[0])
        return _reference(rows, p_rows)

    p = torch.full((2,), 0.9)
    ours = vllm_plugin.top_p_mask(x, p, spy)
    assert seen == [1]
    assert torch.equal(torch.isinf(ours), torch.isinf(_reference(x, p)))


def test_register_patches_only_when_enabled(monkeypatch):
    # An engine started earlier in this process (tests/test_vllm.py) may have patched it already.
    current = topk_topp_sampler.apply_top_k_top_p
    original = getattr(current, "__wrapped__", current)
    monkeypatch.setattr(topk_topp_sampler, "apply_top_k_top_p", original)
    monkeypatch.delenv(vllm_plugin.ENV, raising=False)
    vllm_plugin.register()
    assert topk_topp_sampler.apply_top_k_top_p is original

    monkeypatch.setenv(vllm_plugin.ENV, "1")
    vllm_plugin.register()
    patched = topk_topp_sampler.apply_top_k_top_p
    assert patched is not original
    vllm_plugin.register()  # loading twice (vLLM may) does not wrap twice
    assert topk_topp_sampler.apply_top_k_top_p is patched and patched.__wrapped__ is original

    x = _decode_like_logits(8, 3000, seed=3)
    p = torch.full((8,), 0.8)
    assert torch.equal(patched(x.clone(), None, p), original(x.clone(), None, p))
    k = torch.full((8,), 5)
    assert torch.equal(patched(x.clone(), k, p), original(x.clone(), k, p))  # top-k: vLLM's own path


def test_entry_point_is_installed():
    names = {ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert "bon_sr.vllm_plugin:register" in names, "reinstall bon-sr (pip install -e .) to register the plugin"
