"""The ONE order of a hooked sampling job, sans IO: sample -> fill -> collect -> retry.

A plan is a generator of steps; a driver (``sync.py`` for ``vllm.LLM``, ``aio.py`` for
``AsyncLLM``) performs each step with its engine and sends the reply back in::

    Sample(requests, follow)   run every request; for each finished output ``o`` of
                               request ``i``, also run ``follow(i, o)`` if it is not None
                               (the candidate's fill); reply: the outputs, in order
    Generate(requests)         run them; reply: None (their rows are what counts)
    Collect(specs)             ``bon_sr_collect``; reply: the worker's results, in order

and the generator's return value is the result. Given the engine's tokenizer, a plan's
sample requests decode one token past ``max_tokens`` and trim it (``protocol.fan_out``'s
``extend``), so a length-cut candidate's last row is computed in the sampling pass; fills
remain for what that cannot cover (a stop string, a candidate cut by the context length).
The sync driver runs a Sample's fills as one more batch after the samples; the async
driver chains each fill right after its own candidate, so fills overlap the other
candidates' decoding. Either way the candidates and scores are the same.

This module knows no engine and does no IO; it builds requests with ``protocol``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Callable, Generator, Sequence

from ..scoring.hidden_states import HiddenStateConfig
from ..types import Candidate
from .protocol import (HookError, cache_salt, collect_spec, embeddings_from_results, extend_by_default, fan_out,
                       fill_request, needs_fill, new_tag, score_request, scores_from_results, text_decoder,
                       tokens_prompt, trim_completion)

logger = logging.getLogger(__name__)

EngineRequest = tuple[Any, Any]  # (TokensPrompt, SamplingParams)


@dataclass(frozen=True)
class Sample:
    requests: list[EngineRequest]
    follow: Callable[[int, Any], EngineRequest | None]


@dataclass(frozen=True)
class Generate:
    requests: list[EngineRequest]


@dataclass(frozen=True)
class Collect:
    specs: list[dict[str, Any]]


Step = Sample | Generate | Collect
Steps = Generator[Step, Any, Any]


@dataclass(frozen=True)
class Group:
    """One prompt's candidates: ``params`` is the prompt's single-sample ``SamplingParams``."""

    prompt_ids: tuple[int, ...]
    params: Any
    n: int
    seed: int | None


class ScoredSampling:
    """Sample every group's candidates, score them in the worker, return them scored.

    ``to_candidate(index, completion) -> Candidate`` turns a vLLM completion into a
    candidate (the sampler's one rule). ``embed``: each candidate also gets its
    ``embeddings`` (``{"last", "mean"}``, d floats each, from the rows it was scored on).
    ``tokenizer``: the engine's (it writes a trimmed candidate's text); None: no extra
    token, every length-cut candidate gets a fill. ``context``: the engine's
    ``max_model_len``; a candidate that reaches it cannot be decoded past nor filled, and is
    scored without its last token's row (``scored_tokens`` says so)."""

    def __init__(self, groups: Sequence[Group], scoring: HiddenStateConfig, to_candidate: Callable[[int, Any], Any],
                 *, logit_stats: bool = False, also: Sequence[str] = (), embed: bool = False,
                 tokenizer: Any = None, context: int | None = None):
        self.scoring = scoring
        self.logit_stats = bool(logit_stats)
        self.also = tuple(also)  # checked where a caller passes it (HookSampler, VLLMBackend.sampler)
        self.embed = bool(embed)
        self.to_candidate = to_candidate
        # With the engine's tokenizer, each candidate decodes one token past max_tokens and
        # is trimmed back (protocol.fan_out's extend): no fill for length-cut candidates.
        self.extend = tokenizer is not None and extend_by_default()
        self.tokenizer = tokenizer
        self.context = context
        self.sizes = [g.n for g in groups]
        self.keys: list[tuple[str, int, tuple[int, ...]]] = []  # (tag, index, prompt ids) per request
        self.params: list[Any] = []  # the prompt's single-sample params, per request
        self.requests: list[EngineRequest] = []
        self._done: dict[int, tuple[Candidate, bool]] = {}  # request -> (candidate, its last row computed)
        self._decoders: dict[str, Callable[[Sequence[int]], str]] = {}  # tag -> text_decoder of its prompt
        for g in groups:
            tag = new_tag()
            salt = cache_salt(tag, scoring)
            for i, child in enumerate(fan_out(g.params, g.n, g.seed, tag, len(g.prompt_ids), scoring,
                                              logit_stats=self.logit_stats, extend=self.extend)):
                self.requests.append((tokens_prompt(g.prompt_ids, salt), child))
                self.keys.append((tag, i, g.prompt_ids))
                self.params.append(g.params)

    def tags(self) -> list[str]:
        return sorted({tag for tag, _, _ in self.keys})

    def _candidate(self, k: int, output: Any) -> tuple[Candidate, bool]:
        """Request k's candidate, and whether its last row was computed in the sampling pass
        (decoded past, the extra token trimmed here; or ended by EOS / a stop token)."""
        if k not in self._done:
            completion, cap = output.outputs[0], self.params[k].max_tokens
            extended = self.extend and len(completion.token_ids) > cap
            if extended:
                completion = trim_completion(completion, cap, self._decoder(k))
            cand = self.to_candidate(self.keys[k][1], completion)
            self._done[k] = (cand, extended or not needs_fill(cand, isinstance(completion.stop_reason, str)))
        return self._done[k]

    def _decoder(self, k: int) -> Callable[[Sequence[int]], str]:
        """Request k's text decoder, built once per prompt (its candidates share it)."""
        tag = self.keys[k][0]
        if tag not in self._decoders:
            self._decoders[tag] = text_decoder(self.tokenizer, self.keys[k][2], self.params[k].skip_special_tokens)
        return self._decoders[tag]

    def _fills_context(self, k: int, cand: Candidate) -> bool:
        return self.context is not None and len(self.keys[k][2]) + cand.num_tokens >= self.context

    def _fill(self, k: int, output: Any) -> EngineRequest | None:
        """The fill of request k if its last row is missing; none for a candidate that
        filled the context (vLLM cannot prefill a prompt of the whole context length): it is
        scored without its last row."""
        cand, row_done = self._candidate(k, output)
        if row_done or self._fills_context(k, cand):
            return None
        tag, i, p_ids = self.keys[k]
        return fill_request(tag, i, p_ids, cand.token_ids, self.scoring)

    def _specs(self, cands: Sequence[Candidate]) -> list[dict[str, Any]]:
        return [collect_spec(tag, i, len(p_ids), cand.num_tokens, self.scoring, logit_stats=self.logit_stats,
                             release_group=True, also=self.also, embed=self.embed,
                             last_row=self._done[k][1] or not self._fills_context(k, cand))
                for k, ((tag, i, p_ids), cand) in enumerate(zip(self.keys, cands))]

    def steps(self) -> Steps:
        outputs = yield Sample(self.requests, self._fill)
        cands = [self._candidate(k, o)[0] for k, o in enumerate(outputs)]
        specs = self._specs(cands)
        results = check_count((yield Collect(specs)), len(specs))
        missed = [k for k, res in enumerate(results) if "missing" in res]
        if missed:  # should not happen (see protocol.fill_request); recompute under a salt of their own
            logger.warning("bon-sr hook: %d candidates missed rows after the fill step; recomputing them",
                           len(missed))
            yield Generate([fill_request(self.keys[k][0], self.keys[k][1], self.keys[k][2], cands[k].token_ids,
                                         self.scoring, missing=results[k]["missing"]) for k in missed])
            again = check_count((yield Collect([{**specs[k], "group": False} for k in missed])), len(missed))
            results = list(results)
            for k, res in zip(missed, again):
                results[k] = res
        scored = [c.with_scores(**s) for c, s in zip(cands, scores_from_results(results))]
        if self.embed:
            scored = [replace(c, embeddings=e) for c, e in zip(scored, embeddings_from_results(results))]
        out, pos = [], 0
        for n in self.sizes:
            out.append(scored[pos:pos + n])
            pos += n
        return out


def check_count(results: Sequence[Any], expected: int) -> Sequence[Any]:
    """A collect's results, one per spec: a worker that answers fewer (or more) fails the job
    with HookError instead of a ``zip`` dropping candidates silently."""
    if len(results) != expected:
        raise HookError(f"bon-sr hook: the worker answered {len(results)} results for {expected} candidates")
    return results


def score_steps(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                scoring: HiddenStateConfig, *, logit_stats: bool = False, tag: str | None = None,
                embed: bool = False) -> Steps:
    """Score caller-supplied (prompt, response) pairs: teacher-forced prefills, then one collect.
    Returns the score dicts; with ``embed``, ``(score dicts, embeddings)`` (``Candidate.embeddings``
    per pair, from the same rows)."""
    if len(prompt_ids) != len(response_ids):
        raise ValueError("prompt_token_ids and response_token_ids must have the same length")
    tag = tag or new_tag()
    requests, specs = [], []
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        p, r = [int(t) for t in p], [int(t) for t in r]
        if p or r:
            requests.append(score_request(tag, i, p, r, scoring, logit_stats=logit_stats))
        specs.append(collect_spec(tag, i, len(p), len(r), scoring, logit_stats=logit_stats, group=False,
                                  embed=embed))
    if requests:
        yield Generate(requests)
    results = check_count((yield Collect(specs)), len(specs))
    scores = scores_from_results(results)
    return (scores, embeddings_from_results(results)) if embed else scores
