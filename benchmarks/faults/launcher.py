"""``bon-sr`` with its phases traced: ``python -m benchmarks.faults.launcher ARGS`` runs
``bon-sr ARGS`` and appends ``<time> <phase> begin|end`` lines to the file named by
``BON_SR_FAULT_TRACE`` for model load (``BestOfN.__init__``), sampling (``HFSampler``), scoring
(``HFScorer.score``) and each record written (``JsonlWriter.write``), so that a kill can aim
at a phase. With ``BON_SR_FAULT_TORN_WRITE=k`` the k-th record is written only up to the
fraction ``BON_SR_FAULT_TORN_AT`` of its bytes and the process SIGKILLs itself: a torn line.

Only the transformers path is traced: vLLM's spawned engine would re-import this module.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any, Callable


def _marker(trace: str) -> Callable[[str], None]:
    def mark(event: str) -> None:
        with open(trace, "a") as fh:
            fh.write(f"{time.time():.4f} {event}\n")

    return mark


def _traced(cls: type, name: str, phase: str, mark: Callable[[str], None]) -> None:
    original = getattr(cls, name)

    def traced(self: Any, *args: Any, **kwargs: Any) -> Any:
        mark(phase + " begin")
        try:
            return original(self, *args, **kwargs)
        finally:
            mark(phase + " end")

    setattr(cls, name, traced)


def install(mark: Callable[[str], None], torn_write: int = 0, torn_at: float = 0.5) -> None:
    """Wrap bon-sr's phase methods with ``mark``; ``torn_write``: the record to tear (0: none)."""
    import json

    from bon_sr import api, jsonl
    from bon_sr.scoring import scorers
    from bon_sr.sampling import hf

    _traced(api.BestOfN, "__init__", "load", mark)
    for name in ("sample", "sample_and_greedy"):
        if hasattr(hf.HFSampler, name):
            _traced(hf.HFSampler, name, "sample", mark)
    _traced(scorers.HFScorer, "score", "score", mark)
    writes = [0]
    original_write = jsonl.JsonlWriter.write

    def write(self: Any, record: Any) -> None:
        writes[0] += 1
        mark("write begin")
        if writes[0] == torn_write:
            data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
            self._fh.write(data[: max(1, int(len(data) * torn_at))])  # the writer's own file, bypassed
            os.kill(os.getpid(), signal.SIGKILL)
        original_write(self, record)
        mark("write end")

    jsonl.JsonlWriter.write = write


def main() -> None:
    mark = _marker(os.environ["BON_SR_FAULT_TRACE"])
    mark("start")  # before the imports: a kill "while loading" may land in them
    install(mark, int(os.environ.get("BON_SR_FAULT_TORN_WRITE", "0")),
            float(os.environ.get("BON_SR_FAULT_TORN_AT", "0.5")))
    from bon_sr.cli import main as bon_sr_main

    sys.argv[0] = "bon-sr"
    bon_sr_main(prog_name="bon-sr")  # click would name it after this module


if __name__ == "__main__":
    main()
