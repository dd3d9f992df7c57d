"""Where the hook keeps rows in the worker: one arena tensor per worker and, per candidate,
the arena slot of each absolute position.

Runs in the WORKER. ``Arena`` holds every entry's rows in one (capacity, width) tensor with
a free list of slots, so a step copies every tagged row with one ``index_select`` and one
``index_copy_``, whatever the number of candidates; ``Entry`` maps one candidate's (or one
tag's prompt's) positions to slots. This module knows nothing about vLLM, requests, tags
or what the rows mean.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch


def index_tensor(values: Sequence[int] | np.ndarray, device: torch.device) -> torch.Tensor:
    """int64 indices on ``device``; on CUDA through pinned memory, so the copy does not
    block the host until the stream drains."""
    t = torch.as_tensor(np.asarray(values, dtype=np.int64))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t if device.type == "cpu" else t.to(device)


class Arena:
    """Rows of every entry in one (capacity, width) tensor; slots from a free list. Grows
    by doubling; dropped whole when nothing is live."""

    def __init__(self) -> None:
        self.buf: torch.Tensor | None = None
        self.free: list[int] = []
        self.live = 0

    def alloc(self, k: int, like: torch.Tensor) -> list[int]:
        if self.buf is None:
            self.buf = like.new_empty((max(64, k), like.shape[-1]))
            self.free = list(range(self.buf.shape[0] - 1, -1, -1))
        if len(self.free) < k:
            old = self.buf.shape[0]
            new = max(2 * old, old + k)
            grown = self.buf.new_empty((new, self.buf.shape[1]))
            grown[:old] = self.buf
            self.buf = grown
            self.free[:0] = range(new - 1, old - 1, -1)
        out = self.free[-k:] if k else []
        del self.free[len(self.free) - k:]
        self.live += k
        return out

    def release(self, slots: np.ndarray) -> None:
        slots = slots[slots >= 0]
        self.free.extend(slots.tolist())
        self.live -= len(slots)
        if self.live == 0:
            self.buf, self.free = None, []

    def bytes(self) -> int:
        return 0 if self.buf is None else self.buf.numel() * self.buf.element_size()


class Entry:
    """One candidate's (or one tag's prompt, for ``full``) slots by absolute position.

    Life cycle: created when the hook first sees one of its positions scheduled; a step
    that computes a position writes its row (a later write wins: recompute after
    preemption is safe); freed by ``bon_sr_collect``, ``bon_sr_release`` (aborted jobs),
    a failure of its job, or ORPHAN_SECONDS after it was last touched (a lost driver)."""

    __slots__ = ("base", "slots", "sbase", "sslots", "touched")

    def __init__(self) -> None:
        self.base = 0
        self.slots = np.empty(0, dtype=np.int64)  # position base + j -> arena slot, -1 missing
        self.sbase = 0
        self.sslots = np.empty(0, dtype=np.int64)  # the same for the (2,) logit stats
        self.touched = time.monotonic()

    @staticmethod
    def _cover(base: int, arr: np.ndarray, lo: int, hi: int) -> tuple[int, np.ndarray]:
        if hi <= lo:
            return base, arr
        if not len(arr):
            return lo, np.full(hi - lo, -1, dtype=np.int64)
        end = base + len(arr)
        if lo >= base and hi <= end:
            return base, arr
        nb, ne = min(base, lo), (max(hi, base + 2 * len(arr)) if hi > end else end)
        out = np.full(ne - nb, -1, dtype=np.int64)
        out[base - nb:base - nb + len(arr)] = arr
        return nb, out

    def rows(self, lo: int, hi: int) -> np.ndarray:
        """The (writable) slot view of positions [lo, hi), grown to cover them."""
        self.base, self.slots = self._cover(self.base, self.slots, lo, hi)
        return self.slots[lo - self.base:hi - self.base]

    def stats(self, lo: int, hi: int) -> np.ndarray:
        self.sbase, self.sslots = self._cover(self.sbase, self.sslots, lo, hi)
        return self.sslots[lo - self.sbase:hi - self.sbase]

    def get(self, arr_base: int, arr: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """Slots of [lo, hi) without growing (-1 where absent)."""
        out = np.full(max(0, hi - lo), -1, dtype=np.int64)
        a, b = max(lo, arr_base), min(hi, arr_base + len(arr))
        if a < b:
            out[a - lo:b - lo] = arr[a - arr_base:b - arr_base]
        return out


def slots_of(entry: Entry | None, lo: int, hi: int) -> np.ndarray:
    if hi <= lo:
        return np.empty(0, dtype=np.int64)
    if entry is None:
        return np.full(hi - lo, -1, dtype=np.int64)
    return entry.get(entry.base, entry.slots, lo, hi)
