"""The worker's answer to ``bon_sr_collect``: stored rows -> stable rank, token statistics
and embeddings per candidate, then the rows freed.

Runs in the WORKER, on the state of a ``worker.WorkerHook`` (its candidates, groups, failed
tags and arenas); batches the stable ranks by length, each batch gathered from the arena
with one index. This module knows nothing about vLLM or how rows were captured.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from ..scoring.stable_rank import stable_rank
from .store import Arena, slots_of


def collect(hook: Any, specs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Answer ``bon_sr_collect``: each spec's stable rank (and its ``also`` token sets, mean
    log-prob and self-certainty, embeddings) from the rows ``hook`` (a ``worker.WorkerHook``)
    stored, then free those rows. A spec whose job failed answers ``{"error": ...}``; one
    with positions never stored answers ``{"missing": [...]}`` (the driver fills and retries)."""
    results: list[dict[str, Any]] = [{} for _ in specs]
    mats: list[tuple[dict[str, Any], np.ndarray]] = []  # (result dict, arena slots)
    stats_of: list[tuple[dict[str, Any], np.ndarray]] = []
    embeds: list[tuple[dict[str, Any], np.ndarray]] = []
    failed_tags: set[str] = set()
    for k, spec in enumerate(specs):
        tag = spec["tag"]
        head = {"tag": tag, "index": spec["index"]}
        if tag in hook.failed:
            results[k] = {**head, "error": hook.failed[tag][0]}
            failed_tags.add(tag)
            continue
        try:
            cand = hook.cands.get((tag, spec["index"]))
            group = hook.groups.get(tag)
            p = spec["p"] if spec["group"] else spec["start"]  # rows below p come from the group entry
            spans = [(None, spec["start"], spec["end"]), *((n, int(a), int(b)) for n, (a, b) in
                                                           (spec.get("also") or {}).items())]
            res: dict[str, Any] = dict(head)
            if len(spans) > 1:
                res["also"] = {}
            parts, missing = [], []
            for name, s, e in spans:
                slots = np.concatenate([
                    slots_of(group, s, min(e, p)), slots_of(cand, max(s, p), e)])
                if (slots < 0).any():
                    missing += [q for q, sl in zip([*range(s, min(e, p)), *range(max(s, p), e)], slots) if sl < 0]
                parts.append((res if name is None else res["also"].setdefault(name, {}), slots))
            if missing:
                results[k] = {**head, "missing": sorted(set(missing))}
                failed_tags.add(tag)
                continue
            mats += parts
            if spec["stats"]:
                r, q0 = spec["r"], spec["p"]
                st = cand.get(cand.sbase, cand.sslots, q0, q0 + r) if cand is not None else np.empty(0, np.int64)
                if r and (st >= 0).all():
                    stats_of.append((res, st))
                else:
                    res.update(mean_logprob=float("nan"), self_certainty=float("nan"))
            if spec.get("embed"):
                resp = slots_of(cand, max(spec["start"], spec["p"]), spec["end"])
                embeds.append((res, resp[resp >= 0]))
            results[k] = res
        except Exception as exc:  # noqa: BLE001 - this job only
            hook.fail([tag], exc)
            results[k] = {**head, "error": f"{type(exc).__name__}: {exc}"}
            failed_tags.add(tag)
    stable_ranks(hook.rows, mats)
    mean_stats(hook.stat_rows, stats_of)
    embeddings(hook.rows, embeds)
    for k, spec in enumerate(specs):
        if "missing" not in results[k]:
            entry = hook.cands.pop((spec["tag"], spec["index"]), None)
            if entry is not None:
                hook.free(entry)
        if spec.get("release_group") and spec["tag"] not in failed_tags:
            group = hook.groups.pop(spec["tag"], None)
            if group is not None:
                hook.free(group)
        if "error" in results[k]:
            hook.drop(spec["tag"])
    return results


def stable_ranks(rows: Arena, mats: list[tuple[dict[str, Any], np.ndarray]], budget: int = 16384) -> None:
    """Stable rank of each (result dict, slots) pair, written into the dict; batched by
    length, each batch gathered from the arena with one index (padding masked out)."""
    mats = sorted(mats, key=lambda m: -len(m[1]))
    pos = 0
    while pos < len(mats):
        width = max(1, len(mats[pos][1]))
        batch = mats[pos:pos + max(1, budget // width)]
        pos += len(batch)
        idx = np.zeros((len(batch), width), dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=bool)
        for row, (_, slots) in enumerate(batch):
            idx[row, :len(slots)] = slots
            mask[row, :len(slots)] = True
        if rows.buf is None:  # nothing stored at all: every batch entry is empty
            h = torch.zeros(len(batch), width, 1)
        else:
            h = rows.read(idx.reshape(-1)).view(len(batch), width, -1).float()
        m = torch.as_tensor(mask, device=h.device)
        res = stable_rank(h, m)
        table = torch.stack([res.stable_rank, res.frobenius_sq, res.spectral_sq,
                             res.num_tokens.to(res.stable_rank.dtype)], dim=1).double().tolist()
        for (target, _), (sr, fro, spec, num) in zip(batch, table):
            target.update(stable_rank=sr, frobenius_sq=fro, spectral_sq=spec, scored_tokens=num)


def mean_stats(stat_rows: Arena, stats_of: list[tuple[dict[str, Any], np.ndarray]]) -> None:
    for target, slots in stats_of:
        mean = stat_rows.read(slots).float().mean(0)
        lp, sc = mean.tolist()
        target.update(mean_logprob=lp, self_certainty=sc)


def embeddings(rows: Arena, embeds: list[tuple[dict[str, Any], np.ndarray]]) -> None:
    for target, slots in embeds:
        if not len(slots) or rows.buf is None:
            # an empty response (or a worker holding no rows at all): NaN vectors of the
            # model's width, as hidden_states.embedding_summary; None only if the width is unknown
            width = rows.width
            nan = None if width is None else [math.nan] * int(width)
            target.update(embedding_last=nan, embedding_mean=None if nan is None else list(nan))
            continue
        got = rows.read(slots).float()
        target.update(embedding_last=got[-1].tolist(), embedding_mean=got.mean(0).tolist())
