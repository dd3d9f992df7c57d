"""The paper's two protocols around the runner, and the comparison with its own figures.

- ``paper_summary``: after ``run_bench`` has run each task of ``PAPER_PRESET``, the per-task
  and mean results at every n, the gain over greedy in absolute points and relative
  percent, and beside them what the paper reports for that model (``paper_figures``).
- ``rewardbench_summary``: a finished ``run_rank_eval`` cache scored the RewardBench way
  (``bench.rewardbench``), next to the paper's RewardBench figures for that model.

This module samples nothing and loads no model: it reads run summaries and caches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from . import hub, rewardbench
from .paper_figures import ABSTRACT_CLAIM, PAPER_PRESET, SOURCE, figures_for
from .report import relative_pct

#: selectors a paper report shows, when they were evaluated (the paper has the first three)
PAPER_SELECTORS = ("greedy", "random", "sr-response", "sr-full", "majority", "self-certainty", "oracle")


def _gain(value: float, base: float) -> dict[str, float | None]:
    return {"points": 100.0 * (value - base), "relative_pct": relative_pct(value, base)}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def revisions(tasks: Sequence[str], data_source: str) -> dict[str, dict[str, Any]]:
    """What each task was read from: hub repo, pinned revision, whether it was verified and,
    from the hub, the commit it resolves to now."""
    out: dict[str, dict[str, Any]] = {}
    for task in tasks:
        if task not in hub.HUB_SPECS or data_source == "package":
            out[task] = {"source": data_source}
            continue
        spec = hub.HUB_SPECS[task]
        out[task] = {"source": data_source, "repo": spec.repo, "configs": len(spec.configs), "split": spec.split,
                     "revision": spec.revision, "verified": spec.verified,
                     "resolved": hub.resolved_revision(spec) if data_source == "hub" else None}
    return out


def paper_summary(summaries: Mapping[str, Mapping[str, Any]], *, model: str,
                  settings: Mapping[str, Any], data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Per-task and mean accuracy of the paper's selectors at every n, gains over greedy at
    the largest n, and the paper's own figures for ``model``.

    summaries: task -> ``run_bench`` summary (all with the same n values).
    Mean = unweighted mean over tasks (the paper averages its tasks). Its relative gain
    is given two ways because the paper does not say which it means: the relative gain of
    the mean accuracy, and the mean of the per-task relative gains.
    """
    tasks = list(summaries)
    ns = sorted(set.intersection(*(set(s["results"]) for s in summaries.values())), key=int)
    selectors = [s for s in PAPER_SELECTORS if all(s in summaries[t]["selectors"] for t in tasks)]
    per_task: dict[str, Any] = {}
    for task, s in summaries.items():
        acc = {sel: {n: s["results"][n][sel]["accuracy"] for n in ns} for sel in selectors}
        per_task[task] = {"problems": s["problems"], "n_samples": s["n_samples"], "accuracy": acc,
                          "max_new_tokens": s.get("config", {}).get("max_new_tokens")}
    mean = {sel: {n: _mean([per_task[t]["accuracy"][sel][n] for t in tasks]) for n in ns} for sel in selectors}
    top = ns[-1]
    gains: dict[str, Any] = {}
    if "greedy" in selectors:
        for sel in selectors:
            if sel == "greedy":
                continue
            task_gains = {t: _gain(per_task[t]["accuracy"][sel][top], per_task[t]["accuracy"]["greedy"][top])
                          for t in tasks}
            rel = [g["relative_pct"] for g in task_gains.values()]
            of_mean = _gain(mean[sel][top], mean["greedy"][top])
            gains[sel] = {"per_task": task_gains, "mean_points": of_mean["points"],
                          "relative_pct_of_mean": of_mean["relative_pct"],
                          "mean_of_relative_pct": None if None in rel else _mean(rel)}
    return {"model": model, "n": [int(n) for n in ns], "n_max": int(top), "tasks": per_task, "mean": mean,
            "selectors": selectors, "gains_at_n_max": gains, "settings": dict(settings), "data": dict(data or {}),
            "paper": paper_comparison(model, per_task, gains, int(top)),
            "note": "accuracy: fraction; points: absolute difference in percentage points; relative %: "
                    "100 x (acc - greedy) / greedy; mean: unweighted over tasks"}


def paper_comparison(model: str, per_task: Mapping[str, Any], gains: Mapping[str, Any], n_max: int) -> dict[str, Any]:
    """Rows (what, paper, ours) for what the paper states about ``model``; ours are at n_max."""
    found = figures_for(model)
    out: dict[str, Any] = {"source": SOURCE, "abstract": ABSTRACT_CLAIM, "rows": []}
    if found is None:
        out["model"] = None
        return out
    paper_id, fig = found
    out["model"] = paper_id
    rows = out["rows"]
    sr = gains.get("sr-response")
    if "bon_mean_gain_at_16" in fig and sr is not None:
        rows.append({"what": f"stable rank vs greedy, mean over tasks, relative % (ours at N={n_max}: mean of "
                             "per-task relative %; relative % of the mean accuracy in brackets)",
                     "unit": "relative %", "paper": fig["bon_mean_gain_at_16"]["relative_pct"],
                     "ours": sr["mean_of_relative_pct"], "ours_alt": sr["relative_pct_of_mean"]})
    for task, pair in fig.get("bon_at_16", {}).items():
        if task not in per_task:
            continue
        acc = per_task[task]["accuracy"]
        mine = {k: 100.0 * acc[sel][str(n_max)] for k, sel in (("greedy", "greedy"), ("sr", "sr-response"))
                if sel in acc}
        paper_gain = _gain(pair["sr"] / 100.0, pair["greedy"] / 100.0)
        mine_gain = _gain(mine["sr"] / 100.0, mine["greedy"] / 100.0) if len(mine) == 2 else {}
        rows.append({"what": f"{task}: greedy accuracy %", "unit": "%", "paper": pair["greedy"],
                     "ours": mine.get("greedy")})
        rows.append({"what": f"{task}: stable rank at N=16 accuracy % (ours at N={n_max})", "unit": "%",
                     "paper": pair["sr"], "ours": mine.get("sr")})
        rows.append({"what": f"{task}: gain, points", "unit": "points", "paper": paper_gain["points"],
                     "ours": mine_gain.get("points")})
        rows.append({"what": f"{task}: gain, relative %", "unit": "relative %", "paper": paper_gain["relative_pct"],
                     "ours": mine_gain.get("relative_pct")})
    base = fig.get("base_accuracy", {})
    for task in per_task:
        if task in base and "greedy" in per_task[task]["accuracy"]:
            rows.append({"what": f"{task}: base model accuracy % (paper: SR-GRPO table's base row; ours: greedy)",
                         "unit": "%", "paper": base[task],
                         "ours": 100.0 * per_task[task]["accuracy"]["greedy"][str(n_max)]})
    if "rewardbench" in fig:
        out["rewardbench"] = fig["rewardbench"]
    return out


# -- RewardBench ----------------------------------------------------------------------------

def rewardbench_summary(records: Sequence[Mapping[str, Any]], scorers: Mapping[str, str], *,
                        model: str, source: str) -> dict[str, Any]:
    """RewardBench scores of every scorer from rank-eval records (``category`` = subset;
    ``chosen``/``rejected`` = score dicts), beside the paper's figures for ``model``.

    scorers: report name -> score key (``runner.RANK_SCORERS``).
    """
    subsets = [str(r["category"]) for r in records]
    results = {}
    for name, key in scorers.items():
        wins = [rewardbench.strict_win(r["chosen"].get(key), r["rejected"].get(key)) for r in records]
        results[name] = rewardbench.score(wins, subsets)
    found = figures_for(model)
    paper = None
    if found is not None and "rewardbench" in found[1]:
        paper = {"model": found[0], **found[1]["rewardbench"]}
    return {"model": model, "source": source, "pairs": len(records), "scorers": list(scorers), "results": results,
            "complete": len(records) == rewardbench.FILTERED_PAIRS and not any(
                r["unknown_subsets"] for r in results.values()),
            "paper": paper, "paper_source": SOURCE,
            "note": "RewardBench rules: a pair is won only if chosen > rejected (ties and missing scores lose); "
                    "sections weight subsets by EXAMPLE_COUNTS (math-prm upweighted to equal code); overall = "
                    "mean of the four sections (the filtered split has no Prior Sets); accuracy = share of all "
                    "pairs won. The paper does not say whether its RewardBench figure is the overall or the "
                    "plain accuracy: both are shown."}


def read_rank_records(out_dir: str | Path, ids: Sequence[str]) -> list[dict[str, Any]]:
    """The rank-eval cache records of ``ids``, in that order."""
    from .runner import cache_paths, read_cache

    cached = read_cache(cache_paths(Path(out_dir), "rank_eval")[0])
    return [cached[i] for i in ids]

