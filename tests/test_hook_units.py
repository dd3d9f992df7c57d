"""The hook's pieces without an engine: the worker's row store and fault isolation driven
by a fake model runner (the attributes listed in ``bon_sr/hook/worker.py``), the async
collector's coalescing, and the plan's step order. The real engine runs in
test_vllm_hook.py (slow)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bon_sr.scoring.hidden_states import HiddenStateConfig
from bon_sr.hook import Collector, HookError, collect_spec, request_meta, scores_from_results
from bon_sr.hook.worker import FAULT_ENV, WorkerHook
from bon_sr.scoring.stable_rank import stable_rank

P, D = 5, 8


class FakeRunner:
    """What the hook reads from vLLM's V1 runner, for a batch of tagged requests."""

    def __init__(self, metas: dict[str, tuple[dict, int]]):
        self.requests = {rid: SimpleNamespace(sampling_params=SimpleNamespace(extra_args={"bon_sr": m}, seed=seed),
                                              prompt_token_ids=list(range(P)))
                         for rid, (m, seed) in metas.items()}
        self.execute_model_state = None
        self.input_batch = None
        self.query_start_loc = None

    def step(self, hook: WorkerHook, scheduled: dict[str, tuple[int, torch.Tensor]]) -> None:
        """scheduled: req id -> (tokens computed before this step, this step's rows)."""
        ids = list(scheduled)
        counts = [scheduled[r][1].shape[0] for r in ids]
        self.input_batch = SimpleNamespace(req_ids=ids, num_computed_tokens_cpu=np.array([scheduled[r][0] for r in ids]))
        self.query_start_loc = SimpleNamespace(np=np.concatenate([[0], np.cumsum(counts)]))
        self.execute_model_state = SimpleNamespace(hidden_states=torch.cat([scheduled[r][1] for r in ids]))
        hook.after_forward(SimpleNamespace(finished_req_ids=set(), num_scheduled_tokens=dict(zip(ids, counts))))


def test_rows_are_stored_by_position_and_a_faulty_job_fails_alone(monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "100")
    full = HiddenStateConfig(token_set="full")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randn(P, D, generator=g)
    resp = {k: torch.randn(3, D, generator=g) for k in ("a", "b", "c")}
    metas = {"a": (request_meta("T", 0, P, 3, full), 7), "b": (request_meta("T", 1, P, 3, full), 8),
             "c": (request_meta("U", 0, P, 3, full), 100)}  # seed 100 - index 0 = the fault seed
    runner = FakeRunner(metas)
    hook = WorkerHook(runner, store=True)
    # prefill (both T candidates compute the shared prompt rows), then three decode steps
    runner.step(hook, {k: (0, prompt.clone()) for k in metas})
    for t in range(3):
        runner.step(hook, {k: (P + t, resp[k][t:t + 1]) for k in metas})
    assert hook.stats()["rows"] == P + 2 * 3 and hook.stats()["groups"] == 1  # U's rows were never kept
    specs = [collect_spec("T", i, P, 3, full, release_group=True, embed=True) for i in (0, 1)]
    specs.append(collect_spec("U", 0, P, 3, full, release_group=True))
    results = hook.collect(specs)
    for k, res in zip("ab", results):
        want = stable_rank(torch.cat([prompt, resp[k]])[None], torch.ones(1, P + 3, dtype=torch.bool))
        assert res["stable_rank"] == pytest.approx(float(want.stable_rank[0]), rel=1e-6)
        assert res["scored_tokens"] == P + 3
        torch.testing.assert_close(torch.tensor(res["embedding_last"]), resp[k][-1])
        torch.testing.assert_close(torch.tensor(res["embedding_mean"]), resp[k].mean(0))
    assert results[2]["error"].startswith("RuntimeError: fault injected")
    with pytest.raises(HookError, match="fault injected") as err:
        scores_from_results(results)
    assert err.value.worker_error == "RuntimeError"
    assert hook.stats()["rows"] == 0 and hook.stats()["candidates"] == 0 and hook.stats()["groups"] == 0


def test_release_frees_rows_and_ignores_the_jobs_late_steps():
    cfg = HiddenStateConfig()
    runner = FakeRunner({"a": (request_meta("T", 0, P, 4, cfg), 1)})
    hook = WorkerHook(runner, store=True)
    runner.step(hook, {"a": (0, torch.randn(P, D))})
    runner.step(hook, {"a": (P, torch.randn(1, D))})
    assert hook.stats()["rows"] == 1  # response rows only
    assert hook.release(["T"]) == 1 and hook.stats()["rows"] == 0
    runner.step(hook, {"a": (P + 1, torch.randn(1, D))})  # the aborted request's last step
    assert hook.stats()["rows"] == 0 and hook.stats()["candidates"] == 0


def test_a_step_that_breaks_outside_any_request_does_not_raise():
    cfg = HiddenStateConfig()
    runner = FakeRunner({"a": (request_meta("T", 0, P, 4, cfg), 1)})
    hook = WorkerHook(runner, store=True)
    runner.step(hook, {"a": (0, torch.randn(P, D))})
    runner.query_start_loc = None  # a vLLM that renamed an attribute mid-flight
    hook.after_forward(SimpleNamespace(finished_req_ids=set(), num_scheduled_tokens={"a": 1}))
    assert hook.collect([collect_spec("T", 0, P, 1, cfg)])[0]["error"].startswith("AttributeError")


def test_collector_coalesces_concurrent_collects():
    class SlowEngine:
        def __init__(self):
            self.calls = []

        async def collective_rpc(self, name, args=()):
            self.calls.append(len(args[0]))
            await asyncio.sleep(0.05)
            return [[{"tag": s["tag"], "index": s["index"], "echo": s["index"] * 10} for s in args[0]]]

    engine = SlowEngine()
    collector = Collector(engine)

    async def run():
        return await asyncio.gather(*(collector.collect([{"tag": f"t{j}", "index": i} for i in range(3)])
                                      for j in range(6)))

    out = asyncio.run(run())
    # six jobs ready in the same loop turn: one RPC
    assert engine.calls == [18] and collector.calls == 1
    for j, res in enumerate(out):
        assert [(r["tag"], r["echo"]) for r in res] == [(f"t{j}", 0), (f"t{j}", 10), (f"t{j}", 20)]

    async def staggered():
        first = asyncio.ensure_future(collector.collect([{"tag": "x", "index": 0}]))
        await asyncio.sleep(0.01)  # the first RPC is in flight: the next five wait and share one
        rest = [asyncio.ensure_future(collector.collect([{"tag": f"y{j}", "index": 1}])) for j in range(5)]
        return await asyncio.gather(first, *rest)

    engine.calls.clear()
    out = asyncio.run(staggered())
    assert engine.calls == [1, 5] and [r[0]["tag"] for r in out] == ["x", *(f"y{j}" for j in range(5))]


def test_probe_names_missing_internals_before_any_engine(monkeypatch):
    from bon_sr.errors import ConfigError
    from bon_sr.hook import worker
    from bon_sr.engines import check_hook_internals

    from bon_sr.hook import internals

    probe = worker.probe_vllm.__wrapped__  # uncached
    assert probe().startswith("0.32")
    runner = internals.find("GPUModelRunner")
    monkeypatch.setattr(internals, "INTERNALS", (*internals.INTERNALS, internals.Internal(
        "runner", "class", runner.module, "GPUModelRunner", attrs=("bon_sr_no_such_attribute",), probe=True)))
    with pytest.raises(RuntimeError, match="lacks what the hook relies on: .*GPUModelRunner.bon_sr_no_such_attribute"
                                           ".*scorer='pooling'"):
        probe()
    monkeypatch.setattr(worker, "KNOWN_VLLM", ("0.99.",))
    worker.probe_vllm.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"not a version the hook knows \(0.99.x\)"):
            check_hook_internals()
    finally:
        worker.probe_vllm.cache_clear()


def test_row_budget_admits_in_order_waits_and_refuses_past_its_queue():
    from bon_sr.hook.aio import HookBusy, RowBudget, job_bytes

    # response rows: 4 candidates x 10 tokens x 100 bytes; full adds the 6 prompt rows once
    assert job_bytes(6, 4, 10, HiddenStateConfig(), 100) == 4 * 10 * 100
    assert job_bytes(6, 4, 10, HiddenStateConfig(token_set="full"), 100) == (4 * 10 + 6) * 100
    budget = RowBudget(1000, max_waiting=1, retry_after=2.0)
    order = []

    async def job(name, nbytes, hold):
        await budget.acquire(nbytes)
        order.append(name)
        await asyncio.sleep(hold)
        budget.release(nbytes)

    async def run():
        first = asyncio.ensure_future(job("a", 800, 0.05))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(job("b", 800, 0.0))  # waits for a
        await asyncio.sleep(0)
        with pytest.raises(HookBusy, match="hook memory budget") as busy:
            await budget.acquire(10)  # the queue (1) is full
        await asyncio.gather(first, second)
        await job("huge", 5000, 0.0)  # larger than the budget: runs alone
        return busy.value

    busy = asyncio.run(run())
    assert order == ["a", "b", "huge"] and budget.used == 0 and busy.retry_after == 2.0


def test_a_window_inside_the_prompt_keeps_prompt_rows_only():
    """token_set full with a window shorter than the prompt: the kept rows [0, 3) are all
    prompt rows (the group's); the candidate keeps none and still collects."""
    cfg = HiddenStateConfig(token_set="full", window=3)
    prompt = torch.randn(P, D)
    runner = FakeRunner({"a": (request_meta("T", 0, P, 4, cfg), 1)})
    hook = WorkerHook(runner, store=True)
    runner.step(hook, {"a": (0, prompt)})
    runner.step(hook, {"a": (P, torch.randn(1, D))})
    res = hook.collect([collect_spec("T", 0, P, 2, cfg, release_group=True, embed=True)])[0]
    want = stable_rank(prompt[None, :3], torch.ones(1, 3, dtype=torch.bool))
    assert res["scored_tokens"] == 3 and res["stable_rank"] == pytest.approx(float(want.stable_rank[0]), rel=1e-6)
    assert hook.stats()["rows"] == 0
    # no response rows kept: NaN embeddings of the model's width (as hidden_states.embedding_summary)
    assert len(res["embedding_last"]) == len(res["embedding_mean"]) == D
    assert all(np.isnan(res["embedding_last"])) and all(np.isnan(res["embedding_mean"]))


def test_score_steps_with_embed_return_the_candidates_embeddings():
    """Score mode asks the worker for embeddings only with embed=True and returns them with
    the scores, keyed as Candidate.embeddings (the HF scorer's "last" / "mean")."""
    from bon_sr.hook.plan import Collect, Generate, score_steps

    def drive(embed):
        steps = score_steps([[1, 2], [1, 2]], [[3, 4], [5]], HiddenStateConfig(), embed=embed)
        assert isinstance(next(steps), Generate)
        collect = steps.send(None)
        assert isinstance(collect, Collect) and all(sp.get("embed", False) is embed for sp in collect.specs)
        results = [{"tag": "t", "index": i, "stable_rank": 1.5 + i, **({"embedding_last": [float(i), 1.0],
                                                                        "embedding_mean": [0.5, float(i)]}
                                                                       if embed else {})} for i in range(2)]
        with pytest.raises(StopIteration) as stop:
            steps.send(results)
        return stop.value.value

    assert drive(False) == [{"stable_rank": 1.5}, {"stable_rank": 2.5}]
    scores, embeddings = drive(True)
    assert scores == [{"stable_rank": 1.5}, {"stable_rank": 2.5}]
    assert embeddings == [{"last": (0.0, 1.0), "mean": (0.5, 0.0)}, {"last": (1.0, 1.0), "mean": (0.5, 1.0)}]


def test_fills_go_first_only_on_a_priority_engine():
    from bon_sr.hook.aio import fill_priority

    def engine(policy):
        return SimpleNamespace(vllm_config=SimpleNamespace(scheduler_config=SimpleNamespace(policy=policy)))

    assert fill_priority(engine("priority")) == -1
    assert fill_priority(engine("fcfs")) == 0 and fill_priority(object()) == 0


def _plan_outputs(tok, plan_kwargs, completions, monkeypatch, last_row="extend"):
    """Step a one-prompt ScoredSampling with fake vLLM outputs: (sample step, fills, specs, candidates)."""
    from vllm.outputs import CompletionOutput

    from bon_sr.hook.plan import Collect, Group, Sample, ScoredSampling
    from bon_sr.hook.protocol import LAST_ROW_ENV
    from bon_sr.sampling import SamplingConfig
    from bon_sr.sampling.vllm import VLLMSampler

    monkeypatch.setenv(LAST_ROW_ENV, last_row)
    base = VLLMSampler(None, SamplingConfig(n=len(completions), max_new_tokens=3))
    prompt = tuple(tok.encode("Q: hi", add_special_tokens=False))
    plan = ScoredSampling([Group(prompt, base.request_params(1, 7), len(completions), 7)], HiddenStateConfig(),
                          base.to_candidate, **plan_kwargs)
    steps = plan.steps()
    sample = next(steps)
    assert isinstance(sample, Sample)
    outs = [SimpleNamespace(outputs=[CompletionOutput(index=0, text=tok.decode(ids, skip_special_tokens=True), token_ids=ids,
                                                      cumulative_logprob=None, logprobs=None, finish_reason=fin,
                                                      stop_reason=None)]) for ids, fin in completions]
    fills = [sample.follow(k, o) for k, o in enumerate(outs)]
    collect = steps.send(outs)
    assert isinstance(collect, Collect)
    results = [{"tag": sp["tag"], "index": sp["index"], "stable_rank": 1.0} for sp in collect.specs]
    with pytest.raises(StopIteration) as stop:
        steps.send(results)
    return sample, fills, collect.specs, stop.value.value[0]


def test_candidates_decode_one_token_past_max_tokens_and_are_trimmed(tiny_tokenizer, monkeypatch):
    """With the tokenizer, requests ask for max_tokens + 1 (the rows kept stay max_tokens');
    a candidate that got the extra token reads as a max_tokens request: first 3 tokens,
    finish "length" (even when the extra token was EOS), their text; it needs no fill."""
    tok = tiny_tokenizer
    abcd, ab = tok.encode("abcd", add_special_tokens=False), tok.encode("ab", add_special_tokens=False)
    eos = tok.eos_token_id
    sample, fills, specs, cands = _plan_outputs(
        tok, {"tokenizer": tok}, [(abcd, "length"), ([*abcd[:3], eos], "stop"), ([*ab, eos], "stop")], monkeypatch)
    assert [p.max_tokens for _, p in sample.requests] == [4, 4, 4]
    p = len(sample.requests[0][0]["prompt_token_ids"])
    assert {p_.extra_args["bon_sr"]["hi"] for _, p_ in sample.requests} == {p + 3}
    assert fills == [None, None, None]
    assert [c.text for c in cands] == ["abc", "abc", "ab"]
    assert [c.finish_reason for c in cands] == ["length", "length", "stop"]
    assert [c.num_tokens for c in cands] == [3, 3, 2] and [sp["r"] for sp in specs] == [3, 3, 2]


def test_without_a_tokenizer_or_with_the_fill_switch_length_cut_candidates_get_fills(tiny_tokenizer, monkeypatch):
    from bon_sr.errors import ConfigError
    from bon_sr.hook.protocol import LAST_ROW_ENV, extend_by_default

    tok = tiny_tokenizer
    abc = tok.encode("abc", add_special_tokens=False)
    for kwargs, switch in (({}, "extend"), ({"tokenizer": tok}, "fill")):
        sample, fills, _, cands = _plan_outputs(tok, kwargs, [(abc, "length")], monkeypatch, last_row=switch)
        assert sample.requests[0][1].max_tokens == 3
        assert fills[0] is not None and fills[0][1].extra_args["bon_sr"]["mode"] == "fill"
        assert cands[0].text == "abc" and cands[0].finish_reason == "length"
    monkeypatch.setenv(LAST_ROW_ENV, "both")
    with pytest.raises(ConfigError, match="BON_SR_HOOK_LAST_ROW='both'.*'extend'"):
        extend_by_default()


@pytest.mark.slow
def test_text_decoder_writes_the_response_as_after_its_prompt(default_model_dir):
    """The default model's tokenizer: a response decoded after a few prompt tokens equals
    the plain decode when that is context-free, for text with multi-byte characters."""
    from transformers import AutoTokenizer

    from bon_sr.hook.protocol import text_decoder
    from bon_sr.sampling.prompts import encode_prompt

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    prompt = encode_prompt(tok, "Say something.")
    for text in ("Paris is the capital.", " été, où, ça 🎉", "x = {'a': 1}\n\n  y"):
        ids = tok.encode(text, add_special_tokens=False)
        assert text_decoder(tok, prompt)(ids) == text
        assert text_decoder(tok, prompt)(ids[:-1]) == tok.decode(ids[:-1])


def test_a_candidate_that_fills_the_context_gets_no_fill_and_is_scored_without_its_last_row(tiny_tokenizer,
                                                                                            monkeypatch):
    tok = tiny_tokenizer
    abc = tok.encode("abc", add_special_tokens=False)
    sample, fills, specs, cands = _plan_outputs(tok, {"tokenizer": tok, "context": 5 + 3}, [(abc, "length")],
                                                monkeypatch)
    p = len(sample.requests[0][0]["prompt_token_ids"])
    assert p == 5 and fills == [None]
    assert (specs[0]["start"], specs[0]["end"], specs[0]["r"]) == (p, p + 2, 3)
    assert cands[0].num_tokens == 3 and cands[0].finish_reason == "length"
    # a candidate ended by EOS had its last kept row computed: kept, whatever the context
    eos = tok.eos_token_id
    _, fills, specs, _ = _plan_outputs(tok, {"tokenizer": tok, "context": 5 + 2}, [([*abc[:2], eos], "stop")],
                                       monkeypatch)
    assert fills == [None] and (specs[0]["end"], specs[0]["r"]) == (p + 2, 2)
    # a window that ends before the last token is not shortened
    spec = collect_spec("t", 0, p, 3, HiddenStateConfig(window=2), last_row=False)
    assert (spec["start"], spec["end"]) == (p, p + 2)
    spec = collect_spec("t", 0, p, 3, HiddenStateConfig(token_set="full"), also=("response",), last_row=False)
    assert (spec["start"], spec["end"], spec["also"]["response"]) == (0, p + 2, [p, p + 2])
