"""The vLLM backend: a generate engine for sampling; stable rank from a hook in that
engine (``hook=True``) or from a second, pooling engine (the fallback).

The hook (``bon_sr.hook``): the generate engine starts with bon-sr's worker extension
and prefix caching on; the worker keeps each candidate's last-layer post-norm rows as
decoding computes them and returns only the stable rank (and optionally mean log-prob and
self-certainty) per candidate. One engine, so on CUDA it gets vLLM's usual memory share
(``gpu_memory_utilization`` 0.9). ``check_scorer`` says, without starting anything,
whether the hook or the pooling engine can compute a given ``HiddenStateConfig``.

The pooling fallback: vLLM's ``generate`` returns no hidden states, and one engine cannot
both generate and encode, so it uses a SECOND engine with the pooling runner (``runner="pooling"``,
``convert="embed"``, token-wise ``ALL`` pooling, activation off). It returns the last
layer's post-final-norm states (HF ``hidden_states[-1]``; 2e-6 relative in float32), one
row per token, for exactly the prompt+response ids it is given. That is the only layer
and norm it can give: ``norm="pre"`` or another ``layer`` needs the HF scorer.

Both engines start lazily, on first use: scoring caller-supplied candidates never starts
a generate engine, and sampling with the HF scorer never starts a pooling engine.

Memory. The engines (and an HF scorer, if chosen) share one device, so each engine gets
its own budget instead of vLLM's default of "most of the device" (the first engine would
take everything and the second would not start):
- CUDA: ``gpu_memory_utilization`` 0.45 for the generate engine (0.9 with the hook, when no
  pooling engine is started) and
  ``pooling_gpu_memory_utilization`` 0.2 for the pooling engine (fractions of the whole
  GPU; what is left serves an HF scorer or other work).
- CPU: KV-cache bytes per engine, ``kv_cache_memory_bytes`` (default 2 GiB) and
  ``pooling_kv_cache_memory_bytes`` (default 1 GiB); both engines live in RAM beside the
  weights (about 7-8 GiB RSS in all for a 135M model). vLLM's own
  ``VLLM_CPU_KVCACHE_SPACE`` variable, when the user sets it, overrides both.
A start-up failure (model too large, KV cache too small for ``max_model_len``) becomes a
``ModelError`` that names these options.

Who starts and stops the engines: an ``EngineFactory`` (``start(role, kwargs)``, ``stop(llm)``).
The default, ``VLLMEngineFactory``, builds a ``vllm.LLM``; a backend takes another as
``engine_factory=`` (else the module's ``default_engine_factory``), so a long-running process
can hand several backends one pool of engines (the test suite shares one engine this way).
``VLLMBackend.started`` names the roles it started through its factory; ``close()`` stops those.

CPU pitfalls handled here (vllm-cpu 0.32, see OFFLINE.md): OpenMP threads are bound to
the cores this process may use (``VLLM_CPU_OMP_THREADS_BIND``, set only when unset; the
default binding leaves cores idle), eager mode (compiled mode starts in 70-90 s and its
seeded runs did not reproduce), and chunked prefill off in the generate engine because
per-request seeds crash with it (see ``samplers.vllm``); top-p without a full-vocabulary
sort per decode step (``bon_sr.sampling.vllm_plugin``, the same tokens about 10x cheaper).

vLLM is imported only inside this module's functions; ``import bon_sr`` never imports it.
This module knows nothing about selection; the stable-rank math is ``stable_rank``'s.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Any, Mapping, Protocol, Sequence

from .errors import ConfigError, ModelError
from .sampling import SamplingConfig
from .sampling.vllm_platform import apply_cpu_env_defaults, import_vllm, is_cpu_platform
from .scoring.hidden_states import HiddenStateConfig
from .scoring.pooling import VLLMScorer
from .hook.protocol import (WORKER_EXTENSION, check_also, check_hook_config, has_hook_extension,
                           hook_missing_message)
from .hook.selfcheck import run_selfcheck
from .hook.sync import install_hook

logger = logging.getLogger(__name__)

GiB = 1 << 30
CPU_KV_CACHE_BYTES = {"generate": 2 * GiB, "pooling": 1 * GiB}
CUDA_MEMORY_UTILIZATION = {"generate": 0.45, "pooling": 0.2}
#: vLLM's own default: with the hook the generate engine is the only one.
CUDA_MEMORY_UTILIZATION_HOOK = 0.9
SCORER_KINDS = ("hook", "pooling")
#: seconds an engine may take to exit after close() asks it to
SHUTDOWN_TIMEOUT_S = 30.0

#: vllm_options understood by VLLMBackend (everything else is a ConfigError).
OPTIONS = {
    "generate_llm": "an existing vllm.LLM to sample with (no generate engine is started)",
    "max_model_len": "context length of both engines (default: the model's)",
    "enforce_eager": "eager mode (default: True on CPU, vLLM's default on CUDA)",
    "gpu_memory_utilization": "generate engine's fraction of the GPU (default 0.45; 0.9 with the hook)",
    "pooling_gpu_memory_utilization": "pooling engine's fraction of the GPU (default 0.2)",
    "kv_cache_memory_bytes": "generate engine's KV cache in bytes (CPU default 2 GiB)",
    "pooling_kv_cache_memory_bytes": "pooling engine's KV cache in bytes (CPU default 1 GiB)",
    "logprobs": "return each sampled token's log-probability (default False)",
    "engine_kwargs": "extra vllm.LLM keyword arguments for the generate engine",
    "pooling_engine_kwargs": "extra vllm.LLM keyword arguments for the pooling engine",
}


def parallel_vllm_options(vllm_options: Mapping[str, Any], *, tensor_parallel_size: int = 1,
                          pipeline_parallel_size: int = 1, data_parallel_size: int = 1) -> dict[str, Any]:
    """``vllm_options`` with vLLM's parallel sizes in ``engine_kwargs`` (and the tensor /
    pipeline sizes in ``pooling_engine_kwargs`` too: a model too big for one device is too
    big for it in the pooling engine as well). Data parallelism is for the async engine of
    ``bon-sr serve`` (vLLM's offline ``LLM`` has none; ``generate --ray`` runs replicas
    instead). A size of 1 leaves the options as they are."""
    out = dict(vllm_options)
    sizes = {"tensor_parallel_size": tensor_parallel_size, "pipeline_parallel_size": pipeline_parallel_size,
             "data_parallel_size": data_parallel_size}
    for key, value in sizes.items():
        if int(value) < 1:
            raise ConfigError(f"{key} must be >= 1 (got {value}).")
    for route in ("engine_kwargs", "pooling_engine_kwargs"):
        engine_kwargs = dict(out.get(route) or {})
        for key, value in sizes.items():
            if value == 1 or (key == "data_parallel_size" and route != "engine_kwargs"):
                continue
            if key in engine_kwargs and int(engine_kwargs[key]) != int(value):
                raise ConfigError(f"{key} is given twice ({engine_kwargs[key]} in {route}, {value} as an option); "
                                  "keep one.")
            engine_kwargs[key] = int(value)
        if engine_kwargs:
            out[route] = engine_kwargs
    return out


def check_hook_internals() -> str:
    """``hook.worker.probe_vllm`` as a ConfigError: the installed vLLM must have what the
    hook wraps, checked on the driver before an engine starts; returns vLLM's version."""
    from .hook.worker import probe_vllm

    try:
        return probe_vllm()
    except RuntimeError as exc:
        raise ConfigError(str(exc)) from exc


def use_v1_runner() -> None:
    """The hook wraps the V1 model runner; on CUDA vLLM would pick Model Runner V2. Sets
    ``VLLM_USE_V2_MODEL_RUNNER=0``, but refuses (ConfigError) a user's own value asking for V2."""
    check_v1_runner()
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"


def check_v1_runner() -> None:
    """ConfigError when the environment asks vLLM for Model Runner V2, which the hook cannot wrap."""
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0") not in ("0", "false", "False"):
        raise ConfigError("The bon-sr hook needs vLLM's V1 model runner, but VLLM_USE_V2_MODEL_RUNNER is "
                          f"{os.environ['VLLM_USE_V2_MODEL_RUNNER']!r}; unset it or use scorer='pooling'.")


def _start_failure(role: str, model_path: str, exc: BaseException, cpu: bool) -> ModelError:
    prefix = "pooling_" if role == "pooling" else ""
    if cpu:
        knobs = (f"'{prefix}kv_cache_memory_bytes' (default {CPU_KV_CACHE_BYTES[role] // GiB} GiB), "
                 "a smaller 'max_model_len', or a smaller model")
        extra = (" On CPU vLLM starts its engine in a spawned process, so a script must guard its "
                 "entry point with `if __name__ == '__main__':`.")
    else:
        knobs = (f"'{prefix}gpu_memory_utilization' (default {CUDA_MEMORY_UTILIZATION[role]}), a smaller "
                 "'max_model_len', or a smaller model (the two engines and an HF scorer share the GPU)")
        extra = ""
    return ModelError(
        f"vLLM could not start the {role} engine for '{model_path}': {type(exc).__name__}: {exc}. "
        f"If the model or its KV cache does not fit, set vllm_options {knobs}; or use scorer='hf' "
        f"or backend='hf'.{extra}"
    )


# --------------------------------------------------------------------------- engines


class EngineFactory(Protocol):
    """Starts and stops a backend's engines (see the module's docstring)."""

    def start(self, role: str, kwargs: dict[str, Any]) -> Any:
        """A started engine for ``role`` ('generate' or 'pooling'), built from ``kwargs``
        (``VLLMBackend.engine_kwargs(role)``: ``vllm.LLM``'s keyword arguments)."""

    def stop(self, llm: Any) -> None:
        """Shut down an engine this factory's ``start`` returned."""


class VLLMEngineFactory:
    """The default: ``vllm.LLM(**kwargs)``; ``stop`` shuts its engine core down."""

    def start(self, role: str, kwargs: dict[str, Any]) -> Any:
        return import_vllm().LLM(**kwargs)

    def stop(self, llm: Any) -> None:
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            # vLLM gives an engine 5 s after SIGTERM before it force-kills it and warns;
            # a loaded CPU needs longer to tear down the worker.
            core.shutdown(timeout=SHUTDOWN_TIMEOUT_S)


#: the factory a VLLMBackend built without ``engine_factory=`` uses (read at construction)
default_engine_factory: EngineFactory = VLLMEngineFactory()


# --------------------------------------------------------------------------- backend


class VLLMBackend:
    """Owns the engines for one model; hands out a sampler and a scorer.

    ``options`` are the user's ``vllm_options`` (see ``OPTIONS``). Engines start on the
    first ``sampler(...).sample`` / ``scorer(...).score`` that needs them, through
    ``engine_factory`` (default: the module's ``default_engine_factory``); ``started`` holds
    the roles started that way, which ``close()`` stops.
    """

    def __init__(self, model_path: str, *, dtype: str = "auto", seed: int = 0, hook: bool = False,
                 engine_factory: EngineFactory | None = None, **options: Any):
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ConfigError(f"Unknown vllm_options {', '.join(map(repr, unknown))}. "
                              f"Available: {', '.join(sorted(OPTIONS))}")
        import_vllm()
        self.cpu = is_cpu_platform()
        if self.cpu:
            apply_cpu_env_defaults(int((options.get("engine_kwargs") or {}).get("data_parallel_size", 1)))
        self.model_path = str(model_path)
        self.dtype = dtype
        self.seed = int(seed)
        self.options = dict(options)
        self.hook = bool(hook)
        self._hook_installed = False
        self._generate_llm: Any = options.get("generate_llm")
        self._pooling_llm: Any = None
        self.engine_factory: EngineFactory = engine_factory or default_engine_factory
        #: roles ('generate', 'pooling') whose engine this backend started: close() stops only these
        self.started: set[str] = set()
        self._hf_config: Any = None
        if self._generate_llm is not None and self.hook and not has_hook_extension(self._generate_llm):
            raise ConfigError(hook_missing_message())  # before anything is sampled
        if self._generate_llm is not None:
            self.tokenizer = self._generate_llm.get_tokenizer()
            self.context: int | None = int(self._generate_llm.llm_engine.model_config.max_model_len)
        else:
            from transformers import AutoTokenizer

            try:
                self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
            except (OSError, ValueError) as exc:
                raise ModelError(f"Could not load the tokenizer of '{self.model_path}': {exc}") from exc
            self.context = options.get("max_model_len") or self._model_context()

    # -- engines ------------------------------------------------------------------------

    def _model_context(self) -> int | None:
        from .models import model_context

        return model_context(self._config())

    def _config(self) -> Any:
        if self._hf_config is None:
            from transformers import AutoConfig

            try:
                self._hf_config = AutoConfig.from_pretrained(self.model_path)
            except (OSError, ValueError) as exc:
                raise ModelError(f"Could not read the config of '{self.model_path}': {exc}") from exc
        return self._hf_config

    def engine_kwargs(self, role: str) -> dict[str, Any]:
        opts = self.options
        prefix = "pooling_" if role == "pooling" else ""
        kwargs: dict[str, Any] = dict(model=self.model_path, dtype=self.dtype, seed=self.seed)
        if self.context is not None:
            kwargs["max_model_len"] = int(self.context)
        eager = opts.get("enforce_eager", True if self.cpu else None)
        if eager is not None:
            kwargs["enforce_eager"] = bool(eager)
        kv_bytes = opts.get(f"{prefix}kv_cache_memory_bytes")
        if self.cpu:
            kwargs["kv_cache_memory_bytes"] = int(kv_bytes or CPU_KV_CACHE_BYTES[role])
        elif kv_bytes:
            kwargs["kv_cache_memory_bytes"] = int(kv_bytes)
        else:
            default = (CUDA_MEMORY_UTILIZATION_HOOK if self.hook and role == "generate"
                       else CUDA_MEMORY_UTILIZATION[role])
            kwargs["gpu_memory_utilization"] = float(opts.get(f"{prefix}gpu_memory_utilization") or default)
        if role == "pooling":
            from vllm.config import PoolerConfig

            kwargs.update(runner="pooling", convert="embed", enable_prefix_caching=False,
                          pooler_config=PoolerConfig(task="token_embed", pooling_type="ALL", use_activation=False))
        else:
            if self.cpu:
                # Per-request seeds need it (see samplers.vllm); without chunking a prompt must
                # fit one scheduler step.
                kwargs.update(enable_chunked_prefill=False,
                              max_num_batched_tokens=max(int(self.context or 0), 2048))
            if self.hook:
                # Prefix caching turns the hook's fills (stop strings, context-capped
                # candidates) into prefills of their last block.
                kwargs.update(worker_extension_cls=WORKER_EXTENSION, enable_prefix_caching=True)
        kwargs.update(opts.get(f"{prefix}engine_kwargs") or {})
        return kwargs

    def _start(self, role: str) -> Any:
        import_vllm()
        kwargs = self.engine_kwargs(role)
        if self.hook and role == "generate":
            use_v1_runner()
            check_hook_internals()  # before minutes of engine start, not after
        logger.info("starting the vLLM %s engine for %s", role, self.model_path)
        from .sampling.vllm_plugin import mark_engine_parent

        mark_engine_parent()  # a hard kill of this process takes the engine with it
        try:
            llm = self.engine_factory.start(role, kwargs)
            self.started.add(role)
            return llm
        except TypeError as exc:
            raise ConfigError(f"vLLM rejected the {role} engine's arguments: {exc}. Check vllm_options "
                              f"'{'pooling_' if role == 'pooling' else ''}engine_kwargs'.") from exc
        except Exception as exc:  # vLLM reports start-up failures as assorted types
            raise _start_failure(role, self.model_path, exc, self.cpu) from exc

    @property
    def generate_llm(self) -> Any:
        if self._generate_llm is None:
            self._generate_llm = self._start("generate")
        if self.hook and not self._hook_installed:
            info = install_hook(self._generate_llm)  # a caller's engine without it: ConfigError
            run_selfcheck(self._generate_llm)  # rows vs tokens sampled; HookSelfCheckError names the vLLM version
            logger.info("bon-sr hook active in the generate engine (%s)", info)
            self._hook_installed = True
        return self._generate_llm

    @property
    def pooling_llm(self) -> Any:
        if self._pooling_llm is None:
            self._pooling_llm = self._start("pooling")
        return self._pooling_llm

    # -- components ---------------------------------------------------------------------

    def sampler(self, sampling: SamplingConfig, scoring: HiddenStateConfig | None = None, *,
                logit_stats: bool = False, logprobs: bool | None = None, also: Sequence[str] = (),
                embed: bool = False) -> Any:
        """Candidates of ``sample`` / ``sample_and_greedy``; with ``scoring`` (needs
        ``hook=True``) their ``scores`` already hold the hook's score dict (``also``: more
        token sets; ``embed``: ``Candidate.embeddings`` too; see ``HookSampler``)."""
        if scoring is not None:
            self.check_scorer("hook", scoring)
            also = check_also(scoring, also)
        elif also or embed:
            raise ConfigError("also= and embed= need scoring= (the hook scores while it samples).")
        return _LazySampler(self, sampling, bool(self.options.get("logprobs", False) if logprobs is None
                                                 else logprobs), scoring, logit_stats, tuple(also), embed)

    def hook_scorer(self, scoring: HiddenStateConfig, *, logit_stats: bool = False) -> "_LazyHookScorer":
        """Scores caller-supplied candidates with the hook (teacher-forced prefill in the
        generate engine; no pooling engine)."""
        self.check_scorer("hook", scoring)
        return _LazyHookScorer(self, scoring, logit_stats)

    def check_scorer(self, kind: str, scoring: HiddenStateConfig) -> None:
        """ConfigError unless ``kind`` ('hook' or 'pooling') can compute ``scoring``; starts
        no engine (a caller's own engine is only inspected)."""
        if kind not in SCORER_KINDS:
            raise ConfigError(f"Unknown vLLM scorer '{kind}'. Available: {', '.join(SCORER_KINDS)}")
        if kind == "pooling":
            self.scorer(scoring)
            return
        if not self.hook:
            raise ConfigError("This VLLMBackend was built without the hook (hook=False); use scorer='pooling'.")
        given = self.options.get("generate_llm")
        if given is not None and not has_hook_extension(given):
            raise ConfigError(hook_missing_message())
        check_hook_config(self._last_layer_as_minus_one(scoring))

    def _last_layer_as_minus_one(self, scoring: HiddenStateConfig) -> HiddenStateConfig:
        """``layer=num_layers-1`` names the last layer too: the vLLM scorers accept it."""
        if scoring.layer != -1:
            layers = getattr(self._text_config(), "num_hidden_layers", None)
            if layers is not None and scoring.layer == layers - 1:
                return replace(scoring, layer=-1)
        return scoring

    def scorer(self, scoring: HiddenStateConfig) -> "_LazyScorer":
        """The pooling-engine scorer (the fallback)."""
        check_hook_config(self._last_layer_as_minus_one(scoring), scorer="pooling")
        return _LazyScorer(self, scoring)

    def _text_config(self) -> Any:
        if self._generate_llm is not None:
            return self._generate_llm.llm_engine.model_config.hf_text_config
        config = self._config()
        return getattr(config, "get_text_config", lambda: config)()

    def per_request_seeds(self) -> bool:
        """False only for a caller's CPU engine with chunked prefill on (it would crash)."""
        if not self.cpu:
            return True
        sched = getattr(self.generate_llm.llm_engine, "vllm_config", None)
        chunked = bool(getattr(getattr(sched, "scheduler_config", None), "enable_chunked_prefill", False))
        if chunked:
            logger.warning("This CPU vLLM engine has chunked prefill on, which crashes with per-request "
                           "seeds; sampling with the engine's global seed instead (a prompt's samples then "
                           "depend on the batch). Create it with enable_chunked_prefill=False to fix.")
        return not chunked

    def close(self) -> None:
        """Shut down the engines this backend started (a caller's generate_llm, or an engine
        handed in some other way, is left alone)."""
        for role, name in (("pooling", "_pooling_llm"), ("generate", "_generate_llm")):
            llm = getattr(self, name)
            if llm is None or role not in self.started:
                continue
            setattr(self, name, None)
            self.started.discard(role)
            if role == "generate":
                self._hook_installed = False
            self.engine_factory.stop(llm)


class _LazySampler:
    """Starts the generate engine on the first ``sample`` call, then delegates."""

    def __init__(self, backend: VLLMBackend, config: SamplingConfig, logprobs: bool,
                 scoring: HiddenStateConfig | None = None, logit_stats: bool = False, also: tuple[str, ...] = (),
                 embed: bool = False):
        self.backend = backend
        self.also = also
        self.embed = embed
        self.config = config
        self.logprobs = logprobs
        self.scoring = scoring
        self.logit_stats = logit_stats
        self._inner: Any = None

    def _sampler(self) -> Any:
        if self._inner is None:
            llm = self.backend.generate_llm
            seeds = self.backend.per_request_seeds()
            if self.scoring is not None:
                from .hook.sync import HookSampler

                self._inner = HookSampler(llm, self.config, _last_layer(self.scoring), logit_stats=self.logit_stats,
                                          logprobs=self.logprobs, per_request_seeds=seeds, also=self.also,
                                          embed=self.embed)
            else:
                from .sampling.vllm import VLLMSampler

                self._inner = VLLMSampler(llm, self.config, logprobs=self.logprobs, per_request_seeds=seeds)
        return self._inner

    def sample(self, prompt_token_ids: Sequence[Sequence[int]], *, n: int | None = None,
               seeds: Sequence[int]) -> list[list[Any]]:
        return self._sampler().sample(prompt_token_ids, n=n, seeds=seeds)

    def sample_and_greedy(self, prompt_token_ids: Sequence[Sequence[int]], *, n: int | None = None,
                          seeds: Sequence[int]) -> tuple[list[list[Any]], list[Any]]:
        return self._sampler().sample_and_greedy(prompt_token_ids, n=n, seeds=seeds)


def _last_layer(scoring: HiddenStateConfig) -> HiddenStateConfig:
    """The last layer spelled positively (check_scorer accepted it) as -1, which the hook knows."""
    return scoring if scoring.layer == -1 else replace(scoring, layer=-1)


class _LazyHookScorer:
    """Starts the (hooked) generate engine on the first ``score`` call, then delegates."""

    def __init__(self, backend: VLLMBackend, config: HiddenStateConfig, logit_stats: bool):
        self.backend = backend
        self.config = config
        self.logit_stats = logit_stats
        self._inner: Any = None

    def _scorer(self) -> Any:
        if self._inner is None:
            from .hook.sync import HookScorer

            self._inner = HookScorer(self.backend.generate_llm, _last_layer(self.config), logit_stats=self.logit_stats)
        return self._inner

    def score(self, prompt_token_ids: Sequence[Sequence[int]],
              response_token_ids: Sequence[Sequence[int]]) -> list[dict[str, float]]:
        return self._scorer().score(prompt_token_ids, response_token_ids)

    def score_and_embed(self, prompt_token_ids: Sequence[Sequence[int]],
                        response_token_ids: Sequence[Sequence[int]]) -> tuple[list[dict[str, float]], list[Any]]:
        return self._scorer().score_and_embed(prompt_token_ids, response_token_ids)


class _LazyScorer:
    """Starts the pooling engine on the first ``score`` call, then delegates."""

    def __init__(self, backend: VLLMBackend, config: HiddenStateConfig):
        self.backend = backend
        self.config = config
        self._inner: VLLMScorer | None = None

    def score(self, prompt_token_ids: Sequence[Sequence[int]],
              response_token_ids: Sequence[Sequence[int]]) -> list[dict[str, float]]:
        if self._inner is None:
            self._inner = VLLMScorer(self.backend.pooling_llm, self.config, max_model_len=self.backend.context)
        return self._inner.score(prompt_token_ids, response_token_ids)
