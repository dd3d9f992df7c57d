"""Consensus (MBR) selection: the similarity math against hand-derived values, the ``mbr``
and ``auto`` selectors' rules, and (slow) the product paths on the real default model."""

from __future__ import annotations

import math

import pytest
import torch

from bon_sr.answers import get_extractor
from bon_sr.consensus import UTILITIES, UTILITY_KEY, embedding_summary, get_utility, hidden_similarity, \
    lexical_similarity, mbr_utilities, similarity
from bon_sr.errors import ConfigError
from bon_sr.selection import decide, ranked
from bon_sr.selectors import Pick, get_selector, select
from bon_sr.types import Candidate

NAN = math.nan


def _cands(texts, embeddings=None):
    return [Candidate(text=t, token_ids=(1, 2), index=i, embeddings=None if embeddings is None else embeddings[i])
            for i, t in enumerate(texts)]


# -- similarity math ----------------------------------------------------------------------

def test_lexical_identical_disjoint_and_hand_worked():
    m = lexical_similarity(["The cat sat.", "The cat sat.", "xyz", "a", "ab"])
    assert m[0][1] == pytest.approx(1.0)           # identical texts: chrF 100 -> 1.0
    assert m[0][2] == 0.0 and m[2][0] == 0.0       # no shared character
    # hyp "a", ref "ab": only order 1 has n-grams on both sides; P = 1/1, R = 1/2,
    # F_2 = (1 + 4) P R / (4 P + R) = 2.5 / 4.5 = 0.5556; reversed P = 1/2, R = 1 -> 2.5 / 3
    assert m[3][4] == pytest.approx(2.5 / 4.5)
    assert m[4][3] == pytest.approx(2.5 / 3.0)
    assert lexical_similarity(["", "a"]) == [[0.0, 0.0], [0.0, 1.0]]   # empty text agrees with nothing
    assert lexical_similarity([]) == []


def test_lexical_equals_sacrebleu_chrf():
    sacrebleu = pytest.importorskip("sacrebleu", reason="sacrebleu is the dev extra's reference chrF")
    texts = ["Natalia sold 48 clips in April and 24 in May, so 72 clips.",
             "In May she sold half as many: 48 / 2 = 24. Total: 48 + 24 = 72.",
             "def add(a, b):\n    return a + b\n", "The answer is 72.", "Über straße ñ 数学"]
    m = lexical_similarity(texts)
    chrf = sacrebleu.metrics.CHRF()
    for i, a in enumerate(texts):
        for j, b in enumerate(texts):
            assert m[i][j] == pytest.approx(chrf.sentence_score(a, [b]).score / 100, abs=1e-9), (i, j)


def test_hidden_cosine_hand_worked():
    m = hidden_similarity(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), centred=False)
    torch.testing.assert_close(torch.tensor(m, dtype=torch.float64), torch.tensor([[1.0, 0.0, 0.5 ** 0.5],
                                                              [0.0, 1.0, 0.5 ** 0.5],
                                                              [0.5 ** 0.5, 0.5 ** 0.5, 1.0]], dtype=torch.float64))
    # centred: mean (2/3, 2/3) -> (1/3, -2/3), (-2/3, 1/3), (1/3, 1/3);
    # cos(0, 1) = (-2/9 - 2/9) / (5/9) = -0.8; cos(0, 2) = (-1/9) / (sqrt(5) sqrt(2) / 9) = -1/sqrt(10)
    c = hidden_similarity([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], centred=True)
    assert c[0][1] == pytest.approx(-0.8) and c[1][0] == pytest.approx(-0.8)
    assert c[0][2] == pytest.approx(-(10 ** -0.5))
    # scale invariance; a zero vector is cosine 0 with everything
    s = hidden_similarity([[3.0, 4.0], [30.0, 40.0], [0.0, 0.0]], centred=False)
    assert s[0][1] == pytest.approx(1.0) and s[0][2] == 0.0 and s[2][2] == 0.0


def test_hidden_missing_rows_are_nan_and_left_out_of_centring():
    m = hidden_similarity([[1.0, 0.0], [NAN, 1.0], [0.0, 1.0], [1.0, 1.0]], centred=True)
    assert all(math.isnan(v) for v in m[1]) and math.isnan(m[0][1])
    # centred over rows 0, 2, 3 only: the same numbers as the 3-row case above
    assert m[0][2] == pytest.approx(-0.8) and m[0][3] == pytest.approx(-(10 ** -0.5))
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        hidden_similarity([1.0, 2.0], centred=False)


def test_mbr_utilities_mean_over_the_others():
    m = [[9.0, 0.2, 0.4],
         [0.2, 9.0, 0.6],
         [0.4, 0.6, 9.0]]
    # diagonal ignored: (0.2 + 0.4) / 2, (0.2 + 0.6) / 2, (0.4 + 0.6) / 2
    assert mbr_utilities(m) == pytest.approx([0.3, 0.4, 0.5])
    assert mbr_utilities([[1.0]]) == [0.0]                  # a lone candidate: defined as 0.0
    u = mbr_utilities([[1.0, NAN, 0.5], [NAN, 1.0, NAN], [0.5, NAN, 1.0]])
    assert u[0] == 0.5 and u[2] == 0.5 and math.isnan(u[1])  # NaN entries skipped; none left: NaN
    with pytest.raises(ConfigError, match="N x N"):
        mbr_utilities([[1.0, 0.0], [1.0]])


def test_utility_registry_and_callables():
    assert set(UTILITIES) == {"lexical", "hidden-last", "hidden-mean", "hidden-last-centred", "hidden-mean-centred"}
    with pytest.raises(ConfigError, match="Unknown utility 'bleu'. Available: hidden-last, hidden-last-centred"):
        get_utility("bleu")

    def same_length(a, b):
        return float(len(a) == len(b))

    assert similarity(_cands(["aa", "bb", "c"]), same_length) == [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0],
                                                                   [0.0, 0.0, 1.0]]
    with pytest.raises(ConfigError, match="returned 'x'"):
        similarity(_cands(["a", "b"]), lambda a, b: "x")
    with pytest.raises(ConfigError, match="no 'mean' embedding.*--scorer hf"):
        similarity(_cands(["a", "b"]), "hidden-mean")
    emb = [{"last": (1.0, 0.0), "mean": (0.0, 1.0)}, {"last": (0.0, 1.0), "mean": (0.0, 2.0)}]
    assert similarity(_cands(["a", "b"], emb), "hidden-last")[0][1] == 0.0   # orthogonal
    assert similarity(_cands(["a", "b"], emb), "hidden-mean")[0][1] == pytest.approx(1.0)


def test_embedding_summary():
    rows = torch.tensor([[1.0, 2.0], [3.0, 6.0]], dtype=torch.bfloat16)
    assert embedding_summary(rows) == {"last": (3.0, 6.0), "mean": (2.0, 4.0)}
    empty = embedding_summary(torch.zeros(0, 3))
    assert len(empty["mean"]) == 3 and all(math.isnan(v) for v in empty["last"])


# -- selectors ----------------------------------------------------------------------------

def test_mbr_picks_the_consensus_candidate_and_orders_by_utility():
    texts = ["The total is 72 clips.", "She sold 72 clips in total.", "The total is 72 clips in all.",
             "Purple elephants dance."]
    d = decide(_cands(texts), get_selector("mbr"))
    utilities = [c.scores[UTILITY_KEY] for c in d.candidates]
    assert d.pick.index in (0, 2) and utilities[3] < min(utilities[:3])
    assert d.pick.rule == "mbr lexical"
    assert list(d.pick.order) == sorted(range(4), key=lambda i: (-utilities[i], i))
    _, order = ranked(_cands(texts), get_selector("mbr"), k=4)
    assert order == list(d.pick.order) and order[-1] == 3


def test_mbr_ties_nan_and_missing_matrix():
    spec = get_selector("mbr")
    cands = _cands(["a", "b", "c"])
    tie = [[1.0, 0.5, 0.5], [0.5, 1.0, 0.5], [0.5, 0.5, 1.0]]
    assert select(spec, cands, similarity=tie) == Pick(0, "mbr", (0, 1, 2))           # ties to the lowest index
    nan_row = [[1.0, NAN, NAN], [NAN, 1.0, 0.1], [NAN, 0.1, 1.0]]
    assert select(spec, cands, similarity=nan_row).order == (1, 2, 0)                  # NaN utility ranks last
    all_nan = [[NAN] * 3 for _ in range(3)]
    assert select(spec, cands, similarity=all_nan).index == 0
    with pytest.raises(ConfigError, match="needs the candidates' pairwise similarity"):
        select(spec, cands)
    with pytest.raises(ConfigError, match="2 rows for 3 candidates"):
        select(spec, cands, similarity=tie[:2])


def test_auto_votes_with_enough_answers_else_mbr():
    spec = get_selector("auto")
    numeric = get_extractor("numeric")
    texts = ["so 5", "it is 7", "it is 7", "the answer is 7 apples", "no idea"]
    d = decide(_cands(texts), spec, numeric)
    assert d.pick.index == 1 and d.pick.rule == "auto: majority (4/5 candidates gave an answer)"
    assert all(UTILITY_KEY in c.scores for c in d.candidates)         # utilities reported either way
    few = ["so 5", "hmm", "hmm, hmm", "hmm hmm"]
    d = decide(_cands(few), spec, numeric)
    assert d.pick.rule == "auto: mbr lexical (only 1/4 candidates gave an answer)" and d.pick.index != 0
    half = ["so 5", "7", "hmm", "hmm hmm"]                            # 2/4 answered: at least half votes
    assert decide(_cands(half), spec, numeric).pick.rule == "auto: majority (2/4 candidates gave an answer)"
    d = decide(_cands(texts), spec)
    assert d.pick.rule == "auto: mbr lexical (no answer extractor)"
    assert d.pick.index in (1, 2)
    d = decide(_cands(texts), spec, utility=get_utility(lambda a, b: float(a == b)))
    assert d.pick.index == 1 and d.pick.rule == "auto: mbr <lambda> (no answer extractor)"


def test_to_dict_leaves_embeddings_out_unless_asked():
    c = _cands(["a"], [{"last": (1.0, 2.0), "mean": (0.5, 0.5)}])[0]
    assert "embeddings" not in c.to_dict()
    assert c.to_dict(include_embeddings=True)["embeddings"] == {"last": [1.0, 2.0], "mean": [0.5, 0.5]}
    assert "embeddings" not in _cands(["a"])[0].to_dict(include_embeddings=True)


# -- the API on a tiny random model -------------------------------------------------------

def test_lexical_mbr_through_the_api_runs_no_scoring_pass(tiny_model_dir):
    from bon_sr.api import BestOfN

    bon = BestOfN(tiny_model_dir, backend="hf", selector="mbr", dtype="float32")
    sel = bon.select("Q?", candidates=["The total is 72.", "Purple elephants.", "The total is 72 clips."])
    assert sel.rule == "mbr lexical" and sel.best_index in (0, 2)
    assert bon._scorer is None and all(set(c.scores) == {UTILITY_KEY} for c in sel.candidates)
    assert sel.to_dict()["candidates"][1]["scores"][UTILITY_KEY] == min(c.scores[UTILITY_KEY] for c in sel.candidates)
    assert bon.config_dict()["utility"] == "lexical"


def test_hidden_mbr_embeds_in_the_scoring_forward(tiny_model_dir, tiny_model):
    from bon_sr.api import BestOfN
    from bon_sr.hidden_states import HiddenStateConfig
    from bon_sr.scoring import HFScorer

    bon = BestOfN(tiny_model_dir, backend="hf", selector="mbr", utility="hidden-mean", dtype="float32")
    sel = bon.select("Q?", candidates=["abc", "abd", "xyz", ""])
    prompt = list(sel.prompt_token_ids)
    for c in sel.candidates:
        assert "stable_rank" in c.scores                              # the same pass gave SR
    # the reference: the last layer's post-norm rows of the response, by hand
    c = sel.candidates[1]
    with torch.no_grad():
        h = tiny_model(torch.tensor([prompt + list(c.token_ids)]), output_hidden_states=True).hidden_states[-1][0]
    rows = h[len(prompt):].float()
    torch.testing.assert_close(torch.tensor(c.embeddings["mean"]), rows.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(c.embeddings["last"]), rows[-1], rtol=1e-5, atol=1e-5)
    empty = sel.candidates[3]
    assert math.isnan(empty.scores[UTILITY_KEY]) and sel.best_index != 3       # no rows: ranks last
    expected = mbr_utilities(hidden_similarity([c.embeddings["mean"] for c in sel.candidates], centred=False))
    assert [c.scores[UTILITY_KEY] for c in sel.candidates[:3]] == pytest.approx(expected[:3])
    assert "embeddings" not in sel.to_dict()["candidates"][0]
    # the embeddings do not depend on what the stable rank reads (token set, window)
    scorer = HFScorer(tiny_model, HiddenStateConfig(token_set="full", window=2))
    _, emb = scorer.score_and_embed([prompt], [list(c.token_ids)])
    assert emb[0]["mean"] == pytest.approx(c.embeddings["mean"], abs=1e-5)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(selector="mbr", utility="bleu"), "Unknown utility 'bleu'"),
    (dict(selector="mbr", utility="hidden-mean", score=False), "drop score=False"),
    (dict(backend="vllm", scorer="hook", selector="mbr", utility="hidden-last"), "use scorer='hf'"),
    (dict(backend="vllm", scorer="pooling", selector="auto", utility="hidden-mean-centred"), "use scorer='hf'"),
])
def test_utility_options_are_checked_before_any_model_loads(kwargs, needle):
    from bon_sr.api import BestOfN

    with pytest.raises(ConfigError, match=needle):
        BestOfN("no-such-model", **kwargs)
