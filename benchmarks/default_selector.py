"""The default-selector rule (issue 32, item 6), computed from the committed bench reports.

For every committed task report (``benchmarks/results/*/<task>.json``, as ``bon-sr bench``
writes it: math, QA and code), each selector's accuracy minus random@n at n = 8 (the largest
n every report has; a report without n = 8 uses its largest n, and the table says so), then
each selector's worst case over the reports. The rule names the selector with the best worst
case among the product's selectors that every report measures (bench-only columns, greedy,
the oracle and random itself, the zero of every cell, are shown for reference, not chosen).

Two readings of the code reports, both printed:
- as reported: every column as the bench computed it (for code, the answer-voting columns
  ``majority``, ``majority-sr-tiebreak``, ``sr-weighted-vote`` and ``auto`` vote over the
  code text, the code checker's answer);
- ``--answer python``: how a user runs the answer-voting selectors on code, with the
  ``python`` answer format: ``majority`` and ``auto`` make the pass-first vote (the report's
  ``exec`` column), ``majority-sr`` the same with SR splitting ties (``exec-sr``).
  ``sr-weighted-vote`` takes no pass results (it would weigh behaviour groups by SR): no
  report measures that, so its code cells stay as reported.

    PYTHONPATH=. .venv/bin/python benchmarks/default_selector.py [-o benchmarks/results/default_selector.md]

It changes no default: it says which selector the rule picks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Mapping

from bon_sr.selection.selectors import get_selector

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
N = 8
#: bench column -> the product selector it measures (None: bench-only)
PRODUCT = {
    "auto": "auto", "majority": "majority", "majority-sr-tiebreak": "majority-sr",
    "sr-weighted-vote": "sr-weighted-vote", "mbr-lexical": "mbr", "mean-logprob": "mean-logprob",
    "self-certainty": "self-certainty", "shortest": "shortest", "sr-response": "stable-rank",
    "sr-full": "stable-rank --token-set full", "random": "random",
    "mbr-hidden-last": "mbr --utility hidden-last", "mbr-hidden-last-centred": "mbr --utility hidden-last-centred",
    "mbr-hidden-mean": "mbr --utility hidden-mean", "mbr-hidden-mean-centred": "mbr --utility hidden-mean-centred",
}
#: shown, never chosen: greedy and the oracle, and random (the zero every cell is measured from)
REFERENCE = ("greedy", "oracle", "random")
#: on code, with --answer python: the answer-voting columns become these exec columns
PYTHON_ANSWERS = {"majority": "exec", "auto": "exec", "majority-sr-tiebreak": "exec-sr"}
KIND = {"gsm8k": "math", "math500": "math", "squad": "QA", "mbpp": "code", "mbpp-doctest": "code"}


def reports(results: Path = RESULTS) -> list[dict[str, Any]]:
    """Every committed task report, in a fixed order (kind, task, model)."""
    out = []
    for path in sorted(results.glob("*/*.json")):
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not {"task", "n", "results", "selectors"} <= set(data):
            continue
        n = N if N in data["n"] else max(data["n"])
        model = str(data.get("config", {}).get("model", path.parent.name))
        out.append({"path": str(path.relative_to(results.parent.parent)), "task": data["task"], "model": model,
                    "kind": KIND.get(data["task"], "?"), "n": n, "problems": data["problems"],
                    "row": data["results"][str(n)]})
    return sorted(out, key=lambda r: (["math", "QA", "code", "?"].index(r["kind"]), r["task"], r["model"]))


def diffs(rep: Mapping[str, Any], python_answers: bool) -> dict[str, tuple[float, list[float] | None]]:
    """Column -> (accuracy - random@n in points, its paired 95% CI) for one report."""
    row = rep["row"]
    rand = row["random"]["accuracy"]
    out = {}
    for col in row:
        src = PYTHON_ANSWERS.get(col, col) if python_answers and rep["kind"] == "code" else col
        if src not in row:
            continue
        e = row[src]
        if col == "random":
            out[col] = (0.0, [0.0, 0.0])
        else:
            vs = e.get("vs_random")
            out[col] = (100.0 * (e["accuracy"] - rand), vs["points_ci95"] if vs else None)
    return out


def table(reps: list[dict[str, Any]], python_answers: bool) -> dict[str, Any]:
    per = [diffs(r, python_answers) for r in reps]
    cols = sorted({c for d in per for c in d})
    rows = {}
    for col in cols:
        vals = [d.get(col) for d in per]
        present = [v[0] for v in vals if v is not None]
        worst = min(present)
        rows[col] = {"values": vals, "worst": worst, "in_every_report": len(present) == len(per),
                     "worst_task": reps[[v[0] if v else float("inf") for v in vals].index(worst)]["task"]
                     + " " + reps[[v[0] if v else float("inf") for v in vals].index(worst)]["model"],
                     "product": PRODUCT.get(col), "reference": col in REFERENCE}
    eligible = [c for c, r in rows.items() if r["in_every_report"] and r["product"] and not r["reference"]]
    # an exact tie on the worst case goes to the better second-worst case, and so on (leximin)
    # and a full tie to the selector that needs no answer format (it works on every prompt)
    ranked = sorted(eligible, key=lambda c: ([-v[0] for v in sorted(rows[c]["values"], key=lambda v: v[0])],
                                             get_selector(rows[c]["product"].split()[0]).needs_answers, c))
    tied = [c for c in ranked if [v[0] for v in rows[c]["values"]] == [v[0] for v in rows[ranked[0]]["values"]]]
    return {"rows": rows, "winner": ranked[0], "tied": tied, "ranked": ranked}


def markdown(reps: list[dict[str, Any]], tables: Mapping[str, dict[str, Any]]) -> str:
    ns = sorted({r["n"] for r in reps})
    lines = ["# The default selector by the rule: the best worst case against random@n (issue 32, item 6)", "",
             "Generated by `benchmarks/default_selector.py` from the committed bench reports (no model, no "
             "sampling): `PYTHONPATH=. .venv/bin/python benchmarks/default_selector.py`. Each cell: accuracy minus "
             f"random@n in percentage points at n = {', '.join(map(str, ns))} "
             + ("(every report has n = 8)" if ns == [N] else "(n = 8 where a report has it, else its largest n)")
             + ", with the report's paired 95% bootstrap CI; `worst` = the smallest cell over the reports. The rule "
             "names the product selector (one every report measures) with the largest worst case; bench-only "
             "columns, greedy and the oracle are for reference. On code, `sr-weighted-vote` with `--answer python` "
             "(SR-weighted behaviour groups, no pass-first) is not measured: its code cells are the reported ones "
             "in both tables. Reports:", ""]
    lines += [f"- {r['kind']}: {r['task']}, {r['model']}, {r['problems']} problems, n = {r['n']} (`{r['path']}`)"
              for r in reps]
    heads = [f"{r['task']} {r['model'].replace('qwen2.5-coder-', '').replace('-instruct', '')}" for r in reps]
    for title, tab in tables.items():
        rows = tab["rows"]
        lines += ["", f"## {title}", "", "| selector (product name) | " + " | ".join(heads) + " | worst (where) |",
                  "|---|" + "---|" * (len(heads) + 1)]
        for col in sorted(rows, key=lambda c: (rows[c]["reference"], not rows[c]["in_every_report"],
                                               -rows[c]["worst"], c)):
            r = rows[col]
            name = col + (f" ({r['product']})" if r["product"] and r["product"] != col else "")
            name += "" if r["product"] or r["reference"] else " [bench-only]"
            name += " [reference]" if r["reference"] else ""
            name += "" if r["in_every_report"] else " [not in every report]"
            cells = ["-" if v is None else f"{v[0]:+.1f}" + (f" [{v[1][0]:+.1f}, {v[1][1]:+.1f}]" if v[1] else "")
                     for v in r["values"]]
            best = col == tab["winner"]
            worst = f"{r['worst']:+.1f} ({r['worst_task']})"
            lines.append(f"| {'**' + name + '**' if best else name} | " + " | ".join(cells)
                         + f" | {'**' + worst + '**' if best else worst} |")
        w = rows[tab["winner"]]
        same = [c for c in tab["tied"] if c != tab["winner"]]
        lines += ["", f"Best worst case among the product's selectors: **{w['product']}** (column `{tab['winner']}`): "
                      f"{w['worst']:+.1f} points against random@n, on {w['worst_task']}"
                  + (f"; `{'`, `'.join(same)}` equal it on every report" if same else "") + ". An exact tie on the "
                  "worst case goes to the better second-worst case, and so on; a full tie to the selector that needs no "
                  "answer format. Order by that rule: "
                  + ", ".join(f"{rows[c]['product']} ({rows[c]['worst']:+.1f})" for c in tab["ranked"]) + "."]
    return "\n".join(lines) + "\n"


def verdict(tables: Mapping[str, dict[str, Any]]) -> str:
    """The default this rule gives: the product's ``auto`` is ``mbr`` when no answer format is
    given, and the answer-format vote (``exec`` on code) when one is: the two readings above
    are its two uses, so the default is the selector that leads both (if one does)."""
    reported, python = tables.values()
    without = reported["rows"]["mbr-lexical"]["worst"]
    lines = ["", "## The default", "",
             f"`auto` is `mbr` when no answer format is given (worst case {without:+.1f}, the `mbr` row of the first "
             f"table) and the vote over the answer format when one is (worst case "
             f"{python['rows']['auto']['worst']:+.1f}, second table, code with `--answer python`). First table's "
             f"winner: {reported['rows'][reported['winner']]['product']} "
             f"({reported['rows'][reported['winner']]['worst']:+.1f}); second table's: "
             f"{python['rows'][python['winner']]['product']} ({python['rows'][python['winner']]['worst']:+.1f}). "
             "In the first table `auto`'s code cells vote over the code text, which the product does only when "
             "asked to (`--answer exact`); `stable-rank` is last in both "
             f"({reported['rows']['sr-response']['worst']:+.1f})."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output", type=Path, default=RESULTS / "default_selector.md")
    args = ap.parse_args()
    reps = reports()
    tables = {"As reported (code: answer-voting columns vote over the code text)": table(reps, False),
              "Code with --answer python (majority, auto: the exec column; majority-sr: exec-sr)": table(reps, True)}
    text = markdown(reps, tables) + verdict(tables)
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
