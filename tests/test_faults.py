"""Faults, the CI subset of benchmarks/faults (``python -m benchmarks.faults``): kill -9 at
seeded moments then --resume (generate, bench, ablate), fuzzed prompt files, a full disk, and
on the real default model with vLLM: kill -9 and SIGTERM leave no engine process behind, and
a normal run's terminal shows the progress and the summary, not vLLM's log.

Every test that starts a `bon-sr` process (or any child process) is marked slow, so
`make test-fast` starts none; the in-process fuzz test is the fast one."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from benchmarks.faults import disk, fuzz, kill
from benchmarks.faults import proc as procs

ROOT = procs.ROOT
slow = pytest.mark.slow


def _report(outcomes) -> str:
    return "\n".join(f"{o.case}: {o.message}" for o in outcomes if not o.ok)


# -- fuzzed prompt files ---------------------------------------------------------------

@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return fuzz.fuzz_cases(tmp_path_factory.mktemp("fuzz"), seed=0, count=300)


def test_fuzzed_prompt_files_in_process(cases):
    outcomes = fuzz.fuzz_in_process(cases)
    assert len(outcomes) > 300
    assert not [o for o in outcomes if not o.ok], _report(outcomes)
    # the message names the line of the damage, not only the file
    for o in outcomes:
        if o.case in ("truncated-json", "invalid-utf8", "nul-byte", "100k-lines-one-bad"):
            assert ".jsonl:" in o.message or ".txt:" in o.message, o
    assert any(o.case == "100k-lines-one-bad" and "100k-lines.jsonl:99991:" in o.message for o in outcomes)


@slow
def test_fuzzed_prompt_files_through_the_cli(cases, tmp_path):
    special = [c for c in cases if c.path.parent.name == "special"]
    generated = [c for c in cases if c.path.parent.name != "special" and not c.valid]
    picked = special + generated[::60]
    outcomes = fuzz.fuzz_cli(picked, tmp_path)
    assert not [o for o in outcomes if not o.ok], _report(outcomes)


# -- kill -9 and --resume (HF backend: the final output equals an uninterrupted run) ----

@slow
def test_kill9_generate_then_resume_equals_uninterrupted(tmp_path, tiny_model_dir):
    prompts = procs.write_prompts(tmp_path / "p.jsonl", 4)
    args = ["generate", str(prompts), "--model", tiny_model_dir, "--backend", "hf", "--n", "2",
            "--max-new-tokens", "6", "--seed", "3"]
    results = kill.kill_generate(args, tmp_path / "work", 3, seed=1, phases=("load", "sample", "write"))
    summary = kill.summarize_kills(results)
    assert summary["kills"] >= 2, results
    assert summary["records_lost"] == summary["duplicates"] == summary["not_equal"] == 0, results
    assert summary["invalid"] == summary["resume_failed"] == 0, results
    assert any(r.phase == "write" for r in results)   # a torn last line was repaired


@slow
def test_kill9_bench_and_ablate_then_rerun_equals_uninterrupted(tmp_path, tiny_model_dir, tiny_tokenizer):
    task = procs.write_task(tmp_path / "task.jsonl", 4)
    bench_args = ["--task", str(task), "--model", tiny_model_dir, "--backend", "hf", "--n", "1,2",
                  "--max-new-tokens", "6", "--bootstrap", "100"]
    res = kill.kill_dir_command("bench", bench_args, tmp_path, 2, seed=2, compare=kill.bench_state)
    # ablate over a cache with mixed correctness (the tiny model gets every answer wrong)
    from test_variants import synthetic_cache

    synthetic_cache(tmp_path / "cache", tiny_tokenizer, tiny_model_dir, problems=8)
    ablate_args = ["--cache", str(tmp_path / "cache"), "--variants", "paper,center,drop-massive", "--layers", "0,-1",
                   "--norms", "post,pre", "--bootstrap", "100"]
    res += kill.kill_dir_command("ablate", ablate_args, tmp_path, 2, seed=2, compare=kill.ablate_state)
    summary = kill.summarize_kills(res)
    assert summary["records_lost"] == summary["duplicates"] == summary["not_equal"] == 0, res
    assert summary["resume_failed"] == 0, res


@slow
def test_ablate_recovers_from_a_torn_cell(tmp_path, tiny_model_dir):
    """A cell file cut short (a crash of an older version mid-write) is recomputed, not a traceback."""
    task = procs.write_task(tmp_path / "task.jsonl", 3)
    r = procs.run_cli(["bench", "--task", str(task), "--model", tiny_model_dir, "--backend", "hf", "--n", "1,2",
                        "--max-new-tokens", "6", "--bootstrap", "100", "-o", str(tmp_path / "b")])
    assert r.returncode == 0, r.stderr
    args = ["ablate", "--cache", str(tmp_path / "b"), "--variants", "paper", "--bootstrap", "100",
            "-o", str(tmp_path / "a")]
    assert procs.run_cli(args).returncode == 0
    before = kill.ablate_state(tmp_path / "a")
    cell = next((tmp_path / "a" / "cells").glob("paper__*.json"))
    cell.write_text(cell.read_text()[:15])
    r = procs.run_cli(args)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert kill.ablate_state(tmp_path / "a") == before


# -- a full disk ---------------------------------------------------------------------

@slow
def test_disk_full_keeps_finished_lines_and_resume_completes(tmp_path, tiny_model_dir):
    prompts = procs.write_prompts(tmp_path / "p.jsonl", 4)
    args = ["generate", str(prompts), "--model", tiny_model_dir, "--backend", "hf", "--n", "2",
            "--max-new-tokens", "6"]
    res = disk.disk_full(args, tmp_path)              # room for one and a half records
    assert res["rc"] == 1 and not res["traceback"], res
    assert "File too large" in res["message"] and "rerun with --resume" in res["message"], res
    assert res["kept"] == 1 and not res["torn_tail"] and res["kept_intact"], res
    assert res["resume_rc"] == 0 and res["final_ids"] == ["p0", "p1", "p2", "p3"], res
    assert res["equal_to_uninterrupted"], res


@slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_bench_ctrl_c_and_sigterm_keep_the_cache_and_a_rerun_completes(tmp_path, tiny_model_dir, sig, code):
    task = procs.write_task(tmp_path / "task.jsonl", 40)
    args = ["bench", "--task", str(task), "--model", tiny_model_dir, "--backend", "hf", "--n", "1,2",
            "--max-new-tokens", "48", "--bootstrap", "100", "-o", str(tmp_path / "out")]
    cache = tmp_path / "out" / "cache" / "task.jsonl"
    # a shell without job control starts children with SIGINT ignored: give it the default back
    proc = subprocess.Popen(procs.cli_command(args, traced=False), cwd=procs.ROOT, env=procs.base_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and len(procs.complete_records(cache)) < 2:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code and "Traceback" not in err, err[-3000:]
    assert "rerun the same command to continue" in " ".join(err.split()), err[-2000:]
    kept = procs.complete_records(cache)
    assert 2 <= len(kept) < 40 and cache.read_bytes().endswith(b"\n")
    again = procs.run_cli(args)
    assert again.returncode == 0, again.stderr[-3000:]
    final = procs.complete_records(cache)
    assert [r["id"] for r in final] == [f"t{k}" for k in range(40)] and final[: len(kept)] == kept


@slow
def test_disk_full_while_the_bench_writes_its_cache(tmp_path, tiny_model_dir):
    import resource

    task = procs.write_task(tmp_path / "task.jsonl", 3)
    args = ["bench", "--task", str(task), "--model", tiny_model_dir, "--backend", "hf", "--n", "1,2",
            "--max-new-tokens", "6", "--bootstrap", "100"]
    ref = procs.run_cli([*args, "-o", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr
    first = len((tmp_path / "ref" / "cache" / "task.jsonl").read_bytes().split(b"\n")[0]) + 1
    limit = first + first // 2  # room for one and a half problems

    def small_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "out"
    r = procs.run_cli([*args, "-o", str(out)], preexec=small_disk)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "Cannot write to" in r.stderr and "File too large" in r.stderr, r.stderr[-2000:]
    cache = out / "cache" / "task.jsonl"
    assert cache.read_bytes().endswith(b"\n") and len(procs.complete_records(cache)) == 1
    again = procs.run_cli([*args, "-o", str(out)])
    assert again.returncode == 0, again.stderr
    assert kill.bench_state(out) == kill.bench_state(tmp_path / "ref")


# -- the real default model with vLLM -------------------------------------------------

@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_kill9_sigterm_no_orphans_and_a_quiet_terminal(tmp_path, default_model_dir):
    prompts = procs.write_prompts(tmp_path / "p.jsonl", 3)
    args = ["generate", str(prompts), "--backend", "vllm", "--n", "2", "--max-new-tokens", "12"]
    env = procs.base_env(VLLM_LOGGING_LEVEL="INFO")

    # SIGTERM while sampling: exit 143, the engine shut down, nothing left running.
    res = kill.signal_during_sampling(args, tmp_path, signal.SIGTERM, env=env, after_ready_s=0.5)
    if not res["finished_first"]:
        assert res["rc"] == 143, res["stderr"]
        assert "Stopped by SIGTERM" in " ".join(res["stderr"].split())
    assert res["orphans"] == [], res

    # kill -9 once the engine runs (OFFLINE.md: its engine processes used to outlive it).
    out = tmp_path / "sig15.jsonl"
    log = tmp_path / "sig15.vllm.log"
    ready = "init engine (profile, create kv cache"
    runs_before = log.read_text(errors="replace").count(ready) if log.exists() else 0
    proc = subprocess.Popen(procs.cli_command([*args, "-o", str(out), "--resume"], traced=False),
                                   cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if log.read_text(errors="replace").count(ready) > runs_before:   # this run's engine is up
            break
        time.sleep(0.2)
    kids = procs.descendants(proc.pid)
    if not any("EngineCore" in k.name() for k in kids):
        proc.kill()
    assert any("EngineCore" in k.name() for k in kids), [k.name() for k in kids]
    proc.kill()
    proc.wait()
    assert procs.still_alive(kids) == []

    # The resumed run completes; its terminal shows progress and the summary only.
    r = procs.run_cli([*args, "-o", str(out), "--resume"], env=procs.base_env())
    assert r.returncode == 0, r.stderr
    records = procs.complete_records(out)
    assert [x["id"] for x in records] == ["p0", "p1", "p2"]
    err = r.stderr
    assert "Done: " in err and "vLLM's log:" in err, err
    for noise in procs.NOISE:
        assert noise not in err, (noise, err)
    assert r.stdout == ""
    last_run = log.read_text(errors="replace").rsplit("--- bon-sr", 1)[-1]
    assert "exited unexpectedly" not in last_run and "force killing" not in last_run, last_run[-2000:]


# -- engine processes die with their parent (no vLLM needed) --------------------------

_PARENT = r'''
import multiprocessing as mp, os, sys, time
def child():
    from bon_sr.sampling.vllm_plugin import die_with_parent
    print("armed" if die_with_parent() else "not armed", os.getpid(), flush=True)
    time.sleep(120)
if __name__ == "__main__":
    if sys.argv[1] == "flag":
        from bon_sr.sampling.vllm_plugin import mark_engine_parent
        mark_engine_parent()
    p = mp.get_context("spawn").Process(target=child)
    p.start()
    time.sleep(120)
'''


@slow
@pytest.mark.parametrize("flag", ["flag", "no-flag"])
def test_a_flagged_child_dies_with_its_parent_on_kill9(tmp_path, flag):
    import os

    import psutil

    script = tmp_path / "parent.py"
    script.write_text(_PARENT)
    env = {k: v for k, v in os.environ.items() if k != "BON_SR_ENGINE_PARENT"}
    parent = subprocess.Popen([sys.executable, str(script), flag], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env=env)
    line = parent.stdout.readline().split()             # the child's "armed <pid>"
    child = psutil.Process(int(line[-1]))
    parent.kill()
    parent.wait()
    alive = procs.still_alive([child], wait=5)
    if flag == "flag":
        assert line[0] == "armed" and alive == []
    else:   # the control: without the flag the child outlives its parent (and is killed here)
        assert line[0] == "not" and len(alive) == 1


def test_mark_engine_parent_only_from_the_main_thread(monkeypatch):
    import os
    import threading

    from bon_sr.sampling import vllm_plugin

    monkeypatch.setenv(vllm_plugin.PARENT_ENV, "1")
    t = threading.Thread(target=vllm_plugin.mark_engine_parent)
    t.start()
    t.join()
    assert vllm_plugin.PARENT_ENV not in os.environ      # a worker thread's children would die with the thread
    vllm_plugin.mark_engine_parent()
    assert os.environ[vllm_plugin.PARENT_ENV] == str(os.getpid())
    assert vllm_plugin.die_with_parent() is False        # the flagged process itself is not armed


@slow
def test_a_prompt_longer_than_the_context_fails_before_the_model_loads(tmp_path, tiny_model_dir):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"id": "ok", "prompt": "hi"}) + "\n" + json.dumps({"id": "big", "prompt": "x" * 600}) + "\n")
    out = tmp_path / "out.jsonl"
    r = procs.run_cli(["generate", str(p), "-o", str(out), "--model", tiny_model_dir, "--backend", "hf",
                        "--max-new-tokens", "8"])
    err = " ".join(r.stderr.split())
    assert r.returncode == 1 and f"{p}:2 (id 'big')" in err and "context is 512 tokens" in err, err
    assert "Loaded" not in err and not out.exists()


def test_a_fast_test_cannot_start_the_cli():
    # tests/conftest.py guards every test not marked slow: `make test-fast` starts no bon-sr process
    with pytest.raises(pytest.fail.Exception, match="not marked slow"):
        subprocess.run(procs.cli_command(["--help"], traced=False), capture_output=True)
    with pytest.raises(pytest.fail.Exception, match="not marked slow"):
        subprocess.run(procs.cli_command(["--help"], traced=True), capture_output=True)
    assert subprocess.run([sys.executable, "-c", "pass"]).returncode == 0   # other children are fine
