"""Consensus (MBR) similarities for the benchmark: the sidecar cache and per-subset matrices.

The bench evaluates a selector on subsets of a problem's cached candidates, so an MBR pick
at n needs the similarities among just those n. Two kinds:

- ``lexical`` (chrF, ``bon_sr.selection.consensus.lexical_similarity``): computed from the cached
  texts whenever a report is made; a pair's chrF does not depend on the other candidates,
  so a subset's matrix is the sub-matrix of the full one. Nothing is stored.
- ``ngram`` (bench-only, a candidate for the product): token n-gram F1, the mean over
  n = 1..4 of the F1 of the two responses' multisets of token-id n-grams; symmetric, from
  the cached token ids; computed like ``lexical``.
- ``hidden-*`` (cosine of last-layer embeddings, ``bon_sr.selection.consensus.hidden_similarity``):
  the vectors (d floats per candidate) are not cached. The sidecar
  ``cache/<task>.consensus.json`` keeps, per problem and embedding ("last", "mean"), the
  N x N GRAM matrix of the raw float32 vectors (inner products in float64, 9 significant
  digits). Raw cosines are ``G_ij / sqrt(G_ii G_jj)``; the centred variants centre over the
  SUBSET being evaluated (as the product centres over the candidates it is given), which
  the Gram matrix gives exactly by double centring:
  ``(v_i - m).(v_j - m) = G_ij - mean_k G_ik - mean_k G_kj + mean_kl G_kl`` over the
  subset's valid rows.

The embedding pass (``bench.embeddings``, run by ``bon-sr bench
--embeddings``) fills the sidecar only for problems with MIXED correctness: elsewhere every
candidate is equally right, so no pick changes the accuracy. On those other problems a
hidden-state MBR column counts the expected value of a uniform pick (the same accuracy; its
selected length and truncation are the mean of the candidates', not the pick's).

This module knows nothing about models or how the embeddings were made.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..selection.consensus import UTILITIES, lexical_similarity
from ..errors import ConfigError, InputError
from ..jsonl import write_text_atomic
from .selectors import BENCH_SELECTORS, GREEDY, needs_embeddings

SIDECAR_VERSION = 1
Matrix = list[list[float]]
#: bench-only utilities, measured beside the product's ``bon_sr.selection.consensus.UTILITIES``
BENCH_UTILITIES = ("ngram",)
NGRAM_MAX = 4


def ngram_f1_similarity(sequences: Sequence[Sequence[int]], max_n: int = NGRAM_MAX) -> Matrix:
    """``(N, N)`` token n-gram F1: for each pair, the mean over n = 1..max_n of
    ``2 |A_n & B_n| / (|A_n| + |B_n|)`` (multiset n-grams; 0 for an n either lacks)."""
    from collections import Counter

    grams = [[Counter(tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)) for n in range(1, max_n + 1)]
             for seq in sequences]
    out: Matrix = [[0.0] * len(grams) for _ in grams]
    for i, a in enumerate(grams):
        for j in range(i, len(grams)):
            b = grams[j]
            total = 0.0
            for x, y in zip(a, b):
                size = sum(x.values()) + sum(y.values())
                if size:
                    total += 2.0 * sum((x & y).values()) / size
            out[i][j] = out[j][i] = total / max_n
    return out


def sidecar_path(cache_path: Path) -> Path:
    """``cache/<task>.jsonl`` -> ``cache/<task>.consensus.json``."""
    cache_path = Path(cache_path)
    return cache_path.with_name(cache_path.name.removesuffix(".jsonl") + ".consensus.json")


def gram_matrix(vectors: Sequence[Sequence[float]]) -> Matrix:
    """``(N, d)`` -> the ``(N, N)`` inner products in float64, 9 significant digits; a
    vector with a non-finite value (an empty response) gives a NaN row and column."""
    v = np.asarray(vectors, dtype=np.float64)
    valid = np.isfinite(v).all(axis=1)
    v = np.where(valid[:, None], v, 0.0)
    g = v @ v.T
    g[~valid, :] = math.nan
    g[:, ~valid] = math.nan
    return [[float(f"{x:.9g}") for x in row] for row in g]


def gram_cosine(gram: Sequence[Sequence[float]], index: Sequence[int], *, centred: bool) -> Matrix:
    """Cosine similarities of the candidates ``index`` (a subset, in order) from their
    Gram matrix: ``(len(index), len(index))``, equal to
    ``bon_sr.selection.consensus.hidden_similarity(vectors[index], centred=centred)``: NaN for a
    missing vector, left out of the centring mean; a zero vector has cosine 0."""
    g = np.asarray(gram, dtype=np.float64)[np.ix_(index, index)]
    valid = np.isfinite(np.diag(g))
    g = np.where(valid[:, None] & valid[None, :], g, 0.0)
    if centred and valid.any():
        a = g[:, valid].mean(axis=1)
        c = a[valid].mean()
        g = g - a[:, None] - a[None, :] + c
        g[~valid, :] = 0.0
        g[:, ~valid] = 0.0
    norms = np.sqrt(np.clip(np.diag(g), 0.0, None))
    norms = np.maximum(norms, 1e-30)
    sim = g / norms[:, None] / norms[None, :]
    sim[~(valid[:, None] & valid[None, :])] = math.nan
    return sim.tolist()


@dataclass
class Similarities:
    """One problem's similarity sources: its candidate texts and, if the embedding pass
    reached it, the Gram matrix of each embedding."""

    texts: Sequence[str]
    grams: Mapping[str, Matrix] = field(default_factory=dict)
    token_ids: Sequence[Sequence[int]] = ()
    _full: dict[str, Matrix] = field(default_factory=dict)

    def available(self, utility: str) -> bool:
        if utility in BENCH_UTILITIES:
            return True
        u = UTILITIES[utility]
        return u.embedding is None or u.embedding in self.grams

    def matrix(self, utility: str, index: Sequence[int]) -> Matrix:
        """The ``utility`` similarities among the candidates ``index`` (a subset, in order)."""
        if utility in BENCH_UTILITIES or UTILITIES[utility].embedding is None:
            # pairwise utilities: a subset's matrix is the full matrix's sub-matrix
            if utility not in self._full:
                self._full[utility] = (ngram_f1_similarity(self.token_ids) if utility == "ngram"
                                       else lexical_similarity(list(self.texts)))
            full = self._full[utility]
            return [[full[i][j] for j in index] for i in index]
        u = UTILITIES[utility]
        return gram_cosine(self.grams[u.embedding], index, centred=u.centred)


class ConsensusCache:
    """The similarity sidecar of one task's cache, read once; ``for_record`` gives a
    problem's ``Similarities``."""

    def __init__(self, cache_path: Path):
        self.path = sidecar_path(cache_path)
        self.data: dict[str, Any] = {"version": SIDECAR_VERSION, "gram": {}}
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text())
            except json.JSONDecodeError as exc:
                raise InputError(f"{self.path} is not valid JSON ({exc}); delete it and rerun the embedding "
                                 "pass (bon-sr bench --no-generate --embeddings).") from None
            if self.data.get("version") != SIDECAR_VERSION:
                raise InputError(f"{self.path} has version {self.data.get('version')}, this bon-sr reads "
                                 f"{SIDECAR_VERSION}; delete it and rerun the embedding pass.")

    @property
    def grams(self) -> dict[str, dict[str, Matrix]]:
        """embedding key -> problem id -> Gram matrix."""
        return self.data.setdefault("gram", {})

    def has(self, problem_id: str) -> bool:
        return all(str(problem_id) in by_id for by_id in self.grams.values()) and bool(self.grams)

    def for_record(self, rec: Mapping[str, Any]) -> Similarities:
        pid = str(rec["id"])
        grams = {key: by_id[pid] for key, by_id in self.grams.items() if pid in by_id}
        return Similarities([c["text"] for c in rec["candidates"]], grams, [c["token_ids"] for c in rec["candidates"]])

    def put(self, problem_id: str, grams: Mapping[str, Matrix], info: Mapping[str, Any]) -> None:
        for key, g in grams.items():
            self.grams.setdefault(key, {})[str(problem_id)] = g
        self.data.setdefault("info", {}).update(info)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps(self.data, separators=(",", ":")) + "\n")


def attach_similarities(rec: Mapping[str, Any], cands: Sequence[Any], cache: "ConsensusCache | None") -> list[Any]:
    """A problem's ``bench.selectors.Scored`` candidates with their positions and the
    problem's ``Similarities`` (lexical only when ``cache`` is None)."""
    sims = cache.for_record(rec) if cache is not None else Similarities(
        [c["text"] for c in rec["candidates"]], token_ids=[c["token_ids"] for c in rec["candidates"]])
    return [replace(c, index=i, similarities=sims) for i, c in enumerate(cands)]


@dataclass(frozen=True)
class Coverage:
    """Which problems with mixed correctness the sidecar holds hidden-state similarities for."""

    mixed: int
    embedded: int
    problems: int

    @property
    def complete(self) -> bool:
        return self.embedded == self.mixed and self.mixed > 0 or self.mixed == 0

    @property
    def note(self) -> str:
        if self.complete:
            return (f"Hidden-state MBR columns: embeddings of the {self.mixed} problems with mixed correctness "
                    f"(the only ones where a pick can change the accuracy); on the other "
                    f"{self.problems - self.mixed} they count a uniform pick (same accuracy; length and cut "
                    "columns are the candidates' mean there).")
        return (f"Hidden-state MBR columns not reported: the similarity sidecar holds {self.embedded} of the "
                f"{self.mixed} problems with mixed correctness; run bon-sr bench --no-generate --embeddings.")

    def usable(self, selectors: Sequence[str]) -> list[str]:
        """``selectors`` without the hidden-state ones when they cannot be evaluated: dropped
        from the default list, refused when asked for by name."""
        if self.complete:
            return list(selectors)
        hidden = [s for s in selectors if needs_embeddings(s)]
        if hidden and tuple(selectors) != tuple(sorted([*BENCH_SELECTORS, GREEDY])):
            raise ConfigError(f"{', '.join(hidden)} need hidden-state similarities for every problem with mixed "
                              f"correctness; {self.note.split(': ', 1)[1]}")
        return [s for s in selectors if s not in hidden]


def hidden_coverage(cache: ConsensusCache, mixed_ids: Sequence[str], problems: int) -> Coverage:
    """Coverage of the problems ``mixed_ids`` (those with mixed correctness) of ``problems``."""
    return Coverage(len(mixed_ids), sum(cache.has(str(i)) for i in mixed_ids), problems)
