"""Plain data passed between the pipeline steps, and the Protocols each step implements.

This module knows nothing about models, tensors or backends: it only names the records
that flow prompts -> sampler -> candidates -> scorer -> selector -> Selection.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping, Protocol, Sequence, Union

Message = Mapping[str, str]
#: A prompt is plain text (wrapped in the chat template as one user turn) or a chat.
PromptInput = Union[str, Sequence[Message]]


@dataclass(frozen=True)
class Candidate:
    """One sampled (or caller-supplied) response.

    ``token_ids`` are exactly the ids the scorer sees as the response: for sampled
    candidates they are the generated ids (end-of-sequence token removed), never a
    re-tokenisation of ``text``. ``answer`` and ``vote_share`` (the fraction of the
    candidates with an answer that gave this one) are set when an answer extractor ran.
    ``embeddings`` holds, when a hidden consensus utility asked the scorer for them, the
    frozen model's last-layer post-norm float32 vectors: ``"last"`` (the last response
    token's row) and ``"mean"`` (the mean of the response rows); ``to_dict`` leaves them
    out unless ``include_embeddings``. ``stop_token`` is the id of the EOS (or stop) token
    that ended a sampled candidate and was left out of ``token_ids``: the model generated
    it, so ``generated_tokens`` (what OpenAI's ``usage.completion_tokens`` counts, as vLLM's
    server does) includes it while ``num_tokens`` (the selectors' and scorers' length) does
    not. None when no such token ended it (a length cut, a stop string, whose tokens stay in
    ``token_ids``, or a caller-supplied candidate); ``to_dict`` leaves it out.
    """

    text: str
    token_ids: tuple[int, ...]
    index: int = 0
    finish_reason: str | None = None
    logprobs: tuple[float, ...] | None = None
    scores: Mapping[str, float] = field(default_factory=dict)
    answer: str | None = None
    vote_share: float | None = None
    embeddings: Mapping[str, tuple[float, ...]] | None = None
    #: with an answer format that runs code (``python``): whether the candidate passed every
    #: example, and each example's result (status, error type, value repr; capped)
    passed: bool | None = None
    checks: tuple[Mapping[str, Any], ...] | None = None
    #: the greedy decode added to the sampled candidates (``include_greedy``)
    greedy: bool = False
    stop_token: int | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def generated_tokens(self) -> int:
        """The tokens the model generated for this candidate: ``num_tokens`` plus the EOS /
        stop token that ended it (``stop_token``), as vLLM's OpenAI server counts usage."""
        return self.num_tokens + (self.stop_token is not None)

    def undefined_scores(self) -> dict[str, str]:
        """Why each non-finite score is undefined (JSON writes it as null): score key -> reason."""
        out = {}
        for key, value in self.scores.items():
            if isinstance(value, float) and not math.isfinite(value):
                out[key] = _why_undefined(key, value, self.num_tokens)
        return out

    def with_scores(self, **scores: float) -> "Candidate":
        merged = dict(self.scores)
        merged.update({k: float(v) for k, v in scores.items()})
        return replace(self, scores=merged)

    def to_dict(self, *, include_token_ids: bool = True, include_embeddings: bool = False) -> dict[str, Any]:
        out = asdict(replace(self, embeddings=None))
        del out["stop_token"]
        if include_embeddings and self.embeddings is not None:
            out["embeddings"] = {k: list(v) for k, v in self.embeddings.items()}
        else:
            del out["embeddings"]
        out["token_ids"] = list(self.token_ids) if include_token_ids else None
        if not include_token_ids:
            del out["token_ids"]
        if self.logprobs is None:
            del out["logprobs"]
        else:
            out["logprobs"] = list(self.logprobs)
        out["scores"] = dict(self.scores)
        undefined = self.undefined_scores()
        if undefined:
            out["undefined_scores"] = undefined
        out["num_tokens"] = self.num_tokens
        for key in ("answer", "vote_share", "passed", "checks"):
            if out[key] is None:
                del out[key]
        if self.checks is not None:
            out["checks"] = [dict(c) for c in self.checks]
        if not self.greedy:
            del out["greedy"]
        return out


def _why_undefined(key: str, value: float, num_tokens: int) -> str:
    if key == "mbr_utility":  # selection.consensus.UTILITY_KEY (types sits below selection)
        return ("no defined similarity to another candidate (an empty response has no embedding to compare); "
                "it ranks last")
    if num_tokens == 0:
        return "empty response: no token to score"
    return f"not a finite number ({value})"


@dataclass(frozen=True)
class Selection:
    """The outcome for one prompt: every candidate with its scores, and the winner.

    ``rule`` says what decided (the selector's name, or e.g. "fallback: first (no candidate
    had an answer)"); ``votes`` maps each answer to its number of candidates when voting.
    """

    prompt: PromptInput
    prompt_token_ids: tuple[int, ...]
    candidates: tuple[Candidate, ...]
    best_index: int
    selector: str
    model: str = ""
    rule: str = ""
    votes: Mapping[str, int] | None = None

    @property
    def best(self) -> Candidate:
        return self.candidates[self.best_index]

    @property
    def response(self) -> str:
        return self.best.text

    def to_dict(self, *, keep_candidates: bool = True, include_token_ids: bool = True,
                include_embeddings: bool = False) -> dict[str, Any]:
        prompt = self.prompt if isinstance(self.prompt, str) else [dict(m) for m in self.prompt]
        out: dict[str, Any] = {
            "prompt": prompt,
            "response": self.response,
            "best_index": self.best_index,
            "selector": self.selector,
            "rule": self.rule or self.selector,
            "model": self.model,
            "scores": dict(self.best.scores),
            "num_candidates": len(self.candidates),
        }
        undefined = self.best.undefined_scores()
        if undefined:
            out["undefined_scores"] = undefined
        if self.votes is not None:
            out["answer"] = self.best.answer
            out["votes"] = dict(self.votes)
        if keep_candidates:
            out["candidates"] = [c.to_dict(include_token_ids=include_token_ids, include_embeddings=include_embeddings)
                                 for c in self.candidates]
        return out


class Sampler(Protocol):
    """Draws ``n`` candidates for each already-tokenised prompt."""

    def sample(
        self, prompt_token_ids: Sequence[Sequence[int]], *, n: int, seeds: Sequence[int]
    ) -> list[list[Candidate]]: ...


class Scorer(Protocol):
    """Scores (prompt ids, response ids) pairs; returns one dict of named scores per pair."""

    def score(
        self, prompt_token_ids: Sequence[Sequence[int]], response_token_ids: Sequence[Sequence[int]]
    ) -> list[dict[str, float]]: ...


class Selector(Protocol):
    """Picks the index of the best candidate from their scores (plain callable)."""

    def __call__(self, candidates: Sequence[Candidate], **kwargs: Any) -> int: ...
