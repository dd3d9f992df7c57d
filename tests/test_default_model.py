"""End-to-end tests on the REAL offline default model (SmolLM2-135M-Instruct, converted
from the PyPI wheel on first use). Marked slow; CI runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bon_sr import BestOfN, select_best
from bon_sr.models import DEFAULT_MODEL, verify_builtin

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bon(default_model_dir):
    return BestOfN(DEFAULT_MODEL, backend="hf", n=3, max_new_tokens=24, seed=7, selector="stable-rank")


def test_builtin_model_cached_with_checksums(default_model_dir):
    assert verify_builtin(DEFAULT_MODEL)
    cfg = json.loads((Path(default_model_dir) / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576


def test_select_best_samples_scores_selects(bon):
    sel = bon.select("What is the capital of France? Answer in one sentence.")
    assert len(sel.candidates) == 3
    srs = [c.scores["stable_rank"] for c in sel.candidates]
    assert sel.best_index == max(range(3), key=lambda i: (srs[i], -i))
    for c in sel.candidates:
        assert c.token_ids and c.text
        # Real SR of several distinct rows is > 1 (the estimator clamps a degenerate result to
        # exactly 1) and (PAPER.md) small, about 2, because massive activations dominate.
        assert c.num_tokens > 1 and 1.0 < c.scores["stable_rank"] < min(c.num_tokens, 10.0)
    assert "paris" in " ".join(c.text.lower() for c in sel.candidates)


def test_seeds_reproduce(bon):
    a = bon.select("Name a colour.", seed=3)
    b = bon.select("Name a colour.", seed=3)
    c = bon.select("Name a colour.", seed=4)
    assert [x.token_ids for x in a.candidates] == [x.token_ids for x in b.candidates]
    assert [x.token_ids for x in a.candidates] != [x.token_ids for x in c.candidates]
    assert [x.scores for x in a.candidates] == [x.scores for x in b.candidates]


def test_hidden_states_equal_hf_output_on_real_model(bon):
    p = bon.encode("Say hi.")
    r = bon.tokenizer("Hi there, friend!", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ref = bon.hf_model(torch.tensor([p + r]), output_hidden_states=True).hidden_states[-1][0]
    from bon_sr.scoring.stable_rank import stable_rank_exact

    for token_set, rows in (("response", ref[len(p):]), ("full", ref)):
        from bon_sr.scoring.hidden_states import HiddenStateConfig
        from bon_sr.scoring.scorers import HFScorer

        score = HFScorer(bon.hf_model, HiddenStateConfig(token_set=token_set)).score([p], [r])[0]
        assert score["scored_tokens"] == rows.shape[0]
        assert score["stable_rank"] == pytest.approx(float(stable_rank_exact(rows).stable_rank), rel=1e-4)


def test_select_best_given_candidates(default_model_dir):
    sel = select_best("What is 2+2?", candidates=["4", "2+2 equals 4, since adding two and two gives four."],
                      backend="hf", selector="stable-rank")
    assert [c.index for c in sel.candidates] == [0, 1]
    assert sel.candidates[0].scores["stable_rank"] == pytest.approx(1.0)     # one token
    assert sel.best_index == 1


def _run_cli(*args):
    """``bon-sr ARGS`` in this process (click's CliRunner; stdout and stderr apart)."""
    from click.testing import CliRunner

    from bon_sr.cli import main

    return CliRunner().invoke(main, list(args))


def test_cli_generate_example_prompts(tmp_path, default_model_dir):
    out = tmp_path / "out.jsonl"
    r = _run_cli("generate", str(ROOT / "examples/prompts.jsonl"), "-o", str(out), "--backend", "hf", "--n", "2",
                 "--max-new-tokens", "24", "--seed", "0")
    assert r.exit_code == 0, r.output
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    ids = [json.loads(x)["id"] for x in (ROOT / "examples/prompts.jsonl").read_text().splitlines() if x.strip()]
    assert [x["id"] for x in recs] == ids
    for rec in recs:
        assert rec["response"] == rec["candidates"][rec["best_index"]]["text"]
        # the default selector, auto: no answer format given, so mbr's lexical consensus
        assert rec["config"]["sampling"]["n"] == 2 and rec["selector"] == "auto" and rec["rule"].startswith("auto: mbr")
    assert "Done: 4 prompts written" in r.stderr.replace("\n", " ")


def test_cli_prompt_longer_than_context(tmp_path, default_model_dir):
    p = tmp_path / "long.jsonl"
    p.write_text(json.dumps({"id": "long", "prompt": "word " * 9000}) + "\n")
    out = tmp_path / "out.jsonl"
    r = _run_cli("generate", str(p), "-o", str(out), "--backend", "hf", "--n", "1")
    assert r.exit_code != 0
    err = " ".join(r.stderr.split())
    assert "context is 8192 tokens" in err and "Shorten the prompt" in err
    assert not out.exists() or out.read_text() == ""


def test_cli_ctrl_c_keeps_finished_records_and_resume_completes(tmp_path, default_model_dir):
    prompts = tmp_path / "p.txt"
    # 12 prompts, stopped once 2 are written: the 10 left take seconds, the poll 20 ms, so the
    # run cannot finish between a poll and the signal (6 prompts polled every 0.2 s could)
    count = 12
    prompts.write_text("\n".join(f"Count from 1 to {k}." for k in range(3, 3 + count)) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["generate", str(prompts), "-o", str(out), "--backend", "hf", "--n", "2", "--max-new-tokens", "32"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # A shell without job control (nohup ... &, some CI runners) starts us with SIGINT ignored,
    # and a child Python would inherit that and never see Ctrl-C: give it the default back.
    proc = subprocess.Popen([sys.executable, "-m", "bon_sr.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "run finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "rerun with --resume" in " ".join(err.split())      # rich wraps long lines
    lines = out.read_text().splitlines()
    assert 2 <= len(lines) < count
    kept = [json.loads(x) for x in lines]                       # every line is complete JSON
    r = _run_cli(*args, "--resume")
    assert r.exit_code == 0, r.output
    final = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in final] == [str(i) for i in range(1, count + 1)]
    assert final[: len(kept)] == kept


def test_cli_generate_majority_vote_on_math_prompts(tmp_path, default_model_dir):
    """The selector that measured best here, end to end on the real model: answers are
    extracted, the votes are in the output, and the pick carries the most-voted answer."""
    p = tmp_path / "math.jsonl"
    p.write_text("".join(json.dumps({"id": f"q{a}", "prompt": f"What is {a} + {a}? Answer with the number."}) + "\n"
                         for a in (2, 7, 12)))
    out = tmp_path / "out.jsonl"
    r = _run_cli("generate", str(p), "-o", str(out), "--backend", "hf", "--n", "5", "--max-new-tokens", "32",
                 "--selector", "majority", "--answer", "numeric")
    assert r.exit_code == 0, r.output
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(recs) == 3
    voted = 0
    for rec in recs:
        answers = [c.get("answer") for c in rec["candidates"]]
        assert rec["selector"] == "majority" and rec["config"]["answer"] == "numeric"
        assert not rec["scores"]                                   # majority needs no hidden-state pass
        if not any(a is not None for a in answers):
            assert rec["rule"].startswith("fallback: first") and rec["best_index"] == 0
            continue
        voted += 1
        counts = {a: answers.count(a) for a in answers if a is not None}
        assert rec["votes"] == counts
        top = max(counts.values())
        winner = next(a for a in answers if a is not None and counts[a] == top)   # earliest of the tied
        assert rec["answer"] == winner == answers[rec["best_index"]]
        assert rec["best_index"] == answers.index(winner) and rec["rule"] == "majority"
    assert voted >= 2, recs                                        # the model answers simple sums
