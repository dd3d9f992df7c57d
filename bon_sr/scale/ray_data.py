"""Best-of-N over a Ray cluster: a Ray Data pipeline whose actors each hold one ``BestOfN``.

prompt records -> ``ray.data.from_items`` -> ``map_batches`` over a fixed pool of
``replicas`` actors (each loads the model once and runs ``BestOfN.select_many`` on its
batches) -> records streamed back to the driver in completion order. The actors RETURN the
output records and never touch a file: the driver is the one writer of the crash-safe JSONL
(``bon_sr.scale.cli``), so a resumed run reads one file and no two processes append to it.
This module knows nothing about files, progress bars or click.

Reproducibility: each prompt's seed derives from the run seed and its id
(``prompts.derive_seed``, inside ``select_many``), so the samples do not depend on the
number of replicas, on which replica got a prompt or on how Ray split the input. The
default batch is one prompt for the transformers backend, as in the single-process command,
so its selections and scores are the same bit for bit (when the replicas use as many torch
threads as that run); larger batches pad scoring passes differently, which moves scores by
float rounding only. vLLM on CPU is not bit-reproducible from one process to the next even
without Ray (two single-process runs of 4 prompts, n=2, differed in 2 prompts), so there the
same holds only up to vLLM's own run-to-run variation.

Faults: Ray Data restarts a dead replica actor and retries its batch (it sets
``max_restarts=-1`` and ``max_task_retries=-1`` on pool actors); a batch returns all its
records at once, so a retried batch cannot leave half its records behind, and the driver
still drops an id it has already written.

Why not Ray Data's own vLLM processor (``ray.data.llm.vLLMEngineProcessorConfig``)? Checked
against the installed Ray 2.60.0: ``ray/llm/_internal/batch/stages/vllm_engine_stage.py``
turns each ``RequestOutput`` into ``vLLMOutputData`` from ``output.outputs[0]`` only
(``generated_tokens``, ``generated_text``, ``logprobs`` of the first completion), and that
pydantic model has fixed fields (prompt, token counts, embeddings, metrics, logprobs): the
other N-1 completions of ``SamplingParams(n=N)`` and any per-request extra (the hook's
stable ranks) are dropped. Its engine is also a plain vLLM engine without bon-sr's hook, and
``ray[llm]`` 2.60 pins ``vllm==0.29.0``. So each actor here runs bon-sr's own ``BestOfN``
(the same sampler, hook/scorer and selector as the single-process command) and Ray Data
supplies only what it is good at: splitting, actor pools, retries and streaming.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from ..errors import BonSRError, ConfigError, MissingExtraError
from ..sampling.prompts import PromptRecord

logger = logging.getLogger(__name__)

#: Test-only fault injection, read on the driver and handed to the replicas: "ID:MARKER"
#: makes the replica process that first meets prompt ID exit hard (``os._exit``) unless the
#: file MARKER exists (it creates it first), so exactly one replica dies once.
CRASH_ONCE_ENV = "BON_SR_TEST_CRASH_ONCE"


def import_ray() -> Any:
    """``import ray`` (with Ray Data), or a MissingExtraError naming the ``ray`` extra."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data needs pandas/pyarrow, which `ray[data]` brings)
    except ImportError as exc:
        raise MissingExtraError("ray", "ray", "bon-sr generate --ray") from exc
    return ray


@dataclass(frozen=True)
class RayConfig:
    """Where and how wide the pipeline runs.

    address: a Ray cluster (``auto``, ``HOST:6379``, ``ray://HOST:10001``); None joins
        ``RAY_ADDRESS`` when set, else starts a local Ray instance for this run.
    replicas: actors in the pool, each holding one model.
    gpus_per_replica: None = tensor x pipeline parallel size when the cluster has GPUs, else 0.
    cpus_per_replica: CPUs Ray reserves per actor; also its torch thread count.
    batch_size: prompts per Ray task (the unit of retry and of streaming); None = the
        single-process chunk (1 for the transformers backend, 32 for vLLM).
    """

    address: str | None = None
    replicas: int = 1
    gpus_per_replica: float | None = None
    cpus_per_replica: float = 1.0
    batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ConfigError(f"replicas must be >= 1 (got {self.replicas}).")
        if self.gpus_per_replica is not None and self.gpus_per_replica < 0:
            raise ConfigError(f"gpus_per_replica must be >= 0 (got {self.gpus_per_replica}).")
        if self.cpus_per_replica <= 0:
            raise ConfigError(f"cpus_per_replica must be > 0 (got {self.cpus_per_replica}).")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1 (got {self.batch_size}).")




def engine_devices(vllm_options: Mapping[str, Any]) -> int:
    """Devices one vLLM engine spans: tensor x pipeline parallel size."""
    kw = vllm_options.get("engine_kwargs") or {}
    return int(kw.get("tensor_parallel_size", 1)) * int(kw.get("pipeline_parallel_size", 1))


def output_record(record_id: str, selection: Any, config: Mapping[str, Any], *,
                  keep_candidates: bool) -> dict[str, Any]:
    """The JSONL line of one prompt, field for field what ``bon-sr generate`` writes."""
    out: dict[str, Any] = {"id": record_id}
    out.update(selection.to_dict(keep_candidates=keep_candidates))
    out["config"] = dict(config)
    return out


class Replica:
    """One actor of the pool: loads one ``BestOfN`` and turns batches of prompts into output
    records (JSON text, so Arrow never has to guess a schema for chats or score dicts)."""

    def __init__(self, options: Mapping[str, Any], *, keep_candidates: bool, chunk_size: int | None,
                 num_threads: int, crash_once: str | None = None):
        import torch

        # Ray reserves cpus_per_replica cores for this actor; more torch threads than that
        # only fight the other replicas for them.
        torch.set_num_threads(max(1, num_threads))
        from ..api import BestOfN

        self.bon = BestOfN(**options)
        self.config = self.bon.config_dict()
        self.keep_candidates = keep_candidates
        self.chunk_size = chunk_size
        self.crash_once = crash_once

    def _maybe_crash(self, ids: Sequence[str]) -> None:
        if not self.crash_once:
            return
        target, _, marker = self.crash_once.partition(":")
        if target in ids and marker and not os.path.exists(marker):
            Path(marker).write_text(f"{os.getpid()}\n")
            os._exit(1)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list[str]]:
        ids = [str(x) for x in batch["id"]]
        prompts = [json.loads(p) for p in batch["prompt"]]
        tests = [json.loads(t) for t in batch["tests"]]  # a prompt line's tests (answer python)
        self._maybe_crash(ids)
        try:
            selections = list(self.bon.select_many(prompts, ids=ids, chunk_size=self.chunk_size, tests=tests))
        except BonSRError as exc:
            # A user-level error (a prompt too long for the context) is no reason to retry:
            # it goes back as data and the driver stops the run with it.
            return {"id": ids, "record": [""] * len(ids), "error": [str(exc)] * len(ids)}
        records = [json.dumps(output_record(i, s, self.config, keep_candidates=self.keep_candidates))
                   for i, s in zip(ids, selections)]
        return {"id": ids, "record": records, "error": [""] * len(ids)}


def default_batch_size(options: Mapping[str, Any]) -> int:
    from ..options import vllm_available

    backend = options.get("backend", "auto")
    hf = backend == "hf" or (backend == "auto" and not vllm_available())
    return 1 if hf else 32


def iter_records(records: Sequence[PromptRecord], options: Mapping[str, Any], config: RayConfig, *,
                 keep_candidates: bool = True, chunk_size: int | None = None) -> Iterator[dict[str, Any]]:
    """Run ``BestOfN(**options)`` on ``config.replicas`` Ray actors over ``records`` and yield
    each prompt's output record as its batch finishes (completion order, not input order).

    Joins the cluster at ``config.address`` (or starts a local Ray that is shut down again
    when the iterator ends); an already initialised Ray (``ray.init`` by the caller) is used
    as it is. A prompt-level error raises BonSRError after the records before it came back.
    """
    ray = import_ray()
    if not records:
        return
    started = False
    if not ray.is_initialized():
        verbose = logging.getLogger().isEnabledFor(logging.DEBUG)
        try:
            ray.init(address=config.address, log_to_driver=verbose, logging_level=logging.INFO if verbose
                     else logging.WARNING, include_dashboard=False)
        except ConnectionError as exc:
            raise ConfigError(f"Cannot reach the Ray cluster at {config.address!r}: {exc}. Start one with "
                              "`ray start --head` or drop --ray-address to run a local Ray.") from exc
        started = True
    try:
        yield from _run_pipeline(ray, records, options, config, keep_candidates, chunk_size)
    finally:
        if started:
            ray.shutdown()


def _run_pipeline(ray: Any, records: Sequence[PromptRecord], options: Mapping[str, Any], config: RayConfig,
                  keep_candidates: bool, chunk_size: int | None) -> Iterator[dict[str, Any]]:
    ctx = ray.data.DataContext.get_current()
    # The driver draws bon-sr's own progress; Ray Data's bars and banners would interleave.
    ctx.enable_progress_bars = False
    if hasattr(ctx, "print_on_execution_start"):
        ctx.print_on_execution_start = False
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    resources = ray.cluster_resources()
    gpus = config.gpus_per_replica
    if gpus is None:
        gpus = float(engine_devices(options.get("vllm_options") or {})) if resources.get("GPU", 0) > 0 else 0.0
    for name, need, have in (("GPU", gpus * config.replicas, resources.get("GPU", 0.0)),
                             ("CPU", config.cpus_per_replica * config.replicas, resources.get("CPU", 0.0))):
        if need > have:
            # An autoscaling cluster may still grow; a fixed one would wait forever.
            logger.warning("%d replicas need %g %ss but the Ray cluster has %g now; the pool waits for them "
                           "(lower --replicas or --gpus-per-replica on a fixed cluster).",
                           config.replicas, need, name, have)
    batch_size = config.batch_size or chunk_size or default_batch_size(options)
    items = [{"id": r.id, "prompt": json.dumps(r.prompt), "tests": json.dumps(r.tests)} for r in records]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 4 * config.replicas)))
    ds = ds.map_batches(
        Replica,
        fn_constructor_kwargs=dict(options=dict(options), keep_candidates=keep_candidates, chunk_size=chunk_size,
                                   num_threads=int(config.cpus_per_replica),
                                   crash_once=os.environ.get(CRASH_ONCE_ENV)),
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=config.replicas),
        num_cpus=config.cpus_per_replica,
        num_gpus=gpus or None,
    )
    try:
        for row in ds.iter_rows():
            if row["error"]:
                raise BonSRError(str(row["error"]))
            yield json.loads(row["record"])
    except ray.exceptions.RayError as exc:
        raise BonSRError(f"The Ray pipeline failed: {exc}") from exc
