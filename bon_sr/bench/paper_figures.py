"""The paper's own numbers, kept beside ours so a report can show both, and the paper preset.

Source: Tang & Yang, "SR-GRPO: Stable Rank as an Intrinsic Geometric Reward for Large
Language Model Alignment", arXiv 2512.02807 (Dec 2025), as quoted in ../shared/PAPER.md
(which notes where the paper contradicts itself). Only figures the text states are here; a
figure we would have to read off a plot is not. Accuracies are percentages as printed;
"relative_pct" is a relative gain in percent, "points" an absolute difference.

This module knows nothing about how our numbers are measured.
"""

from __future__ import annotations

from typing import Any

SOURCE = "Tang & Yang, arXiv 2512.02807 (Dec 2025)"

#: the paper's Best-of-N protocol. It states N, temperature and top-p; it states no
#: generation budget for Best-of-N, so we use 4096 new tokens, its SR-GRPO maximum
#: completion length (a shorter budget cuts long answers, and SR prefers long ones).
PAPER_PRESET: dict[str, Any] = {
    "tasks": ("math500", "gpqa-diamond", "mmlu-redux", "olympiadbench", "amc23"),
    "n": (1, 4, 8, 16),
    "temperature": 0.7,
    "top_p": 0.9,
    "max_new_tokens": 4096,
    "max_new_tokens_note": "not stated for Best-of-N; 4096 = the paper's SR-GRPO max completion length",
    "data_source": "hub",
}

#: model (lower-case hub id) -> what the paper reports for it
PAPER_FIGURES: dict[str, dict[str, Any]] = {
    "qwen/qwen2.5-1.5b-instruct": {
        "bon_mean_gain_at_16": {"relative_pct": 17.0, "vs": "greedy",
                                "note": "stable rank at N=16 over greedy, relative %, averaged over its tasks"},
        "rewardbench": {"sr": 75.95, "note": "best prompt baseline 65.85, pointwise judge 37.15"},
        # Its SR-GRPO table's BASE row: the same model without training, under that table's
        # decoding (not restated there), so a reference for our greedy, not a Best-of-N row.
        "base_accuracy": {"gpqa-diamond": 19.0, "math500": 48.0, "olympiadbench": 25.5, "amc23": 35.0,
                          "note": "SR-GRPO table, base model row (AIME25 3.3 too; not a preset task)"},
    },
    "deepseek-ai/deepseek-r1-distill-qwen-1.5b": {
        "bon_mean_gain_at_16": {"relative_pct": 10.2, "vs": "greedy",
                                "note": "stable rank at N=16 over greedy, relative %, averaged over its tasks"},
        "bon_at_16": {"math500": {"greedy": 82.8, "sr": 86.8}, "olympiadbench": {"greedy": 43.6, "sr": 59.7}},
    },
    "meta-llama/llama-3.2-1b-instruct": {
        "bon_mean_gain_at_16": {"relative_pct": 20.5, "vs": "greedy",
                                "note": "stable rank at N=16 over greedy, relative %, averaged over its tasks"},
    },
    "microsoft/phi-3.5-mini-instruct": {
        "bon_mean_gain_at_16": {"relative_pct": 8.5, "vs": "greedy",
                                "note": "stable rank at N=16 over greedy, relative %, averaged over its tasks"},
    },
    "qwen/qwen3-8b": {
        "rewardbench": {"sr": 84.04, "note": "pointwise judge 83.70, pairwise judge 71.98, P(yes) 78.02"},
    },
}

#: the abstract's headline, which the text does not reproduce (the four relative gains above
#: average 14.05 %, and they are relative, not points)
ABSTRACT_CLAIM = {"bon_mean_gain_points": 11.3, "rewardbench_sr": 84.04,
                  "note": "abstract: 'an average of 11.3 percentage points over greedy'; not reproducible from "
                          "the text (PAPER.md)"}


def figures_for(model: str) -> tuple[str, dict[str, Any]] | None:
    """(paper model id, figures) for a model given as a hub id, a local directory named like
    the model, or the bare model name; None when the paper reports nothing for it.

    Matching is on the last path component, case-insensitive: ``Qwen/Qwen2.5-1.5B-Instruct``
    and ``/models/qwen2.5-1.5b-instruct`` match; ``qwen2.5-coder-1.5b-instruct`` (another
    model of the same size) does not.
    """
    name = model.rstrip("/").split("/")[-1].lower()
    for paper_id, figures in PAPER_FIGURES.items():
        if paper_id.split("/")[-1] == name:
            return paper_id, figures
    return None
