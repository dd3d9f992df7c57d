"""The async Best-of-N engine: one vLLM ``AsyncLLM`` with bon-sr's hook, shared by every request.

Concurrent HTTP requests submit their candidates to the same ``AsyncLLM``, which batches
them in one engine step loop: no lock, no synchronous ``vllm.LLM`` inside ``async def``.
Sampling and scoring are ``bon_sr.hook.sample_scored_async``: the same fan-out, seeds,
extra decoded token, fills and collect as ``BestOfN(backend="vllm", scorer="hook")``, so a request
with seed S samples and scores what ``BestOfN.select(prompt, seed=S)`` does. A job that
needs no scores (``majority``, ``random``, ...) runs one plain ``n=N`` request, as
``BestOfN``'s unscored vLLM sampler does.

Life cycle: ``start()`` (run as a background task by the app) resolves the model, builds
the engine in a worker thread (tens of seconds on CPU; the event loop keeps answering
``/health`` with 503 meanwhile) and installs the hook; ``state`` goes ``loading`` ->
``ready`` (or ``failed`` with ``error``). ``close()`` shuts the engine down. A cancelled
``sample`` (the client went away) cancels its ``AsyncLLM.generate`` calls, vLLM aborts
those requests and the hook frees their rows. The scored jobs' collects go through one
``Collector``, so concurrent requests share collect RPCs.

This module knows nothing about HTTP, selection or answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..hook.aio import Collector, RowBudget, default_row_budget, install_hook_async, sample_scored_async
from ..hook.selfcheck import run_selfcheck_async
from ..types import Candidate

if TYPE_CHECKING:
    from .service import Job
    from .settings import ServeSettings

logger = logging.getLogger(__name__)


class BonEngine:
    """What the app needs from an engine (tests substitute a fake with the same surface):
    ``state``, ``error``, ``tokenizer``, ``context``, ``await start()``,
    ``await sample(job) -> list[Candidate]``, ``close()``.

    ``build`` makes the vLLM engine (called on a thread by ``start``); by default vLLM's
    ``AsyncLLM`` for ``settings``. A test passes its own to run the life cycle without vLLM."""

    def __init__(self, settings: "ServeSettings", build: Callable[[], Any] | None = None):
        self.settings = settings
        self._make_llm = build or self._build
        self.state = "loading"
        self.error: str | None = None
        self.tokenizer: Any = None
        self.context: int | None = None
        self.started_at = time.monotonic()
        self._llm: Any = None
        self._closed = False
        self.collector: Any = None  # bon_sr.hook.Collector: one collect RPC for all ready jobs
        self.budget: Any = None  # bon_sr.hook.RowBudget: scored jobs' rows in flight
        self.row_bytes = 0

    @property
    def llm(self) -> Any:
        """vLLM's ``AsyncLLM`` this engine samples with (hooked), or None before start/after close."""
        return self._llm

    # -- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        try:
            llm = await asyncio.to_thread(self._make_llm)
            if self._closed:  # shut down while loading
                llm.shutdown()
                return
            self._llm = llm
            info = await install_hook_async(llm)
            if self._closed:  # close() ran during the install and shut the engine down
                self.state = "stopped"
                return
            await run_selfcheck_async(llm)  # rows vs tokens sampled; HookSelfCheckError names the vLLM version
            if self._closed:
                self.state = "stopped"
                return
            self.collector = Collector(llm)
            default, self.row_bytes = default_row_budget(llm.vllm_config, info)
            capacity = self.settings.hook_memory or default
            self.budget = RowBudget(capacity, max_waiting=self.settings.hook_queue)
            logger.info("bon-sr serve: hook row budget %.1f MiB (%s; %s)", capacity / 2**20,
                        "--hook-memory" if self.settings.hook_memory else "what vLLM leaves free minus a margin",
                        info.get("device", "device unknown"))
            self.state = "ready"
            logger.info("bon-sr serve: %s ready in %.1f s", self.settings.model, time.monotonic() - self.started_at)
        except Exception as exc:  # a failed start is reported by /health, not raised into the loop
            self.state = "failed"
            self.error = f"{type(exc).__name__}: {exc}"
            logger.error("bon-sr serve: the engine did not start: %s", self.error)

    def _build(self) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from ..models import resolve_model
        from ..engines import VLLMBackend, check_hook_internals, use_v1_runner

        s = self.settings
        path = resolve_model(s.model)
        # VLLMBackend starts no engine here: it loads the tokenizer, applies the CPU
        # environment defaults and knows the generate engine's arguments (KV bytes, eager,
        # chunked prefill off for per-request seeds, the hook extension, prefix caching).
        backend = VLLMBackend(path, dtype=s.dtype, seed=s.sampling.seed, hook=True, **s.engine_options())
        self.tokenizer = backend.tokenizer
        self.context = backend.context
        kwargs = backend.engine_kwargs("generate")
        # fills (one-block prefills that let a finished job complete) go ahead of waiting
        # samples; among equal priorities this is first come, first served (hook.aio.fill_priority)
        kwargs.setdefault("scheduling_policy", "priority")
        # The hook wraps the V1 model runner (see VLLMBackend._start); a user's
        # VLLM_USE_V2_MODEL_RUNNER=1 is refused there and here, never silently overridden;
        # its vLLM internals are probed here, before the engine starts.
        use_v1_runner()
        check_hook_internals()
        from ..sampling.vllm_plugin import mark_engine_parent

        # the engine's processes die with the server, even on kill -9 (this thread lives as
        # long as the event loop's executor, i.e. as long as the engine)
        mark_engine_parent(thread_ok=True)
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))

    def close(self) -> None:
        self._closed = True
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
        if self.state == "ready":
            self.state = "stopped"

    # -- work ---------------------------------------------------------------------------

    async def sample(self, job: "Job") -> list[Candidate]:
        """The job's N candidates; with ``job.include_greedy`` one greedy decode joins them,
        last and marked ``greedy``, sampled beside them (vLLM batches the two requests)."""
        if not job.include_greedy:
            return await self._sample(job, job.sampling, job.seed)
        greedy = replace(job.sampling, n=1, greedy=True)
        sampled, (lone,) = await asyncio.gather(self._sample(job, job.sampling, job.seed),
                                                self._sample(job, greedy, job.seed))
        return [*sampled, replace(lone, index=len(sampled), greedy=True)]

    async def _sample(self, job: "Job", sampling: Any, seed: int) -> list[Candidate]:
        if job.score_keys or job.embed:
            return await sample_scored_async(self._llm, job.prompt_ids, sampling, seed=seed,
                                             scoring=job.scoring, logit_stats=job.logit_stats,
                                             collector=self.collector, budget=self.budget, row_bytes=self.row_bytes,
                                             embed=job.embed, tokenizer=self.tokenizer)
        return await self._sample_unscored(job.prompt_ids, sampling, seed)

    async def _sample_unscored(self, prompt_ids: Sequence[int], sampling: Any, seed: int) -> list[Candidate]:
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        from ..sampling.vllm import VLLMSampler

        # BestOfN's unscored vLLM sampler: one request with n=N, children seeded seed+i.
        base = VLLMSampler(None, sampling)
        params = base.request_params(sampling.n, seed)
        params.output_kind = RequestOutputKind.FINAL_ONLY  # all N completions in one output
        final = None
        async for out in self._llm.generate(TokensPrompt(prompt_token_ids=[int(t) for t in prompt_ids]), params,
                                            request_id=f"bon-sr-{uuid.uuid4().hex}"):
            final = out
        completions = sorted(final.outputs, key=lambda c: c.index)
        return [base.to_candidate(i, c) for i, c in enumerate(completions)]
