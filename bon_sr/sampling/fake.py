"""A sampler for tests: returns responses from a callable instead of a model.

Knows nothing about models; tokenises the fake responses with the given tokenizer.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from ..types import Candidate


class FakeSampler:
    """``responses(prompt_token_ids, n, seed) -> list[str]`` supplies each prompt's texts."""

    def __init__(self, tokenizer: Any, responses: Callable[[Sequence[int], int, int], list[str]]):
        self.tokenizer = tokenizer
        self.responses = responses

    def sample(
        self, prompt_token_ids: Sequence[Sequence[int]], *, n: int, seeds: Sequence[int]
    ) -> list[list[Candidate]]:
        out = []
        for ids, seed in zip(prompt_token_ids, seeds):
            texts = self.responses(ids, n, seed)
            out.append([
                Candidate(text=t, token_ids=tuple(self.tokenizer(t, add_special_tokens=False)["input_ids"]),
                          index=i, finish_reason="stop")
                for i, t in enumerate(texts)
            ])
        return out
