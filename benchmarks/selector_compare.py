"""Apply the default-utility rule of issue 22 across several `bon-sr bench` reports.

    python benchmarks/selector_compare.py RUN1/task.json RUN2/task.json [...] [--n 8] [--markdown]

A consensus utility may become the default only if its MBR column's paired accuracy
difference against random@n is clear of zero (bootstrap 95% CI above 0) on EVERY task
measured (the spirit of benchmarks/ablate_compare.py); if none passes, the simplest
(``lexical``) stays. This prints, per selector and task, the accuracy and the paired
differences against random@n, greedy and majority vote, and which MBR utilities pass. It
reads the reports only (no model); a selector missing from a report (e.g. a hidden-state
column before the embedding pass) counts as not measured there, and cannot pass.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

#: consensus columns the rule is about, then the ones shown beside them
CANDIDATES_PREFIX = "mbr-"
SHOWN = ("auto", "majority-mbr-tiebreak", "mbr-sr", "mbr-logprob", "majority", "greedy", "random", "sr-response",
         "mean-logprob")


def _diff(entry: dict, key: str) -> str:
    d = entry.get(key)
    if not d:
        return "-"
    lo, hi = d["points_ci95"]
    return f"{d['points']:+.1f} [{lo:+.1f}, {hi:+.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path, help="<task>.json files written by bon-sr bench")
    parser.add_argument("--n", default="8", help="the n to compare at (must be in every report; default 8)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table (for the README)")
    args = parser.parse_args()
    runs = [json.loads(p.read_text()) for p in args.reports]
    names = [f"{r['task']} ({r['config']['model'].removeprefix('qwen2.5-coder-').removesuffix('-instruct')})"
             for r in runs]
    for r, p in zip(runs, args.reports):
        if args.n not in r["results"]:
            raise SystemExit(f"{p} has no n = {args.n}; its n are {', '.join(r['results'])}.")
    rows = [r["results"][args.n] for r in runs]
    sels = sorted({s for row in rows for s in row if s.startswith(CANDIDATES_PREFIX)})
    sels += [s for s in SHOWN if any(s in row for row in rows) and s not in sels]

    def passes(sel: str) -> bool:
        return all(sel in row and row[sel].get("vs_random", {}).get("points_ci95", [0])[0] > 0 for row in rows)

    if args.markdown:
        print(f"Accuracy % at n = {args.n}; paired differences in points [95% bootstrap CI].\n")
        print("| selector | " + " | ".join(names) + " | clear of random@n on every task |")
        print("|---|" + "---|" * (len(names) + 1))
        for sel in sels:
            cells = []
            for row in rows:
                e = row.get(sel)
                cells.append("not measured" if e is None else
                             f"{100 * e['accuracy']:.1f}; vs random {_diff(e, 'vs_random')}; "
                             f"vs greedy {_diff(e, 'vs_greedy')}; vs majority {_diff(e, 'vs_majority')}")
            print(f"| {sel} | " + " | ".join(cells) + f" | {'yes' if passes(sel) else 'no'} |")
    else:
        for run, name in zip(runs, names):
            print(f"{name}: {run['problems']} problems, {run['mixed_problems']} mixed, N = {run['n_samples']}")
        print()
        for sel in sels:
            print(sel)
            for name, row in zip(names, rows):
                e = row.get(sel)
                text = ("not measured" if e is None else
                        f"{100 * e['accuracy']:5.1f}%  vs random {_diff(e, 'vs_random'):22s} vs greedy "
                        f"{_diff(e, 'vs_greedy'):22s} vs majority {_diff(e, 'vs_majority')}")
                print(f"  {name:24s} {text}")
    mbr = [s for s in sels if s.startswith(CANDIDATES_PREFIX) and s not in ("mbr-sr", "mbr-logprob")]
    passing = [s for s in mbr if passes(s)]
    print(f"\nMBR utilities clear of random@{args.n} on every task: "
          + (", ".join(passing) if passing else "none (the default utility stays 'lexical', the simplest)"))


if __name__ == "__main__":
    main()
