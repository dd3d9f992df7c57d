"""Selectors against hand-worked cases, run twice: on the product path (``bon_sr.selection.selectors``
with ``Candidate`` objects) and through the benchmark's weight wrapper (``bench.selectors``
with cached ``Scored`` records). Both must agree because the bench owns no second copy."""

from __future__ import annotations

import math

import pytest

from bon_sr.selection.answers import get_extractor
from bon_sr.bench.selectors import Scored, get_bench_selector
from bon_sr.errors import ConfigError
from bon_sr.selection.selectors import SELECTORS, Pick, argmax, get_selector, select
from bon_sr.types import Candidate

NAN = math.nan

# product name -> (bench name, the bench's key for stable rank)
BENCH = {"stable-rank": "sr-response", "majority": "majority", "majority-sr": "majority-sr-tiebreak",
         "sr-weighted-vote": "sr-weighted-vote", "mean-logprob": "mean-logprob",
         "self-certainty": "self-certainty", "shortest": "shortest"}


def _product(srs, groups=None, lens=None, lp=None):
    lens = lens or [3] * len(srs)
    out = []
    for i, (sr, n) in enumerate(zip(srs, lens)):
        scores = {"stable_rank": sr, "mean_logprob": (lp or srs)[i], "self_certainty": (lp or srs)[i]}
        out.append(Candidate(text="x", token_ids=tuple(range(n)), index=i, scores=scores))
    return out


def _bench(srs, groups=None, lens=None, lp=None):
    lens = lens or [3] * len(srs)
    groups = groups or [-1] * len(srs)
    return [Scored(correct=False, group=g, num_tokens=n,
                   scores={"sr_response": sr, "mean_logprob": (lp or srs)[i], "self_certainty": (lp or srs)[i]})
            for i, (sr, g, n) in enumerate(zip(srs, groups, lens))]


def both(name, srs, groups=None, lens=None, lp=None):
    """The index the product selector picks, checked equal to the bench wrapper's one-hot.
    The bench falls back to the first candidate when nothing has an answer, so compare
    only where answers exist or no answers are needed."""
    spec = get_selector(name)
    pick = select(spec, _product(srs, groups, lens, lp), seed=0,
                  groups=groups if spec.needs_answers else None, fallback="first")
    if name in BENCH:
        w = get_bench_selector(BENCH[name]).fn(_bench(srs, groups, lens, lp))
        assert w == [1.0 if i == pick.index else 0.0 for i in range(len(srs))], (name, w, pick)
    return pick.index


def test_score_selectors_ties_and_nan():
    # 2.5 appears twice: the lower index wins; NaN never wins, even at index 0
    assert both("stable-rank", [1.5, 2.5, 2.5, 1.0]) == 1
    assert both("stable-rank", [NAN, 1.0, 3.0, NAN]) == 2
    assert both("stable-rank", [NAN, NAN]) == 0                     # all NaN: the first
    assert both("mean-logprob", [0.0, 0.0, 0.0], lp=[-2.0, -0.5, NAN]) == 1
    assert both("self-certainty", [0.0, 0.0], lp=[NAN, 4.0]) == 1
    assert both("stable-rank", [7.0]) == 0                          # one candidate
    assert argmax([float("nan"), -math.inf, -1e300]) == 2


def test_length_selectors():
    assert both("shortest", [0, 0, 0, 0], lens=[4, 2, 9, 2]) == 1   # tie 2/2 -> lower index
    assert both("longest", [0, 0, 0], lens=[4, 9, 9]) == 1


def test_majority_hand_worked():
    # answers (classes): 0, 1, 1, 2 -> class 1 has 2 votes; its first member is index 1
    assert both("majority", [0, 0, 0, 0], groups=[0, 1, 1, 2]) == 1
    # classes 1 and 0 tie at 2 votes: the class whose first member comes earliest (class 1 at 0)
    assert both("majority", [0, 0, 0, 0], groups=[1, 0, 0, 1]) == 0
    # unanswered candidates do not vote
    assert both("majority", [0, 0, 0], groups=[-1, -1, 3]) == 2


def test_majority_sr_and_weighted_vote_hand_worked():
    srs = [3.0, 2.0, 2.0, 1.0]
    groups = [0, 1, 1, 0]                 # votes 2 : 2; best SR per class: 3.0 (class 0) vs 2.0
    assert both("majority", srs, groups) == 0          # earliest class
    assert both("majority-sr", srs, groups) == 0       # class 0 has the higher best SR
    groups = [1, 0, 0, 1]                 # class 1 (indices 0, 3) SRs 3+1; class 0 (1, 2) 2+2
    assert both("majority-sr", srs, groups) == 0       # tie on votes, class 1 holds SR 3.0
    # SR sums: class 0 -> 3.0 + 2.0 = 5.0, class 1 -> 2.0 + 2.0 = 4.0 (majority: class 1, 3 votes)
    srs, groups = [3.0, 2.0, 2.0, 2.0, 2.0], [0, 1, 1, 1, 0]
    assert both("majority", srs, groups) == 1
    assert both("sr-weighted-vote", [3.0, 1.0, 1.0, 1.0, 2.0], [0, 1, 1, 1, 0]) == 0   # 5.0 vs 3.0
    # within the winning class the highest-SR member is picked: class 0 = {1: 1.0, 3: 4.0}
    assert both("sr-weighted-vote", [1.0, 1.0, 0.5, 4.0], [1, 0, 1, 0]) == 3
    # a NaN SR counts 0 in the sum and never wins inside its class
    assert both("sr-weighted-vote", [NAN, 1.0, 0.4, 0.4], [0, 0, 1, 1]) == 1


def test_voting_without_answers_falls_back_and_says_so():
    cands = _product([1.0, 5.0, 2.0])
    pick = select(get_selector("majority"), cands, groups=[-1, -1, -1])
    assert pick == Pick(0, "fallback: first (no candidate had an answer)")
    pick = select(get_selector("majority-sr"), cands, groups=[-1, -1, -1])
    assert pick.index == 1 and pick.rule.startswith("fallback: stable-rank")
    assert select(get_selector("majority"), cands, groups=[-1, 2, -1]).rule == "majority"
    with pytest.raises(ConfigError, match="needs each candidate's answer"):
        select(get_selector("majority"), cands)


def test_registry_and_user_callables():
    assert list(SELECTORS) == sorted(SELECTORS)
    assert {"stable-rank", "random", "first", "shortest", "longest", "majority", "majority-sr",
            "sr-weighted-vote", "self-certainty", "mean-logprob"} <= set(SELECTORS)
    with pytest.raises(ConfigError, match="Unknown selector 'best'. Available: auto, first, longest, majority"):
        get_selector("best")

    def last(candidates, **kwargs):
        return len(candidates) - 1

    spec = get_selector(last)
    assert spec.name == "last" and spec.needs_scores is None      # unknown: score everything
    assert select(spec, _product([1.0, 2.0, 3.0])) == Pick(2, "last")
    with pytest.raises(ConfigError, match="returned index 5"):
        select(get_selector(lambda c, **k: 5), _product([1.0]))
    with pytest.raises(ConfigError, match="returns a candidate index"):
        select(get_selector(lambda c, **k: "0"), _product([1.0]))
    with pytest.raises(ConfigError, match="zero candidates"):
        get_selector("first").fn([])


def test_answer_extractors_group_equal_answers():
    numeric = get_extractor("numeric")
    answers = [numeric.extract(t) for t in ["so 1,000 apples", "The answer is 1000.", "#### 12", "no idea"]]
    assert answers == ["1000", "1000", "12", None]
    assert numeric.group(answers) == [0, 0, 1, -1]
    regex = get_extractor(regex=r"answer is (\w+)")
    answers = [regex.extract(t) for t in ["the answer is Paris", "answer is paris.", "Lyon"]]
    assert answers == ["Paris", "paris", None]
    assert regex.group(answers) == [0, 0, -1]                      # case and whitespace normalised
    custom = get_extractor(lambda text: text[:1] or None)
    assert custom.group([custom.extract(t) for t in ["ab", "ac", ""]]) == [0, 0, -1]
    with pytest.raises(ConfigError, match="Unknown answer extractor 'roman'"):
        get_extractor("roman")
    with pytest.raises(ConfigError, match="either"):
        get_extractor("numeric", regex="x")
