"""Tests of the bench's consensus layer: Gram-matrix cosines on subsets, the similarity
sidecar, the MBR bench selectors and mixes, the embedding pass, the SQuAD task file.

Hand-made vectors and texts, a tiny random Llama and the fake sampler of test_bench.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bon_sr import models
from bon_sr.bench import runner
from bon_sr.bench.consensus import ConsensusCache, Coverage, Similarities, gram_cosine, gram_matrix, sidecar_path
from bon_sr.bench.selectors import BENCH_SELECTORS, GREEDY, Scored, borda_ranks, get_bench_selector, mbr_mix
from bon_sr.bench.tasks import Task
from bon_sr.selection.consensus import hidden_similarity, lexical_similarity
from bon_sr.errors import ConfigError

from test_bench import fake_generator, tiny_model  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]


def _close(a, b, tol=1e-6):
    torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                               rtol=tol, atol=tol, equal_nan=True)


def test_gram_cosine_equals_product_cosine_on_every_subset():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(6, 5)) * 30.0 + 5.0  # large norms and a shared offset, as real states
    vectors[3] = math.nan                            # an empty response
    vectors[4] = 0.0                                 # a zero vector: cosine 0
    gram = gram_matrix(vectors.tolist())
    assert math.isnan(gram[3][0]) and math.isnan(gram[0][3])
    for index in ([0, 1, 2, 3, 4, 5], [1, 3, 4], [2, 5], [0], [5, 1, 0]):
        for centred in (False, True):
            _close(gram_cosine(gram, index, centred=centred),
                   hidden_similarity(vectors[index].tolist(), centred=centred))


def test_hidden_cosine_by_hand():
    # v0 = (1, 0), v1 = (1, 0.1), v2 = (0, 1): cos01 = 1/sqrt(1.01), cos02 = 0, cos12 = 0.1/sqrt(1.01)
    gram = gram_matrix([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
    c01, c12 = 1 / math.sqrt(1.01), 0.1 / math.sqrt(1.01)
    _close(gram_cosine(gram, [0, 1, 2], centred=False), [[1, c01, 0], [c01, 1, c12], [0, c12, 1]])
    # two vectors centred on their mean are opposite: cosine -1
    _close(gram_cosine(gram, [0, 2], centred=True), [[1, -1], [-1, 1]])


def _scored(n, correct, sims, groups=None, **scores):
    groups = groups or [0] * n
    return [Scored(correct=correct[i], group=groups[i], num_tokens=i + 1,
                   scores={k: v[i] for k, v in scores.items()}, index=i, similarities=sims)
            for i in range(n)]


def _weights(name, cands):
    w = get_bench_selector(name).fn(cands)
    assert sum(w) == pytest.approx(1.0)
    return w


def test_mbr_bench_selectors_use_the_subsets_own_matrix():
    # hidden-last, raw: utilities (mean cosine to the others) v0 (c01 + 0)/2, v1 (c01 + c12)/2,
    # v2 (0 + c12)/2 -> v1 wins on the full set; on {v0, v2} both are 0 -> the earliest (v0)
    sims = Similarities(["a", "b", "c"], {"last": gram_matrix([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])})
    cands = _scored(3, [False, True, False], sims)
    assert _weights("mbr-hidden-last", cands) == [0.0, 1.0, 0.0]
    assert _weights("mbr-hidden-last", [cands[0], cands[2]]) == [1.0, 0.0]
    # centred on {v0, v1, v2}: the mean (1/3, 11/30) removed, v1 is closest to both others
    centred = np.asarray(hidden_similarity([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]], centred=True))
    util = [(centred[i].sum() - 1) / 2 for i in range(3)]
    assert _weights("mbr-hidden-last-centred", cands).index(1.0) == int(np.argmax(util))
    # lexical: chrF of the subset's texts, the product's matrix
    texts = ["the cat sat on the mat", "a dog ran", "the cat sat on a mat", "the cat sat"]
    lex = Similarities(texts)
    for index in ([0, 1, 2, 3], [1, 3], [3, 1, 2]):
        _close(lex.matrix("lexical", index), lexical_similarity([texts[i] for i in index]))
    assert _weights("mbr-lexical", _scored(4, [True, False, True, True], lex)).index(1.0) in (0, 2)


def test_hidden_selector_without_embeddings():
    sims = Similarities(["a", "b"])
    # every candidate equally right: no pick matters, a uniform pick is counted
    assert _weights("mbr-hidden-mean", _scored(2, [True, True], sims)) == [0.5, 0.5]
    with pytest.raises(ConfigError, match="--embeddings"):
        _weights("mbr-hidden-mean", _scored(2, [True, False], sims))


def test_majority_mbr_tiebreak_by_hand():
    # classes 1 ("bbbb", "bbbc") and 0 ("aaaa" twice) tie 2-2. Plain majority takes the class
    # seen first (1, index 0); its chrF to the others is below 1/3 while each "aaaa" has
    # chrF 1 to the other "aaaa" and 0 to the b's: utility 1/3, so the tie-break takes class 0
    texts = ["bbbb", "aaaa", "bbbc", "aaaa"]
    cands = _scored(4, [False, True, False, True], Similarities(texts), groups=[1, 0, 1, 0])
    assert _weights("majority", cands) == [1.0, 0.0, 0.0, 0.0]
    assert _weights("majority-mbr-tiebreak", cands) == [0.0, 1.0, 0.0, 0.0]
    # auto: everyone has an answer -> majority vote
    assert _weights("auto", cands) == [1.0, 0.0, 0.0, 0.0]
    # no answers: auto and the tie-break fall back to MBR (the "aaaa" pair)
    none = _scored(4, [False, True, False, True], Similarities(texts), groups=[-1, -1, -1, -1])
    assert _weights("auto", none) == [0.0, 1.0, 0.0, 0.0]
    assert _weights("majority-mbr-tiebreak", none) == [0.0, 1.0, 0.0, 0.0]


def test_ranks_and_borda_mix_by_hand():
    assert borda_ranks([3.0, 1.0, math.nan, 3.0]) == [1.5, 3.0, 4.0, 1.5]
    # hidden-last utilities from test_mbr_bench...: v1 (rank 1) > v0 (2) > v2 (3)
    sims = Similarities(["a", "b", "c"], {"last": gram_matrix([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])})
    mix = mbr_mix("hidden-last", "sr_response")
    # SR ranks v2 1, v0 2, v1 3: sums v0 4, v1 4, v2 4 -> tie -> the higher utility, v1
    assert mix(_scored(3, [True] * 3, sims, sr_response=[2.0, 1.0, 3.0])) == [0.0, 1.0, 0.0]
    # SR ranks v0 1, v2 2, v1 3: sums v0 3, v1 4, v2 5 -> v0
    assert mix(_scored(3, [True] * 3, sims, sr_response=[3.0, 1.0, 2.0])) == [1.0, 0.0, 0.0]


def test_coverage_drops_or_refuses_hidden_selectors():
    default = tuple(sorted([*BENCH_SELECTORS, GREEDY]))
    partial = Coverage(mixed=4, embedded=3, problems=10)
    kept = partial.usable(default)
    assert "mbr-lexical" in kept and not any(s.startswith("mbr-hidden") for s in kept)
    assert "3 of the 4" in partial.note
    with pytest.raises(ConfigError, match="mbr-hidden-last"):
        partial.usable(["majority", "mbr-hidden-last"])
    assert Coverage(mixed=4, embedded=4, problems=10).usable(default) == list(default)
    assert Coverage(mixed=0, embedded=0, problems=10).complete


def test_sidecar_path_and_version(tmp_path):
    cache = tmp_path / "cache" / "gsm8k.jsonl"
    assert sidecar_path(cache) == tmp_path / "cache" / "gsm8k.consensus.json"
    c = ConsensusCache(cache)
    c.put("7", {"last": [[1.0]], "mean": [[2.0]]}, {"model": "m"})
    c.save()
    again = ConsensusCache(cache)
    assert again.has("7") and not again.has("8")
    sidecar_path(cache).write_text(json.dumps({"version": 99}))
    with pytest.raises(Exception, match="version 99"):
        ConsensusCache(cache)


def test_embedding_pass_fills_the_sidecar_and_reports_rederive(tmp_path, monkeypatch, tiny_model):  # noqa: F811
    from bon_sr.scoring.hidden_states import HiddenStateConfig
    from bon_sr.scoring.scorers import HFScorer

    monkeypatch.setattr(runner, "load_generator", lambda *a, **k: fake_generator(tiny_model, []))
    loads: list[str] = []
    monkeypatch.setattr(models, "resolve_model", lambda name, progress=None: name)
    monkeypatch.setattr(models, "load_hf_model", lambda path, **k: (loads.append(path), (tiny_model, None))[1])
    task = Task("toy", tuple(runner.Problem(str(i), f"What is 2+2? ({i})", "4", "numeric") for i in range(3)))
    config = runner.BenchConfig(task="toy", n=(2, 4), backend="hf", bootstrap=200)
    first = runner.run_bench(config, tmp_path, task=task)
    assert not any(s.startswith("mbr-hidden") for s in first["results"]["4"])  # no embeddings yet
    assert "0 of the 3" in first["consensus"]
    s = runner.run_bench(config, tmp_path, task=task, generate=False, embeddings=True)
    assert len(loads) == 1
    row = s["results"]["4"]
    assert {"mbr-lexical", "mbr-hidden-last", "mbr-hidden-mean-centred", "auto", "mbr-sr"} <= set(row)
    assert "vs_majority" in row["mbr-lexical"]
    # the sidecar holds the Gram matrix of the product's HF embeddings
    rec = json.loads((tmp_path / "cache" / "toy.jsonl").read_text().splitlines()[0])
    _, embs = HFScorer(tiny_model, HiddenStateConfig()).score_and_embed(
        [rec["prompt_token_ids"]] * 4, [c["token_ids"] for c in rec["candidates"]])
    side = json.loads((tmp_path / "cache" / "toy.consensus.json").read_text())
    _close(side["gram"]["last"][rec["id"]], gram_matrix([e["last"] for e in embs]), 1e-5)
    # a second pass has nothing to do; the report re-derives without the model
    monkeypatch.setattr(models, "load_hf_model", lambda *a, **k: pytest.fail("model loaded"))
    again = runner.run_bench(config, tmp_path, task=task, generate=False, embeddings=True)
    assert again["results"] == s["results"]


def _squad():
    spec = importlib.util.spec_from_file_location("squad_task", ROOT / "benchmarks" / "tasks" / "squad.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_squad_checker():
    squad = _squad()
    assert squad.normalize_answer("The  Levi's Stadium.") == "levis stadium"
    assert squad.extract_answer("\n**Answer:** \"Tate Britain\"\nIt is in London.") == "Tate Britain"
    assert squad.extract_answer("  \n") is None
    gold = squad.CHECKER.gold("23 years\n23\n23")
    assert gold == "23 years\n23"
    check = squad.CHECKER
    assert check.is_correct("23", gold) and check.is_correct("23 Years.", gold)
    assert not check.is_correct("twenty-three years", gold) and not check.is_correct(None, gold)
    assert check.key("The Air Force") == check.key("air force")


def test_ngram_f1_by_hand():
    from bon_sr.bench.consensus import ngram_f1_similarity

    # [1,2,3] vs [1,2,4]: unigrams 2*2/6, bigrams 2*1/4, trigrams 0, 4-grams none (0): mean over 4
    m = ngram_f1_similarity([[1, 2, 3], [1, 2, 4], []])
    assert m[0][1] == m[1][0] == pytest.approx((4 / 6 + 0.5) / 4)
    assert m[0][0] == pytest.approx(3 / 4)  # identical 3 tokens: n = 1..3 give 1, n = 4 gives 0
    assert m[2][0] == 0.0 and m[2][2] == 0.0
    sims = Similarities(["", "", ""], token_ids=[[1, 2, 3], [1, 2, 4], [9]])
    assert sims.matrix("ngram", [1, 0]) == [[m[1][1], m[1][0]], [m[0][1], m[0][0]]]
    assert _weights("mbr-ngram", _scored(3, [True, False, True], sims)) == [1.0, 0.0, 0.0]


def test_cli_embeddings_flag_reaches_the_runner_and_refusals_are_clear(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from bon_sr.bench.cli import bench

    seen = {}

    def fake_run(config, out_dir, **kwargs):
        seen.update(kwargs, selectors=config.selectors)
        return {"task": "t", "problems": 0, "generated_now": 0, "n": [1], "results": {"1": {}}}

    monkeypatch.setattr(runner, "run_bench", fake_run)
    result = CliRunner().invoke(bench, ["--task", "gsm8k", "--no-generate", "--embeddings",
                                        "--selectors", "mbr-lexical,mbr-hidden-mean", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert seen["embeddings"] is True and seen["generate"] is False
    assert seen["selectors"] == ("mbr-lexical", "mbr-hidden-mean")
    # asking by name for a hidden column the sidecar cannot give stops with the fix
    with pytest.raises(ConfigError, match="--embeddings"):
        Coverage(mixed=2, embedded=0, problems=2).usable(["mbr-hidden-mean"])
