"""The Python API: ``select_best()`` for one prompt, ``BestOfN`` for many.

Wires a sampler, a scorer and a selector together. Backends are built here from names;
the math, sampling, scoring and selection live in their own modules. Every option is
checked when ``BestOfN`` is built, before a model is loaded, an engine starts or a token
is sampled: a selector that needs answers without an extractor, a score the chosen
scorer cannot compute, a scoring option the scorer does not support.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Iterable, Iterator, Mapping, Sequence, Union

from .options import resolve
from .selection.answers import AnswerInput
from .selection.consensus import DEFAULT_UTILITY, UtilityInput
from .errors import ConfigError, InputError
from .scoring.hidden_states import HiddenStateConfig
from .models import DEFAULT_MODEL, ProgressFn, load_hf_model, model_context, resolve_model
from .sampling.prompts import encode_prompt, encode_response, validate_prompt
from .sampling import SamplingConfig
from .scoring.scorers import SCORE_SOURCES, SR_KEYS, STAT_KEYS, HFScorer
from .selection.decide import decide
from .selection.execution import PromptContext
from .selection.selectors import DEFAULT_SELECTOR, SelectorFn
from .types import Candidate, PromptInput, Selection

logger = logging.getLogger(__name__)

CandidateInput = Union[str, Candidate, Mapping[str, Any]]

__all__ = ["BestOfN", "load_hf_model", "model_context", "select_best"]


class BestOfN:
    """Loads a model once, then samples N candidates per prompt and keeps the best.

    >>> bon = BestOfN("smollm2-135m-instruct", n=4, seed=0)          # doctest: +SKIP
    >>> bon.select("Name a prime number.").response                   # doctest: +SKIP
    >>> BestOfN(n=16, selector="majority", answer="numeric")          # doctest: +SKIP

    backend: ``auto`` (vLLM when importable, else transformers), ``hf`` or ``vllm``.
    scorer: ``auto`` (the vLLM hook with the vLLM backend, else ``hf``), ``hook`` (inside
        vLLM's sampling pass, one engine), ``pooling`` (a second vLLM engine) or ``hf``.
    selector: a name from ``bon_sr.selection.selectors.SELECTORS`` or a callable
        ``fn(candidates, *, seed, groups, **kwargs) -> int``.
    answer / answer_regex: the answer extractor voting selectors need (``numeric``,
        ``math``, ``choice``, ``exact``, a callable, or a regex); with any selector, each
        candidate's answer and vote share are reported.
    utility: the similarity the consensus selectors (``mbr``, ``auto``) use: a name from
        ``bon_sr.selection.consensus.UTILITIES`` (``lexical``, the default, needs no hidden states;
        ``hidden-*`` compare the frozen model's last-layer embeddings, which the ``hf``
        and ``hook`` scorers compute in their scoring pass; ``pooling`` cannot) or a
        callable ``utility(a, b) -> float`` on two texts. Each candidate's utility is
        reported as ``scores["mbr_utility"]``.
    score: None (default) scores what the selector needs, plus stable rank with the hook
        scorer (free in vLLM's sampling pass; with ``hf``, ``majority`` or ``random`` run no
        hidden-state pass); True always computes stable rank; False never scores.
    logit_stats: also compute ``mean_logprob`` and ``self_certainty`` (automatic when the
        selector needs them).
    include_greedy: add one greedy decode per prompt to the N sampled candidates (in the
        same vLLM call), marked ``greedy``; with ``answer="python"`` it is kept when it passes
        the prompt's examples. None (default): on exactly when candidates run as code
        (``answer="python"`` with a selector that votes).
    Sampling options and their defaults are ``SamplingConfig``'s (the paper's temperature
    0.7 and top-p 0.9; n 8); scoring options are ``HiddenStateConfig``'s (response tokens,
    last layer, post-norm). The signature takes its defaults from those two classes, which
    also check the values, as the CLI, the server and the bench do.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        backend: str = "auto",
        scorer: str = "auto",
        n: int = SamplingConfig.n,
        temperature: float = SamplingConfig.temperature,
        top_p: float = SamplingConfig.top_p,
        max_new_tokens: int = SamplingConfig.max_new_tokens,
        stop: Sequence[str] = (),
        greedy: bool = SamplingConfig.greedy,
        include_greedy: bool | None = None,
        seed: int = SamplingConfig.seed,
        selector: str | SelectorFn = DEFAULT_SELECTOR,
        answer: AnswerInput = None,
        answer_regex: str | None = None,
        utility: UtilityInput = DEFAULT_UTILITY,
        score: bool | None = None,
        logit_stats: bool = False,
        token_set: str = HiddenStateConfig.token_set,
        layer: int = HiddenStateConfig.layer,
        norm: str = HiddenStateConfig.norm,
        window: int | None = HiddenStateConfig.window,
        transform: str = HiddenStateConfig.transform,
        max_batch_tokens: int = HiddenStateConfig.max_batch_tokens,
        device: str | None = None,
        dtype: str = "auto",
        vllm_options: Mapping[str, Any] | None = None,
        progress: ProgressFn | None = None,
    ):
        # -- everything that can be checked without a model, first (bon_sr.options) --------
        plan = resolve(selector=selector, answer=answer, answer_regex=answer_regex, utility=utility, score=score,
                       logit_stats=logit_stats, backend=backend, scorer=scorer,
                       sampling=dict(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                     stop=tuple(stop), greedy=greedy, seed=seed),
                       scoring=dict(token_set=token_set, layer=layer, norm=norm, window=window,
                                    transform=transform, max_batch_tokens=max_batch_tokens),
                       include_greedy=include_greedy)
        if plan.embeddings_needed and scorer == "auto" and plan.scorer == "hf" and plan.backend == "vllm":
            logger.info("utility '%s' needs embeddings: scoring with the transformers model (scorer 'hf')",
                        plan.utility.name)
        self.plan = plan
        self.include_greedy = plan.include_greedy
        self.sampling, self.scoring = plan.sampling, plan.scoring
        self.selector_spec, self.selector_name = plan.selector, plan.selector.name
        self.answers, self.utility = plan.answers, plan.utility
        self.embeddings_needed = plan.embeddings_needed
        self.backend, self.scorer_name = plan.backend, plan.scorer
        self.score_keys, self.logit_stats = plan.score_keys, plan.logit_stats
        self.model_name = str(model)
        self.device = device
        self.dtype = dtype
        self.vllm_options = dict(vllm_options or {})
        # -- then the model -------------------------------------------------------------
        self.model_path = resolve_model(model, progress=progress)
        self._sampler: Any = None
        self._scorer: Any = None
        self._hf_model: Any = None
        self._vllm: Any = None
        self.tokenizer: Any = None
        self.context: int | None = None
        self._load()

    # -- construction -------------------------------------------------------------------

    @property
    def scores_needed(self) -> bool:
        """Whether candidates go through a scoring pass (scores, or embeddings for MBR)."""
        return bool(self.score_keys) or self.embeddings_needed

    def _load(self) -> None:
        hf_scores = self.scorer_name == "hf" and self.scores_needed
        if self.backend == "hf" or hf_scores:
            self._hf_model, self.tokenizer = load_hf_model(self.model_path, device=self.device, dtype=self.dtype)
            self.context = model_context(self._hf_model)
        if self.backend == "vllm" or (self.scorer_name in ("hook", "pooling") and self.scores_needed):
            from .engines import VLLMBackend

            options = dict(self.vllm_options)
            if self.scorer_name == "hook":
                options.setdefault("hook", True)
            self._vllm = VLLMBackend(self.model_path, dtype=self.dtype, seed=self.sampling.seed, **options)
            if self.scorer_name in ("hook", "pooling") and self.scores_needed:
                # before any engine starts: e.g. a caller's engine without the hook extension
                self._vllm.check_scorer(self.scorer_name, self.scoring)
            if self.tokenizer is None:
                self.tokenizer = self._vllm.tokenizer
                self.context = self._vllm.context

    @classmethod
    def from_vllm(cls, llm: Any, **kwargs: Any) -> "BestOfN":
        """Wrap an existing ``vllm.LLM``: it samples (and, built with bon-sr's hook, scores);
        otherwise use ``scorer='pooling'`` (a pooling engine beside it) or ``scorer='hf'``."""
        backend = kwargs.pop("backend", "vllm")
        if backend != "vllm":
            raise ConfigError(f"BestOfN.from_vllm samples with the given vllm.LLM, so backend must be 'vllm', "
                              f"not '{backend}'.")
        if kwargs.get("scorer", "auto") == "auto":
            from .vllm_hook import has_hook_extension, hook_missing_message

            if not has_hook_extension(llm):
                logger.warning("This vllm.LLM has no bon-sr hook, so a pooling engine will score beside it. %s",
                               hook_missing_message())
                kwargs["scorer"] = "pooling"
        model_config = llm.llm_engine.model_config
        model = kwargs.pop("model", model_config.model)
        kwargs.setdefault("dtype", str(model_config.dtype).removeprefix("torch."))
        options: Mapping[str, Any] = kwargs.pop("vllm_options", None) or {}
        return cls(model, backend="vllm", vllm_options={**options, "generate_llm": llm}, **kwargs)

    def make_sampler(self, config: SamplingConfig | None = None, *, also: Sequence[str] = ()) -> Any:
        """A sampler on this object's backend with other sampling options (e.g. greedy).
        With the hook scorer its candidates come back already scored; ``also`` adds the
        stable rank of more token sets from the same pass as ``sr_<token set>`` (hook only,
        e.g. ``token_set='full'`` and ``also=('response',)``: both of the paper's readings)."""
        config = config or self.sampling
        if also and not (self.scorer_name == "hook" and self.scores_needed):
            raise ConfigError("also= scores more token sets in the hook's sampling pass: it needs scorer='hook' "
                              "and a scoring pass.")
        if self.backend == "hf":
            from .sampling.hf import HFSampler

            return HFSampler(self._hf_model, self.tokenizer, config)
        if self.scorer_name == "hook" and self.scores_needed:
            return self._vllm.sampler(config, scoring=self.scoring, logit_stats=self.logit_stats, also=also,
                                      embed=self.embeddings_needed)
        logprobs = self.scorer_name == "pooling" and "mean_logprob" in self.score_keys
        return self._vllm.sampler(config, logprobs=True) if logprobs else self._vllm.sampler(config)

    @property
    def sampler(self) -> Any:
        """The sampler ``select`` draws with (built on first use); assign any object with the
        ``Sampler`` protocol's ``sample`` to draw candidates another way (e.g. ``FakeSampler``)."""
        if self._sampler is None:
            self._sampler = self.make_sampler()
        return self._sampler

    @sampler.setter
    def sampler(self, sampler: Any) -> None:
        self._sampler = sampler

    @property
    def vllm_engines(self) -> Any:
        """The ``VLLMBackend`` holding this object's vLLM engines (its ``sampler()``,
        ``scorer()``, ``generate_llm``), or None with the transformers backend and scorer."""
        return self._vllm

    @property
    def hf_model(self) -> Any:
        """The frozen transformers model (loaded on first use when the backend is vLLM)."""
        if self._hf_model is None:
            self._hf_model, _ = load_hf_model(self.model_path, device=self.device, dtype=self.dtype)
        return self._hf_model

    def sample(self, prompt_token_ids: Sequence[Sequence[int]], seeds: Sequence[int], *,
               greedy: bool = False) -> tuple[list[list[Candidate]], list[Candidate] | None]:
        """The configured ``n`` candidates per tokenised prompt (already scored when the hook
        scores in the sampling pass) and, with ``greedy``, one greedy decode per prompt: in
        the same vLLM call as the samples (a lone greedy pass is a small batch that costs
        about as much wall time), else a separate greedy sampler."""
        both = getattr(self.sampler, "sample_and_greedy", None)
        if greedy and both is not None:
            return both(prompt_token_ids, n=self.sampling.n, seeds=seeds)
        groups = self.sampler.sample(prompt_token_ids, n=self.sampling.n, seeds=seeds)
        if not greedy:
            return groups, None
        config = SamplingConfig(n=1, greedy=True, max_new_tokens=self.sampling.max_new_tokens,
                                stop=self.sampling.stop, seed=self.sampling.seed)
        return groups, [g[0] for g in self.make_sampler(config).sample(prompt_token_ids, n=1, seeds=seeds)]

    @property
    def scorer(self) -> Any:
        """The scorer for caller-supplied candidates (and for sampled ones unless the hook
        scored them in the sampling pass): ``score(prompt_ids, response_ids) -> [dict]``."""
        if self._scorer is None:
            if self.scorer_name == "hf":
                self._scorer = HFScorer(self.hf_model, self.scoring, logit_stats=self.logit_stats,
                                        tokenizer=self.tokenizer)
            elif self.scorer_name == "hook":
                self._scorer = self._vllm.hook_scorer(self.scoring, logit_stats=self.logit_stats)
            else:
                self._scorer = self._vllm.scorer(self.scoring)
        return self._scorer

    def config_dict(self) -> dict[str, Any]:
        sources = SCORE_SOURCES[self.scorer_name]
        return {"model": self.model_name, "backend": self.backend, "scorer": self.scorer_name,
                "selector": self.selector_name, "answer": self.answers.name if self.answers else None,
                "utility": self.utility.name if self.selector_spec.needs_similarity else None,
                "sampling": self.sampling.to_dict(), "scoring": self.scoring.to_dict(),
                "score_sources": {k: sources[k] for k in sorted(self.score_keys)}}

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
        return encode_prompt(self.tokenizer, validate_prompt(prompt, where))

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
            try:
                token_ids = (tuple(int(t) for t in ids) if ids is not None
                             else tuple(encode_response(self.tokenizer, text)))
            except (TypeError, ValueError):
                raise InputError(f"{where}: candidate {i} 'token_ids' must be a list of integers.") from None
            out.append(Candidate(text=text, token_ids=token_ids, index=i))
        return out

    def select(
        self,
        prompt: PromptInput,
        *,
        candidates: Sequence[CandidateInput] | None = None,
        seed: int | None = None,
        id: str | int = 0,
        tests: str | Sequence[str] | None = None,
    ) -> Selection:
        """Best-of-N for one prompt; with ``candidates`` only scores and selects them.

        The prompt's seed derives from the run seed and ``id`` exactly as in
        ``select_many`` (so ``select(p)`` equals ``select_many([p])``); ``seed`` overrides it.
        ``tests`` (assert lines or doctest text) replace the examples the prompt shows for
        ``answer="python"``."""
        seeds = [self.plan.seed_for(str(id), seed)]
        return next(self._run([prompt], seeds, [candidates] if candidates is not None else None, ["prompt"],
                              [tests]))

    def select_many(
        self,
        prompts: Iterable[PromptInput],
        *,
        ids: Sequence[str | int] | None = None,
        candidates: Sequence[Sequence[CandidateInput]] | None = None,
        chunk_size: int | None = None,
        tests: Sequence[str | Sequence[str] | None] | None = None,
    ) -> Iterator[Selection]:
        """Yield one Selection per prompt, in order. Each prompt's seed derives from the run
        seed and its id (default: its position), so results do not depend on chunking.
        ``tests``: per prompt, the tests ``answer="python"`` runs instead of the prompt's examples."""
        prompts = list(prompts)
        keys = [str(k) for k in ids] if ids is not None else [str(i) for i in range(len(prompts))]
        if len(keys) != len(prompts):
            raise ConfigError("ids must have one entry per prompt")
        if candidates is not None and len(candidates) != len(prompts):
            raise ConfigError("candidates must have one list per prompt")
        if tests is not None and len(tests) != len(prompts):
            raise ConfigError("tests must have one entry (or None) per prompt")
        size = chunk_size or (1 if self.backend == "hf" else 32)
        for start in range(0, len(prompts), size):
            part = slice(start, start + size)
            seeds = [self.plan.seed_for(k) for k in keys[part]]
            yield from self._run(prompts[part], seeds, candidates[part] if candidates is not None else None,
                                 [f"prompt {k}" for k in keys[part]], tests[part] if tests is not None else None)

    def _score(self, prompt_ids: Sequence[Sequence[int]], groups: list[list[Candidate]],
               sampled: bool) -> list[list[Candidate]]:
        """Attach the scores the selector needs (the hook already did for sampled ones)."""
        if not self.scores_needed:
            return groups
        if sampled and self.scorer_name == "hook":
            return groups
        if self.scorer_name == "pooling" and self.score_keys & set(STAT_KEYS):
            if any(c.logprobs is None for g in groups for c in g):
                raise ConfigError("The pooling scorer takes mean_logprob from vLLM's sampled-token logprobs, "
                                  "which caller-supplied candidates do not have; use scorer='hf' or 'hook'.")
        flat_p = [ids for ids, group in zip(prompt_ids, groups) for _ in group]
        flat_r = [c.token_ids for group in groups for c in group]
        # The pooling engine gives stable rank only; its mean_logprob is the sampler's.
        from_logprobs = self.scorer_name == "pooling" and "mean_logprob" in self.score_keys
        run_scorer = self.scorer_name != "pooling" or bool(self.score_keys & set(SR_KEYS))
        embeddings = None
        if self.embeddings_needed:
            score_list, embedding_list = self.scorer.score_and_embed(flat_p, flat_r)
            scores, embeddings = iter(score_list), iter(embedding_list)
        else:
            scores = iter(self.scorer.score(flat_p, flat_r) if run_scorer else [{} for _ in flat_r])
        out = []
        for group in groups:
            scored = []
            for c in group:
                extra = dict(next(scores))
                if from_logprobs:
                    extra["mean_logprob"] = sum(c.logprobs) / len(c.logprobs) if c.logprobs else float("nan")
                c = c.with_scores(**extra)
                scored.append(c if embeddings is None else replace(c, embeddings=next(embeddings)))
            out.append(scored)
        return out

    def _run(
        self,
        prompts: Sequence[PromptInput],
        seeds: Sequence[int],
        given: Sequence[Sequence[CandidateInput] | None] | None,
        wheres: Sequence[str],
        tests: Sequence[str | Sequence[str] | None] | None = None,
    ) -> Iterator[Selection]:
        prompt_ids = [self.encode(p, w) for p, w in zip(prompts, wheres)]
        if given is None:
            for ids, where in zip(prompt_ids, wheres):
                self.plan.check_fits(ids, self.context, where)
            groups, lone = self.sample(prompt_ids, seeds, greedy=self.include_greedy)
            if lone is not None:  # the greedy decode joins its prompt's candidates, last
                groups = [[*g, replace(c, index=len(g), greedy=True)] for g, c in zip(groups, lone, strict=True)]
        else:
            groups = [self._candidates_from_input(c or [], w) for c, w in zip(given, wheres)]
            for ids, group, where in zip(prompt_ids, groups, wheres):
                self.plan.check_fits(ids, self.context, where, max(c.num_tokens for c in group))
        groups = self._score(prompt_ids, groups, sampled=given is None)
        tests = tests if tests is not None else [None] * len(prompts)
        for prompt, ids, group, seed, test in zip(prompts, prompt_ids, groups, seeds, tests, strict=True):
            d = decide(group, self.selector_spec, self.answers, seed=seed, utility=self.utility,
                       context=PromptContext.of(prompt, test))
            yield Selection(prompt=prompt, prompt_token_ids=tuple(ids), candidates=d.candidates,
                            best_index=d.pick.index, selector=self.selector_name, model=self.model_name,
                            rule=d.pick.rule, votes=d.votes)


def select_best(
    prompt: PromptInput,
    *,
    candidates: Sequence[CandidateInput] | None = None,
    model: str = DEFAULT_MODEL,
    **options: Any,
) -> Selection:
    """Sample ``n`` candidates for ``prompt`` (or take the caller's ``candidates``), score
    them, and return the one the selector picks (default ``auto``: a vote over the answers
    when ``answer`` is given, else ``mbr``; ``selector="stable-rank"`` is the paper's pick, the
    highest stable rank of the frozen model's hidden states). Options are ``BestOfN``'s, and ``tests`` (for
    ``answer="python"``) ``select``'s.

    Loads the model on every call: use ``BestOfN`` for many prompts.
    """
    tests = options.pop("tests", None)
    with BestOfN(model, **options) as bon:
        return bon.select(prompt, candidates=candidates, tests=tests)
