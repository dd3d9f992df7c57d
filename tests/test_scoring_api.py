"""The scoring and selection layer through the public API and CLI, on the tiny random model:
token statistics from the scoring pass, voting with answers, scoring skipped when the
selector needs none, every option checked before a model loads, ``bon-sr score``."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from bon_sr import BestOfN, select_best
from bon_sr.cli import main
from bon_sr.errors import ConfigError
from bon_sr.scoring.hidden_states import HiddenStateConfig
from bon_sr.scoring.scorers import HFScorer

PROMPTS = [[1, 5, 6, 7, 8], [1, 9, 10], [1, 11, 12, 13]]
RESPONSES = [[20, 21, 22, 23], [24, 25, 26, 27, 28, 29, 30], [31]]


@pytest.mark.parametrize("token_set", ["response", "full", "response+eot"])
def test_token_stats_equal_a_direct_computation_from_hf_logits(tiny_model, token_set):
    cfg = HiddenStateConfig(token_set=token_set, max_batch_tokens=12)     # several micro-batches
    got = HFScorer(tiny_model, cfg, logit_stats=True).score(PROMPTS, RESPONSES)
    plain = HFScorer(tiny_model, cfg).score(PROMPTS, RESPONSES)
    for p, r, g, q in zip(PROMPTS, RESPONSES, got, plain):
        with torch.no_grad():
            logits = tiny_model(torch.tensor([p + r])).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)[len(p) - 1:len(p) + len(r) - 1]     # rows predicting r
        lp = logp.gather(-1, torch.tensor(r)[:, None]).mean()
        sc = (-math.log(logp.shape[-1]) - logp.mean(dim=-1)).mean()      # mean KL(uniform || p)
        assert g["mean_logprob"] == pytest.approx(float(lp), rel=1e-5, abs=1e-6)
        assert g["self_certainty"] == pytest.approx(float(sc), rel=1e-5, abs=1e-6)
        assert {k: g[k] for k in q} == q                                  # SR untouched by the extra stats


def test_majority_votes_without_a_scoring_pass(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(HFScorer, "score", lambda *a, **k: pytest.fail("a hidden-state pass ran"))
    bon = BestOfN(tiny_model_dir, backend="hf", selector="majority", answer="numeric", dtype="float32")
    sel = bon.select("What is 2+2?", candidates=["I think 5.", "The answer is 4.", "so: 4", "no idea"])
    assert sel.best_index == 1 and sel.rule == "majority"
    assert sel.votes == {"4": 2, "5": 1}
    assert [c.answer for c in sel.candidates] == ["5", "4", "4", None]
    assert [c.vote_share for c in sel.candidates] == pytest.approx([1 / 3, 2 / 3, 2 / 3, 0.0])
    assert not bon.scores_needed and all(not c.scores for c in sel.candidates)    # no hidden-state pass
    out = sel.to_dict()
    assert out["answer"] == "4" and out["votes"] == {"4": 2, "5": 1} and out["rule"] == "majority"
    assert out["candidates"][3].get("answer") is None and out["candidates"][1]["vote_share"] == pytest.approx(2 / 3)
    # no answers at all: the stated fallback decides, and says so
    sel = bon.select("What is 2+2?", candidates=["no idea", "none"])
    assert sel.best_index == 0 and sel.rule == "fallback: first (no candidate had an answer)"
    # asked for: SR is computed even though majority does not use it
    monkeypatch.undo()
    scored = BestOfN(tiny_model_dir, backend="hf", selector="majority", answer="numeric", score=True,
                     dtype="float32").select("What is 2+2?", candidates=["4", "4 and 5"])
    assert all("stable_rank" in c.scores for c in scored.candidates)


def test_every_selector_runs_through_select_best(tiny_model_dir):
    cands = ["The answer is 4.", "It is 5, I think, after some thought.", "4"]
    for selector in ("stable-rank", "random", "first", "shortest", "longest", "majority", "majority-sr",
                     "sr-weighted-vote", "self-certainty", "mean-logprob"):
        sel = select_best("What is 2+2?", candidates=cands, model=tiny_model_dir, backend="hf", selector=selector,
                          answer="numeric", dtype="float32")
        assert 0 <= sel.best_index < 3 and sel.selector == selector
        if selector in ("self-certainty", "mean-logprob"):
            key = selector.replace("-", "_")
            values = [c.scores[key] for c in sel.candidates]
            assert sel.best_index == values.index(max(values))
    # a plain callable is a selector too
    sel = select_best("Q?", candidates=["a", "bb"], model=tiny_model_dir, backend="hf",
                      selector=lambda candidates, **kw: 1)
    assert sel.best_index == 1 and "stable_rank" in sel.best.scores       # unknown needs: scored


def test_select_and_select_many_draw_the_same_samples(tiny_model_dir):
    bon = BestOfN(tiny_model_dir, backend="hf", n=2, max_new_tokens=5, temperature=1.0, seed=9, dtype="float32")
    one = bon.select("Hello?")
    many = next(bon.select_many(["Hello?"]))
    assert [c.token_ids for c in one.candidates] == [c.token_ids for c in many.candidates]
    named = next(bon.select_many(["Hello?"], ids=["q7"]))
    assert [c.token_ids for c in bon.select("Hello?", id="q7").candidates] == [c.token_ids for c in named.candidates]


@pytest.mark.parametrize("kwargs,needle", [
    (dict(selector="majority"), "votes over answers"),
    (dict(selector="majority", answer="roman"), "Unknown answer extractor 'roman'"),
    (dict(selector="stable-rank", score=False), "needs the scores stable_rank"),
    (dict(backend="vllm", scorer="pooling", selector="self-certainty"), "cannot compute self_certainty"),
    (dict(backend="vllm", scorer="pooling", selector="stable-rank", transform="center"), "pooling scorer supports the raw transform only"),
    (dict(backend="vllm", scorer="hook", norm="pre"), "hook scorer sees the last layer's post-final-norm"),
    (dict(backend="vllm", scorer="pooling", selector="stable-rank", token_set="response+eot"), "token sets response and full"),
    (dict(backend="hf", scorer="hook"), "needs backend='vllm'"),
    (dict(scorer="tgi"), "Unknown scorer 'tgi'"),
])
def test_options_are_checked_before_any_model_loads(kwargs, needle):
    # the model name does not exist: reaching the loader would raise "Unknown model" instead
    with pytest.raises(ConfigError, match=needle):
        BestOfN("no-such-model", **kwargs)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_score_reranks_given_candidates_and_resumes(tmp_path, tiny_model_dir):
    src = _write(tmp_path / "c.jsonl", [
        {"id": "a", "prompt": "2+2?", "candidates": ["It is 5.", "The answer is 4.", "4"]},
        {"id": "b", "messages": [{"role": "user", "content": "3+3?"}],
         "candidates": [{"text": "6"}, {"text": "six is 6", "token_ids": [20, 21, 22]}, "7"]},
    ])
    out = tmp_path / "out.jsonl"
    base = ["score", str(src), "-o", str(out), "--model", tiny_model_dir, "--backend", "hf", "--dtype", "float32",
            "--selector", "majority", "--answer", "numeric"]
    r = CliRunner().invoke(main, base)
    assert r.exit_code == 0, r.output
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in recs] == ["a", "b"]
    assert recs[0]["best_index"] == 1 and recs[0]["votes"] == {"4": 2, "5": 1} and recs[0]["answer"] == "4"
    assert recs[1]["best_index"] == 0 and recs[1]["candidates"][1]["token_ids"] == [20, 21, 22]
    assert recs[0]["config"]["selector"] == "majority" and recs[0]["config"]["answer"] == "numeric"
    r = CliRunner().invoke(main, [*base, "--resume"])
    assert r.exit_code == 0 and "Nothing to do" in r.output
    r = CliRunner().invoke(main, ["score", str(src), "-o", str(tmp_path / "o2.jsonl"), "--model", tiny_model_dir,
                                  "--backend", "hf",
                                  "--dtype", "float32", "--logit-stats"])
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "o2.jsonl").read_text().splitlines()[0])
    assert {"stable_rank", "mean_logprob", "self_certainty"} <= set(rec["scores"])
    assert rec["config"]["score_sources"]["self_certainty"] == "hf forward logits"


@pytest.mark.parametrize("row,needle", [
    ({"id": 1, "prompt": "a"}, "missing 'candidates'"),
    ({"id": 1, "prompt": "a", "candidates": []}, "non-empty list"),
    ({"id": 1, "prompt": "a", "candidates": [{"txt": "x"}]}, "candidate 0 must be a string or an object"),
    ({"id": 1, "prompt": "a", "candidates": [{"text": "x", "token_ids": [1, "2"]}]}, "non-negative integers"),
])
def test_cli_score_bad_input(tmp_path, row, needle):
    src = _write(tmp_path / "c.jsonl", [row])
    r = CliRunner().invoke(main, ["score", str(src), "-o", str(tmp_path / "o.jsonl"), "--model", "no-such-model"])
    assert r.exit_code != 0 and needle in r.output
    assert not (tmp_path / "o.jsonl").exists()


def test_prompt_file_with_a_byte_order_mark(tmp_path):
    from bon_sr.sampling.prompts import read_prompt_file

    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + b'{"id": "x", "prompt": "hi"}\n')
    assert [r.id for r in read_prompt_file(p)] == ["x"]


def test_end_of_turn_of_a_multi_eos_model_comes_from_the_chat_template(tiny_model, tiny_tokenizer):
    """Llama-3 Instruct lists <|end_of_text|> first and ends turns with <|eot_id|>: the
    template, not the order of the eos list, decides (here: <|im_end|>, id 2)."""
    import copy

    from bon_sr.scoring.hidden_states import end_of_turn_id

    model = copy.deepcopy(tiny_model)
    im_start, im_end = tiny_tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    model.generation_config.eos_token_id = [im_start, im_end]     # the wrong one first
    assert end_of_turn_id(model) == im_start                     # without a tokenizer: the first
    assert end_of_turn_id(model, tiny_tokenizer) == im_end
