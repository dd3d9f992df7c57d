"""How many bytes of hidden-state rows the hook may hold at once, and what one job needs.

The worker keeps each scored candidate's last-layer rows (d values each, the model's dtype)
until the collect, OUTSIDE the memory vLLM budgets for itself (weights, activations, KV
cache: ``gpu_memory_utilization`` of the GPU). So the rows must fit in what vLLM leaves:

- CUDA: ``(1 - gpu_memory_utilization) x total - margin``, and no more than the device's
  free memory after the engine started minus the margin (another process may hold some of
  the rest). ``ROW_MARGIN`` (1 GiB) is left for the CUDA context, the allocator's slack and
  the stable-rank computation's own temporaries.
- CPU: rows live in RAM beside vLLM's KV cache (``VLLM_CPU_KVCACHE_SPACE``): rows for twice
  the KV cache's tokens, at most a quarter of the RAM available when the engine started.

Both drivers obey it: the server admits scored requests against it (``aio.RowBudget``),
the synchronous path (``BestOfN``, ``bon-sr generate``, ``bon-sr bench``) runs its prompts
in batches whose worst case fits (``batches``). A job larger than the whole budget runs
alone. Runs on the DRIVER; knows nothing of vLLM's objects beyond the config fields read
here, nor of asyncio.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

from ..scoring.hidden_states import HiddenStateConfig
from .protocol import row_range

logger = logging.getLogger(__name__)

#: bytes left free on the device beside the rows (CUDA context, allocator slack, SR temporaries)
ROW_MARGIN = 1 << 30
#: vLLM's default gpu_memory_utilization (used when the config does not say)
DEFAULT_UTILIZATION = 0.9
#: the share of the available RAM the rows may take on CPU
CPU_RAM_SHARE = 0.25


def job_bytes(prompt_len: int, n: int, max_tokens: int, scoring: HiddenStateConfig, row_bytes: int) -> int:
    """Worst-case bytes of hook rows one job holds: n candidates' kept rows (plus the
    prompt rows once, for ``full``)."""
    lo, hi = row_range(prompt_len, max_tokens, scoring)
    shared = max(0, min(hi, prompt_len) - lo)
    return (n * (hi - lo - shared) + shared) * int(row_bytes)


def row_bytes(vllm_config: Any) -> int:
    """Bytes of one kept row: the hidden size times the model dtype's size."""
    model = vllm_config.model_config
    dtype = model.dtype
    elem = dtype.itemsize if hasattr(dtype, "itemsize") else 2
    return int(model.get_hidden_size()) * int(elem)


def default_row_budget(vllm_config: Any, memory: Mapping[str, Any] | None = None) -> tuple[int, int]:
    """(budget bytes, bytes per row). ``memory``: the worker's device report from
    ``bon_sr_install_hook`` (``device``, ``total_bytes``, ``free_bytes``); without one,
    the CPU rule from the KV cache alone."""
    row = row_bytes(vllm_config)
    cache = vllm_config.cache_config
    memory = memory or {}
    if memory.get("device") == "cuda" and memory.get("total_bytes"):
        util = float(getattr(cache, "gpu_memory_utilization", None) or DEFAULT_UTILIZATION)
        left = round((1.0 - util) * int(memory["total_bytes"]))
        if memory.get("free_bytes") is not None:
            left = min(left, int(memory["free_bytes"]))
        budget = max(0, int(left) - ROW_MARGIN)
        if budget == 0:
            logger.warning("bon-sr hook: vLLM leaves no room for hook rows (gpu_memory_utilization %.2f of %.1f GiB, "
                           "%.1f GiB free); scored jobs run one at a time. Lower gpu_memory_utilization.",
                           util, int(memory["total_bytes"]) / 2**30, int(memory.get("free_bytes") or 0) / 2**30)
        return budget, row
    blocks = int(getattr(cache, "num_gpu_blocks", 0) or 0)
    tokens = blocks * int(cache.block_size) if blocks else 65536
    budget = 2 * tokens * row
    if memory.get("free_bytes"):
        budget = min(budget, int(CPU_RAM_SHARE * int(memory["free_bytes"])))
    return budget, row


def batches(sizes: Sequence[int], budget: int | None) -> list[list[int]]:
    """Consecutive indices of ``sizes`` (each job's bytes) in batches whose sum fits
    ``budget``; a job larger than the budget is a batch of its own. None: one batch."""
    if budget is None or not sizes:
        return [list(range(len(sizes)))] if sizes else []
    out: list[list[int]] = []
    used = 0
    for i, size in enumerate(sizes):
        if out and out[-1] and used + size <= budget:
            out[-1].append(i)
            used += size
        else:
            out.append([i])
            used = size
    return out
