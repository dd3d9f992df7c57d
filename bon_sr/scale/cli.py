"""The driver side of ``bon-sr generate --ray``: maps the scale-out flags to options and
writes the records the Ray pipeline streams back, with progress on stderr.

The single writer of the output is this process (the same crash-safe ``JsonlWriter`` as
without Ray), so ``--resume`` works as it does without Ray. Knows nothing about how the
replicas sample or score; importing it does not import Ray.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping

from ..errors import ConfigError

logger = logging.getLogger(__name__)


def scale_options(scale: Mapping[str, Any], vllm_options: dict[str, Any], *, backend: str,
                  scorer: str = "auto") -> tuple[dict[str, Any], Any]:
    """(vllm_options with TP/PP in engine_kwargs, RayConfig or None) from the generate flags
    ``ray``, ``ray_address``, ``replicas``, ``gpus_per_replica``, ``tensor_parallel_size`` and
    ``pipeline_parallel_size``."""
    from ..options import vllm_available
    from ..engines import parallel_vllm_options
    from .ray_data import RayConfig, import_ray

    tp, pp = scale["tensor_parallel_size"], scale["pipeline_parallel_size"]
    if tp * pp > 1 and (backend == "hf" or (backend == "auto" and not vllm_available())):
        raise ConfigError("--tensor-parallel-size and --pipeline-parallel-size split one vLLM engine over "
                          "devices: they need the vLLM backend (--backend vllm and bon-sr[vllm]).")
    if pp > 1 and scorer in ("auto", "hook"):
        # The hook reads the final hidden states in the worker; with PP only the last stage has them.
        raise ConfigError("--pipeline-parallel-size > 1 works with --scorer pooling or --scorer hf; the vLLM hook "
                          "scorer (the default with --backend vllm) does not support pipeline parallelism.")
    vllm_options = parallel_vllm_options(vllm_options, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    if not scale["ray"]:
        given = [flag for flag, key, default in (("--ray-address", "ray_address", None), ("--replicas", "replicas", 1),
                                                  ("--gpus-per-replica", "gpus_per_replica", None))
                 if scale[key] != default]
        if given:
            raise ConfigError(f"{', '.join(given)} only apply with --ray.")
        return vllm_options, None
    import_ray()  # a missing extra fails here, before OUTPUT is opened
    return vllm_options, RayConfig(address=scale["ray_address"], replicas=scale["replicas"],
                                   gpus_per_replica=scale["gpus_per_replica"])


def run_ray_generate(console: Any, writer: Any, todo: list[Any], skipped: int, keep_candidates: bool,
                     chunk_size: int | None, options: dict[str, Any], config: Any) -> None:
    """Stream the pipeline's records into ``writer`` as they arrive, one line per prompt."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    from ..cli_runtime import stopped_runs_resume
    from .ray_data import iter_records

    where = config.address or "the cluster in RAY_ADDRESS, else a local Ray instance"
    console.print(f"Ray: {config.replicas} replica(s) of {options['model']} ({options['backend']} backend) on "
                  f"{where}; each loads the model before its first batch.")
    done = [0]
    t0 = time.perf_counter()
    columns = (TextColumn("[bold]generate (ray)"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[rate]}"))
    with stopped_runs_resume(console, writer, done), \
            Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("generate", total=len(todo), rate="")
        for record in iter_records(todo, options, config, keep_candidates=keep_candidates, chunk_size=chunk_size):
            if str(record["id"]) in writer.finished_ids:
                # A retried batch whose first attempt did return: keep the line written first.
                logger.warning("Prompt %s came back twice; kept the first record.", record["id"])
                continue
            writer.write(record)
            done[0] += 1
            progress.update(task, advance=1, rate=f"{done[0] / max(time.perf_counter() - t0, 1e-9):.2f} prompts/s")
    elapsed = time.perf_counter() - t0
    console.print(f"[green]Done:[/] {done[0]} prompts written to {writer.path} ({skipped} skipped as already done) "
                  f"in {elapsed:.1f}s with {config.replicas} Ray replica(s) ({done[0] / max(elapsed, 1e-9):.2f} "
                  "prompts/s, model loading included).")
