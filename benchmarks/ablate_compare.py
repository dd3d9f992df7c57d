"""Apply the default-setting rule of issue 7 across several `bon-sr ablate` runs.

    python benchmarks/ablate_compare.py RUN1/ablate.json RUN2/ablate.json [...] [--top 10]

A variant may replace the paper's definition as the default only if its paired AUC difference
from the paper's cell is clear of zero on every task. This prints, for the cells present in
every run, the AUC on each task, that paired interval, BoN accuracy against each run's random
and greedy baselines, and which cells pass the rule. It reads the reports only (no model).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _cells(summary: dict) -> dict[tuple, dict]:
    return {(c["variant"], c["norm"], c["layer"]): c for c in summary["cells"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path, help="ablate.json files, one per task")
    parser.add_argument("--top", type=int, default=10, help="cells to list, by their worst AUC across tasks")
    args = parser.parse_args()
    runs = [json.loads(p.read_text()) for p in args.reports]
    names = [r["task"] for r in runs]
    tables = [_cells(r) for r in runs]
    common = set(tables[0]).intersection(*tables[1:])
    if not common:
        raise SystemExit("The reports share no (variant, norm, layer) cell; run the same grid on each task.")

    def clear_of_paper(cell: tuple) -> bool:
        diffs = [t[cell].get("auc_vs_paper") for t in tables]
        return all(d is not None and d["ci95"][0] > 0 for d in diffs)

    ranked = sorted(common, key=lambda c: -min(t[c]["auc"] for t in tables))
    for run, name in zip(runs, names):
        base = run["baselines"]
        text = ", ".join(f"{k} {100 * v['accuracy']:.1f}%" for k, v in base.items())
        print(f"{name}: {run['mixed_problems']} mixed problems of {run['problems']}, N = {run['n_samples']}; {text}")
    print()
    header = "variant/norm/layer".ljust(30) + "".join(
        f"| {n}: AUC, vs paper [95% CI], BoN ".ljust(52) for n in names) + "| clear of paper on all"
    print(header)
    for cell in ranked[: args.top]:
        row = "/".join(map(str, cell)).ljust(30)
        for t in tables:
            c = t[cell]
            d = c.get("auc_vs_paper")
            vs = "reference" if d is None else f"{d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
            row += f"| {c['auc']:.3f}, {vs}, {100 * c['bon']['accuracy']:.1f}% ".ljust(52)
        print(row + f"| {'yes' if clear_of_paper(cell) else 'no'}")
    passing = [c for c in ranked if clear_of_paper(c)]
    print(f"\n{len(passing)} of {len(common)} cells are clear of the paper's cell on every task: "
          + (", ".join("/".join(map(str, c)) for c in passing) or "none"))
    above = [c for c in ranked if all(t[c]["auc_ci95"][0] > 0.5 for t in tables)]
    print(f"{len(above)} cells have an AUC interval above 0.5 on every task"
          + (": " + ", ".join("/".join(map(str, c)) for c in above) if above else "."))


if __name__ == "__main__":
    main()
