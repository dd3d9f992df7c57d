"""Consensus utilities: how alike two candidates are, for Minimum Bayes Risk (MBR) selection.

MBR picks the candidate that agrees most with the other candidates of its prompt: each
candidate's utility is its mean similarity to the others (``mbr_utilities``), and the
``mbr`` selector (``bon_sr.selection.selectors``) takes the highest. A similarity is one of

- ``lexical``: chrF (Popovic 2015; character n-grams up to 6, beta 2, whitespace removed)
  computed by ``fastchrf``, a maintained Rust implementation written for MBR's pairwise
  comparisons, scaled from chrF's 0..100 to 0..1. It equals sacrebleu's sentence chrF
  (tests/test_consensus.py checks both on the same texts); fastchrf is used because it
  scores all N x N pairs in one call without re-extracting each text's n-grams per pair.
  chrF is not symmetric (beta 2 weighs recall): ``matrix[i][j]`` scores candidate i as the
  hypothesis against candidate j as the reference, the MBR convention. An empty text has
  chrF 0 against everything, itself included.
- ``hidden-last`` / ``hidden-mean`` (and ``-centred``): cosine similarity of per-candidate
  embeddings from the frozen model's last layer, post-norm, float32: the last response
  token's row (``Candidate.embeddings["last"]``) or the mean of the response rows
  (``["mean"]``), optionally centred by subtracting the mean embedding of the prompt's
  candidates first (removes the direction every candidate shares, so the cosine measures
  how candidates differ from each other). The scorer fills ``Candidate.embeddings``.
- a user callable ``utility(a: str, b: str) -> float`` on the two texts.

Every function returns plain nested lists (N x N, row = candidate), so callers (selectors,
the benchmark's cache) need no tensors. NaN marks an undefined similarity (a candidate
without a usable embedding); ``mbr_utilities`` skips NaN entries and a candidate with no
defined similarity gets a NaN utility, which ranks last in every selector.

This module knows nothing about models, sampling or which candidate wins. numpy and
fastchrf are imported where used, so importing it (and ``bon_sr.selection.selectors``) stays light.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

from ..errors import ConfigError, OptionError

#: a user's similarity of two candidate texts (higher = more alike)
UtilityFn = Callable[[str, str], float]
#: what ``utility=`` accepts: a name from ``UTILITIES`` or a callable
UtilityInput = Union[str, UtilityFn]
#: the embedding keys a scorer may put on ``Candidate.embeddings``
EMBEDDING_KEYS = ("last", "mean")
#: the score key under which each candidate's MBR utility is reported
UTILITY_KEY = "mbr_utility"

Matrix = list[list[float]]


def _texts(candidates: Sequence[Any]) -> list[str]:
    return [c if isinstance(c, str) else c.text for c in candidates]


def _empty(candidate: Any) -> bool:
    """No response token (or, for an object without a token count, no text)."""
    ids = getattr(candidate, "token_ids", None)
    if ids is not None:
        return len(ids) == 0
    count = getattr(candidate, "num_tokens", None)
    if count is not None:
        return int(count) == 0
    return not (candidate if isinstance(candidate, str) else getattr(candidate, "text", ""))


def lexical_similarity(texts: Sequence[str]) -> Matrix:
    """chrF between every pair of ``texts`` (N strings) scaled to [0, 1]: ``(N, N)``,
    ``matrix[i][j]`` = chrF(hypothesis ``texts[i]``, reference ``texts[j]``) / 100.
    Identical non-empty texts give 1.0; texts sharing no character n-gram give 0.0."""
    if not texts:
        return []
    from fastchrf import pairwise_chrf  # a dependency of bon-sr, imported only when used

    texts = [str(t) for t in texts]
    return [[v / 100.0 for v in row] for row in pairwise_chrf([texts], [texts])[0]]


def hidden_similarity(vectors: Any, *, centred: bool) -> Matrix:
    """Cosine similarity of every pair of embeddings: ``vectors (N, d)`` (a float tensor,
    an array or nested lists) -> ``(N, N)`` in [-1, 1], computed in float64.

    centred: subtract the mean of the N vectors first (the group's shared direction).
    A row with a non-finite value is missing: its similarities are NaN and it is left out
    of the centring mean. A zero vector (or a lone candidate after centring) has cosine 0
    with everything."""
    import numpy as np

    # numpy, not torch: for N x d this small, torch's thread pool costs more than the
    # product (measured on the shared 2-core machine: 16 ms vs 0.3 ms for N = 64, d = 1536)
    if hasattr(vectors, "detach"):
        import torch

        vectors = vectors.detach().to("cpu", torch.float64).numpy()
    v = np.array(vectors, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"vectors must be (N, d), got shape {v.shape}")
    valid = np.isfinite(v).all(axis=1)
    v[~valid] = 0.0
    if centred and valid.any():
        v -= v[valid].mean(axis=0, keepdims=True)
    v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-30)
    sim = v @ v.T
    sim[~(valid[:, None] & valid[None, :])] = math.nan
    return sim.tolist()


def callable_similarity(texts: Sequence[str], fn: UtilityFn) -> Matrix:
    """``(N, N)`` with ``matrix[i][j] = fn(texts[i], texts[j])`` (the diagonal too)."""
    out: Matrix = []
    name = getattr(fn, "__name__", "utility")
    for a in texts:
        row = []
        for b in texts:
            value = fn(a, b)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"utility '{name}' returned {value!r}; a utility returns a float similarity.")
            row.append(float(value))
        out.append(row)
    return out


def mbr_utilities(matrix: Sequence[Sequence[float]]) -> list[float]:
    """Each candidate's mean similarity to the OTHER candidates: ``(N, N) -> (N,)``,
    the diagonal ignored. NaN entries are skipped; a candidate with no defined similarity
    gets NaN (it ranks last). A lone candidate (N = 1) has no one to agree with: 0.0."""
    n = len(matrix)
    if any(len(row) != n for row in matrix):
        raise ConfigError(f"the similarity matrix must be N x N, got {n} rows of lengths "
                          f"{sorted({len(row) for row in matrix})}.")
    if n == 1:
        return [0.0]
    out = []
    for i, row in enumerate(matrix):
        values = [float(v) for j, v in enumerate(row) if j != i and not math.isnan(float(v))]
        out.append(sum(values) / len(values) if values else math.nan)
    return out


@dataclass(frozen=True)
class Utility:
    """A similarity between candidates: ``embedding`` names the ``Candidate.embeddings``
    key it reads (None: it reads the texts); ``fn`` is a user's text callable. A candidate
    without the embedding has NaN similarities (it ranks last); when none has one and some
    are not empty, the scorer computed none: a ConfigError, unless ``missing_ok``."""

    name: str
    description: str
    embedding: str | None = None
    centred: bool = False
    fn: UtilityFn | None = None
    #: a candidate set where NO candidate has an embedding is undefined too, not an error
    #: (the server: the hook is its only scorer, so that is the model's doing, not the client's)
    missing_ok: bool = False

    @property
    def needs_embeddings(self) -> bool:
        return self.embedding is not None

    def matrix(self, candidates: Sequence[Any]) -> Matrix:
        if self.fn is not None:
            return callable_similarity(_texts(candidates), self.fn)
        if self.embedding is None:
            return lexical_similarity(_texts(candidates))
        vectors = [(getattr(c, "embeddings", None) or {}).get(self.embedding) for c in candidates]
        if not self.missing_ok and all(v is None for v in vectors):
            # no candidate has one: a scorer that computes none (an empty response alone has none)
            for i, c in enumerate(candidates):
                if not _empty(c):
                    raise ConfigError(f"candidate {i} has no '{self.embedding}' embedding, which utility "
                                      f"'{self.name}' compares: the hf and hook scorers compute embeddings in their "
                                      "scoring pass (scorer='hf' or 'hook', --scorer hf|hook); or use --utility "
                                      "lexical.")
        # a candidate without an embedding (an empty response has no rows to embed; a worker
        # holding none answers None) has no defined similarity: NaN, so it ranks last
        if not vectors:
            return []
        width = next((len(v) for v in vectors if v is not None), 1)
        vectors = [[math.nan] * width if v is None else v for v in vectors]
        return hidden_similarity(vectors, centred=self.centred)


UTILITIES: dict[str, Utility] = {u.name: u for u in [
    Utility("hidden-last", "cosine of the last response token's last-layer state", "last"),
    Utility("hidden-last-centred", "cosine of the last response token's state, group mean removed", "last", True),
    Utility("hidden-mean", "cosine of the mean last-layer state over the response", "mean"),
    Utility("hidden-mean-centred", "cosine of the mean response state, group mean removed", "mean", True),
    Utility("lexical", "chrF of the texts (character n-grams; no hidden states needed)"),
]}
DEFAULT_UTILITY = "lexical"


def get_utility(utility: UtilityInput | Utility = DEFAULT_UTILITY) -> Utility:
    """The registry entry for a name, or a ``Utility`` wrapping a user's text callable."""
    if isinstance(utility, Utility):
        return utility
    if callable(utility):
        return Utility(getattr(utility, "__name__", "custom"), "user utility", fn=utility)
    try:
        return UTILITIES[utility]
    except (KeyError, TypeError):
        raise OptionError("utility", f"Unknown utility '{utility}'. Available: {', '.join(sorted(UTILITIES))}, "
                          "or a callable utility(a, b) -> float in the API.") from None


def similarity(candidates: Sequence[Any], utility: UtilityInput | Utility = DEFAULT_UTILITY) -> Matrix:
    """``(N, N)`` similarities of ``candidates`` (objects with ``.text``, and ``.embeddings``
    for the hidden utilities; plain strings work for text utilities) under ``utility``."""
    return get_utility(utility).matrix(candidates)
