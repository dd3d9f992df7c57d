"""The package's layout: the pipeline's stages as folders, no module over 500 lines, and every
import path that README, docs, examples, benchmarks and task files use still works."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bon_sr"
MAX_LINES = 500


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"split these modules by what each part knows: {long}"


def test_the_stages_are_folders_with_a_docstring_and_the_top_stays_small():
    for stage in ("sampling", "scoring", "selection", "hook", "serve", "bench", "train", "scale"):
        doc = importlib.import_module(f"bon_sr.{stage}").__doc__ or ""
        assert len(doc.strip().splitlines()) >= 3, f"bon_sr.{stage} has no docstring saying what it owns"
    for stage in ("sampling", "scoring", "selection"):
        doc = importlib.import_module(f"bon_sr.{stage}").__doc__
        assert "know nothing" in doc or "knows nothing" in doc, f"bon_sr.{stage} says what it does not know"
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 13, top


@pytest.mark.parametrize("path", [
    "bon_sr.select_best", "bon_sr.BestOfN", "bon_sr.Candidate", "bon_sr.Selection", "bon_sr.stable_rank",
    "bon_sr.stable_rank_exact", "bon_sr.vllm_hook.HookWorkerExtension", "bon_sr.bench.checkers.CHECKERS",
    "bon_sr.bench.checkers.Checker", "bon_sr.bench.tasks.Problem", "bon_sr.bench.tasks.Task",
    "bon_sr.bench.data.package_docs", "bon_sr.sampling.SamplingConfig",
    "bon_sr.scoring.hidden_states.HiddenStateConfig", "bon_sr.selection.consensus.similarity",
    "bon_sr.scoring.variants.length_corrected", "bon_sr.vllm_plugin.register",
])
def test_documented_import_paths(path):
    module, _, name = path.rpartition(".")
    assert getattr(importlib.import_module(module), name) is not None


def test_the_vllm_plugin_entry_point_loads():
    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "bon_sr_fast_top_p"]
    from bon_sr.sampling.vllm_plugin import register

    assert ep.load() is register


def test_the_worker_extension_string_resolves():
    from bon_sr.hook import HookWorkerExtension
    from bon_sr.hook.protocol import WORKER_EXTENSION

    module, _, name = WORKER_EXTENSION.rpartition(".")
    assert getattr(importlib.import_module(module), name) is HookWorkerExtension
