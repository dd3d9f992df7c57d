"""The hook's driver for vLLM's ``AsyncLLM`` (the server): steps a plan (``plan.py``)
with ``engine.generate`` and coalesced collects.

Runs on the DRIVER, in the event loop. Knows nothing of vLLM's internals (``worker.py``)
or of the order of the steps (``plan.py``).

- A Sample step chains each candidate's fill right after its own output, so fills
  overlap the other candidates' decoding instead of waiting for the slowest.
- Collects go through one :class:`Collector` per engine: the specs of every job that is
  ready while a collect is in flight leave together in the next ``bon_sr_collect``, so
  32 concurrent requests cost a few utility calls between engine steps, not 32.
- A cancelled job (the client went away: vLLM aborts its requests) releases its rows.

Data parallelism (``data_parallel_size`` > 1): every request of one job carries
``data_parallel_rank`` (from its tag), so its samples, fills and rows meet one engine
core; collects and releases go to every core (vLLM 0.32's DP client otherwise answers
with core 0's result only) and each spec keeps the answer of the core that held it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any, Sequence

from ..scoring.hidden_states import HiddenStateConfig
from ..types import Candidate
from .budget import default_row_budget, job_bytes  # noqa: F401 - the server's names for them
from .plan import Collect, Generate, Group, Sample, ScoredSampling, Steps
from .protocol import (HookError, check_hook_config, dp_rank_for, engine_context, merge_engine_results,
                       require_hook)

logger = logging.getLogger(__name__)


async def install_hook_async(engine: Any, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """``install_hook`` for an ``AsyncLLM`` (or any engine client with ``collective_rpc``)."""
    require_hook(engine)
    return (await engine.collective_rpc("bon_sr_install_hook", args=(dict(options or {}),)))[0]


def data_parallel_size(engine: Any) -> int:
    """vLLM data-parallel engine cores behind ``engine`` (1 without data parallelism)."""
    config = getattr(engine, "vllm_config", None)
    return int(getattr(getattr(config, "parallel_config", None), "data_parallel_size", 1) or 1)


async def rpc_all(engine: Any, name: str, args: tuple[Any, ...]) -> list[Any]:
    """``collective_rpc(name)`` on every engine core; rank 0's answer of each."""
    if data_parallel_size(engine) <= 1:
        return [(await engine.collective_rpc(name, args=args))[0]]
    # vLLM 0.32's DP client sends a utility call to every core but returns core 0's answer
    # only (DPLBAsyncMPClient.call_utility_async); ask for all of them
    per_engine = await engine.engine_core.call_utility_all_async("collective_rpc", name, None, args, None)
    return [workers[0] for workers in per_engine]


async def hook_stats_async(engine: Any) -> dict[str, int]:
    """Live entries summed over the engine cores (see ``worker.HookWorkerExtension``)."""
    total: dict[str, int] = {}
    for stats in await rpc_all(engine, "bon_sr_hook_stats", ()):
        for k, v in stats.items():
            total[k] = total.get(k, 0) + int(v)
    return total


class Collector:
    """Coalesces concurrent jobs' collects on one engine into as few RPCs as possible:
    while one ``bon_sr_collect`` is in flight, the specs that arrive wait and leave
    together in the next."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.calls = 0  # RPCs sent (tests and benchmarks read it)
        self._queue: list[tuple[list[dict[str, Any]], asyncio.Future]] = []
        self._task: asyncio.Task | None = None

    async def collect(self, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not specs:
            return []
        future = asyncio.get_running_loop().create_future()
        self._queue.append((specs, future))
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            specs = [s for part, _ in batch for s in part]
            try:
                self.calls += 1
                results = merge_engine_results(await rpc_all(self.engine, "bon_sr_collect", (specs,)))
                if len(results) != len(specs):
                    raise HookError(f"bon-sr hook: the worker answered {len(results)} results for {len(specs)} "
                                    "collect specs")
            except BaseException as exc:  # noqa: BLE001 - handed to every waiting job
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
                if not isinstance(exc, Exception):
                    raise
                continue
            pos = 0
            for part, future in batch:
                if not future.done():  # a cancelled job's rows were collected (freed) all the same
                    future.set_result(results[pos:pos + len(part)])
                pos += len(part)


class HookBusy(Exception):
    """The hook's row budget is spent and its wait queue is full: retry later."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class RowBudget:
    """Bytes of hook rows the scored jobs in flight may hold (the worker keeps each
    candidate's rows until collect, outside vLLM's own memory budget). A job reserves its
    worst case (``job_bytes``) before it samples and gives it back when it ends; past the
    budget new jobs wait in arrival order, and past ``max_waiting`` waiting jobs a new one
    is refused with :class:`HookBusy` instead of risking an out-of-memory crash. A job
    larger than the whole budget runs alone."""

    def __init__(self, capacity: int, *, max_waiting: int = 256, retry_after: float = 1.0):
        self.capacity = int(capacity)
        self.max_waiting = int(max_waiting)
        self.retry_after = float(retry_after)
        self.used = 0
        self._waiting: list[tuple[int, asyncio.Future]] = []

    def _fits(self, nbytes: int) -> bool:
        return self.used == 0 or self.used + nbytes <= self.capacity

    async def acquire(self, nbytes: int) -> None:
        if not self._waiting and self._fits(nbytes):
            self.used += nbytes
            return
        if len(self._waiting) >= self.max_waiting:
            raise HookBusy(f"The server is at its hook memory budget ({self.capacity} bytes of rows in flight) "
                           f"with {len(self._waiting)} requests waiting; retry later.", self.retry_after)
        future = asyncio.get_running_loop().create_future()
        entry = (nbytes, future)
        self._waiting.append(entry)
        try:
            await future
        except BaseException:
            if entry in self._waiting:
                self._waiting.remove(entry)
                self._admit()  # it may have held back smaller jobs behind it
            elif future.done() and not future.cancelled():
                self.release(nbytes)  # admitted while being cancelled
            raise

    def release(self, nbytes: int) -> None:
        self.used -= nbytes
        self._admit()

    def _admit(self) -> None:
        """Admit waiting jobs in arrival order while the first of them fits."""
        while self._waiting and self._fits(self._waiting[0][0]):
            nbytes, future = self._waiting.pop(0)
            self.used += nbytes
            future.set_result(None)


def fill_priority(engine: Any) -> int:
    """The vLLM priority of fill requests: ahead of waiting samples (-1) on an engine with
    ``scheduling_policy="priority"`` (bon-sr's server), else 0. Under first-come-first-served
    a fill waits behind every sample request still queued, so with more candidates than
    the engine runs at once no job could finish before the last wave of samples starts."""
    config = getattr(engine, "vllm_config", None)
    return -1 if getattr(getattr(config, "scheduler_config", None), "policy", "fcfs") == "priority" else 0


async def _final(engine: Any, request: tuple[Any, Any], rank: int | None, priority: int = 0) -> Any:
    last = None
    extra: dict[str, Any] = {} if rank is None else {"data_parallel_rank": rank}
    if priority:
        extra["priority"] = priority
    async for out in engine.generate(request[0], request[1], request_id=f"bon-sr-{uuid.uuid4().hex}", **extra):
        last = out
    return last


async def all_or_cancel(coros: Sequence[Any]) -> list[Any]:
    """Run ``coros`` concurrently; their results in order. The first to fail cancels the
    others (vLLM aborts their requests) and waits for them before its exception propagates,
    and cancelling the caller cancels them all: a failed candidate leaves none of its
    siblings decoding for a dead job (``asyncio.gather`` would; 3.10 has no TaskGroup)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    if not tasks:
        return []
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except BaseException:
        await _cancel_all(tasks)
        raise
    failed = next((t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None), None)
    if failed is not None:
        await _cancel_all(tasks)
        raise failed.exception()  # type: ignore[misc]
    return [t.result() for t in tasks]


async def _cancel_all(tasks: Sequence[asyncio.Future]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def drive_async(engine: Any, steps: Steps, tags: Sequence[str], *, collector: Collector | None = None
                      ) -> Any:
    """Run ``steps`` to the end on ``engine``; a cancelled run releases ``tags``' rows."""
    # no registry of shared collectors (one keyed by engine kept every engine alive: its
    # Collector holds the engine): callers that should share collect RPCs pass one collector
    collector = collector or Collector(engine)
    rank = dp_rank_for(tags[0], data_parallel_size(engine)) if tags else None
    first = fill_priority(engine)

    async def then_fill(k: int, request: tuple[Any, Any], follow: Any) -> Any:
        out = await _final(engine, request, rank)
        fill = follow(k, out)
        if fill is not None:
            await _final(engine, fill, rank, first)
        return out

    try:
        step = next(steps)
        while True:
            if isinstance(step, Sample):
                reply: Any = await all_or_cancel([then_fill(k, r, step.follow) for k, r in enumerate(step.requests)])
            elif isinstance(step, Generate):
                await all_or_cancel([_final(engine, r, rank, first) for r in step.requests])
                reply = None
            elif isinstance(step, Collect):
                reply = await collector.collect(step.specs)
            else:  # pragma: no cover - a plan yields only the steps above
                raise TypeError(f"unknown plan step {step!r}")
            step = steps.send(reply)
    except StopIteration as stop:
        return stop.value
    except BaseException:
        # the client went away (vLLM aborts the requests) or a step failed: free the rows now
        if tags:
            try:
                await asyncio.shield(rpc_all(engine, "bon_sr_release", (list(tags),)))
            except Exception as exc:  # the original error matters more
                logger.warning("bon-sr hook: could not release the rows of an abandoned job: %s", exc)
        raise


async def sample_scored_async(engine: Any, prompt_ids: Sequence[int], sampling: Any, *, seed: int | None,
                              scoring: HiddenStateConfig | None = None, n: int | None = None,
                              logit_stats: bool = False, collector: Collector | None = None,
                              budget: RowBudget | None = None, row_bytes: int = 0,
                              embed: bool = False, tokenizer: Any = None) -> list[Candidate]:
    """One prompt's n scored candidates on an ``AsyncLLM`` whose workers have the hook
    (``worker_extension_cls=WORKER_EXTENSION``; ``await install_hook_async(engine)`` once
    after creating it). ``sampling`` is a ``bon_sr.sampling.SamplingConfig``; the requests
    are the sync path's, so the same seed gives the same candidates and scores.
    ``budget``: the job first reserves its worst-case rows (``row_bytes`` each) there.
    ``embed``: the candidates also carry ``embeddings`` (``HookSampler``'s). ``tokenizer``:
    the model's (default: the engine's ``get_tokenizer()``), for the extra-token decode that
    spares length-cut candidates a fill (``plan.ScoredSampling``)."""
    from ..sampling.vllm import VLLMSampler

    scoring = scoring or HiddenStateConfig()
    check_hook_config(scoring)
    n = sampling.n if n is None else n
    base = VLLMSampler(None, sampling)
    group = Group(tuple(int(t) for t in prompt_ids), base.request_params(1, seed or 0), n,
                  None if seed is None else int(seed))
    if tokenizer is None and callable(getattr(engine, "get_tokenizer", None)):
        tokenizer = engine.get_tokenizer()
    plan = ScoredSampling([group], scoring, base.to_candidate, logit_stats=logit_stats, embed=embed,
                          tokenizer=tokenizer, context=engine_context(engine))
    if budget is None:
        return (await drive_async(engine, plan.steps(), plan.tags(), collector=collector))[0]
    nbytes = job_bytes(len(group.prompt_ids), n, sampling.max_new_tokens, scoring, row_bytes)
    await budget.acquire(nbytes)
    try:
        return (await drive_async(engine, plan.steps(), plan.tags(), collector=collector))[0]
    finally:
        budget.release(nbytes)
