"""Benchmark reports: summaries with bootstrap intervals (``metrics``), then JSON, Markdown
and a PNG plot.

Conventions, stated in every report because the paper mixes them up:
- accuracy is a fraction in JSON and a percentage in Markdown;
- "points" is the ABSOLUTE difference in percentage points (acc - base) * 100;
- "relative %" is the RELATIVE difference 100 * (acc - base) / base (undefined when the
  base is 0);
- 95% intervals are percentile bootstrap intervals over problems (or pairs), resampled
  with a fixed seed; differences use paired resamples (the same problems for both).

This module knows nothing about models, sampling or how the numbers were produced.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .metrics import bootstrap_ci, bootstrap_indices
from .selectors import GREEDY, RANDOM

MAJORITY = "majority"
#: code reports: every selector is also compared with the exec columns (paired, as with greedy)
EXEC_BASES = ("exec", "exec+greedy")

POINTS_NOTE = ("points = absolute difference in percentage points; relative % = 100 x (acc - base) / base; "
               "95% CI = percentile bootstrap over problems (paired for differences)")


def relative_pct(value: float, base: float) -> float | None:
    """100 * (value - base) / base; None when base is 0."""
    return None if base == 0 else 100.0 * (value - base) / base


def _compare(values: np.ndarray, base: np.ndarray, idx: np.ndarray) -> dict[str, Any]:
    diff = 100.0 * (values - base)
    lo, hi = bootstrap_ci(diff, idx)
    return {"points": float(diff.mean()), "points_ci95": [lo, hi],
            "relative_pct": relative_pct(float(values.mean()), float(base.mean()))}


def summarize(evaluation: Mapping[str, Any], *, bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Per n and selector: accuracy with CI, mean selected length, the share of selected
    responses cut by the token limit, and the comparisons with greedy and with random@n
    (when those selectors were evaluated)."""
    num = len(evaluation["ids"])
    idx = bootstrap_indices(num, bootstrap, seed)
    acc, length = evaluation["accuracy"], evaluation["length"]
    results: dict[str, dict[str, Any]] = {}
    for n in evaluation["n"]:
        row: dict[str, Any] = {}
        greedy = np.asarray(acc[GREEDY][n]) if GREEDY in acc else None
        rand = np.asarray(acc[RANDOM][n]) if RANDOM in acc else None
        vote = np.asarray(acc[MAJORITY][n]) if MAJORITY in acc else None
        execs = {e: np.asarray(acc[e][n]) for e in EXEC_BASES if e in acc}
        for sel in acc:
            values = np.asarray(acc[sel][n], dtype=float)
            lo, hi = bootstrap_ci(values, idx)
            entry: dict[str, Any] = {"accuracy": float(values.mean()), "ci95": [lo, hi],
                                     "mean_length": float(np.mean(length[sel][n]))}
            if "truncated" in evaluation:
                entry["truncated"] = float(np.mean(evaluation["truncated"][sel][n]))
            if greedy is not None and sel != GREEDY:
                entry["vs_greedy"] = _compare(values, greedy, idx)
            if rand is not None and sel != RANDOM:
                entry["vs_random"] = _compare(values, rand, idx)
            if vote is not None and sel != MAJORITY:
                entry["vs_majority"] = _compare(values, vote, idx)
            for base, base_values in execs.items():
                if sel != base:
                    entry[f"vs_{base}"] = _compare(values, base_values, idx)
            row[sel] = entry
        results[str(n)] = row
    return {"n": list(evaluation["n"]), "selectors": list(acc), "results": results,
            "mixed_problems": evaluation.get("mixed_problems"), "bootstrap": bootstrap, "note": POINTS_NOTE}


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:+.1f}" if signed else f"{x:.1f}"


def _ci(ci: Sequence[float], scale: float = 100.0, signed: bool = False) -> str:
    fmt = "{:+.1f}" if signed else "{:.1f}"
    return "[" + fmt.format(ci[0] * scale) + ", " + fmt.format(ci[1] * scale) + "]"


def _order(summary: Mapping[str, Any], n: str) -> list[str]:
    row = summary["results"][n]
    return sorted(row, key=lambda s: (-row[s]["accuracy"], s))


def bench_markdown(summary: Mapping[str, Any]) -> str:
    cfg = summary.get("config", {})
    lines = [
        f"# Best-of-N: {summary['task']} ({cfg.get('model', '?')})",
        "",
        f"{summary['problems']} problems, {summary['n_samples']} samples per problem (temperature "
        f"{cfg.get('temperature')}, top-p {cfg.get('top_p')}, max {cfg.get('max_new_tokens')} new tokens, "
        f"backend {cfg.get('backend')}, seed {cfg.get('seed')}) plus one greedy decode. Smaller n: mean over "
        f"up to {summary['subsets']} subsets of the same samples (all subsets when there are no more). "
        f"Problems with mixed correctness among the samples: {summary.get('mixed_problems')}.",
        "",
        f"_{POINTS_NOTE}. random@n is the expected value of a random pick (mean correctness), not one draw._",
        "",
    ]
    if summary.get("missing"):
        lines += [f"**{summary['missing']} problems of the task are not in the cache yet.**", ""]
    if summary.get("consensus"):
        lines += [f"_{summary['consensus']}_", ""]
    if summary.get("exec"):
        lines += [exec_markdown(summary["exec"]), ""]
    for n in summary["results"]:
        bases = [b for b in EXEC_BASES if b in summary["results"][n]]
        lines += [f"## n = {n}", "",
                  "| selector | accuracy % [95% CI] | vs greedy: points [95% CI] | vs greedy: relative % "
                  "| vs random@n: points [95% CI] | vs random@n: relative % | vs majority: points [95% CI] "
                  + "".join(f"| vs {b}: points [95% CI] " for b in bases)
                  + "| mean length (tokens) | cut at max tokens % |",
                  "|---|---|---|---|---|---|---|" + "---|" * len(bases) + "---|---|"]
        for sel in _order(summary, n):
            e = summary["results"][n][sel]
            g, r, v = e.get("vs_greedy"), e.get("vs_random"), e.get("vs_majority")
            cells = [sel, f"{_pct(100 * e['accuracy'])} {_ci(e['ci95'])}",
                     f"{_pct(g['points'], True)} {_ci(g['points_ci95'], 1.0, True)}" if g else "-",
                     _pct(g["relative_pct"], True) if g else "-",
                     f"{_pct(r['points'], True)} {_ci(r['points_ci95'], 1.0, True)}" if r else "-",
                     _pct(r["relative_pct"], True) if r else "-",
                     f"{_pct(v['points'], True)} {_ci(v['points_ci95'], 1.0, True)}" if v else "-",
                     *[f"{_pct(x['points'], True)} {_ci(x['points_ci95'], 1.0, True)}" if (x := e.get(f"vs_{b}"))
                       else "-" for b in bases],
                     f"{e['mean_length']:.0f}",
                     _pct(100 * e["truncated"]) if "truncated" in e else "n/a"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def exec_markdown(ex: Mapping[str, Any]) -> str:
    """The exec step in one paragraph: what ran, its time per problem and its timeouts, and
    how often a candidate passes the shown examples."""
    shown = ex["with_examples"]
    if not shown:
        return f"_Exec columns: none of the {ex['problems']} prompts shows an example; exec picks the first sample._"

    def share(k: int) -> str:
        return f"{k}/{shown} ({100 * k / shown:.1f}%)"

    return (f"_Exec columns: {shown} of the {ex['problems']} prompts show examples; each problem's "
            f"{ex['programs_per_problem']} programs (the samples and the greedy decode) ran once, in one sandbox "
            f"batch, on them (the product's `python` answer format). Exec step per problem: median "
            f"{ex['wall_s_median']:.2f} s, 90th percentile {ex['wall_s_p90']:.2f} s, {ex['wall_s_total']:.0f} s in "
            f"all; timeouts apart: {ex['timeouts']} programs on {ex['problems_with_timeouts']} problems (each "
            f"counts as failing). Problems where some sample passes the shown examples: {share(ex['any_sample_passes'])}"
            f"; with the greedy decode in the pool: {share(ex['any_passes_with_greedy'])}; the greedy decode "
            f"passes: {share(ex['greedy_passes'])}._")


#: one fixed look per selector (11 lines would repeat matplotlib's 10-colour cycle):
#: baselines dashed, the SR family in reds, votes in greens, the model's own token
#: statistics in blues, the oracle light grey
PLOT_STYLES = {
    "oracle": ("#b0b0b0", "--", "^"), GREEDY: ("#000000", "--", "s"), RANDOM: ("#6e6e6e", ":", "o"),
    "shortest": ("#9467bd", "-.", "v"),
    "sr-response": ("#d62728", "-", "o"), "sr-full": ("#ff7f0e", "-", "o"),
    "majority": ("#2ca02c", "-", "D"), "majority-sr-tiebreak": ("#98df8a", "-", "D"),
    "sr-weighted-vote": ("#17becf", "-", "D"),
    "mean-logprob": ("#1f77b4", "-", "x"), "self-certainty": ("#aec7e8", "-", "x"),
    # consensus: lexical MBR and its mixes in browns, hidden-state MBR in pinks
    "mbr-lexical": ("#8c564b", "-", "P"), "mbr-ngram": ("#7f7f7f", "-", "P"), "auto": ("#bcbd22", "-", "P"),
    "majority-mbr-tiebreak": ("#c49c94", "-", "D"), "mbr-sr": ("#8c564b", "-.", "P"),
    "mbr-logprob": ("#8c564b", ":", "P"),
    # execution on the prompt's examples in purples
    "exec": ("#6a3d9a", "-", "h"), "exec+greedy": ("#6a3d9a", "--", "h"), "exec-sr": ("#cab2d6", "-", "h"),
    "exec-logprob": ("#cab2d6", "--", "h"), "exec-mbr": ("#cab2d6", ":", "h"),
    "mbr-hidden-last": ("#e377c2", "-", "*"), "mbr-hidden-last-centred": ("#e377c2", "--", "*"),
    "mbr-hidden-mean": ("#f7b6d2", "-", "*"), "mbr-hidden-mean-centred": ("#f7b6d2", "--", "*"),
}


def plot_bench(summary: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [int(n) for n in summary["results"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for sel in summary["selectors"]:
        acc = [100 * summary["results"][str(n)][sel]["accuracy"] for n in ns]
        lo = [100 * summary["results"][str(n)][sel]["ci95"][0] for n in ns]
        hi = [100 * summary["results"][str(n)][sel]["ci95"][1] for n in ns]
        color, line, marker = PLOT_STYLES.get(sel, (None, "-", "."))
        drawn = ax.plot(ns, acc, linestyle=line, marker=marker, color=color, label=sel)[0]
        ax.fill_between(ns, lo, hi, alpha=0.08, color=drawn.get_color())
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns)
    ax.set_xticklabels([str(n) for n in ns])
    ax.set_xlabel("n (candidates)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{summary['task']}: {summary['problems']} problems, {summary.get('config', {}).get('model', '')}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write(summary: Mapping[str, Any], markdown: str, plot: Any, out_dir: Path, stem: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "markdown": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    paths["json"].write_text(json.dumps(summary, indent=2, default=str) + "\n")
    paths["markdown"].write_text(markdown + "\n")
    plot(summary, paths["png"])
    return paths


def write_bench_report(summary: Mapping[str, Any], out_dir: str | Path, stem: str) -> dict[str, Path]:
    """DIR/<stem>.json, .md and .png."""
    return _write(summary, bench_markdown(summary), plot_bench, Path(out_dir), stem)


# -- rank-eval ------------------------------------------------------------------------------

def summarize_pairs(outcomes: Mapping[str, Sequence[float]], categories: Sequence[str], *,
                    bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Pairwise accuracy per scorer, overall and per category.

    outcomes: scorer -> per pair 1.0 (chosen scored higher), 0.0 (lower), 0.5 (tie or NaN).
    """
    cats = sorted(set(categories))
    groups = {"all": list(range(len(categories)))}
    if len(cats) > 1:
        groups.update({c: [i for i, x in enumerate(categories) if x == c] for c in cats})
    out: dict[str, Any] = {}
    for g, members in groups.items():
        idx = bootstrap_indices(len(members), bootstrap, seed)
        out[g] = {"pairs": len(members)}
        for scorer, values in outcomes.items():
            vals = np.asarray([values[i] for i in members], dtype=float)
            lo, hi = bootstrap_ci(vals, idx)
            out[g][scorer] = {"accuracy": float(vals.mean()), "ci95": [lo, hi]}
    return {"scorers": list(outcomes), "categories": out, "bootstrap": bootstrap,
            "note": "accuracy = share of pairs where the scorer ranks 'chosen' above 'rejected' (ties count 1/2); "
                    "95% CI = percentile bootstrap over pairs; chance = 50%"}


def rank_markdown(summary: Mapping[str, Any]) -> str:
    cfg = summary.get("config", {})
    scorers = summary["scorers"]
    lines = [f"# Pairwise accuracy as a zero-shot reward ({cfg.get('model', '?')})", "",
             f"{summary['categories']['all']['pairs']} pairs from {cfg.get('pairs', '?')}. Higher score = "
             "predicted preferred. _" + summary["note"] + "._", "",
             "| category | pairs | " + " | ".join(f"{s} % [95% CI]" for s in scorers) + " |",
             "|---|---|" + "---|" * len(scorers)]
    for cat, row in summary["categories"].items():
        cells = [cat, str(row["pairs"])] + [f"{_pct(100 * row[s]['accuracy'])} {_ci(row[s]['ci95'])}"
                                           for s in scorers]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_rank(summary: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = list(summary["categories"])
    scorers = summary["scorers"]
    width = 0.8 / max(len(scorers), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(cats) + 3), 4.5))
    for j, s in enumerate(scorers):
        xs = [i + j * width for i in range(len(cats))]
        acc = [100 * summary["categories"][c][s]["accuracy"] for c in cats]
        err = [[a - 100 * summary["categories"][c][s]["ci95"][0] for a, c in zip(acc, cats)],
               [100 * summary["categories"][c][s]["ci95"][1] - a for a, c in zip(acc, cats)]]
        ax.bar(xs, acc, width, yerr=err, capsize=2, label=s)
    ax.axhline(50, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cats))])
    ax.set_xticklabels(cats, rotation=20, fontsize=8)
    ax.set_ylabel("pairwise accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_rank_report(summary: Mapping[str, Any], out_dir: str | Path, stem: str = "rank_eval") -> dict[str, Path]:
    return _write(summary, rank_markdown(summary), plot_rank, Path(out_dir), stem)


# -- the paper's protocols: Best-of-N preset and RewardBench --------------------------------

def _num(x: float | None, signed: bool = False, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def paper_markdown(summary: Mapping[str, Any]) -> str:
    """Per-task and mean accuracy at every n, gains at the largest n, then the paper's figures."""
    ns = [str(n) for n in summary["n"]]
    sels = summary["selectors"]
    top = ns[-1]
    st = summary["settings"]
    lines = [f"# The paper's Best-of-N protocol: {summary['model']}", "",
             f"Settings: n = {', '.join(ns)}; temperature {st.get('temperature')}, top-p {st.get('top_p')}, "
             f"max {st.get('max_new_tokens')} new tokens ({st.get('max_new_tokens_note', '')}); data from "
             f"{st.get('data_source')}. Accuracy in %; _{summary['note']}._", ""]
    # The paper's method at every n; greedy (the same at every n) and the others at the largest.
    cols = [(s, n) for s in sels for n in (ns if s == "sr-response" else [top])]
    lines += ["| task | problems | " + " | ".join(f"{s}@{n}" for s, n in cols) + " |",
              "|---|---|" + "---|" * len(cols)]
    rows = [(t, str(v["problems"]), v["accuracy"]) for t, v in summary["tasks"].items()]
    rows.append(("**mean**", "", summary["mean"]))
    for task, count, acc in rows:
        lines.append(f"| {task} | {count} | " + " | ".join(_num(100 * acc[s][n]) for s, n in cols) + " |")
    gains = summary["gains_at_n_max"]
    if gains:
        lines += ["", f"## Gain over greedy at n = {top}", "",
                  "| selector | " + " | ".join(f"{t}: points / relative %" for t in summary["tasks"])
                  + " | mean: points | mean: relative % of the mean | mean of per-task relative % |",
                  "|---|" + "---|" * (len(summary["tasks"]) + 3)]
        for sel, g in gains.items():
            cells = [f"{_num(x['points'], True)} / {_num(x['relative_pct'], True)}" for x in g["per_task"].values()]
            cells += [_num(g["mean_points"], True), _num(g["relative_pct_of_mean"], True),
                      _num(g["mean_of_relative_pct"], True)]
            lines.append(f"| {sel} | " + " | ".join(cells) + " |")
    paper = summary["paper"]
    lines += ["", f"## The paper's own figures ({paper['source']})", ""]
    if paper.get("model") is None:
        lines.append(f"The paper reports no Best-of-N figures for {summary['model']}.")
    elif not paper["rows"]:
        lines.append(f"The paper reports no Best-of-N figures for {paper['model']} that this run can be set beside.")
    else:
        lines += [f"Model in the paper: {paper['model']}.", "", "| figure | unit | paper | ours |", "|---|---|---|---|"]
        for r in paper["rows"]:
            ours = _num(r["ours"], r["unit"] != "%")
            if r.get("ours_alt") is not None:
                ours += f" ({_num(r['ours_alt'], True)})"
            lines.append(f"| {r['what']} | {r['unit']} | {_num(r['paper'], r['unit'] != '%', 2)} | {ours} |")
    lines += ["", f"_The abstract's {paper['abstract']['bon_mean_gain_points']} points: {paper['abstract']['note']}._"]
    data = summary.get("data") or {}
    if data:
        lines += ["", "## Data", "", "| task | source | repo | revision | verified | resolved commit |",
                  "|---|---|---|---|---|---|"]
        for task, d in data.items():
            lines.append(f"| {task} | {d.get('source')} | {d.get('repo', '-')} | {d.get('revision', '-')} | "
                         f"{d.get('verified', '-')} | {d.get('resolved') or '-'} |")
    return "\n".join(lines) + "\n"


def rewardbench_markdown(summary: Mapping[str, Any]) -> str:
    from .rewardbench import SECTIONS

    scorers = summary["scorers"]
    res = summary["results"]
    lines = [f"# RewardBench, scored the RewardBench way ({summary['model']})", "",
             f"{summary['pairs']} pairs from {summary['source']}"
             + ("" if summary["complete"] else " (NOT the full filtered split: sections cover the subsets present)")
             + f". Scores in %. _{summary['note']}_", "",
             "| scorer | " + " | ".join(SECTIONS) + " | overall | accuracy (all pairs) |",
             "|---|" + "---|" * (len(SECTIONS) + 2)]
    for s in scorers:
        r = res[s]
        cells = [_num(100 * r["sections"][sec], digits=2) if sec in r["sections"] else "n/a" for sec in SECTIONS]
        cells += [_num(100 * r["overall"], digits=2) if r["overall"] is not None else "n/a",
                  _num(100 * r["accuracy"], digits=2)]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    paper = summary.get("paper")
    lines.append("")
    if paper:
        sr = res.get("sr-response")
        ours = {"overall": sr["overall"] if sr else None, "accuracy": sr["accuracy"] if sr else None}
        parts = [f"{k} {_num(None if v is None else 100 * v, digits=2)} "
                 f"({_num(None if v is None else 100 * v - paper['sr'], True, 2)} points vs the paper)"
                 for k, v in ours.items()]
        lines.append(f"The paper ({summary['paper_source']}) reports stable rank at **{paper['sr']:.2f}** on "
                     f"RewardBench for {paper['model']} ({paper['note']}). Ours, sr-response: {'; '.join(parts)}.")
    else:
        lines.append(f"The paper reports no RewardBench figure for {summary['model']} (it does for "
                     "Qwen/Qwen3-8B: 84.04, and Qwen/Qwen2.5-1.5B-Instruct: 75.95).")
    subsets = sorted({k for s in scorers for k in res[s]["subsets"]})
    lines += ["", "## Per subset (accuracy %)", "", "| subset | " + " | ".join(scorers) + " |",
              "|---|" + "---|" * len(scorers)]
    for sub in subsets:
        lines.append(f"| {sub} | " + " | ".join(_num(100 * res[s]["subsets"][sub], digits=2) for s in scorers) + " |")
    return "\n".join(lines) + "\n"


def write_json_markdown(summary: Mapping[str, Any], markdown: str, out_dir: str | Path, stem: str) -> dict[str, Path]:
    """DIR/<stem>.json and .md (no plot)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md"}
    paths["json"].write_text(json.dumps(summary, indent=2, default=str) + "\n")
    paths["markdown"].write_text(markdown)
    return paths
