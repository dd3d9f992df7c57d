"""Tests of the benchmark layer: checkers, selectors, statistics, cache/resume, data, CLI.

Fast tests use hand-made candidates, a tiny random Llama and a fake sampler; the tests
marked ``slow`` read the real data package and run the default model.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bon_sr.bench import checkers, metrics, report, runner
from bon_sr.selection.answers import group_answers, last_boxed
from bon_sr.bench.checkers import get_checker
from bon_sr.bench.rank_eval import pair_outcome
from bon_sr.bench.selectors import BENCH_SELECTORS, Scored, get_bench_selector
from bon_sr.bench.tasks import Task, load_task
from bon_sr.errors import ConfigError, InputError
from bon_sr.sampling import SamplingConfig
from bon_sr.sampling.fake import FakeSampler



# -- checkers -------------------------------------------------------------------------------

@pytest.mark.parametrize("response, gold, expected", [
    ("She makes 9 * 2 = $18 every day. The answer is 18.", "18", True),
    ("The answer is 1,000.", "1000", True),            # thousands comma in the response
    ("so the total is 1000", "1,000", True),           # ... and in the gold (14 GSM8K golds)
    ("Total: \\boxed{1,000}", "1000", True),
    ("5 x 3 = 15\n#### 15", "15", True),
    ("The answer is 18.00 dollars", "18", True),
    ("The answer is 17.", "18", False),
    ("I am not sure.", "18", False),
    ("The answer is 1, 2 or 3", "123", False),          # a list is not a thousands number
])
def test_numeric_checker(response, gold, expected):
    c = get_checker("numeric")
    assert c.is_correct(c.extract(response), c.gold(gold)) is expected


def test_numeric_gold_from_gsm8k_solution():
    assert get_checker("numeric").gold("Janet sells 16 - 3 - 4 = 9 eggs.\n#### 1,234") == "1234"
    with pytest.raises(ConfigError, match="not a number"):
        get_checker("numeric").gold("seven")


@pytest.mark.parametrize("response, gold, expected", [
    ("So $x = \\boxed{0.5}$.", "\\frac{1}{2}", True),
    ("The answer is \\boxed{\\frac12}", "0.5", True),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "(3,\\frac{\\pi}{2})", True),
    ("\\boxed{1,000}", "1000", True),
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", False),
    ("\\boxed{[2,5)}", "(2,5)", False),                 # interval ends matter
])
def test_math_checker_latex_equivalence(response, gold, expected):
    c = get_checker("math")
    assert c.is_correct(c.extract(response), c.gold(gold)) is expected


def test_math_gold_is_last_boxed_with_nested_braces():
    solution = "First \\boxed{2}. Therefore $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$"
    assert get_checker("math").gold(solution) == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert last_boxed("no box") is None
    assert last_boxed("\\boxed{a{b}c} and \\fbox{d}") == "d"


@pytest.mark.parametrize("response, letter", [
    ("Reasoning...\nThe answer is (B).", "B"),
    ("**Answer:** C", "C"),
    ("The answer is a number, so (B)", "B"),
    ("so \\boxed{D}", "D"),
    ("I pick\nA\n", "A"),
    ("The answer is A. Wait, no: the answer is C", "C"),  # the last statement wins
    ("nothing here", None),
])
def test_choice_extraction(response, letter):
    assert get_checker("choice").extract(response) == letter


def test_choice_gold_and_exact():
    c = get_checker("choice")
    assert c.gold("2") == "C" and c.gold("(b)") == "B"
    assert c.is_correct("C", "C") and not c.is_correct("A", "C") and not c.is_correct(None, "C")
    e = get_checker("exact")
    assert e.is_correct(e.extract("The answer is Paris."), e.gold("paris"))


def test_unknown_checker_lists_available():
    with pytest.raises(ConfigError, match="Unknown checker 'nope'. Available: choice, exact, math, numeric"):
        get_checker("nope")


def test_group_answers():
    assert group_answers(["1,000", "1000", "7", None, "7.0"], get_checker("numeric")) == [0, 0, 1, -1, 1]
    assert group_answers(["\\frac{1}{2}", "0.5", "\\frac13", None], get_checker("math")) == [0, 0, 1, -1]


# -- selectors ------------------------------------------------------------------------------

def cands(groups, correct, sr=None, lengths=None, **scores):
    sr = sr or [1.0] * len(groups)
    lengths = lengths or [10] * len(groups)
    out = []
    for i, (g, c) in enumerate(zip(groups, correct)):
        s = {"sr_response": sr[i], **{k: v[i] for k, v in scores.items()}}
        out.append(Scored(correct=c, group=g, num_tokens=lengths[i], scores=s))
    return out


def pick(name, cs):
    w = get_bench_selector(name).fn(cs)
    assert sum(w) == pytest.approx(1.0)
    return w.index(max(w))


def test_majority_picks_most_frequent_answer():
    assert pick("majority", cands([0, 1, 1, 2], [False, True, True, False])) == 1


def test_majority_tie_goes_to_earliest_answer_class():
    # classes 1 and 0 both have 2 votes; class 1 appears first (index 0), so index 0 wins
    assert pick("majority", cands([1, 0, 0, 1], [False, True, True, False])) == 0
    # unanswered candidates do not vote; none answered -> the first candidate
    assert pick("majority", cands([-1, -1, 3], [False, False, True])) == 2
    assert pick("majority", cands([-1, -1], [False, False])) == 0


def test_majority_sr_tiebreak_and_sr_weighted_vote():
    cs = cands([1, 0, 0, 1], [False, True, True, False], sr=[1.0, 3.0, 1.0, 1.0])
    assert pick("majority-sr-tiebreak", cs) == 1          # class 0 holds the highest SR (3.0)
    # SR sums: class 0 -> 5.0, class 1 -> 2.0 + 2.0 = 4.0; majority would pick class 1
    cs = cands([0, 1, 1], [True, False, False], sr=[5.0, 2.0, 2.0])
    assert pick("majority", cs) == 1
    assert pick("sr-weighted-vote", cs) == 0
    # the winning class's highest-SR member is the pick
    cs = cands([0, 0, 1], [True, True, False], sr=[2.0, 3.0, 4.0])
    assert pick("sr-weighted-vote", cs) == 1


def test_score_max_selectors_and_nan():
    cs = cands([0, 1, 2], [False, True, False], sr=[2.0, float("nan"), 2.5],
               sr_full=[1.0, 3.0, 2.0], mean_logprob=[-1.0, -0.2, -0.5], self_certainty=[4.0, 1.0, 9.0])
    assert pick("sr-response", cs) == 2                  # NaN ranks last
    assert pick("sr-full", cs) == 1
    assert pick("mean-logprob", cs) == 1
    assert pick("self-certainty", cs) == 2
    cs = cands([0, 1], [False, True], sr=[2.0, 2.0])
    assert pick("sr-response", cs) == 0                  # equal scores: the earliest


def test_oracle_random_shortest():
    cs = cands([0, 1, 2, 3], [False, False, True, True], lengths=[5, 3, 8, 9])
    assert pick("oracle", cs) == 2
    assert get_bench_selector("random").fn(cs) == [0.25] * 4
    assert pick("shortest", cs) == 1
    assert pick("oracle", cands([0], [False])) == 0


def test_selector_errors():
    with pytest.raises(ConfigError, match=r"Unknown selector 'best'. Available: auto, exec, exec\+greedy, exec-logprob, exec-mbr, exec-sr, greedy, majority"):
        get_bench_selector("best")
    with pytest.raises(ConfigError, match="no 'self_certainty' score"):
        get_bench_selector("self-certainty").fn(cands([0], [True]))
    with pytest.raises(ConfigError, match="zero candidates"):
        get_bench_selector("majority").fn([])


# -- statistics -----------------------------------------------------------------------------

def test_relative_pct_and_bootstrap_by_hand():
    assert report.relative_pct(0.6, 0.5) == pytest.approx(20.0)
    assert report.relative_pct(0.4, 0.5) == pytest.approx(-20.0)
    assert report.relative_pct(0.3, 0.0) is None
    # resample means of [0, 1] over rows [0,0], [1,1], [0,1]: 0, 1, 0.5 -> sorted 0, .5, 1;
    # numpy's linear percentile: 2.5% at position 0.05 -> 0.025, 97.5% at 1.95 -> 0.975
    idx = np.array([[0, 0], [1, 1], [0, 1]])
    assert metrics.bootstrap_ci([0.0, 1.0], idx) == pytest.approx((0.025, 0.975))
    assert metrics.bootstrap_ci([0.3] * 5, metrics.bootstrap_indices(5, 200)) == pytest.approx((0.3, 0.3))


def test_summarize_points_and_relative():
    evaluation = {"ids": ["a", "b", "c", "d"], "n": [2], "mixed_problems": 2,
                  "accuracy": {"greedy": {2: [1, 0, 0, 1]}, "random": {2: [0.5, 0.5, 0.25, 0.25]},
                               "sr-response": {2: [1, 1, 0, 0]}},
                  "length": {"greedy": {2: [10, 20, 30, 40]}, "random": {2: [1, 1, 1, 1]},
                             "sr-response": {2: [4, 4, 4, 4]}}}
    s = report.summarize(evaluation, bootstrap=200)
    sr = s["results"]["2"]["sr-response"]
    assert sr["accuracy"] == pytest.approx(0.5)
    assert sr["vs_greedy"]["points"] == pytest.approx(0.0)            # 50% vs 50%
    assert sr["vs_greedy"]["relative_pct"] == pytest.approx(0.0)
    assert sr["vs_random"]["points"] == pytest.approx(12.5)           # 50% - 37.5%
    assert sr["vs_random"]["relative_pct"] == pytest.approx(100 * 0.125 / 0.375)
    assert s["results"]["2"]["greedy"]["mean_length"] == pytest.approx(25.0)
    assert "vs_greedy" not in s["results"]["2"]["greedy"]
    lo, hi = sr["ci95"]
    assert 0.0 <= lo <= 0.5 <= hi <= 1.0


def test_subsets_enumerated_or_seeded():
    assert len(runner.subsets_for(4, 2, 32, 0, "p")) == 6           # C(4,2) = 6 <= 32: all of them
    assert runner.subsets_for(4, 4, 32, 0, "p") == [(0, 1, 2, 3)]
    drawn = runner.subsets_for(16, 8, 32, 0, "p")                   # C(16,8) = 12870 > 32
    assert len(drawn) == 32 and all(list(s) == sorted(set(s)) and len(s) == 8 for s in drawn)
    assert drawn == runner.subsets_for(16, 8, 32, 0, "p")
    assert drawn != runner.subsets_for(16, 8, 32, 0, "q")
    with pytest.raises(ConfigError):
        runner.subsets_for(4, 5, 32, 0, "p")


def _record(pid, correct, groups, sr, greedy_correct):
    cs = [{"text": "", "token_ids": [1] * (i + 1), "correct": c, "group": g,
           "scores": {"sr_response": s, "sr_full": s, "mean_logprob": 0.0, "self_certainty": 0.0}}
          for i, (c, g, s) in enumerate(zip(correct, groups, sr))]
    return {"id": pid, "candidates": cs, "greedy": {"correct": greedy_correct, "token_ids": [1, 2]}}


def test_evaluate_records_by_hand():
    recs = [_record("a", [True, False, False, False], [0, 1, 1, 2], [1.0, 2.0, 3.0, 4.0], True),
            _record("b", [False, True, True, False], [0, 1, 1, 0], [4.0, 1.0, 1.0, 1.0], False)]
    ev = runner.evaluate_records(recs, [1, 2, 4], ["greedy", "majority", "oracle", "random", "sr-response"])
    # n=4: sr picks index 3 in a (wrong), index 0 in b (wrong); majority picks class 1 in a
    # (wrong) and, tied 2-2 in b, class 0 (first appearance; wrong); the oracle is right on both
    assert ev["accuracy"]["sr-response"][4] == [0.0, 0.0]
    assert ev["accuracy"]["majority"][4] == [0.0, 0.0]
    assert ev["accuracy"]["oracle"][4] == [1.0, 1.0]
    # random@n over all enumerated subsets = mean correctness: 1/4 and 2/4 at every n
    for n in (1, 2, 4):
        assert ev["accuracy"]["random"][n] == pytest.approx([0.25, 0.5])
    # oracle@2 = pass@2 = 1 - C(N-c, 2)/C(N, 2): a: 1 - 3/6 = 0.5; b: 1 - 1/6
    assert ev["accuracy"]["oracle"][2] == pytest.approx([0.5, 5 / 6])
    assert ev["accuracy"]["greedy"][2] == [1.0, 0.0]
    assert ev["length"]["random"][4] == pytest.approx([2.5, 2.5])  # lengths 1..4
    assert ev["mixed_problems"] == 2


def test_truncation_share_by_hand():
    rec = _record("a", [True, False, False, False], [0, 1, 1, 2], [1.0, 2.0, 3.0, 4.0], True)
    for c, reason in zip(rec["candidates"], ["stop", "length", "stop", "length"]):
        c["finish_reason"] = reason
    rec["greedy"]["finish_reason"] = "length"
    ev = runner.evaluate_records([rec], [1, 4], ["greedy", "random", "sr-response"])
    assert ev["truncated"]["sr-response"][4] == [1.0]  # picks index 3, cut at the limit
    assert ev["truncated"]["random"][4] == [0.5]  # 2 of 4 were cut
    assert ev["truncated"]["greedy"][1] == [1.0]
    summary = report.summarize(ev, bootstrap=50)
    assert summary["results"]["4"]["random"]["truncated"] == 0.5
    summary.update(task="t", problems=1, n_samples=4, subsets=32)
    assert "| cut at max tokens % |" in report.bench_markdown(summary)


def test_read_cache_cuts_torn_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"id": "1", "x": 1}) + "\n" + '{"id": "2", "x"')
    assert list(runner.read_cache(path)) == ["1"]
    # reading skips the torn line; the cache's writer cuts it, under its lock (issue 31)
    runner.JsonlWriter(path, mode="resume").close()
    assert path.read_text() == json.dumps({"id": "1", "x": 1}) + "\n"


# -- tasks ------------------------------------------------------------------------------------

def test_custom_jsonl_task(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in [
        {"id": "q1", "prompt": "2+2?", "answer": "4", "checker": "numeric"},
        {"prompt": "Capital of France?", "answer": "Paris"},
    ]) + "\n")
    with pytest.raises(InputError, match="no 'checker' given"):
        load_task(str(path))
    task = load_task(str(path), checker="exact")
    assert [p.id for p in task.problems] == ["q1", "2"]
    assert [p.checker for p in task.problems] == ["numeric", "exact"]
    assert task.problems[1].answer == "paris"
    assert len(load_task(str(path), checker="exact", limit=1).problems) == 1


def test_python_task_file(tmp_path):
    path = tmp_path / "task_def.py"
    path.write_text("from bon_sr.bench.tasks import Problem, Task\n"
                    "TASK = Task('tiny', (Problem('1', 'Say 3.', '3', 'numeric'),))\n")
    assert load_task(str(path)).name == "tiny"
    # a task file may grade with a checker of its own, registered by name
    own = tmp_path / "task_own.py"
    own.write_text("from bon_sr.bench.checkers import Checker, register_checker\n"
                   "from bon_sr.bench.tasks import Problem, Task\n"
                   "register_checker(Checker('parity', 'odd or even', lambda r: r.split()[-1] if r.split() else None,\n"
                   "                         lambda g: g.lower(), lambda a, b: a.lower() == b.lower()))\n"
                   "TASK = Task('par', (Problem('1', 'Is 3 odd or even?', 'odd', 'parity'),))\n")
    try:
        task = load_task(str(own))
        parity = get_checker(task.problems[0].checker)
        assert parity.is_correct(parity.extract("It is ODD"), task.problems[0].answer)
        assert parity.group(["odd", "ODD", None, "even"]) == [0, 0, -1, 1]
    finally:
        checkers.CHECKERS.pop("parity", None)
    with pytest.raises(ConfigError, match="Unknown task 'nope'"):
        load_task("nope")


# -- scores on a tiny random model -------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def test_scores_match_hfscorer_and_logits(tiny_model):
    from bon_sr.bench.scores import score_candidates
    from bon_sr.scoring.hidden_states import HiddenStateConfig
    from bon_sr.scoring.scorers import HFScorer

    prompts = [[1, 2, 3, 4], [5, 6]]
    responses = [[7, 8, 9], [10, 11, 12, 13, 14]]
    got = score_candidates(tiny_model, prompts, responses, config=HiddenStateConfig(max_batch_tokens=8))
    for token_set, key in (("response", "sr_response"), ("full", "sr_full")):
        ref = HFScorer(tiny_model, HiddenStateConfig(token_set=token_set)).score(prompts, responses)
        torch.testing.assert_close(torch.tensor([g[key] for g in got]),
                                   torch.tensor([r["stable_rank"] for r in ref]), rtol=1e-4, atol=1e-5)
    for g, p, r in zip(got, prompts, responses):
        with torch.no_grad():
            logp = torch.log_softmax(tiny_model(torch.tensor([p + r])).logits[0].float(), -1)[len(p) - 1:-1]
        lp = logp.gather(-1, torch.tensor(r)[:, None]).mean()
        # KL(U || p) = sum_j (1/V) log((1/V) / p_j) = -log V - mean_j log p_j
        kl = (-math.log(97) - logp.mean(-1)).mean()
        torch.testing.assert_close(torch.tensor(g["mean_logprob"]), lp, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.tensor(g["self_certainty"]), kl, rtol=1e-4, atol=1e-5)
        assert g["num_tokens"] == len(r)
    pre = score_candidates(tiny_model, prompts, responses, config=HiddenStateConfig(norm="pre"))
    ref = HFScorer(tiny_model, HiddenStateConfig(norm="pre")).score(prompts, responses)
    assert pre[0]["sr_response"] == pytest.approx(ref[0]["stable_rank"], rel=1e-4)
    empty = score_candidates(tiny_model, [[1, 2]], [[]])[0]
    assert math.isnan(empty["sr_response"]) and math.isnan(empty["mean_logprob"])


# -- the runner with a fake sampler: caching, resume, reports -----------------------------------

class CharTokenizer:
    chat_template = None
    pad_token_id = 0
    eos_token_id = 1

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [2 + (ord(ch) % 90) for ch in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def fake_generator(tiny_model, calls):
    tok = CharTokenizer()

    def responses(prompt_ids, n, seed):
        calls.append(n)
        # alternate a right and a wrong answer to '2+2' so that every selector has work
        return [f"The answer is {4 if i % 2 == 0 else 5}." for i in range(n)]

    sampler = FakeSampler(tok, responses)
    greedy = FakeSampler(tok, lambda ids, n, seed: ["The answer is 5."])

    def sample(prompt_ids, seeds):
        groups = sampler.sample(prompt_ids, n=4, seeds=seeds)
        return groups, [g[0] for g in greedy.sample(prompt_ids, n=1, seeds=seeds)]

    # the public surface the bench uses: encode, context, sample(..., greedy=True), hf_model
    return SimpleNamespace(backend="hf", context=None, tokenizer=tok, hf_model=tiny_model, close=lambda: None,
                           encode=lambda prompt, where="": tok(prompt)["input_ids"],
                           sample=lambda prompt_ids, seeds, greedy=False: sample(prompt_ids, seeds))


def test_run_bench_caches_and_resumes(tmp_path, monkeypatch, tiny_model):
    calls: list[int] = []
    monkeypatch.setattr(runner, "load_generator", lambda *a, **k: fake_generator(tiny_model, calls))
    task = Task("toy", tuple(runner.Problem(str(i), f"What is 2+2? ({i})", "4", "numeric") for i in range(3)))
    config = runner.BenchConfig(task="toy", n=(1, 2, 4), backend="hf", bootstrap=200)
    s = runner.run_bench(config, tmp_path, task=task)
    assert s["generated_now"] == 3 and calls == [4, 4, 4]
    res = s["results"]
    assert res["4"]["random"]["accuracy"] == pytest.approx(0.5)
    assert res["4"]["oracle"]["accuracy"] == 1.0
    assert res["4"]["greedy"]["accuracy"] == 0.0
    assert res["4"]["random"]["vs_greedy"]["points"] == pytest.approx(50.0)
    assert res["4"]["random"]["vs_greedy"]["relative_pct"] is None           # greedy is 0
    assert res["4"]["majority"]["accuracy"] == 1.0                           # tie 2-2, '4' comes first
    for name in ("json", "md", "png"):
        assert (tmp_path / f"toy.{name}").is_file()
    assert "relative %" in (tmp_path / "toy.md").read_text()
    # resume: nothing new is generated; one more problem generates exactly one
    again = runner.run_bench(config, tmp_path, task=task)
    assert again["generated_now"] == 0 and len(calls) == 3
    bigger = Task("toy", task.problems + (runner.Problem("3", "What is 2+2? (3)", "4", "numeric"),))
    assert runner.run_bench(config, tmp_path, task=bigger)["generated_now"] == 1
    # a new selector subset re-scores from the cache without the model
    monkeypatch.setattr(runner, "load_generator", lambda *a, **k: pytest.fail("model loaded"))
    only = runner.BenchConfig(task="toy", n=(2,), backend="hf", selectors=("majority", "shortest"),
                              bootstrap=200)
    s = runner.run_bench(only, tmp_path, task=bigger, generate=False)
    assert set(s["results"]["2"]) == {"majority", "shortest"}
    # other sampling settings refuse to mix into the same cache
    with pytest.raises(ConfigError, match="other settings"):
        runner.run_bench(runner.BenchConfig(task="toy", n=(4,), backend="hf", sampling=SamplingConfig(temperature=1.0)),
                         tmp_path, task=bigger)
    record = json.loads((tmp_path / "cache" / "toy.jsonl").read_text().splitlines()[0])
    assert {"prompt_token_ids", "candidates", "greedy", "gold"} <= set(record)
    assert {"text", "token_ids", "answer", "correct", "group", "scores"} <= set(record["candidates"][0])


def test_bench_scorer_is_part_of_the_cache_identity(tmp_path, monkeypatch, tiny_model):
    monkeypatch.setattr(runner, "load_generator", lambda *a, **k: fake_generator(tiny_model, []))
    with pytest.raises(ConfigError, match="Unknown bench scorer"):
        runner.BenchConfig(task="toy", scorer="pooling")
    task = Task("toy", (runner.Problem("0", "What is 2+2?", "4", "numeric"),))
    with pytest.raises(ConfigError, match="--scorer hook needs --backend vllm"):
        runner.run_bench(runner.BenchConfig(task="toy", n=(2,), backend="hf", scorer="hook"), tmp_path, task=task)
    config = runner.BenchConfig(task="toy", n=(2,), backend="hf", bootstrap=200)
    assert runner.run_bench(config, tmp_path, task=task)["config"]["scorer"] == "hf"  # auto with hf
    # a cache written before the scorer was recorded was scored by HF: auto resumes it
    meta_path = tmp_path / "cache" / "toy.meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["scorer"]
    meta_path.write_text(json.dumps(meta))
    bigger = Task("toy", task.problems + (runner.Problem("1", "What is 3+3?", "6", "numeric"),))
    assert runner.run_bench(config, tmp_path, task=bigger)["generated_now"] == 1


def test_bench_config_validation():
    with pytest.raises(ConfigError, match="Unknown selector"):
        runner.BenchConfig(task="gsm8k", selectors=("nope",))
    with pytest.raises(ConfigError, match="positive integers"):
        runner.BenchConfig(task="gsm8k", n=(0, 2))
    assert runner.BenchConfig(task="gsm8k", n=(4, 1, 4)).n == (1, 4)
    assert set(BENCH_SELECTORS) >= {"majority", "oracle", "random", "self-certainty", "mean-logprob",
                                    "sr-response", "sr-full", "sr-weighted-vote"}


def test_rank_eval_outcomes():
    assert pair_outcome(2.0, 1.0) == 1.0
    assert pair_outcome(1.0, 2.0) == 0.0
    assert pair_outcome(1.0, 1.0) == 0.5
    assert pair_outcome(float("nan"), 1.0) == 0.5
    s = report.summarize_pairs({"a": [1.0, 0.0, 1.0, 0.5]}, ["x", "x", "y", "y"], bootstrap=200)
    assert s["categories"]["all"]["a"]["accuracy"] == pytest.approx(0.625)
    assert s["categories"]["x"]["a"]["accuracy"] == pytest.approx(0.5)
    assert s["categories"]["y"]["a"]["accuracy"] == pytest.approx(0.75)


def test_cli_errors_are_click_exceptions(tmp_path):
    from click.testing import CliRunner

    from bon_sr.bench.cli import bench, rank_eval

    result = CliRunner().invoke(bench, ["--task", "nope", "-o", str(tmp_path)])
    assert result.exit_code != 0 and "Unknown task 'nope'" in result.output
    result = CliRunner().invoke(bench, ["--task", "gsm8k", "--n", "a,b", "-o", str(tmp_path)])
    assert result.exit_code != 0 and "comma-separated integers" in result.output
    result = CliRunner().invoke(rank_eval, ["-o", str(tmp_path)])
    assert result.exit_code != 0 and "exactly one of --pairs" in result.output
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "hi", "chosen": "a"}\n')
    result = CliRunner().invoke(rank_eval, ["--pairs", str(bad), "-o", str(tmp_path)])
    assert result.exit_code != 0 and "'rejected' must be a non-empty string" in result.output


# -- real data and the real default model (slow) -------------------------------------------------

@pytest.mark.slow
def test_data_package_loads_real_sets():
    from bon_sr.bench.data import EXPECTED_COUNTS, load_dataset_items

    for name, count in EXPECTED_COUNTS.items():
        assert len(load_dataset_items(name)) == count
    gsm = load_task("gsm8k")
    assert gsm.problems[0].answer == "18"
    commas = [it for it in load_dataset_items("gsm8k") if "," in it["short_answer"]]
    assert len(commas) == 14
    assert all("," not in p.answer for p in gsm.problems)
    math500 = load_task("math500", limit=1)
    assert math500.problems[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    arc = load_task("arc-challenge", limit=2)
    assert arc.problems[0].answer == "C" and "\nD. " in arc.problems[0].prompt
    mmlu = load_task("mmlu", limit=3)
    assert len({p.meta["subject"] for p in mmlu.problems}) == 3    # interleaved across subjects


@pytest.mark.slow
def test_real_bench_end_to_end_and_resume(tmp_path, one_thread):
    from click.testing import CliRunner

    from bon_sr.bench.cli import bench

    args = ["--task", "gsm8k", "--limit", "3", "--n", "1,2,4", "--max-new-tokens", "64", "--backend", "hf",
            "--bootstrap", "200", "-o", str(tmp_path)]
    first = CliRunner().invoke(bench, args)
    assert first.exit_code == 0, first.output
    assert "3 generated now" in first.output
    for name in ("json", "md", "png"):
        assert (tmp_path / f"gsm8k.{name}").stat().st_size > 0
    summary = json.loads((tmp_path / "gsm8k.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "cache" / "gsm8k.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(len(r["candidates"]) == 4 for r in records)
    mean_correct = np.mean([np.mean([c["correct"] for c in r["candidates"]]) for r in records])
    greedy = np.mean([r["greedy"]["correct"] for r in records])
    for n, row in summary["results"].items():
        for sel, e in row.items():
            assert e["accuracy"] <= row["oracle"]["accuracy"] + 1e-12, (n, sel)
            assert e["ci95"][0] <= e["accuracy"] + 1e-12 <= e["ci95"][1] + 2e-12
            if sel != "greedy":
                assert e["vs_greedy"]["points"] == pytest.approx(100 * (e["accuracy"] - greedy))
        # C(4, n) <= 32 subsets, all enumerated: random@n is exactly the mean correctness
        assert row["random"]["accuracy"] == pytest.approx(mean_correct)
        assert row["greedy"]["accuracy"] == pytest.approx(greedy)
    for sel, e in summary["results"]["1"].items():
        if sel != "greedy":   # one candidate: every selector picks it
            assert e["accuracy"] == pytest.approx(mean_correct)
    second = CliRunner().invoke(bench, args)
    assert second.exit_code == 0, second.output
    assert "0 generated now" in second.output
    assert len((tmp_path / "cache" / "gsm8k.jsonl").read_text().splitlines()) == 3


@pytest.mark.slow
def test_real_rank_eval(tmp_path, one_thread):
    from click.testing import CliRunner

    from bon_sr.bench.cli import rank_eval

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(x) for x in [
        {"prompt": "What is 2+2?", "chosen": "2+2 = 4.", "rejected": "2+2 = 5.", "category": "math"},
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Berlin, obviously.", "category": "facts"},
        {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No.", "category": "facts"},
    ]) + "\n")
    result = CliRunner().invoke(rank_eval, ["--pairs", str(pairs), "--bootstrap", "200", "-o", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "r" / "rank_eval.json").read_text())
    assert summary["categories"]["all"]["pairs"] == 3 and set(summary["categories"]) == {"all", "facts", "math"}
    for s in ("sr-response", "sr-full", "mean-logprob", "self-certainty", "length"):
        assert 0.0 <= summary["categories"]["all"][s]["accuracy"] <= 1.0
    assert (tmp_path / "r" / "rank_eval.png").is_file() and (tmp_path / "r" / "rank_eval.md").is_file()


def test_extract_number_boxed_without_digits_falls_back():
    from bon_sr.selection.answers import extract_number

    # A \boxed{} with no number (seen on GSM8K from Qwen2.5-Coder-0.5B) must not crash:
    # the next rule (last number of the response) applies.
    assert extract_number("So x = 7.\n\\boxed{x}") == "7"
    assert extract_number("\\boxed{\\text{none}}") is None


def test_bench_chunk_size_must_be_positive():
    from bon_sr.bench.runner import BenchConfig
    from bon_sr.errors import ConfigError

    with pytest.raises(ConfigError, match="--chunk-size must be >= 1"):
        BenchConfig(task="gsm8k", chunk_size=0)
