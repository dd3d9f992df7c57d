"""Re-evaluate a finished `bon-sr ablate` run on its first K problems, from its saved cells.

    python benchmarks/ablate_subset.py OUT/ablate.json --limit K [CELL ...]

CELL is a cell file's stem, e.g. paper__post__L23 (default: every cell of the run). No model is
loaded: the per-candidate scores in OUT/cells/ are cut to the first K problems and scored with
the same metrics as `bon-sr ablate`. Use it to compare two runs on the same problems, e.g. the
generator's cells on the subset a slower scoring model (`--limit`) or the random-init control
covered.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from bon_sr.bench.ablate import AblateConfig, cell_groups, cell_metrics, cell_name, length_correction
from bon_sr.bench.runner import read_cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="OUT/ablate.json of a finished run")
    parser.add_argument("--limit", type=int, required=True, help="first K problems of that run")
    parser.add_argument("cells", nargs="*", help="cell stems (default: all)")
    args = parser.parse_intermixed_args()
    summary = json.loads(args.report.read_text())
    cells_dir = args.report.parent / "cells"
    records = [r for r in read_cache(Path(summary["cache"])).values() if r.get("candidates")]
    if args.limit > summary["problems"]:
        raise SystemExit(f"--limit {args.limit} exceeds the {summary['problems']} problems of that run.")
    records = records[: args.limit]
    owner = [k for k, rec in enumerate(records) for _ in rec["candidates"]]
    config = AblateConfig(cache_dir=str(summary["cache"]), **{k: summary["config"][k] for k in ("bootstrap", "seed")})
    names = args.cells or [cell_name((c["variant"], c["norm"], c["layer"])) for c in summary["cells"]]
    for name in names:
        path = cells_dir / f"{name}.json"
        if not path.is_file():
            raise SystemExit(f"{path} does not exist; cell stems look like paper__post__L23.")
        scores = [math.nan if v is None else v for v in json.loads(path.read_text())["scores"]][: len(owner)]
        length = length_correction(name.split("__")[0])
        m = cell_metrics(cell_groups(records, scores, owner, length), config)
        lo, hi = m["auc_ci95"]
        print(f"{name}: AUC {m['auc']:.3f} [{lo:.3f}, {hi:.3f}] over {m['prompts']} mixed problems; "
              f"BoN {100 * m['bon']['accuracy']:.1f}%")


if __name__ == "__main__":
    main()
