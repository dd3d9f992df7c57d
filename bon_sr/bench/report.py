"""Benchmark reports: bootstrap statistics, then JSON, Markdown and a PNG plot.

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

from .selectors import GREEDY, RANDOM

POINTS_NOTE = ("points = absolute difference in percentage points; relative % = 100 x (acc - base) / base; "
               "95% CI = percentile bootstrap over problems (paired for differences)")


def bootstrap_indices(num: int, resamples: int, seed: int = 0) -> np.ndarray:
    """(resamples, num) indices drawn with replacement; shared so that differences are paired."""
    return np.random.default_rng(seed).integers(0, num, size=(resamples, num))


def bootstrap_ci(values: Sequence[float], idx: np.ndarray) -> tuple[float, float]:
    """Percentile 95% interval of the mean of ``values`` over the resamples ``idx``."""
    arr = np.asarray(values, dtype=float)
    means = arr[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


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
    for n in summary["results"]:
        lines += [f"## n = {n}", "",
                  "| selector | accuracy % [95% CI] | vs greedy: points [95% CI] | vs greedy: relative % "
                  "| vs random@n: points [95% CI] | vs random@n: relative % | mean length (tokens) "
                  "| cut at max tokens % |",
                  "|---|---|---|---|---|---|---|---|"]
        for sel in _order(summary, n):
            e = summary["results"][n][sel]
            g, r = e.get("vs_greedy"), e.get("vs_random")
            cells = [sel, f"{_pct(100 * e['accuracy'])} {_ci(e['ci95'])}",
                     f"{_pct(g['points'], True)} {_ci(g['points_ci95'], 1.0, True)}" if g else "-",
                     _pct(g["relative_pct"], True) if g else "-",
                     f"{_pct(r['points'], True)} {_ci(r['points_ci95'], 1.0, True)}" if r else "-",
                     _pct(r["relative_pct"], True) if r else "-",
                     f"{e['mean_length']:.0f}",
                     _pct(100 * e["truncated"]) if "truncated" in e else "n/a"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


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
        style = "--" if sel in (GREEDY, RANDOM, "oracle") else "-"
        ax.plot(ns, acc, style, marker="o", label=sel)
        ax.fill_between(ns, lo, hi, alpha=0.08)
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
