"""A full disk: `bon-sr generate` under a file-size limit, then a rerun with room and --resume."""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any, Sequence

from .proc import complete_records, run_cli

def disk_full(args: Sequence[str], work: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """`bon-sr generate ARGS` under a file-size limit (RLIMIT_FSIZE: a write past it fails
    with EFBIG, as on a full disk) that leaves room for one and a half records (measured on
    an uninterrupted run first), then a rerun with room and --resume."""
    ref, out = work / "diskfull-reference.jsonl", work / "diskfull.jsonl"
    for p in (ref, out):
        p.unlink(missing_ok=True)
    first = run_cli([*args, "-o", str(ref)], env=env)
    if first.returncode != 0:
        raise RuntimeError(first.stderr[-3000:])
    sizes = [len(x) + 1 for x in ref.read_bytes().split(b"\n")[:-1]]
    limit_bytes = sizes[0] + sizes[1] // 2

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    r = run_cli([*args, "-o", str(out)], env=env, preexec=limit)
    kept_bytes = out.read_bytes() if out.exists() else b""
    kept = complete_records(out)
    torn = bool(kept_bytes) and not kept_bytes.endswith(b"\n")
    err = " ".join(r.stderr.split())
    again = run_cli([*args, "-o", str(out), "--resume"], env=env)
    final = complete_records(out)
    return {"limit_bytes": limit_bytes, "rc": r.returncode, "message": err[err.find("Error:"):][:400],
            "traceback": "Traceback (most recent" in r.stderr, "kept": len(kept), "torn_tail": torn,
            "kept_intact": final[: len(kept)] == kept, "resume_rc": again.returncode, "final": len(final),
            "final_ids": [x["id"] for x in final], "equal_to_uninterrupted": out.read_bytes() == ref.read_bytes()}
