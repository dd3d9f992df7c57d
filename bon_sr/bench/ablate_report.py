"""The ablation's report: Markdown table and plot of every cell's AUC and Best-of-N accuracy.

Reads the summary ``bench.ablate.run_ablate`` builds; knows nothing about how cells were scored.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def _fmt_ci(ci: Sequence[float | None], pct: bool = False) -> str:
    return f"[{_fmt(ci[0], pct)}, {_fmt(ci[1], pct)}]"


def ablate_markdown(summary: Mapping[str, Any]) -> str:
    scorer = summary["scoring_model"] + (" (RANDOM INIT: control, must show no signal)"
                                         if summary["random_init"] else "")
    lines = [f"# Scorer ablation: {summary['task']}", "",
             f"- samples: {summary['cache']} (generator {summary['generator']}), {summary['problems']} problems, "
             f"N = {summary['n_samples']}, {summary['mixed_problems']} with mixed correctness",
             f"- scoring model: {scorer}; token set {summary['token_set']}; "
             f"{'cached token ids' if summary['reused_token_ids'] else 'texts re-encoded with its tokenizer'}",
             f"- reference cell: {summary['reference_cell'][0]}, {summary['reference_cell'][1]}-norm, layer "
             f"{summary['reference_cell'][2]} (the paper's definition)", "",
             "## Baselines (Best-of-N at N, accuracy with 95% CI)", "", "| selector | accuracy | 95% CI |",
             "|---|---|---|"]
    for name, b in summary["baselines"].items():
        lines.append(f"| {name} | {_fmt(b['accuracy'], True)} | {_fmt_ci(b['ci95'], True)} |")
    lines += ["", "## Reference scores from the cache", "",
              "| score | AUC | 95% CI | pairwise | BoN | BoN 95% CI |", "|---|---|---|---|---|---|"]
    for name, m in summary["reference_scores"].items():
        lines.append(f"| {name} | {_fmt(m['auc'])} | {_fmt_ci(m['auc_ci95'])} | {_fmt(m['pairwise']['accuracy'], True)}"
                     f" | {_fmt(m['bon']['accuracy'], True)} | {_fmt_ci(m['bon']['ci95'], True)} |")
    lines += ["", "## Cells, best AUC first", "",
              "| variant | norm | layer | AUC | 95% CI | AUC - paper [95% CI] | pairwise | BoN | BoN 95% CI |",
              "|---|---|---|---|---|---|---|---|---|"]
    ordered = sorted(summary["cells"], key=lambda c: -(c["auc"] if c["auc"] is not None else -1))
    for c in ordered:
        vs = c.get("auc_vs_paper")
        vs_s = f"{vs['diff']:+.3f} {_fmt_ci(vs['ci95'])}" if vs else "(reference)"
        lines.append(f"| {c['variant']} | {c['norm']} | {c['layer']} | {_fmt(c['auc'])} | {_fmt_ci(c['auc_ci95'])} | "
                     f"{vs_s} | {_fmt(c['pairwise']['accuracy'], True)} | {_fmt(c['bon']['accuracy'], True)} | "
                     f"{_fmt_ci(c['bon']['ci95'], True)} |")
    lines += ["", summary["note"]]
    return "\n".join(lines)


def plot_ablate(summary: Mapping[str, Any], path: Path) -> None:
    """Heat map of AUC: rows = variants, columns = layers, one panel per norm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants, layers, norms = summary["variants"], summary["layers"], summary["norms"]
    grids = {n: np.full((len(variants), len(layers)), np.nan) for n in norms}
    for c in summary["cells"]:
        if c["norm"] in grids and c["layer"] in layers and c["auc"] is not None:
            grids[c["norm"]][variants.index(c["variant"]), layers.index(c["layer"])] = c["auc"]
    finite = [abs(v - 0.5) for g in grids.values() for v in g.ravel() if not np.isnan(v)]
    half = max([0.1, *finite])
    fig, axes = plt.subplots(1, len(norms), figsize=(max(4.0, 0.45 * len(layers) + 3) * len(norms),
                                                     0.45 * len(variants) + 2), squeeze=False)
    for k, (ax, norm) in enumerate(zip(axes[0], norms)):
        im = ax.imshow(grids[norm], cmap="RdBu_r", vmin=0.5 - half, vmax=0.5 + half, aspect="auto")
        ax.set_xticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
        # Variant names only on the first panel: long names would run into the panel before.
        ax.set_yticks(range(len(variants)), variants if k == 0 else [""] * len(variants), fontsize=8)
        ax.set_xlabel("layer")
        ax.set_title(f"{norm}-norm", fontsize=9)
        if len(layers) * len(variants) <= 300:
            for i in range(len(variants)):
                for j in range(len(layers)):
                    if not np.isnan(grids[norm][i, j]):
                        ax.text(j, i, f"{grids[norm][i, j]:.2f}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=list(axes[0]), label="within-prompt AUC (0.5 = no signal)")
    scorer = summary["scoring_model"] + (" [random init]" if summary["random_init"] else "")
    fig.suptitle(f"{summary['task']}: {Path(str(scorer)).name}, {summary['mixed_problems']} mixed prompts",
                 fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_ablate_report(summary: Mapping[str, Any], out_dir: str | Path, stem: str = "ablate") -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "markdown": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    paths["json"].write_text(json.dumps(summary, indent=2, default=str) + "\n")
    paths["markdown"].write_text(ablate_markdown(summary) + "\n")
    plot_ablate(summary, paths["png"])
    return paths
