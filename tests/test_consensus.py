"""Consensus (MBR) selection: the similarity math against hand-derived values, the ``mbr``
and ``auto`` selectors' rules, and (slow) the product paths on the real default model."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import sr_in_range

from bon_sr.selection.answers import get_extractor
from bon_sr.selection.consensus import UTILITIES, UTILITY_KEY, get_utility, hidden_similarity, lexical_similarity, \
    mbr_utilities, similarity
from bon_sr.errors import ConfigError
from bon_sr.scoring.scorers import SR_KEYS
from bon_sr.selection.decide import decide, ranked
from bon_sr.selection.selectors import Pick, get_selector, select
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
    import sacrebleu  # the dev extra's reference chrF (required: tests/conftest.py)

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
    from bon_sr.scoring.hidden_states import embedding_summary

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

def test_lexical_mbr_through_the_api_runs_no_scoring_pass(tiny_model_dir, monkeypatch):
    from bon_sr.api import BestOfN
    from bon_sr.scoring.scorers import HFScorer

    def no_scorer(*args, **kwargs):
        raise AssertionError("lexical MBR built a hidden-state scorer")

    monkeypatch.setattr(HFScorer, "__init__", no_scorer)
    bon = BestOfN(tiny_model_dir, backend="hf", selector="mbr", dtype="float32")
    sel = bon.select("Q?", candidates=["The total is 72.", "Purple elephants.", "The total is 72 clips."])
    assert sel.rule == "mbr lexical" and sel.best_index in (0, 2)
    assert not bon.scores_needed and all(set(c.scores) == {UTILITY_KEY} for c in sel.candidates)
    assert sel.to_dict()["candidates"][1]["scores"][UTILITY_KEY] == min(c.scores[UTILITY_KEY] for c in sel.candidates)
    assert bon.config_dict()["utility"] == "lexical"


def test_hidden_mbr_embeds_in_the_scoring_forward(tiny_model_dir, tiny_model):
    from bon_sr.api import BestOfN
    from bon_sr.scoring.hidden_states import HiddenStateConfig
    from bon_sr.scoring.scorers import HFScorer

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


@pytest.mark.vllm
def test_hidden_utility_with_vllm_and_scorer_auto_embeds_in_the_hook(tiny_model_dir):
    from bon_sr.api import BestOfN

    # the vLLM engines start lazily: building the sampler starts none
    with BestOfN(tiny_model_dir, backend="vllm", selector="mbr", utility="hidden-last", dtype="float32") as bon:
        assert bon.scorer_name == "hook" and bon.config_dict()["scorer"] == "hook"
        assert bon.sampler.embed is True and bon.sampler.scoring is not None     # embeddings from the sampling pass
        assert bon.vllm_engines.started == set()
    # lexical consensus needs no embeddings; the hook still gives stable rank (free in the sampling
    # pass) unless told not to score: then a plain sampler
    with BestOfN(tiny_model_dir, backend="vllm", selector="mbr", utility="lexical", dtype="float32") as bon:
        assert bon.scores_needed and bon.sampler.scoring is not None and bon.sampler.embed is False
    with BestOfN(tiny_model_dir, backend="vllm", selector="mbr", utility="lexical", score=False,
                 dtype="float32") as bon:
        assert not bon.scores_needed and bon.sampler.scoring is None and bon.sampler.embed is False
    with BestOfN(tiny_model_dir, backend="vllm", selector="stable-rank", utility="hidden-last",
                 dtype="float32") as bon:
        assert bon.sampler.embed is False                       # the utility is unused: no embeddings


@pytest.mark.parametrize("kwargs,needle", [
    (dict(selector="mbr", utility="bleu"), "Unknown utility 'bleu'"),
    (dict(selector="mbr", utility="hidden-mean", score=False), "drop score=False"),
    (dict(backend="vllm", scorer="pooling", selector="auto", utility="hidden-mean-centred"),
     "pooling scorer does not return; use scorer='hook'"),
    (dict(backend="vllm", selector="mbr", utility="hidden-mean", window=8), "drop window"),
])
def test_utility_options_are_checked_before_any_model_loads(kwargs, needle):
    from bon_sr.api import BestOfN

    with pytest.raises(ConfigError, match=needle):
        BestOfN("no-such-model", **kwargs)


# -- the server, with an engine that returns fixed texts -----------------------------------

class _TextEngine:
    """``BonEngine``'s surface for the app: ready at once, returns ``texts`` as candidates."""

    state, error, context = "ready", None, 512

    def __init__(self, tokenizer, texts):
        self.tokenizer, self.texts, self.jobs = tokenizer, texts, []

    async def start(self):
        return None

    async def sample(self, job):
        self.jobs.append(job)
        return [Candidate(text=t, token_ids=(5,) * (i + 1), index=i, finish_reason="stop",
                          embeddings=self.embeddings[i] if job.embed else None)
                for i, t in enumerate(self.texts[:job.sampling.n])]

    #: what the hook returns with job.embed (the real hook: tests/test_vllm_hook.py)
    embeddings = [{"last": (1.0, 0.0), "mean": (1.0, 0.1)}, {"last": (0.0, 1.0), "mean": (0.9, 0.2)},
                  {"last": (1.0, 0.2), "mean": (0.1, 1.0)}, {"last": (0.9, 0.1), "mean": (1.0, 0.0)}]

    def close(self):
        return None


def test_serve_mbr_and_auto_report_utilities(tiny_tokenizer):
    from fastapi.testclient import TestClient

    from bon_sr.sampling import SamplingConfig
    from bon_sr.serve.app import create_app
    from bon_sr.serve.settings import ServeSettings

    texts = ["Purple elephants.", "The total is 72 clips.", "She sold 72 clips.", "The total is 72 clips in all."]
    engine = _TextEngine(tiny_tokenizer, texts)
    body = {"model": "m", "messages": [{"role": "user", "content": "How many clips?"}]}
    with TestClient(create_app(engine, ServeSettings(model="m", sampling=SamplingConfig(n=4, max_new_tokens=16), max_n=8))) as client:
        r = client.post("/v1/chat/completions", json={**body, "n": 4, "bon_sr": {"selector": "mbr", "utility": "lexical"}})
        assert r.status_code == 200, r.text
        info = r.json()["bon_sr"]
        utilities = [s[UTILITY_KEY] for s in info["scores"]]
        assert info["rule"] == "mbr lexical" and info["utility"] == "lexical" and info["scorer"] == "hook"
        assert info["choice_indices"] == sorted(range(4), key=lambda i: (-utilities[i], i))   # choices by utility
        assert info["choice_indices"][-1] == 0 and set(engine.jobs[-1].score_keys) == set(SR_KEYS)  # free in the hook
        r = client.post("/v1/chat/completions", json={**body, "bon_sr": {"selector": "auto", "answer": "numeric"}})
        assert r.json()["bon_sr"]["rule"] == "auto: majority (3/4 candidates gave an answer)"
        assert not engine.jobs[-1].embed                                                      # lexical: none
        r = client.post("/v1/chat/completions", json={**body, "bon_sr": {"selector": "mbr", "utility": "hidden-mean"}})
        assert r.status_code == 200, r.text
        info = r.json()["bon_sr"]
        assert engine.jobs[-1].embed and info["rule"] == "mbr hidden-mean" and info["scorer"] == "hook"
        expected = mbr_utilities(hidden_similarity([e["mean"] for e in _TextEngine.embeddings], centred=False))
        assert [s[UTILITY_KEY] for s in info["scores"]] == pytest.approx(expected)
        assert info["selected_index"] == max(range(4), key=lambda i: (expected[i], -i))
        r = client.post("/v1/chat/completions", json={**body, "bon_sr": {"selector": "mbr", "utility": "bleu"}})
        assert r.status_code == 400 and "Unknown utility 'bleu'" in r.json()["error"]["message"]


def test_cli_score_with_mbr_auto_and_embeddings(tmp_path, tiny_model_dir):
    import json

    from click.testing import CliRunner

    from bon_sr.cli import main

    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"id": "a", "prompt": "2+2?",
                               "candidates": ["It is 4.", "Purple.", "The answer is 4.", "4, it is 4."]}) + "\n")
    base = ["score", str(src), "--model", tiny_model_dir, "--backend", "hf", "--dtype", "float32"]
    out = tmp_path / "auto.jsonl"
    r = CliRunner().invoke(main, [*base, "-o", str(out), "--selector", "auto", "--answer", "numeric"])
    assert r.exit_code == 0, r.output
    rec = json.loads(out.read_text())
    assert rec["rule"] == "auto: majority (3/4 candidates gave an answer)" and rec["best_index"] == 0
    assert rec["config"]["utility"] == "lexical" and UTILITY_KEY in rec["candidates"][1]["scores"]
    out = tmp_path / "hidden.jsonl"
    r = CliRunner().invoke(main, [*base, "-o", str(out), "--selector", "mbr", "--utility", "hidden-last-centred",
                                  "--embeddings"])
    assert r.exit_code == 0, r.output
    rec = json.loads(out.read_text())
    assert rec["rule"] == "mbr hidden-last-centred" and rec["config"]["scorer"] == "hf"
    assert len(rec["candidates"][0]["embeddings"]["last"]) == 32            # the tiny model's width
    r = CliRunner().invoke(main, [*base, "-o", str(tmp_path / "x.jsonl"), "--selector", "mbr", "--utility", "bleu"])
    assert r.exit_code != 0 and "Invalid value for '--utility'" in r.output


# -- bon-sr show --------------------------------------------------------------------------

def _show(*args):
    from click.testing import CliRunner

    from bon_sr.cli import main

    return CliRunner().invoke(main, ["show", *map(str, args)], env={"COLUMNS": "160"})


def test_show_renders_records_and_refuses_garbled_files(tmp_path):
    import json

    from bon_sr.selection.decide import decide as _decide
    from bon_sr.types import Selection

    texts = ["The answer is 4.", "It is 5.", "4, since 2+2=4.", "Purple."]
    d = _decide(_cands(texts), get_selector("auto"), get_extractor("numeric"))
    sel = Selection(prompt="2+2?", prompt_token_ids=(1,), candidates=d.candidates, best_index=d.pick.index,
                    selector="auto", rule=d.pick.rule, votes=d.votes)
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"id": "q1", **sel.to_dict(), "config": {"utility": "lexical"}}) + "\n"
                   + json.dumps({"id": "q2", **sel.to_dict(keep_candidates=False)}) + "\n")
    r = _show(out, "--id", "q1")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert "auto: majority (3/4 candidates gave an answer)" in r.output and "utility lexical" in r.output
    picked = next(ln for ln in lines if ln.startswith("★"))
    assert "The answer is 4." in picked and " 4 " in picked            # the pick, its answer ...
    assert picked.split("│")[-2].strip() == "2"                          # ... and its answer's 2 votes
    assert "utility = mbr_utility" in r.output and "q2" not in r.output
    assert "candidates not kept" in _show(out, "--id", "q2").output
    r = _show(out, "--id", "q9")
    assert r.exit_code == 1 and "No record with id 'q9'" in r.output and "q1, q2" in r.output
    assert "does not exist" in _show(tmp_path / "missing.jsonl").output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "best_index": 5, "candidates": [{"text": "a"}]}\n')
    r = _show(bad)
    assert r.exit_code == 1 and "bad.jsonl:1: not a bon-sr output record" in r.output and "out of range" in r.output
    bad.write_text('{"id": 1, "best_')
    assert "bad.jsonl:1: malformed JSON" in _show(bad).output


# =========================================================================== slow: the real default model

def _run_cli(*args):
    """``bon-sr ARGS`` in this process (click's CliRunner): the vLLM backend gets the suite's
    engines where the test asks for ``reuse_engines``."""
    from click.testing import CliRunner

    from bon_sr.cli import main

    return CliRunner().invoke(main, [*map(str, args)], env={"COLUMNS": "160"})


PROMPTS = [{"id": "mul", "prompt": "What is 12 * 7? Answer with the number."},
           {"id": "colour", "prompt": "Name one primary colour."}]


def _generate_mbr(tmp_path, utility, *args):
    """``bon-sr generate`` of PROMPTS with mbr and ``utility`` (4 candidates, 24 tokens, seed 1)."""
    import json

    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    out = tmp_path / f"{utility}.jsonl"
    r = _run_cli("generate", src, "-o", out, "--selector", "mbr", "--utility", utility, *args, "-n", 4,
                 "--max-new-tokens", 24, "--seed", 1)
    assert r.exit_code == 0, r.output
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in recs] == ["mul", "colour"]
    return out, recs


@pytest.mark.slow
@pytest.mark.vllm
def test_real_cli_generate_mbr_lexical_then_show(tmp_path, default_model_dir, reuse_engines):
    # the default backend (vLLM here): lexical MBR needs no hidden states; the hook's stable rank
    # comes with the one n=N sampling request
    out, recs = _generate_mbr(tmp_path, "lexical")
    assert reuse_engines == ["generate"]
    for rec in recs:
        cands = rec["candidates"]
        assert rec["rule"] == "mbr lexical" and rec["config"]["utility"] == "lexical"
        assert all(set(c["scores"]) == {UTILITY_KEY, *SR_KEYS} for c in cands)  # utility + the hook's free SR
        # the written utilities are the texts' chrF consensus, and the pick is their argmax
        expected = mbr_utilities(lexical_similarity([c["text"] for c in cands]))
        assert [c["scores"][UTILITY_KEY] for c in cands] == pytest.approx(expected)
        assert rec["best_index"] == max(range(4), key=lambda i: (expected[i], -i))
    r = _run_cli("show", out, "--id", "mul")
    assert r.exit_code == 0, r.output
    picked = next(ln for ln in r.stdout.splitlines() if ln.startswith("★"))
    assert "rule mbr lexical" in r.stdout and "colour" not in r.stdout.split("\n", 1)[0]
    assert recs[0]["response"].strip().splitlines()[0][:20] in picked


@pytest.mark.slow
def test_real_cli_generate_auto_numeric_hf(tmp_path, default_model_dir):
    import json

    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps(PROMPTS[0]) + "\n")
    out = tmp_path / "auto.jsonl"
    r = _run_cli("generate", src, "-o", out, "--backend", "hf", "--selector", "auto", "--answer", "numeric",
                 "-n", 4, "--max-new-tokens", 24, "--seed", 1)
    assert r.exit_code == 0, r.output
    rec = json.loads(out.read_text())
    answered = sum(c.get("answer") is not None for c in rec["candidates"])
    if 2 * answered >= 4:
        assert rec["rule"] == f"auto: majority ({answered}/4 candidates gave an answer)"
        assert rec["votes"][rec["answer"]] == max(rec["votes"].values())
    else:
        assert rec["rule"] == f"auto: mbr lexical (only {answered}/4 candidates gave an answer)"
    assert all(UTILITY_KEY in c["scores"] for c in rec["candidates"])
    assert _run_cli("show", out).exit_code == 0


@pytest.mark.slow
def test_real_select_best_hidden_mean_hf(default_model_dir):
    from bon_sr import select_best
    from bon_sr.models import load_hf_model

    sel = select_best("Name one primary colour.", selector="mbr", utility="hidden-mean", backend="hf", n=4,
                      max_new_tokens=16, seed=3, dtype="float32")
    assert sel.rule == "mbr hidden-mean" and len(sel.candidates) == 4
    model, _ = load_hf_model(default_model_dir, dtype="float32")
    prompt = list(sel.prompt_token_ids)
    means = []
    for c in sel.candidates:
        assert "stable_rank" in c.scores                         # from the same forward
        with torch.no_grad():
            h = model(torch.tensor([prompt + list(c.token_ids)]), output_hidden_states=True).hidden_states[-1][0]
        rows = h[len(prompt):].float()
        torch.testing.assert_close(torch.tensor(c.embeddings["mean"]), rows.mean(0), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.tensor(c.embeddings["last"]), rows[-1], rtol=1e-4, atol=1e-4)
        means.append(rows.mean(0))
    expected = mbr_utilities(hidden_similarity(torch.stack(means), centred=False))
    assert [c.scores[UTILITY_KEY] for c in sel.candidates] == pytest.approx(expected, abs=1e-5)
    assert sel.best_index == max(range(4), key=lambda i: (expected[i], -i))
    assert len(sel.best.embeddings["last"]) == 576                 # SmolLM2-135M's width


@pytest.mark.slow
@pytest.mark.vllm
def test_real_cli_generate_mbr_hidden_mean_embeds_in_the_hook(tmp_path, default_model_dir, reuse_engines):
    """vLLM backend, scorer auto (the hook): the embeddings come from the sampling pass, and
    the written utilities are the recomputation from the written embeddings."""
    _, recs = _generate_mbr(tmp_path, "hidden-mean", "--embeddings")
    assert reuse_engines == ["generate"]
    for rec in recs:
        cands = rec["candidates"]
        assert rec["rule"] == "mbr hidden-mean" and rec["config"]["scorer"] == "hook"
        assert rec["config"]["backend"] == "vllm"
        for c in cands:
            assert sr_in_range(c["scores"])                               # the hook scored them in the same pass
            assert len(c["embeddings"]["mean"]) == len(c["embeddings"]["last"]) == 576    # SmolLM2-135M's width
        expected = mbr_utilities(hidden_similarity([c["embeddings"]["mean"] for c in cands], centred=False))
        assert [c["scores"][UTILITY_KEY] for c in cands] == pytest.approx(expected, abs=1e-6)
        assert rec["best_index"] == max(range(4), key=lambda i: (expected[i], -i))


@pytest.mark.slow
@pytest.mark.vllm
def test_real_serve_mbr_with_the_openai_client(serve_process):
    """On the suite's shared server (tests/shared.py: its key, its default n of 3; these
    requests ask for 4 candidates)."""
    import openai

    from shared import API_KEY

    server = serve_process.get()
    client = openai.OpenAI(base_url=server.base + "/v1", api_key=API_KEY, max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    chat = [{"role": "user", "content": "Name one primary colour."}]
    resp = client.chat.completions.create(model=model, messages=chat, n=2, seed=5,
                                          extra_body={"bon_sr": {"n": 4, "selector": "mbr", "utility": "lexical"}})
    info = resp.model_extra["bon_sr"]
    texts = [c["text"] for c in client.chat.completions.create(
        model=model, messages=chat, seed=5,
        extra_body={"bon_sr": {"n": 4, "selector": "mbr", "return_candidates": True}}
    ).model_extra["bon_sr"]["candidates"]]
    expected = mbr_utilities(lexical_similarity(texts))        # the same seed: the same 4 candidates
    assert info["rule"] == "mbr lexical" and info["utility"] == "lexical" and info["scorer"] == "hook"
    assert info["n"] == 4 and len(texts) == 4
    assert [s[UTILITY_KEY] for s in info["scores"]] == pytest.approx(expected)
    assert info["choice_indices"] == sorted(range(4), key=lambda i: (-expected[i], i))[:2]
    assert [c.message.content for c in resp.choices] == [texts[i] for i in info["choice_indices"]]
    # a hidden utility: the hook returns the embeddings from the sampling pass
    hidden = client.chat.completions.create(
        model=model, messages=chat, seed=5,
        extra_body={"bon_sr": {"n": 4, "selector": "mbr", "utility": "hidden-mean"}}
    ).model_extra["bon_sr"]
    assert hidden["rule"] == "mbr hidden-mean" and hidden["scorer"] == "hook"
    assert all(sr_in_range(s) and -1.0 <= s[UTILITY_KEY] <= 1.0 for s in hidden["scores"])
