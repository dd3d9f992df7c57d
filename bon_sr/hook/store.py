"""Where the hook keeps rows in the worker: one chunked arena per worker and, per candidate,
the arena slot of each absolute position.

Runs in the WORKER. ``Arena`` holds every entry's rows in equal chunks (one tensor each, added
without copying) with a free list of slots, so a step copies every tagged row with one
``index_select`` and one ``index_copy_`` per chunk it touches, whatever the number of
candidates; ``Entry`` maps one candidate's (or one
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
    """Rows of every entry in equal chunks of ``(chunk_rows, width)``; slot ``s`` is row
    ``s % chunk_rows`` of chunk ``s // chunk_rows``, slots come from a free list.

    Growing adds one chunk and never copies, so the arena never holds its rows twice (a
    doubling buffer would hold old and new during the copy: 3x the live rows at its peak).
    The driver bounds what is live (``protocol.job_bytes`` against a row budget). Dropped
    whole when nothing is live. ``width``: known before the first row (for NaN embeddings of
    a worker that holds none); else taken from the first allocation."""

    def __init__(self, width: int | None = None, *, chunk_bytes: int = 16 << 20, max_chunk_rows: int = 1 << 16):
        self.width = width
        self.chunk_bytes = int(chunk_bytes)
        self.max_chunk_rows = int(max_chunk_rows)
        self.chunks: list[torch.Tensor] = []
        self.chunk_rows = 0
        self.free: list[int] = []
        self.live = 0

    @property
    def buf(self) -> torch.Tensor | None:
        """The first chunk (None when empty): its dtype and device are the arena's."""
        return self.chunks[0] if self.chunks else None

    def _grow(self, like: torch.Tensor) -> None:
        if not self.chunks:
            self.width = int(like.shape[-1])
            row = max(1, self.width * like.element_size())
            self.chunk_rows = max(64, min(self.max_chunk_rows, self.chunk_bytes // row))
            proto = like
        else:
            proto = self.chunks[0]
        base = len(self.chunks) * self.chunk_rows
        self.chunks.append(proto.new_empty((self.chunk_rows, int(proto.shape[-1]))))
        self.free[:0] = range(base + self.chunk_rows - 1, base - 1, -1)

    def alloc(self, k: int, like: torch.Tensor) -> list[int]:
        while len(self.free) < k:
            self._grow(like)
        out = self.free[-k:] if k else []
        del self.free[len(self.free) - k:]
        self.live += k
        return out

    def write(self, slots: Sequence[int] | np.ndarray, values: torch.Tensor) -> None:
        """Row ``slots[i]`` = ``values[i]``: ``values (k, width)``."""
        slots = np.asarray(slots, dtype=np.int64)
        first = self.chunks[0]
        if len(self.chunks) == 1:
            first.index_copy_(0, index_tensor(slots, first.device), values.to(first.dtype))
            return
        which = slots // self.chunk_rows
        for c in np.unique(which):
            sel = np.nonzero(which == c)[0]
            self.chunks[c].index_copy_(0, index_tensor(slots[sel] % self.chunk_rows, first.device),
                                       values.index_select(0, index_tensor(sel, values.device)).to(first.dtype))

    def read(self, slots: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Rows ``slots`` as one ``(k, width)`` tensor (the arena's dtype and device)."""
        slots = np.asarray(slots, dtype=np.int64)
        first = self.chunks[0]
        if len(self.chunks) == 1:
            return first.index_select(0, index_tensor(slots, first.device))
        out = first.new_empty((len(slots), first.shape[-1]))
        which = slots // self.chunk_rows
        for c in np.unique(which):
            sel = np.nonzero(which == c)[0]
            out.index_copy_(0, index_tensor(sel, first.device),
                            self.chunks[c].index_select(0, index_tensor(slots[sel] % self.chunk_rows, first.device)))
        return out

    def release(self, slots: np.ndarray) -> None:
        slots = slots[slots >= 0]
        self.free.extend(slots.tolist())
        self.live -= len(slots)
        if self.live == 0:
            self.chunks, self.free = [], []

    def bytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.chunks)


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
