"""``bon-sr generate --ray``: the Ray Data pipeline against the single-process command.

The end-to-end tests start a small local Ray (2 CPUs, a 256 MB object store) in this
process and point the CLI at it with ``--ray-address``, as a user would point it at a
cluster. They run transformers-backend replicas (``--backend hf``) of the offline default
model ``smollm2-135m-instruct``: two vLLM engines do not fit CI's memory (about 7 GiB each
on CPU, see OFFLINE.md), and the pipeline is the same whatever each replica runs. Each
replica uses one torch thread, and so does the single-process reference run, so the two
must agree bit for bit. Marked slow (real model); skipped without ``bon-sr[ray]``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from bon_sr.cli import main
from bon_sr.errors import ConfigError
from bon_sr.scale.ray_data import CRASH_ONCE_ENV
from bon_sr.engines import parallel_vllm_options

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [{"id": f"q{i}", "prompt": f"What is {i} + {i + 1}? Answer briefly."} for i in range(7)]
PROMPTS.insert(3, {"id": "chat", "messages": [{"role": "system", "content": "Be terse."},
                                              {"role": "user", "content": "Name a prime number."}]})
ARGS = ["--backend", "hf", "--n", "2", "--max-new-tokens", "16", "--seed", "3"]


# -- fast: no Ray, no model -------------------------------------------------------------

def test_import_bon_sr_never_imports_ray():
    code = ("import sys, bon_sr, bon_sr.cli, bon_sr.scale, bon_sr.scale.cli, bon_sr.scale.ray_data; "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_parallel_sizes_go_into_engine_kwargs():
    assert parallel_vllm_options({}) == {}
    both = {"tensor_parallel_size": 4, "pipeline_parallel_size": 2}
    assert parallel_vllm_options({"engine_kwargs": {"max_num_seqs": 8}}, tensor_parallel_size=4,
                                 pipeline_parallel_size=2) == {
        "engine_kwargs": {"max_num_seqs": 8, **both}, "pooling_engine_kwargs": both}
    with pytest.raises(ConfigError, match="tensor_parallel_size is given twice"):
        parallel_vllm_options({"engine_kwargs": {"tensor_parallel_size": 2}}, tensor_parallel_size=4)


@pytest.mark.parametrize("extra,needle", [
    (["--replicas", "2"], "--replicas only apply with --ray"),
    (["--ray-address", "auto", "--gpus-per-replica", "1"], "--ray-address, --gpus-per-replica only apply with --ray"),
    (["--backend", "hf", "--tensor-parallel-size", "2"], "need the vLLM backend"),
    (["--backend", "vllm", "--pipeline-parallel-size", "2"], "works with --scorer pooling or --scorer hf"),
])
def test_scale_flags_checked_before_anything_loads(tmp_path, extra, needle):
    p = tmp_path / "p.txt"
    p.write_text("hi\n")
    out = tmp_path / "out.jsonl"
    r = CliRunner().invoke(main, ["generate", str(p), "-o", str(out), *extra])
    assert r.exit_code != 0
    assert needle in " ".join(r.output.split())
    assert not out.exists()


def test_missing_ray_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)        # `import ray` now raises ImportError
    p = tmp_path / "p.txt"
    p.write_text("hi\n")
    r = CliRunner().invoke(main, ["generate", str(p), "-o", str(tmp_path / "out.jsonl"), "--ray"])
    assert r.exit_code != 0
    assert "pip install 'bon-sr[ray]'" in " ".join(r.output.split())
    assert not (tmp_path / "out.jsonl").exists()


# -- end to end on a local Ray ----------------------------------------------------------

@pytest.fixture(scope="module")
def ray_address():
    import ray

    ray.init(num_cpus=2, object_store_memory=256 * 2**20, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("ray-prompts") / "p.jsonl"
    p.write_text("".join(json.dumps(x) + "\n" for x in PROMPTS))
    return p


def _env(**extra: str) -> dict[str, str]:
    # One torch thread in the reference run, as in each replica (cpus_per_replica=1): the
    # same kernels in the same order, so the floats agree exactly.
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bon_sr.cli", "generate", *args], capture_output=True, text=True,
                          cwd=ROOT, env=_env(**env), timeout=600)


def _records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _assert_same_as(records: list[dict], reference: dict[str, dict]) -> None:
    ids = [r["id"] for r in records]
    assert sorted(ids) == sorted(reference), "every id exactly once"
    for rec in records:
        ref = reference[rec["id"]]
        for key in ("best_index", "response", "scores"):
            assert rec[key] == ref[key], (rec["id"], key)
        assert rec == ref          # candidates, token ids, config: the whole line


@pytest.fixture(scope="module")
def reference(prompt_file, tmp_path_factory, default_model_dir):
    """The single-process command's output, by id."""
    out = tmp_path_factory.mktemp("ray-ref") / "ref.jsonl"
    r = _cli(str(prompt_file), "-o", str(out), *ARGS)
    assert r.returncode == 0, r.stderr
    return {rec["id"]: rec for rec in _records(out)}


@pytest.mark.slow
def test_ray_two_replicas_write_the_single_process_selections(ray_address, prompt_file, reference, tmp_path):
    out = tmp_path / "ray.jsonl"
    r = _cli(str(prompt_file), "-o", str(out), *ARGS, "--ray", "--ray-address", ray_address, "--replicas", "2")
    assert r.returncode == 0, r.stderr
    _assert_same_as(_records(out), reference)
    assert f"Done: {len(PROMPTS)} prompts written" in " ".join(r.stderr.split())


@pytest.mark.slow
def test_ray_replica_dying_mid_run_is_retried(ray_address, prompt_file, reference, tmp_path):
    out = tmp_path / "ray.jsonl"
    marker = tmp_path / "crashed"
    r = _cli(str(prompt_file), "-o", str(out), *ARGS, "--ray", "--ray-address", ray_address, "--replicas", "2",
             **{CRASH_ONCE_ENV: f"q4:{marker}"})
    assert r.returncode == 0, r.stderr
    assert marker.exists(), "the test hook never killed a replica"
    _assert_same_as(_records(out), reference)


@pytest.mark.slow
def test_ray_resume_after_driver_kill_9(ray_address, prompt_file, reference, tmp_path):
    out = tmp_path / "ray.jsonl"
    args = [str(prompt_file), "-o", str(out), *ARGS, "--ray", "--ray-address", ray_address, "--replicas", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "bon_sr.cli", "generate", *args], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be killed"
    proc.kill()                                               # SIGKILL: no cleanup, no atexit
    proc.communicate(timeout=60)
    kept = out.read_text()
    assert 1 <= kept.count("\n") < len(PROMPTS)
    r = _cli(*args, "--resume")
    assert r.returncode == 0, r.stderr
    assert "Resuming:" in r.stderr
    final = _records(out)
    _assert_same_as(final, reference)
    assert out.read_text().startswith(kept[: kept.rfind("\n") + 1])   # finished lines untouched


@pytest.mark.slow
def test_ray_prompt_too_long_fails_before_any_replica_starts(ray_address, tmp_path):
    p = tmp_path / "long.jsonl"
    p.write_text(json.dumps({"id": "long", "prompt": "word " * 9000}) + "\n")
    out = tmp_path / "out.jsonl"
    r = _cli(str(p), "-o", str(out), *ARGS, "--ray", "--ray-address", ray_address)
    assert r.returncode != 0
    err = " ".join(r.stderr.split())
    # The tokenizer-only context check runs before the model loads (and before Ray starts),
    # naming file:line and the id; nothing is written.
    assert "long.jsonl:1 (id 'long')" in err and "context is 8192 tokens" in err
    assert not out.exists() or out.read_text() == ""
