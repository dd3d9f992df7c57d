"""The ``python`` answer format: examples found in prompts and tests, candidates run in the
sandbox, the pass-first vote; in decide(), the API's tests=, the CLI's `tests` field and the
server (off unless --allow-code-execution). Hostile candidates go through each interface."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from conftest import FakeEngine

from bon_sr.errors import OptionError
from bon_sr.sampling import SamplingConfig
from bon_sr.selection import execution
from bon_sr.selection.answers import get_extractor
from bon_sr.selection.code import examples_from_prompt, examples_from_tests, extract_code
from bon_sr.selection.decide import decide, ranked
from bon_sr.selection.execution import PromptContext
from bon_sr.selection.selectors import get_selector
from bon_sr.serve.app import create_app
from bon_sr.serve.settings import ServeSettings
from bon_sr.types import Candidate

PROMPT = "Write a function add(a, b) that adds two numbers.\nassert add(1, 2) == 3, \"sum\"\n"
GOOD = "```python\ndef add(a, b):\n    return a + b\n```"
GOOD_TOO = "Sure.\n```python\nimport math\n```\n```python\ndef add(x, y):\n    return y + x\n```"
WRONG = "```python\ndef add(a, b):\n    return a - b\n```"
LOOP = "```python\ndef add(a, b):\n    while True:\n        pass\n```"
SECRET = "bon-sr-test-secret-7f3a"
SNOOP = ("```python\nimport os\ndef add(a, b):\n    return os.environ.get('BON_SR_TEST_SECRET', 'none') + "
         "open('/proc/1/cmdline').read()\n```")


def _cands(texts, sr=None):
    return [Candidate(text=t, token_ids=(1, 2), index=i, scores={"stable_rank": float((sr or {}).get(i, i))})
            for i, t in enumerate(texts)]


def test_examples_from_asserts_with_messages_and_doctests():
    (ex,) = examples_from_prompt(PROMPT)
    assert (ex.expr, ex.expected, ex.want) == ("add(1, 2)", "3", None) and ex.calls == {"add"}
    doc = 'def f(a):\n    """Double.\n\n    >>> f(2)\n    4\n    >>> f(\n    ...   3)\n    6\n    """\n```'
    assert [(e.expr, e.want) for e in examples_from_prompt(doc)] == [("f(2)", "4"), ("f(\n  3)", "6")]
    assert [e.expr for e in examples_from_tests(["assert g(1) == 2", ">>> g(2)\n3"])] == ["g(1)", "g(2)"]
    assert examples_from_prompt("no examples here; assert nothing") == []


def test_extract_code_takes_the_block_that_defines_the_call():
    assert extract_code(GOOD_TOO, {"add"}).startswith("def add(x, y)")
    assert extract_code("def add(a, b): return a+b", {"add"}) == "def add(a, b): return a+b"


def test_pass_first_then_the_largest_agreeing_group():
    # 0 and 2 pass (one behaviour), 1 fails, 3 times out, 4 has no code: the passing group wins
    d = decide(_cands([WRONG, GOOD, GOOD_TOO, LOOP, "no code"]), get_selector("majority"), get_extractor("python"),
               context=PromptContext.of(PROMPT))
    assert d.pick.index == 1
    assert d.pick.rule == "exec: 2/5 pass the prompt's 1 example, the largest agreeing group 2"
    assert [c.passed for c in d.candidates] == [False, True, True, False, False]
    assert d.candidates[3].checks[0]["status"] == "error" and d.candidates[3].checks[0]["error_type"] == "Timeout"
    assert d.candidates[1].checks[0]["value_repr"] == "3"


def test_none_pass_gives_the_largest_behaviour_group_and_no_examples_fall_back():
    wrong2 = "```python\ndef add(a, b):\n    return a - b  # again\n```"
    d = decide(_cands([GOOD.replace("a + b", "a * b"), WRONG, wrong2]), get_selector("majority"),
               get_extractor("python"), context=PromptContext.of(PROMPT))
    assert d.pick.index == 1 and d.pick.rule.startswith("exec: none of 3 passes")
    d = decide(_cands([GOOD, WRONG]), get_selector("majority"), get_extractor("python"),
               context=PromptContext.of("Write add(a, b)."))
    assert d.pick.rule == "fallback: first (no candidate had an answer)"
    d = decide(_cands([GOOD, WRONG]), get_selector("auto"), get_extractor("python"),
               context=PromptContext.of("Write add(a, b)."))
    assert d.pick.rule.startswith("auto: mbr")


def test_explicit_tests_replace_the_prompts_examples():
    # the prompt's example is wrong on purpose; the caller's tests decide
    prompt = "Write add.\nassert add(1, 2) == 4\n"
    d = decide(_cands([WRONG, GOOD]), get_selector("majority"), get_extractor("python"),
               context=PromptContext.of(prompt, ["assert add(2, 2) == 4", ">>> add(0, 5)\n5"]))
    assert d.pick.index == 1 and "2 explicit tests" in d.pick.rule


def test_a_selector_that_reads_no_answers_runs_no_code():
    from dataclasses import replace as dc_replace

    def boom(*a, **k):
        raise AssertionError("code ran for stable-rank")

    never = dc_replace(get_extractor("python"), read_many=boom)
    d = decide(_cands([GOOD, WRONG], {0: 1.0, 1: 5.0}), get_selector("stable-rank"), never,
               context=PromptContext.of(PROMPT))
    assert d.pick.index == 1 and d.candidates[0].passed is None and d.votes is None


def test_choices_rank_from_one_run(monkeypatch):
    runs = []
    real = execution.read_python

    def counting(texts, context, **kw):
        runs.append(len(texts))
        return real(texts, context, **kw)

    fmt = get_extractor("python")
    from dataclasses import replace as dc_replace

    counted = dc_replace(fmt, read_many=counting)
    decision, order = ranked(_cands([WRONG, GOOD, GOOD_TOO]), get_selector("majority"), counted,
                             context=PromptContext.of(PROMPT), k=2)
    assert order[0] == 1 and len(order) == 2 and runs[0] == 3


def test_hostile_candidates_through_the_api_decision(monkeypatch):
    monkeypatch.setenv("BON_SR_TEST_SECRET", SECRET)
    d = decide(_cands([SNOOP, GOOD, LOOP]), get_selector("majority"), get_extractor("python"),
               context=PromptContext.of(PROMPT))
    assert d.pick.index == 1
    dump = json.dumps([c.to_dict() for c in d.candidates])
    assert SECRET not in dump and "--api-key" not in dump


# --------------------------------------------------------------------------- the server


class CodeEngine(FakeEngine):
    """Candidates are the given program texts (a hostile one among them)."""

    def __init__(self, tokenizer, texts):
        super().__init__(tokenizer)
        self.texts = texts

    async def sample(self, job):
        self.jobs.append(job)
        return [Candidate(text=t, token_ids=(5,) * (i + 1), index=i, finish_reason="stop")
                for i, t in enumerate(self.texts[:job.sampling.n])]


def _server(tokenizer, texts, **settings):
    s = ServeSettings(model="m", sampling=SamplingConfig(n=len(texts), max_new_tokens=16), max_n=8, **settings)
    return TestClient(create_app(CodeEngine(tokenizer, texts), s))


def test_server_runs_code_only_when_started_for_it(tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("BON_SR_TEST_SECRET", SECRET)
    body = {"model": "m", "messages": [{"role": "user", "content": PROMPT}],
            "bon_sr": {"selector": "majority", "answer": "python", "return_candidates": True}}
    with _server(tiny_tokenizer, [SNOOP, LOOP, GOOD, WRONG]) as client:
        r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "bon_sr.answer"
    assert "--allow-code-execution" in r.json()["error"]["message"]
    with _server(tiny_tokenizer, [SNOOP, LOOP, GOOD, WRONG], allow_code_execution=True) as client:
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        info = r.json()["bon_sr"]
        assert info["selected_index"] == 2 and info["rule"].startswith("exec: 1/4 pass")
        assert SECRET not in r.text
        # token-id prompts have no text: only explicit tests reach the candidates
        r2 = client.post("/v1/completions", json={"model": "m", "prompt": [1, 2, 3], "bon_sr": {
            "selector": "majority", "answer": "python", "tests": "assert add(2, 3) == 5"}})
        assert r2.status_code == 200 and r2.json()["bon_sr"]["selected_index"] == 2
        assert client.get("/health").status_code == 200


def test_unknown_answer_format_still_names_its_field():
    with pytest.raises(OptionError):
        get_extractor("pyton")
    assert os.environ.get("BON_SR_UNSAFE_NO_SANDBOX") in (None, "", "0")


@pytest.mark.slow
def test_hostile_candidates_through_bon_sr_score(tmp_path, default_model_dir, monkeypatch):
    # caller-supplied candidates with a JSONL `tests` field: the loop is contained, the snooper
    # reads no secret, the pick passes, the record carries each candidate's checks
    from click.testing import CliRunner

    from bon_sr.cli import score

    monkeypatch.setenv("BON_SR_TEST_SECRET", SECRET)
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "a", "prompt": "Write add(a, b).", "tests": ["assert add(1, 2) == 3"],
                               "candidates": [SNOOP, LOOP, WRONG, GOOD]}) + "\n")
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(score, [str(src), "-o", str(out), "--backend", "hf", "--selector", "majority",
                                        "--answer", "python", "--model", default_model_dir])
    assert result.exit_code == 0, result.output
    (rec,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert rec["best_index"] == 3 and rec["rule"].startswith("exec: 1/4 pass 1 explicit test,")
    assert [c["passed"] for c in rec["candidates"]] == [False, False, False, True]
    assert rec["candidates"][1]["checks"][0]["error_type"] == "Timeout"
    assert SECRET not in out.read_text()


def test_include_greedy_adds_the_greedy_decode_last(tiny_model_dir):
    from bon_sr import BestOfN

    with BestOfN(tiny_model_dir, backend="hf", n=2, include_greedy=True, selector="first", max_new_tokens=3,
                 seed=1) as bon:
        sel = bon.select("hi")
        greedy = BestOfN(tiny_model_dir, backend="hf", n=1, greedy=True, selector="first", max_new_tokens=3)
        alone = greedy.select("hi")
    assert [c.greedy for c in sel.candidates] == [False, False, True] and sel.candidates[2].index == 2
    assert sel.candidates[2].token_ids == alone.best.token_ids
    assert "greedy" not in sel.candidates[0].to_dict() and sel.candidates[2].to_dict()["greedy"] is True
    with pytest.raises(OptionError, match="include_greedy"):
        BestOfN(tiny_model_dir, backend="hf", n=1, greedy=True, include_greedy=True)


def test_greedy_joins_the_pool_by_default_exactly_where_code_runs():
    from bon_sr.options import resolve

    def pool(**kw):
        return resolve(backend="hf", **kw).include_greedy

    assert pool(answer="python") and pool(selector="majority", answer="python")   # auto and majority vote
    assert pool(selector="majority-sr", answer="python")
    assert not pool(selector="stable-rank", answer="python")                      # runs no code
    assert not pool() and not pool(selector="majority", answer="numeric")
    assert not pool(answer="python", include_greedy=False) and pool(include_greedy=True)
    assert not pool(answer="python", sampling=dict(n=1, greedy=True))             # greedy already
    with pytest.raises(OptionError, match="include_greedy"):
        pool(include_greedy=True, sampling=dict(n=1, greedy=True))


def test_the_server_samples_the_greedy_decode_beside_the_candidates(monkeypatch):
    """BonEngine.sample with include_greedy: the N sampled candidates and one greedy decode
    (n = 1, greedy, the same scoring), requested together; the greedy one joins last."""
    import asyncio

    from bon_sr.serve import engine as engine_mod

    calls = []

    async def fake_scored(llm, prompt_ids, sampling, *, seed, **kw):
        calls.append((sampling.n, sampling.greedy, seed, kw["scoring"]))
        await asyncio.sleep(0)
        return [Candidate(text=f"{'g' if sampling.greedy else 's'}{i}", token_ids=(5,), index=i, finish_reason="stop")
                for i in range(sampling.n)]

    monkeypatch.setattr(engine_mod, "sample_scored_async", fake_scored)
    bon = engine_mod.BonEngine(SimpleNamespace(model="m"))
    job = SimpleNamespace(prompt_ids=(1, 2), sampling=SamplingConfig(n=3, max_new_tokens=8), seed=7,
                          score_keys=frozenset({"stable_rank"}), embed=False, scoring="cfg", logit_stats=False,
                          include_greedy=True)
    cands = asyncio.run(bon.sample(job))
    assert [c.text for c in cands] == ["s0", "s1", "s2", "g0"] and [c.index for c in cands] == [0, 1, 2, 3]
    assert [c.greedy for c in cands] == [False, False, False, True]
    assert sorted(calls) == [(1, True, 7, "cfg"), (3, False, 7, "cfg")]
    job.include_greedy = False
    assert [c.text for c in asyncio.run(bon.sample(job))] == ["s0", "s1", "s2"]


def test_a_passing_greedy_decode_is_kept():
    cands = _cands([GOOD, GOOD_TOO, WRONG])
    from dataclasses import replace as dc_replace

    cands = [*cands[:2], dc_replace(cands[2], greedy=True), dc_replace(_cands([GOOD])[0], index=3, greedy=True)]
    d = decide(cands, get_selector("majority"), get_extractor("python"), context=PromptContext.of(PROMPT))
    assert d.pick.index == 3 and d.pick.rule == "exec: the greedy decode passes the prompt's 1 example"
