"""Sampling with transformers ``generate``.

One ``generate`` call per prompt (chunked for large n) under a per-prompt seed: the
candidates of a prompt then do not depend on which other prompts share the run, so a
resumed run reproduces an uninterrupted one. Knows nothing about scoring.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from ..types import Candidate
from . import SamplingConfig, truncate_at_stop

logger = logging.getLogger(__name__)


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    gen_cfg = getattr(model, "generation_config", None)
    for source in (getattr(gen_cfg, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if source is None:
            continue
        ids.update(source if isinstance(source, (list, tuple)) else [source])
    return ids


class HFSampler:
    """Draws candidates with ``model.generate``."""

    def __init__(self, model: Any, tokenizer: Any, config: SamplingConfig, *, max_batch: int = 16):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.max_batch = max(1, max_batch)
        self.eos_ids = eos_token_ids(model, tokenizer)

    def sample(
        self, prompt_token_ids: Sequence[Sequence[int]], *, n: int | None = None, seeds: Sequence[int]
    ) -> list[list[Candidate]]:
        n = self.config.n if n is None else n
        return [self._sample_one(ids, n, seed) for ids, seed in zip(prompt_token_ids, seeds)]

    def _sample_one(self, prompt_ids: Sequence[int], n: int, seed: int) -> list[Candidate]:
        cfg = self.config
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = min(self.eos_ids) if self.eos_ids else 0
        rows: list[list[int]] = []
        done = 0
        chunk_no = 0
        while done < n:
            k = min(self.max_batch, n - done)
            kwargs: dict[str, Any] = dict(
                max_new_tokens=cfg.max_new_tokens,
                num_return_sequences=k,
                pad_token_id=pad_id,
                attention_mask=torch.ones_like(input_ids),
            )
            if cfg.greedy:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            else:
                kwargs.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0)
            if cfg.stop:
                kwargs.update(stop_strings=list(cfg.stop), tokenizer=self.tokenizer)
            # transformers' generate draws from torch's global generator and takes no other, so
            # each chunk seeds it inside fork_rng, which restores the caller's RNG state after:
            # sampling leaves the caller's random stream as it found it. Each chunk's seed derives
            # from the prompt's, so n=64 drawn in chunks of 16 is reproducible.
            cuda = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda), torch.inference_mode():
                torch.manual_seed(seed + 1_000_003 * chunk_no)
                out = self.model.generate(input_ids, **kwargs)
            rows.extend(out[:, input_ids.shape[1]:].tolist())
            done += k
            chunk_no += 1
        return [self._to_candidate(i, row) for i, row in enumerate(rows)]

    def _to_candidate(self, index: int, row: list[int]) -> Candidate:
        finish, stop_token = "length", None
        for pos, tok in enumerate(row):
            if tok in self.eos_ids:
                row, stop_token = row[:pos], int(tok)
                finish = "stop"
                break
        text = self.tokenizer.decode(row, skip_special_tokens=True)
        if self.config.stop:
            text, hit = truncate_at_stop(text, self.config.stop)
            if hit:
                finish = "stop"
        return Candidate(text=text, token_ids=tuple(row), index=index, finish_reason=finish, stop_token=stop_token)
