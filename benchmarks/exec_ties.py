"""Which tie rule for the pass-first vote (issue 32, item 2): measured on graded caches.

The ``python`` answer format's vote (``majority`` given ``passed``) puts the candidates that
pass every example the prompt shows first and picks the largest group of identical behaviour
among them. Two choices are left to a rule:

- between groups: which of several equally large passing groups wins (the product: the one
  whose first member comes earliest, ``majority``; ``majority-sr`` splits by SR);
- within the winning group: which member is returned (the product: its first). With one
  shown example most passing candidates behave alike, so this is where a rule acts most.

Rules compared, each at both levels: lowest index (today's), mean log-prob, SR (response
tokens), MBR utility (lexical, among the subset). Every candidate runs once per problem on
its prompt's examples (``bench.execution``); every n and subset as the bench evaluates them;
differences against lowest index paired per problem with the reports' bootstrap.

The decision is by a rule across the caches given (both prompt styles), not the best single
number: a rule replaces lowest index only when its worst case over the caches (the smallest
difference at the largest n) is above zero and it is nowhere below lowest index at any n;
among such rules, the best worst case. Otherwise lowest index stays (it needs no scores).

    PYTHONPATH=. .venv/bin/python benchmarks/exec_ties.py \\
        benchmarks/results/mbpp-qwen2.5-coder-0.5b benchmarks/results/mbpp-doctest-qwen2.5-coder-0.5b \\
        -o benchmarks/results/exec_ties.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bon_sr.bench.execution import ExecRuns
from bon_sr.bench.metrics import bootstrap_ci, bootstrap_indices
from bon_sr.bench.runner import evaluate_records, read_cache
from bon_sr.bench.selectors import BENCH_SELECTORS, BenchSelector, Scored, with_utility
from bon_sr.selection.consensus import UTILITY_KEY

#: rule -> (the bench selector that splits equal groups by it, the score key; None: index)
RULES = {"lowest index": ("exec", None), "mean log-prob": ("exec-logprob", "mean_logprob"),
         "SR": ("exec-sr", "sr_response"), "MBR utility": ("exec-mbr", UTILITY_KEY)}
BASE = "lowest index"


def member_by(group_rule: str, key: str) -> Any:
    """The group ``group_rule``'s selector picks, then its member with the highest ``key``
    (ties to the earliest)."""
    base = BENCH_SELECTORS[group_rule].fn

    def weights(cands: Sequence[Scored]) -> list[float]:
        w = base(cands)
        i = w.index(max(w))
        view = with_utility(cands, "lexical") if key == UTILITY_KEY else list(cands)
        view = view or list(cands)
        members = [j for j, c in enumerate(cands) if (c.behaviour, c.passed) == (cands[i].behaviour, cands[i].passed)]
        best = max(members, key=lambda j: (float(view[j].scores.get(key, float("-inf"))), -j))
        out = [0.0] * len(cands)
        out[best] = 1.0
        return out

    return weights


def register() -> dict[str, str]:
    """Column name -> rule label, the within-group columns registered for this script."""
    names = {}
    for rule, (sel, key) in RULES.items():
        names[sel] = f"{rule}: between groups"
        if key is not None:
            name = f"{sel}+member"
            BENCH_SELECTORS[name] = BenchSelector(name, member_by(sel, key), f"{rule}, between and within groups",
                                                  executes=True)
            names[name] = f"{rule}: between groups and within the group"
    return names


def ties(records: Sequence[dict], runs: ExecRuns) -> dict[str, int]:
    """Over the full candidate sets: problems where equally large passing groups tie, and
    where the winning passing group has more than one member."""
    between = within = 0
    for rec in records:
        r = runs.get(rec)
        if r.passed is None or not any(r.passed):
            continue
        sizes: dict[int, int] = {}
        for g, p in zip(r.groups, r.passed):
            if p:
                sizes[g] = sizes.get(g, 0) + 1
        top = max(sizes.values())
        between += sum(1 for s in sizes.values() if s == top) > 1
        within += top > 1
    return {"between": between, "within": within}


def study(out_dir: Path, names: dict[str, str], bootstrap: int, seed: int) -> dict[str, Any]:
    caches = [p for p in sorted((out_dir / "cache").glob("*.jsonl"))]
    if len(caches) != 1:
        raise SystemExit(f"{out_dir}/cache should hold one task cache, found {[p.name for p in caches]}")
    records = list(read_cache(caches[0]).values())
    if any(r.get("ungraded") or r["greedy"].get("correct") is None for r in records):
        raise SystemExit(f"{caches[0]} is not graded: run bon-sr bench ... --no-generate --recheck first")
    n_samples = min(len(r["candidates"]) for r in records)
    ns = [n for n in (1, 2, 4, 8, 16) if n <= n_samples]
    runs = ExecRuns()
    ev = evaluate_records(records, ns, list(names), execution=runs)
    idx = bootstrap_indices(len(records), bootstrap, seed)
    base = RULES[BASE][0]
    table: dict[str, dict[int, dict[str, Any]]] = {}
    for name in names:
        table[name] = {}
        for n in ns:
            acc = np.asarray(ev["accuracy"][name][n])
            diff = 100.0 * (acc - np.asarray(ev["accuracy"][base][n]))
            table[name][n] = {"accuracy": float(acc.mean()), "ci95": bootstrap_ci(acc, idx),
                              "points": float(diff.mean()), "points_ci95": bootstrap_ci(diff, idx),
                              "problems_differ": int(np.count_nonzero(np.abs(diff) > 1e-12))}
    return {"task": caches[0].stem, "dir": str(out_dir), "problems": len(records), "n": ns, "table": table,
            "ties": ties(records, runs), "exec": runs.summary([r["id"] for r in records])}


def decide(studies: Sequence[dict[str, Any]], names: dict[str, str]) -> tuple[str, dict[str, float]]:
    """The rule (see the module docstring) and each column's worst case at the largest n."""
    worst: dict[str, float] = {}
    eligible = []
    for name in names:
        if name == RULES[BASE][0]:
            continue
        worst[name] = min(s["table"][name][s["n"][-1]]["points"] for s in studies)
        nowhere_below = all(s["table"][name][n]["points"] >= 0 for s in studies for n in s["n"])
        if worst[name] > 0 and nowhere_below:
            eligible.append(name)
    chosen = max(eligible, key=lambda k: (worst[k], -list(names).index(k))) if eligible else RULES[BASE][0]
    return chosen, worst


def markdown(studies: Sequence[dict[str, Any]], names: dict[str, str], chosen: str, worst: dict[str, float]) -> str:
    lines = ["# The pass-first vote's tie rule, measured (issue 32)", "",
             "Generated by `benchmarks/exec_ties.py` from the graded caches below (no model). Accuracy % with 95% "
             "bootstrap CI; difference against lowest index (today's rule) in points, paired per problem. "
             "`between groups`: the rule splits equally large passing groups only (the product's mechanism: "
             "`majority-sr` with the score as its key), the winning group's first member is returned; "
             "`... and within the group`: the group the same rule picks, then its member with the highest score.",
             ""]
    for s in studies:
        t = s["ties"]
        lines += [f"## {s['task']} ({s['problems']} problems, `{s['dir']}`)", "",
                  f"With all {s['n'][-1]} samples: problems where equally large passing groups tie: {t['between']}; "
                  f"where the winning passing group has several members: {t['within']}.", "",
                  "| rule | " + " | ".join(f"n={n}: accuracy % | n={n}: vs lowest index, points [95% CI]"
                                          for n in s["n"]) + " |",
                  "|---|" + "---|---|" * len(s["n"])]
        for name, label in names.items():
            cells = []
            for n in s["n"]:
                e = s["table"][name][n]
                lo, hi = e["ci95"]
                dl, dh = e["points_ci95"]
                cells += [f"{100 * e['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]",
                          "-" if name == RULES[BASE][0] else f"{e['points']:+.1f} [{dl:+.1f}, {dh:+.1f}]"]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Decision", "",
              "Rule: a tie rule replaces lowest index only when its worst case over the caches above (the smallest "
              "difference at the largest n) is above zero and it is nowhere below lowest index at any n; among "
              "those, the best worst case. Otherwise lowest index stays: it needs no scores (a caller's own "
              "candidates have none) and is deterministic.", "",
              "| rule | worst case at the largest n (points) |", "|---|---|"]
    lines += [f"| {names[k]} | {v:+.2f} |" for k, v in sorted(worst.items(), key=lambda kv: -kv[1])]
    lines += ["", f"**Chosen: {names[chosen]}.**", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="bench result directories with a graded cache each")
    ap.add_argument("-o", "--output", type=Path, required=True, help="the Markdown report (a .json beside it)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    names = register()
    studies = [study(d, names, args.bootstrap, args.seed) for d in args.dirs]
    chosen, worst = decide(studies, names)
    args.output.write_text(markdown(studies, names, chosen, worst))
    args.output.with_suffix(".json").write_text(json.dumps({"studies": studies, "chosen": chosen,
                                                            "worst_case_points": worst}, indent=2) + "\n")
    print(markdown(studies, names, chosen, worst))


if __name__ == "__main__":
    main()
