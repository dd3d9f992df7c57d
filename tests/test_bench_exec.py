"""The bench's exec columns on a tiny synthetic cache: each problem's candidates run once on the
examples its prompt shows (the product's python format, in the sandbox), the pass-first vote
at every n and subset, the greedy decode in the pool, the step's time and timeouts in the
report, and no exec column where no prompt shows an example."""

from __future__ import annotations

import json
import math

import pytest

import bon_sr.sandbox as sandbox
from bon_sr.bench import report, runner
from bon_sr.bench.execution import ExecRuns, exec_plan
from bon_sr.bench.selectors import get_bench_selector

PROMPT = "Write a function add(a, b) that adds two numbers.\n```python\nassert add(1, 2) == 3\n```"
GOOD = "```python\ndef add(a, b):\n    return a + b\n```"
GOOD_TOO = "Here.\n```python\ndef add(x, y):\n    return y + x\n```"
WRONG = "```python\ndef add(a, b):\n    return a - b\n```"
CONST = "```python\ndef add(a, b):\n    return 3\n```"  # passes the shown example, wrong on the others


def _cand(text: str, correct: bool, sr: float = 1.0, logprob: float = -1.0) -> dict:
    return {"text": text, "token_ids": [1] * 10, "finish_reason": "stop", "answer": text, "correct": correct,
            "group": -1, "scores": {"sr_response": sr, "sr_full": sr, "mean_logprob": logprob,
                                    "self_certainty": 0.0, "num_tokens": 10.0}}


def _record(pid: str, prompt: str, cands: list[tuple[str, bool]], greedy: tuple[str, bool]) -> dict:
    return {"id": pid, "prompt": prompt, "gold": "{}", "checker": "exact",
            "candidates": [_cand(t, ok, sr=float(i)) for i, (t, ok) in enumerate(cands)],
            "greedy": _cand(*greedy)}


RECORDS = [
    # 1, 2 and 3 pass the shown example and behave alike; 3 is wrong on the hidden tests
    _record("a", PROMPT, [(WRONG, False), (GOOD, True), (GOOD_TOO, True), (CONST, False)], (WRONG, False)),
    # the greedy decode passes: exec+greedy keeps it at every n; exec picks CONST (see below)
    _record("b", PROMPT, [(WRONG, False), (CONST, False), (WRONG, False), (GOOD, True)], (GOOD, True)),
    # no example shown: nothing runs, exec falls back to the first sample
    _record("c", "Write a function add(a, b).", [(WRONG, False), (GOOD, True), (GOOD, True), (GOOD, True)],
            (GOOD, True)),
]


@pytest.fixture()
def counted(monkeypatch):
    calls: list[int] = []
    real = sandbox.run_programs

    def run(programs, **kw):
        calls.append(len(programs))
        return real(programs, **kw)

    monkeypatch.setattr(sandbox, "run_programs", run)
    return calls


def test_exec_columns_by_hand_and_each_problem_runs_once(counted):
    runs = ExecRuns()
    ev = runner.evaluate_records(RECORDS, [1, 2, 4], ["exec", "exec+greedy", "greedy", "random"], execution=runs)
    acc = ev["accuracy"]
    # a: n=1 the mean correctness; n=2 the pairs (0,3) pick 3 (wrong), the other five a right one
    assert acc["exec"][1][0] == pytest.approx(0.5) and acc["exec"][2][0] == pytest.approx(5 / 6)
    # b: CONST and GOOD behave alike on the shown example: their group's first member, CONST;
    # c: no example, the first sample (wrong)
    assert acc["exec"][4] == [1.0, 0.0, 0.0]
    assert acc["exec+greedy"][1][1] == acc["exec+greedy"][2][1] == acc["exec+greedy"][4][1] == 1.0
    assert acc["exec+greedy"][2][0] == pytest.approx(5 / 6)  # a: the greedy decode fails, exec decides
    assert counted == [5, 5]  # one batch per problem with examples (4 samples + greedy), reused at every n
    summary = runs.summary(ev["ids"])
    assert summary["problems"] == 3 and summary["with_examples"] == 2 and summary["programs_per_problem"] == 5
    assert summary["any_sample_passes"] == 2 and summary["greedy_passes"] == 1 and summary["timeouts"] == 0
    assert summary["wall_s_median"] > 0


def test_exec_plan_only_where_prompts_show_examples():
    names = ["majority", "exec", "exec+greedy", "greedy"]
    kept, runs = exec_plan([RECORDS[2]], names)
    assert kept == ["majority", "greedy"] and runs is None
    kept, runs = exec_plan(RECORDS, names)
    assert kept == names and isinstance(runs, ExecRuns)
    assert get_bench_selector("exec+greedy").greedy_in_pool and not get_bench_selector("exec").greedy_in_pool


def test_tie_variants_split_equal_passing_groups():
    # two passing groups of one each (different values on the example: both equal 3 but print apart)
    prompt = "Write f().\n```python\nassert f() == 3\n```"
    a = "```python\ndef f():\n    return 3\n```"
    b = "```python\ndef f():\n    print('x')\n    return 3.0\n```"
    rec = _record("t", prompt, [(a, False), (b, True)], (a, False))
    rec["candidates"][0]["scores"].update(mean_logprob=-2.0)
    rec["candidates"][1]["scores"].update(mean_logprob=-0.5)
    ev = runner.evaluate_records([rec], [2], ["exec", "exec-logprob", "exec-sr"], execution=ExecRuns())
    assert ev["accuracy"]["exec"][2] == [0.0]  # lowest index
    assert ev["accuracy"]["exec-logprob"][2] == [1.0] and ev["accuracy"]["exec-sr"][2] == [1.0]


def test_run_bench_reports_exec_from_the_cache(tmp_path):
    task = tmp_path / "code.jsonl"
    task.write_text("".join(json.dumps({"id": r["id"], "prompt": r["prompt"], "answer": "x", "checker": "exact"})
                            + "\n" for r in RECORDS))
    out = tmp_path / "run"
    (out / "cache").mkdir(parents=True)
    (out / "cache" / "code.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    (out / "cache" / "code.meta.json").write_text(json.dumps({"model": "m", "backend": "hf", "n_samples": 4}))
    config = runner.BenchConfig(task=str(task), n=(1, 4), backend="hf", scorer="hf", bootstrap=100,
                                selectors=("exec", "exec+greedy", "greedy", "random", "oracle"))
    summary = runner.run_bench(config, out, generate=False)
    assert summary["results"]["4"]["exec"]["accuracy"] == pytest.approx(1 / 3)  # a only (see above)
    assert summary["results"]["4"]["exec+greedy"]["accuracy"] == pytest.approx(2 / 3)
    assert summary["exec"]["with_examples"] == 2 and not math.isnan(summary["exec"]["wall_s_median"])
    text = (out / "code.md").read_text()
    assert "Exec columns: 2 of the 3 prompts show examples" in text and "timeouts apart: 0 programs" in text
    assert "| exec+greedy |" in text and "| vs exec: points [95% CI] | vs exec+greedy: points [95% CI] |" in text
    greedy = summary["results"]["4"]["greedy"]
    assert greedy["vs_exec+greedy"]["points"] == pytest.approx(100 * (2 / 3 - 2 / 3))
    assert greedy["vs_exec"]["points"] == pytest.approx(100 * (2 / 3 - 1 / 3))
    assert report.exec_markdown({"problems": 3, "with_examples": 0}).startswith("_Exec columns: none")


def test_recheck_keeps_the_new_grades_in_the_cache(tmp_path):
    path = tmp_path / "t.jsonl"
    recs = [{"id": "1", "gold": "paris", "checker": "exact", "candidates": [{"text": "Paris"}, {"text": "Lyon"}],
             "greedy": {"text": "Paris"}, "ungraded": "stale"},
            {"id": "2", "gold": "x", "checker": "exact", "candidates": [{"text": "x"}], "greedy": {"text": "y"}}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    records = runner.read_cache(path)
    runner.recheck(records, [records["1"]], path)
    again = runner.read_cache(path)
    assert [c["correct"] for c in again["1"]["candidates"]] == [True, False] and "ungraded" not in again["1"]
    assert again["2"] == recs[1]  # a record not rechecked is kept as it was
    before = path.stat().st_mtime_ns
    runner.recheck(again, [again["1"]], path)  # nothing changed: the file is not rewritten
    assert path.stat().st_mtime_ns == before
