"""Scorer variants (bon_sr.scoring.variants), the dense metrics (bench.metrics) and `bon-sr ablate`
end to end on a synthetic bench cache scored by the tiny random model."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from click.testing import CliRunner
from torch.testing import assert_close

from bon_sr.bench.metrics import bon_accuracy, bon_pick, pairwise_accuracy, prompt_auc, within_prompt_auc
from bon_sr.errors import ConfigError
from bon_sr.scoring.hidden_states import HiddenStateConfig, iter_hidden_states
from bon_sr.scoring.scorers import HFScorer
from bon_sr.scoring.stable_rank import stable_rank_exact
from bon_sr.scoring.variants import (MASSIVE_K, VARIANTS, CalibrationAccumulator, CalibrationStats, TransformContext,
                             length_corrected, parse_variant)


def _sr(spec: str, h: torch.Tensor, mask: torch.Tensor | None = None, **ctx) -> float:
    mask = torch.ones(h.shape[:-1], dtype=torch.bool) if mask is None else mask
    hv, mv = parse_variant(spec).apply(h[None], mask[None], TransformContext(**ctx))
    return float(stable_rank_exact(hv, mv).stable_rank[0])


# -- transforms, values by hand ------------------------------------------------------------

def test_raw_and_paper_are_identity():
    # rows e1, e1, e2: sigma^2 = {2, 1}, SR = 3 / 2
    h = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert _sr("paper", h) == pytest.approx(1.5)
    assert _sr("raw", h) == pytest.approx(1.5)


def test_center_identical_rows_is_degenerate_zero():
    # every row equals the mean -> centred H = 0 -> SR 0.0 by stable_rank's degenerate rule
    h = torch.tensor([[3.0, -1.0, 2.0]] * 4)
    assert _sr("center", h) == 0.0
    assert _sr("raw", h) == pytest.approx(1.0)


def test_center_removes_the_shared_offset():
    # rows (10 + 1, 0), (10 - 1, 0), (10, 1), (10, -1): raw is dominated by the offset;
    # centred rows (1,0), (-1,0), (0,1), (0,-1): H^T H = 2 I -> SR = 4 / 2 = 2
    h = torch.tensor([[11.0, 0.0], [9.0, 0.0], [10.0, 1.0], [10.0, -1.0]])
    assert _sr("center", h) == pytest.approx(2.0)
    assert _sr("raw", h) < 1.01


def test_center_ignores_padding_rows():
    h = torch.tensor([[11.0, 0.0], [9.0, 0.0], [10.0, 1.0], [10.0, -1.0], [1e6, 1e6]])
    mask = torch.tensor([True, True, True, True, False])
    assert _sr("center", h, mask) == pytest.approx(2.0)


def test_drop_first_row():
    # rows 5*e1, e2, e3: raw SR = (25+1+1)/25; without the first row: e2, e3 -> SR 2
    h = torch.tensor([[5.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert _sr("raw", h) == pytest.approx(27 / 25)
    assert _sr("drop-first", h) == pytest.approx(2.0)
    # left padding does not matter: the first *counted* row is dropped
    mask = torch.tensor([False, True, True])
    assert _sr("drop-first", h, mask) == pytest.approx(1.0)


def test_drop_special_rows():
    h = torch.tensor([[5.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    ids = torch.tensor([[7, 3, 4]])
    assert _sr("drop-special", h, token_ids=ids, special_ids=frozenset({7})) == pytest.approx(2.0)
    assert _sr("drop-special", h, token_ids=ids, special_ids=frozenset()) == pytest.approx(27 / 25)
    with pytest.raises(ConfigError, match="token ids"):
        _sr("drop-special", h)


def _massive() -> torch.Tensor:
    # dim 0 is a massive activation (100 on every row) on top of an identity block in dims 1..4:
    # raw SR = (4 * 100^2 + 4) / (4 * 100^2 + 1) ~ 1.0002; without dim 0: I_4 -> SR 4
    eye = torch.eye(4)
    return torch.cat([torch.full((4, 1), 100.0), eye, torch.zeros(4, MASSIVE_K - 1)], dim=1)


def test_drop_massive_per_sequence_raises_sr():
    h = _massive()
    assert _sr("raw", h) == pytest.approx(40004 / 40001)
    # top-3 dims by mean |h|: dim 0 (100) and two of the identity dims (1/4 each) -> I_2 left
    assert _sr("drop-massive-seq", h) == pytest.approx(2.0)


def test_drop_massive_with_calibration_stats():
    h = _massive()
    d = h.shape[1]
    mean_abs = torch.zeros(d, dtype=torch.float64)
    mean_abs[0] = 100.0
    mean_abs[5:] = 50.0      # the zero padding dims are "massive" in this calibration set
    stats = CalibrationStats(mean=torch.zeros(d, dtype=torch.float64), std=torch.ones(d, dtype=torch.float64),
                             mean_abs=mean_abs, rows=1)
    # dims 0, 5, 6 zeroed -> I_4 -> SR 4
    assert _sr("drop-massive", h, stats=stats) == pytest.approx(4.0)
    with pytest.raises(ConfigError, match="calibration"):
        _sr("drop-massive", h)


def test_standardize_with_given_stats():
    # rows (10, 0), (12, 2): with mean (11, 1), std (1, 1) -> (-1, -1), (1, 1): rank 1 -> SR 1
    # with std (1, 2) -> (-1, -0.5), (1, 0.5): still rank 1; add a third row to see the scaling:
    # rows (10,0),(12,2),(11,3) -> centred (-1,-1),(1,1),(0,2); /std(1,2) -> (-1,-.5),(1,.5),(0,1)
    # H^T H = [[2, 1], [1, 1.5]]: eig = (3.5 +- sqrt(0.25 + 4)) / 2 -> SR = 3.5 / ((3.5 + sqrt(4.25)) / 2)
    h = torch.tensor([[10.0, 0.0], [12.0, 2.0], [11.0, 3.0]])
    stats = CalibrationStats(mean=torch.tensor([11.0, 1.0], dtype=torch.float64),
                             std=torch.tensor([1.0, 2.0], dtype=torch.float64),
                             mean_abs=torch.zeros(2, dtype=torch.float64), rows=3)
    assert _sr("standardize", h, stats=stats) == pytest.approx(3.5 / ((3.5 + math.sqrt(4.25)) / 2))


def test_calibration_accumulator():
    h = torch.tensor([[[1.0, -2.0], [3.0, 2.0], [99.0, 99.0]]])
    mask = torch.tensor([[True, True, False]])
    acc = CalibrationAccumulator()
    acc.update(h, mask)
    st = acc.finish()
    assert st.rows == 2
    assert_close(st.mean, torch.tensor([2.0, 0.0], dtype=torch.float64))
    assert_close(st.std, torch.tensor([1.0, 2.0], dtype=torch.float64))       # population std
    assert_close(st.mean_abs, torch.tensor([2.0, 2.0], dtype=torch.float64))
    assert_close(CalibrationStats.from_dict(json.loads(json.dumps(st.to_dict()))).std, st.std)


def test_composition_applies_left_to_right():
    h = torch.tensor([[11.0, 0.0], [9.0, 0.0], [10.0, 1.0], [10.0, -1.0]])
    # drop-first then center: rows (9,0),(10,1),(10,-1) -> mean (29/3, 0) -> centred
    # (-2/3,0),(1/3,1),(1/3,-1): H^T H = diag(2/3, 2) -> SR = (8/3) / 2 = 4/3
    assert _sr("drop-first+center", h) == pytest.approx(4 / 3)


def test_length_correction_residuals():
    # scores exactly linear in log length -> all residuals 0
    lengths = [1, math.e, math.e ** 2]
    assert length_corrected([1.0, 3.0, 5.0], lengths) == pytest.approx([0.0, 0.0, 0.0])
    # equal lengths: slope 0, residual = score - mean; NaN stays out of the fit and NaN
    out = length_corrected([1.0, 3.0, float("nan")], [5, 5, 5])
    assert out[:2] == pytest.approx([-1.0, 1.0]) and math.isnan(out[2])
    # (log n, s) = (0, 0), (1, 2), (2, 1): slope 1/2, intercept 1/2 -> residuals -1/2, 1, -1/2
    assert length_corrected([0.0, 2.0, 1.0], lengths) == pytest.approx([-0.5, 1.0, -0.5])


def test_registry_errors():
    assert "paper" in VARIANTS and "raw" in VARIANTS
    with pytest.raises(ConfigError, match=r"Unknown variant 'nope'\. Available: .*center.*paper"):
        parse_variant("nope")
    with pytest.raises(ConfigError, match="Unknown variant 'x'"):
        parse_variant("center+x")
    with pytest.raises(ConfigError, match="group"):
        HiddenStateConfig(transform="paper+length")
    with pytest.raises(ConfigError, match="Unknown variant"):
        HiddenStateConfig(transform="bogus")


# -- the core scorer with a transform --------------------------------------------------------

def _pairs(tok):
    from bon_sr.sampling.prompts import encode_prompt, encode_response

    prompts = [encode_prompt(tok, "What is 2+2?"), encode_prompt(tok, "Name a colour.")]
    responses = [encode_response(tok, "It is 4, because 2 and 2 make 4."), encode_response(tok, "Blue")]
    return prompts, responses


def test_hfscorer_transform_matches_manual(tiny_model, tiny_tokenizer):
    prompts, responses = _pairs(tiny_tokenizer)
    default = HFScorer(tiny_model).score(prompts, responses)
    assert HFScorer(tiny_model, HiddenStateConfig(transform="raw")).score(prompts, responses) == default
    got = HFScorer(tiny_model, HiddenStateConfig(transform="center")).score(prompts, responses)
    for i in range(2):
        (_, h, m), = iter_hidden_states(tiny_model, prompts[i:i + 1], responses[i:i + 1], HiddenStateConfig())
        assert got[i]["stable_rank"] == pytest.approx(_sr("center", h[0].double(), m[0]), rel=1e-4)
    with pytest.raises(ConfigError, match="calibration"):
        HFScorer(tiny_model, HiddenStateConfig(transform="standardize"))


def test_response_plus_eot_token_set(tiny_model, tiny_tokenizer):
    prompts, responses = _pairs(tiny_tokenizer)
    eot = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    cfg = HiddenStateConfig(token_set="response+eot")
    got = HFScorer(tiny_model, cfg).score(prompts, responses)
    assert [g["scored_tokens"] for g in got] == [len(r) + 1 for r in responses]
    explicit = HFScorer(tiny_model).score(prompts, [[*r, eot] for r in responses])
    assert [g["stable_rank"] for g in got] == pytest.approx([e["stable_rank"] for e in explicit])
    # drop-special with response+eot removes exactly the appended end-of-turn row again
    back = HFScorer(tiny_model, HiddenStateConfig(token_set="response+eot", transform="drop-special"))
    plain = HFScorer(tiny_model).score(prompts, responses)
    assert [g["stable_rank"] for g in back.score(prompts, responses)] == pytest.approx(
        [p["stable_rank"] for p in plain], rel=1e-4)


# -- metrics -----------------------------------------------------------------------------------

def test_auc_arithmetic():
    assert prompt_auc([3, 2, 1, 0], [True, True, False, False]) == 1.0
    assert prompt_auc([0, 1, 2, 3], [True, True, False, False]) == 0.0
    assert prompt_auc([1, 1, 1, 1], [True, True, False, False]) == 0.5
    # right 2 vs wrong {1, 2, 3}: 1 + 1/2 + 0 -> 1.5 / 3
    assert prompt_auc([2, 1, 2, 3], [True, False, False, False]) == pytest.approx(0.5)
    assert prompt_auc([1, 2], [True, True]) is None
    # NaN ranks last: a NaN right answer loses to every real wrong score
    assert prompt_auc([float("nan"), 0.0], [True, False]) == 0.0
    groups = [([3, 2, 1, 0], [True, True, False, False]), ([0, 1], [True, False]), ([5, 6], [False, False])]
    res = within_prompt_auc(groups, bootstrap=200)
    assert res["auc"] == 0.5 and res["prompts"] == 2
    assert res["ci95"][0] <= 0.5 <= res["ci95"][1]
    # pooled: group 1 has 4 pairs all won, group 2 one pair lost -> 4/5
    assert pairwise_accuracy(groups, bootstrap=200)["accuracy"] == pytest.approx(0.8)
    assert within_prompt_auc([([1, 2], [True, True])])["auc"] is None


def test_bon_accuracy():
    assert bon_pick([1, 3, 3], [False, True, False]) == 0.5      # tie at the top splits the credit
    assert bon_pick([float("nan"), 0.0], [True, False]) == 0.0
    res = bon_accuracy([([1, 2], [False, True]), ([2, 1], [False, True])], bootstrap=200)
    assert res["accuracy"] == 0.5 and res["per_problem"] == [1.0, 0.0]


# -- ablate end to end -------------------------------------------------------------------------

def synthetic_cache(root, tok, model_dir, problems=10, n=4, seed=0, uniform=()):
    """A bench cache as runner.py writes it: random responses, random correctness."""
    from bon_sr.sampling.prompts import encode_prompt, encode_response

    rng = random.Random(seed)
    (root / "cache").mkdir(parents=True)
    lines = []
    for k in range(problems):
        prompt = f"Problem {k}: what is {k} + {k}?"
        cands = []
        for j in range(n):
            text = "".join(rng.choice("abcdefgh 0123456789.") for _ in range(rng.randint(3, 20)))
            ids = encode_response(tok, text)
            correct = rng.random() < 0.5 if j else k % 2 == 0
            cands.append({"text": text, "token_ids": ids, "finish_reason": "stop", "answer": str(j),
                          "correct": correct, "group": j,
                          "scores": {"num_tokens": float(len(ids)), "mean_logprob": rng.random(),
                                     "self_certainty": rng.random(), "sr_response": 1 + rng.random()}})
        if all(c["correct"] for c in cands) or not any(c["correct"] for c in cands):
            cands[0]["correct"] = not cands[0]["correct"]
        if k in uniform:  # all right on even problems, all wrong on odd ones
            for c in cands:
                c["correct"] = k % 2 == 0
        rec = {"version": 1, "id": str(k), "prompt": prompt, "prompt_token_ids": encode_prompt(tok, prompt),
               "gold": str(2 * k), "checker": "numeric", "meta": {}, "seed": k, "candidates": cands,
               "greedy": {**cands[0]}}
        lines.append(json.dumps(rec))
    (root / "cache" / "gsm8k.jsonl").write_text("\n".join(lines) + "\n")
    (root / "cache" / "gsm8k.meta.json").write_text(json.dumps({"model": model_dir, "n_samples": n}))


def test_ablate_end_to_end_resumes_and_random_init(tmp_path, tiny_model_dir, tiny_tokenizer):
    from bon_sr.cli import main

    synthetic_cache(tmp_path / "bench", tiny_tokenizer, tiny_model_dir)
    out = tmp_path / "abl"
    args = ["ablate", "--cache", str(tmp_path / "bench"), "--variants",
            "paper,center,drop-special,drop-massive,standardize,center+length", "--layers", "0,-1",
            "--norms", "post,pre", "--token-set", "response+eot", "--calibration-problems", "3",
            "--bootstrap", "200", "-o", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "Reports:" in res.output
    summary = json.loads((out / "ablate.json").read_text())
    assert (out / "ablate.md").read_text().startswith("# Scorer ablation: gsm8k")
    assert (out / "ablate.png").stat().st_size > 1000
    assert summary["problems"] == 10 and summary["mixed_problems"] == 10 and summary["num_layers"] == 3
    assert len(summary["cells"]) == 6 * 2 * 2
    ref = next(c for c in summary["cells"] if (c["variant"], c["norm"], c["layer"]) == ("paper", "post", 2))
    assert "auc_vs_paper" not in ref and 0.0 <= ref["auc"] <= 1.0
    assert {"greedy", "random", "majority", "oracle"} <= set(summary["baselines"])
    assert summary["baselines"]["oracle"]["accuracy"] == 1.0

    # the paper cell equals the core scorer on the cached ids
    cell = json.loads((out / "cells" / "paper__post__L2.json").read_text())["scores"]
    recs = [json.loads(x) for x in (tmp_path / "bench" / "cache" / "gsm8k.jsonl").read_text().splitlines()]
    from bon_sr.api import load_hf_model

    model, _ = load_hf_model(tiny_model_dir, device="cpu")
    core = HFScorer(model, HiddenStateConfig(token_set="response+eot")).score(
        [recs[0]["prompt_token_ids"]] * 4, [c["token_ids"] for c in recs[0]["candidates"]])
    assert cell[:4] == pytest.approx([c["stable_rank"] for c in core], rel=1e-4)

    # resume: every cell is on disk, nothing is recomputed (files untouched)
    stamp = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*__L*.json")}
    assert CliRunner().invoke(main, args).exit_code == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*__L*.json")} == stamp
    # other settings in the same directory are refused
    bad = CliRunner().invoke(main, [*args, "--random-init"])
    assert bad.exit_code != 0 and "other settings" in bad.output

    ctrl = tmp_path / "ctrl"
    res = CliRunner().invoke(main, ["ablate", "--cache", str(tmp_path / "bench"), "--random-init", "--variants",
                                    "paper,center", "--bootstrap", "200", "-o", str(ctrl)])
    assert res.exit_code == 0, res.output
    assert "random-init control" in res.output
    control = json.loads((ctrl / "ablate.json").read_text())
    assert control["random_init"] is True
    # random labels and random weights: no cell's interval excludes chance
    for c in control["cells"]:
        assert c["auc_ci95"][0] <= 0.5 <= c["auc_ci95"][1]
    # the control really has other weights: its paper cell differs from the trained one
    ctrl_cell = json.loads((ctrl / "cells" / "paper__post__L2.json").read_text())["scores"]
    assert ctrl_cell != pytest.approx(json.loads((out / "cells" / "paper__post__L2.json").read_text())["scores"])


def test_ablate_runs_only_mixed_problems_through_the_model(tmp_path, tiny_model_dir, tiny_tokenizer, monkeypatch):
    from bon_sr.bench import ablate

    synthetic_cache(tmp_path / "bench", tiny_tokenizer, tiny_model_dir, uniform=(2, 5))
    seen = []
    real = ablate.score_cells

    def spy(model, inputs, *args, **kwargs):
        seen.append(sorted(set(inputs.owner)))
        return real(model, inputs, *args, **kwargs)

    monkeypatch.setattr(ablate, "score_cells", spy)
    summary = ablate.run_ablate(ablate.AblateConfig(cache_dir=str(tmp_path / "bench"), variants=("paper",),
                                                    bootstrap=100), tmp_path / "abl")
    assert seen == [[0, 1, 3, 4, 6, 7, 8, 9]]
    scores = json.loads((tmp_path / "abl" / "cells" / "paper__post__L2.json").read_text())["scores"]
    assert scores[8:12] == [0.0] * 4 and scores[20:24] == [0.0] * 4  # problems 2 and 5: not scored
    assert summary["mixed_problems"] == 8
    cell = summary["cells"][0]
    # BoN over all 10 problems: problem 2 (all right) counts 1, problem 5 (all wrong) 0
    from bon_sr.bench.metrics import bon_pick

    recs = [json.loads(x) for x in (tmp_path / "bench" / "cache" / "gsm8k.jsonl").read_text().splitlines()]
    per = [bon_pick(scores[4 * k:4 * k + 4], [c["correct"] for c in r["candidates"]]) for k, r in enumerate(recs)]
    assert per[2] == 1.0 and per[5] == 0.0
    assert cell["bon"]["accuracy"] == pytest.approx(sum(per) / 10)


def test_layer_states_match_single_layer_scorer(tiny_model):
    """Every (norm, layer) from one pass equals iter_hidden_states for that layer alone, in any
    request order (regression: a post-norm intermediate layer once overwrote the last
    layer's pre-norm input, because it calls the final norm again)."""
    from bon_sr.scoring.hidden_states import extract, iter_hidden_states

    prompts, responses = [[1, 2, 3], [4, 5]], [[6, 7, 8, 9], [10, 11, 12]]
    wanted = [("post", 0), ("pre", 2), ("post", 1), ("pre", 0), ("post", 2), ("pre", 1)]
    for order in (wanted, sorted(wanted), wanted[::-1]):
        for b in extract(tiny_model, prompts, responses, views=order, token_set="response", max_batch_tokens=4096):
            batch, states, mask = b.indices, b.states, b.mask
            for (norm, layer), h in states.items():
                cfg = HiddenStateConfig(layer=layer, norm=norm)
                for b2, h2, m2 in iter_hidden_states(tiny_model, [prompts[i] for i in batch],
                                                     [responses[i] for i in batch], cfg):
                    assert torch.equal(mask, m2)
                    assert torch.allclose(h, h2, atol=1e-6), (norm, layer)


def test_ablate_errors(tmp_path, tiny_model_dir, tiny_tokenizer):
    from bon_sr.cli import main

    synthetic_cache(tmp_path / "bench", tiny_tokenizer, tiny_model_dir, problems=2)
    base = ["ablate", "--cache", str(tmp_path / "bench"), "-o", str(tmp_path / "o")]
    res = CliRunner().invoke(main, [*base, "--variants", "paper,nope"])
    assert res.exit_code != 0 and "Unknown variant 'nope'" in res.output
    res = CliRunner().invoke(main, [*base, "--layers", "7"])
    assert res.exit_code != 0 and "out of range" in res.output
    res = CliRunner().invoke(main, [*base, "--task", "math500"])
    assert res.exit_code != 0 and "No bench cache" in res.output


# -- ablate: hidden-state MBR cells ------------------------------------------------------------

def test_ablate_consensus_cells_are_the_mbr_of_extract_states(tmp_path, tiny_model_dir, tiny_tokenizer):
    """--consensus adds mbr-hidden-* cells at every layer: each candidate's score is its MBR
    utility over the embeddings of that layer's states (the product's embedding_summary,
    hidden_similarity and mbr_utilities), and the cell's BoN is the max-utility pick."""
    from bon_sr.api import load_hf_model
    from bon_sr.bench.ablate import CONSENSUS_NOTE
    from bon_sr.cli import main
    from bon_sr.selection.consensus import hidden_similarity, mbr_utilities
    from bon_sr.scoring.hidden_states import embedding_summary, extract

    synthetic_cache(tmp_path / "bench", tiny_tokenizer, tiny_model_dir, problems=6)
    out = tmp_path / "abl"
    res = CliRunner().invoke(main, ["ablate", "--cache", str(tmp_path / "bench"), "--variants", "paper",
                                    "--consensus", "last,mean", "--layers", "0,-1", "--bootstrap", "200",
                                    "-o", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "ablate.json").read_text())
    mbr = ["mbr-hidden-last", "mbr-hidden-last-centred", "mbr-hidden-mean", "mbr-hidden-mean-centred"]
    assert summary["variants"] == ["paper", *mbr]
    assert summary["config"]["consensus"] == ["last", "mean"] and summary["note"].endswith(CONSENSUS_NOTE)
    cells = {(c["variant"], c["norm"], c["layer"]): c for c in summary["cells"]}
    assert set(cells) == {(v, "post", lay) for v in ["paper", *mbr] for lay in (0, 2)}
    assert "| mbr-hidden-mean-centred | post | 0 |" in (out / "ablate.md").read_text()

    recs = [json.loads(x) for x in (tmp_path / "bench" / "cache" / "gsm8k.jsonl").read_text().splitlines()]
    model, _ = load_hf_model(tiny_model_dir, device="cpu")
    for layer in (0, 2):
        per_layer = []
        for rec in recs:
            responses = [c["token_ids"] for c in rec["candidates"]]
            embs = [None] * len(responses)
            for b in extract(model, [rec["prompt_token_ids"]] * len(responses), responses,
                             views=[("post", layer)], embeddings=layer == 2):
                h = b.states[("post", layer)]
                for row, i in enumerate(b.indices):
                    embs[i] = embedding_summary(h[row, : int(b.mask[row].sum())])
                    if layer == 2:  # at the last layer: the product's own embeddings (hook and HF scorer)
                        assert embs[i]["mean"] == pytest.approx(b.embeddings[row]["mean"], abs=1e-6)
                        assert embs[i]["last"] == pytest.approx(b.embeddings[row]["last"], abs=1e-6)
            per_layer.append(embs)
        for key in ("last", "mean"):
            for centred in (False, True):
                variant = f"mbr-hidden-{key}" + ("-centred" if centred else "")
                scores = json.loads((out / "cells" / f"{variant}__post__L{layer}.json").read_text())["scores"]
                picks = []
                for k, (rec, embs) in enumerate(zip(recs, per_layer)):
                    want = mbr_utilities(hidden_similarity([e[key] for e in embs], centred=centred))
                    got = scores[4 * k:4 * k + 4]
                    assert got == pytest.approx(want, abs=1e-5), (variant, layer, k)
                    best = max(range(4), key=lambda j: got[j])
                    assert sorted(got)[-2] < got[best]   # a strict maximum: the pick is unambiguous
                    picks.append(float(rec["candidates"][best]["correct"]))
                assert cells[(variant, "post", layer)]["bon"]["accuracy"] == pytest.approx(sum(picks) / len(recs))


def test_ablate_without_consensus_keeps_the_committed_report_layout(tmp_path, tiny_model_dir, tiny_tokenizer):
    """Without --consensus the summary has the committed reports' keys and note, and the
    committed ablate.md re-derives from its ablate.json unchanged (no model needed)."""
    from pathlib import Path

    from bon_sr.bench.ablate import NOTE, AblateConfig, run_ablate
    from bon_sr.bench.ablate_report import ablate_markdown

    synthetic_cache(tmp_path / "bench", tiny_tokenizer, tiny_model_dir, problems=3)
    summary = run_ablate(AblateConfig(cache_dir=str(tmp_path / "bench"), variants=("paper", "center+length"),
                                      bootstrap=100), tmp_path / "abl")
    committed = sorted(Path(__file__).parent.parent.glob("benchmarks/results/*/ablate*/ablate.json"))
    assert committed
    for path in committed:
        old = json.loads(path.read_text())
        assert set(summary) == set(old) and set(summary["config"]) == set(old["config"]), path
        assert summary["note"] == NOTE == old["note"]
        assert ablate_markdown(old) + "\n" == (path.parent / "ablate.md").read_text(), path
    assert summary["variants"] == ["paper", "center+length"]
    # adding --consensus to the finished run computes only the new cells
    stamp = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "abl" / "cells").glob("*__L*.json")}
    again = run_ablate(AblateConfig(cache_dir=str(tmp_path / "bench"), variants=("paper", "center+length"),
                                    consensus=("last",), bootstrap=100), tmp_path / "abl")
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "abl" / "cells").glob("*__L*.json")
            if p.name in stamp} == stamp
    assert [c["variant"] for c in again["cells"]] == ["paper", "center+length", "mbr-hidden-last",
                                                     "mbr-hidden-last-centred"]


def test_ablate_consensus_errors(tmp_path, tiny_model_dir, tiny_tokenizer):
    from bon_sr.cli import main

    synthetic_cache(tmp_path / "bench", tiny_tokenizer, tiny_model_dir, problems=2)
    base = ["ablate", "--cache", str(tmp_path / "bench"), "-o", str(tmp_path / "o")]
    res = CliRunner().invoke(main, [*base, "--consensus", "first"])
    assert res.exit_code != 0 and "Unknown consensus embedding 'first'" in res.output
    res = CliRunner().invoke(main, [*base, "--consensus", "last", "--token-set", "full"])
    assert res.exit_code != 0 and "--token-set response" in res.output
