"""SR-GRPO: GRPO training with the frozen base model's stable rank as the reward.

``import bon_sr.train`` imports neither TRL nor peft: the reward and the config need only
torch, and the trainer pieces import TRL/peft when first used (a missing one raises an
error that names ``pip install 'bon-sr[train]'``).

- :class:`StableRankReward`: a TRL ``reward_funcs`` callable (SR with LoRA disabled).
- :class:`TrainConfig`, :func:`get_preset`, ``PRESETS``: ``paper`` and ``cpu-smoke``.
- :func:`train`, :func:`build_trainer`, :func:`load_prompts`: the entry points that
  ``bon-sr train`` wraps.
"""

from __future__ import annotations

from typing import Any

from .config import PRESETS, TrainConfig, get_preset
from .reward import StableRankReward, repeated_ngram_fraction

_LAZY = {
    "PromptSet": "trainer",
    "TrainResult": "trainer",
    "build_trainer": "trainer",
    "load_prompts": "trainer",
    "sr_grpo_trainer_class": "trainer",
    "train": "trainer",
    "train_extras_available": "trainer",
}

__all__ = [
    "PRESETS",
    "PromptSet",
    "StableRankReward",
    "TrainConfig",
    "TrainResult",
    "build_trainer",
    "get_preset",
    "load_prompts",
    "repeated_ngram_fraction",
    "sr_grpo_trainer_class",
    "train",
    "train_extras_available",
]


def __getattr__(name: str) -> Any:
    # trainer.py imports transformers' Trainer machinery; keep it off the import path of
    # code that only wants the reward or a preset.
    if name in _LAZY:
        from . import trainer  # a plain import, so that the import-layer check sees it

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
