"""Server-wide settings: the model, the defaults each request may override, and the limits.

Every default is checked when the settings are built (before a model loads), with the same
functions ``BestOfN`` uses, so ``bon-sr serve --selector majority`` without ``--answer``
fails at once with the message ``bon-sr generate`` would give.

This module knows nothing about HTTP or engines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import ConfigError
from ..models import DEFAULT_MODEL
from ..options import resolve
from ..sampling import SamplingConfig
from ..scoring.hidden_states import HiddenStateConfig
from ..selection.consensus import DEFAULT_UTILITY
from ..selection.selectors import DEFAULT_SELECTOR

#: The server scores inside vLLM's sampling pass (one AsyncLLM engine).
SCORER = "hook"


@dataclass(frozen=True)
class ServeSettings:
    """model: alias, local directory or HF id; served_model_name: the name clients send as
    ``model`` (default: ``model`` as given). sampling (n, temperature, top_p,
    max_new_tokens), scoring (token_set), selector, answer, answer_regex, utility: the defaults of a
    request that does not set them; ``sampling.seed`` is the run seed a request's seed
    derives from when it gives none. These are the ``SamplingConfig`` and
    ``HiddenStateConfig`` that ``BestOfN`` and ``bon-sr generate`` use, with their defaults
    and checks. max_n: the largest ``bon_sr.n`` a request may ask for. max_body_bytes:
    larger bodies get a 413.
    body_timeout: seconds a client may take to send its whole body (then 408).
    vllm_options: ``bon_sr.engines.OPTIONS`` (as ``--vllm-opt`` of ``generate``).
    tensor_parallel_size, data_parallel_size: vLLM's, for the one engine (data parallel:
    that many engine cores on this node; each scored request runs on one of them)."""

    model: str = DEFAULT_MODEL
    served_model_name: str | None = None
    api_key: str | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    scoring: HiddenStateConfig = field(default_factory=HiddenStateConfig)
    max_n: int = 64
    selector: str = DEFAULT_SELECTOR
    answer: str | None = None
    answer_regex: str | None = None
    utility: str = DEFAULT_UTILITY
    max_body_bytes: int = 1 << 20
    body_timeout: float = 30.0
    dtype: str = "auto"
    vllm_options: Mapping[str, Any] = field(default_factory=dict)
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    #: bytes of hook rows scored requests may hold at once (None: sized from the model;
    #: see bon_sr.hook.aio.RowBudget); hook_queue: requests waiting for it before a 503
    hook_memory: int | None = None
    hook_queue: int = 256
    #: run model-written code (``answer: python``) in bon_sr.sandbox; off by default
    allow_code_execution: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_n, int) or self.max_n < 1:
            raise ConfigError(f"--max-n must be an integer >= 1, got {self.max_n!r}")
        if self.sampling.n > self.max_n:
            raise ConfigError(f"--n {self.sampling.n} is above --max-n {self.max_n}; raise --max-n or lower --n.")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"--max-body-bytes must be at least 1024, got {self.max_body_bytes}")
        if not self.body_timeout > 0:
            raise ConfigError(f"--body-timeout must be > 0 seconds, got {self.body_timeout}")
        # the defaults a request starts from: checked as one run plan, as the CLI checks its own
        resolve(selector=self.selector, answer=self.answer, answer_regex=self.answer_regex, utility=self.utility,
                backend="vllm", scorer=SCORER, sampling=self.sampling, scoring=self.scoring)
        self.engine_options()  # sizes >= 1, not given twice
        # the environment the hook reads, checked once here rather than on every request
        # (a bad BON_SR_HOOK_LAST_ROW was a 400 on each scored request) or at engine start
        from ..engines import check_v1_runner
        from ..hook.protocol import extend_by_default

        extend_by_default()
        check_v1_runner()

    def engine_options(self) -> dict[str, Any]:
        """``vllm_options`` with the parallel sizes in the engine's arguments."""
        from ..engines import parallel_vllm_options

        return parallel_vllm_options(self.vllm_options, tensor_parallel_size=self.tensor_parallel_size,
                                     data_parallel_size=self.data_parallel_size)

    @property
    def name(self) -> str:
        return self.served_model_name or self.model
