"""Sampling: prompts -> token ids -> N candidate responses.

    prompts.py        prompt files and chat formatting: the token ids the model sees
    __init__.py       SamplingConfig (temperature, top-p, max tokens, stop, seed) and its checks
    hf.py, vllm.py    the transformers and vLLM samplers; fake.py a callable for tests
    vllm_platform.py  importing vLLM, CPU vs GPU, the CPU environment defaults
    vllm_plugin.py    vLLM plugin: top-p without sorting the whole vocabulary (CPU)

Samplers know nothing about scoring or selection: they return token ids and text. The hook
(``bon_sr.hook``) samples and scores in one vLLM pass; the engines are ``bon_sr.engines``'.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import OptionError


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling options shared by every backend (the paper: temperature 0.7, top-p 0.9)."""

    n: int = 8
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256
    stop: tuple[str, ...] = field(default_factory=tuple)
    greedy: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise OptionError("n", f"{{@n}} must be an integer >= 1, got {self.n!r}")
        if self.greedy and self.n != 1:
            raise OptionError("greedy", "greedy decoding gives n identical candidates; use {@n:1} with {@greedy:True}")
        if self.temperature <= 0 and not self.greedy:
            raise OptionError("temperature", f"{{@temperature}} must be > 0 (got {self.temperature}); for greedy "
                              "decoding use {@greedy:True}")
        if not 0 < self.top_p <= 1:
            raise OptionError("top_p", f"{{@top_p}} must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise OptionError("max_new_tokens", f"{{@max_new_tokens}} must be >= 1, got {self.max_new_tokens}")
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        if any(not s for s in self.stop):
            raise OptionError("stop", "{@stop} strings must be non-empty")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["stop"] = list(self.stop)
        return out


def truncate_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """Cut ``text`` before the earliest stop string (vLLM's convention: stop string excluded)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
