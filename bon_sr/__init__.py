"""bon-sr: Best-of-N selection by the stable rank of a frozen LLM's hidden states.

``import bon_sr`` loads torch and this package only: vLLM, TRL and peft are imported
where they are used.
"""

from __future__ import annotations

from .api import BestOfN, select_best
from .errors import BonSRError, ConfigError, InputError, MissingExtraError, ModelError
from .scoring.stable_rank import StableRankResult, stable_rank, stable_rank_exact
from .types import Candidate, Selection

__version__ = "0.1.0"

__all__ = [
    "BestOfN",
    "BonSRError",
    "Candidate",
    "ConfigError",
    "InputError",
    "MissingExtraError",
    "ModelError",
    "Selection",
    "StableRankResult",
    "__version__",
    "select_best",
    "stable_rank",
    "stable_rank_exact",
]
