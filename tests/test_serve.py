"""``bon-sr serve``: the OpenAI-compatible server.

Fast tests (no vLLM, no model): the app from ``create_app`` with a fake engine and
FastAPI's TestClient: request models, every error case, choices in the selector's order,
streaming chunks, the loading state.

Real tests (marked vllm + slow, as tests/test_vllm.py): the suite's ONE ``bon-sr serve``
process (``serve_process``, tests/shared.py: 127.0.0.1, a free port, the offline default
model, shared with tests/test_consensus.py), driven by the official ``openai`` client:
chat, completions, streaming, return_candidates, seeds, errors, 32 concurrent requests, a
client that disconnects mid-request, SIGTERM while a request is in flight (run after the
server's other users; a later user would get a new server). The comparison with
``BestOfN`` runs on the suite's bf16 engine after the server has gone (never two vLLM
engines at once: RAM is shared), and the data-parallel server is its own.
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import FakeEngine
from shared import API_KEY, FAULT_SEED, HOLDERS, MACHINE_CORES, SERVER, ServeProcess, module_server_args

from bon_sr.sampling import SamplingConfig

from fastapi.testclient import TestClient  # noqa: E402

from bon_sr.serve.app import create_app  # noqa: E402
from bon_sr.serve.settings import ServeSettings  # noqa: E402

MODEL = "smollm2-135m-instruct"


# =========================================================================== fast: fake engine


def _client(tiny_tokenizer, settings=None, **engine_kwargs):
    # the fake engine's stable rank is i + 1: a server started with --selector stable-rank picks the last
    settings = settings or ServeSettings(model=MODEL, selector="stable-rank", sampling=SamplingConfig(n=4, max_new_tokens=16),
                                         max_n=8)
    engine = FakeEngine(tiny_tokenizer, **engine_kwargs)
    return TestClient(create_app(engine, settings)), engine


@pytest.fixture
def client(tiny_tokenizer):
    c, engine = _client(tiny_tokenizer)
    with c:
        c.engine = engine
        yield c


def chat(**kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": "Pick a number."}], **kw}


def test_chat_reply_is_openai_shaped_with_bon_sr_object(client):
    r = client.post("/v1/chat/completions", json=chat(seed=3, bon_sr={"return_candidates": True}))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    assert body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    # stable rank i + 1: the last of 4 wins
    assert choice["message"] == {"role": "assistant", "content": "The answer is 1."}
    assert choice["finish_reason"] == "stop"
    info = body["bon_sr"]
    assert info["selected_index"] == 3 and info["selector"] == "stable-rank" and info["n"] == 4
    assert [s["stable_rank"] for s in info["scores"]] == [1.0, 2.0, 3.0, 4.0]
    assert info["seed"] == 3 and info["scorer"] == "hook"
    assert [c["text"] for c in info["candidates"]] == [f"The answer is {i % 2}." for i in range(4)]
    # usage counts every candidate's tokens: 3 + 4 + 5 + 6
    assert body["usage"]["completion_tokens"] == 18
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 18
    job = client.engine.jobs[-1]
    assert job.sampling.max_new_tokens == 16 and job.sampling.temperature == 0.7 and job.seed == 3


def test_choices_follow_the_selector_order_and_voting_reports_answers(client):
    r = client.post("/v1/chat/completions", json=chat(n=3, bon_sr={"n": 5, "selector": "majority",
                                                                  "answer": "numeric"}))
    assert r.status_code == 200, r.text
    body = r.json()
    info = body["bon_sr"]
    # answers 0,1,0,1,0: answer 0 has 3 votes, candidate 0 first; among 1-4 the answers tie
    # 2:2 and the earlier class (candidate 1's) wins; among 2-4 answer 0 leads again
    assert info["votes"] == {"0": 3, "1": 2} and info["answer"] == "0"
    assert info["choice_indices"] == [0, 1, 2]
    # majority needs no scores; the hook's stable rank comes free with the sampling pass
    assert info["scorer"] == "hook" and [s["stable_rank"] for s in info["scores"]] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    r = client.post("/v1/chat/completions", json=chat(n=2))
    assert r.json()["bon_sr"]["choice_indices"] == [3, 2]  # descending stable rank


def test_completions_take_raw_text_and_token_ids(client, tiny_tokenizer):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "abc", "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "text_completion" and r.json()["choices"][0]["text"] == "The answer is 1."
    assert list(client.engine.jobs[-1].prompt_ids) == tiny_tokenizer("abc")["input_ids"]  # no chat template
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": [5, 6, 7]})
    assert r.status_code == 200 and client.engine.jobs[-1].prompt_ids == (5, 6, 7)


def test_seed_derives_from_run_seed_and_id_like_generate(client):
    from bon_sr.sampling.prompts import derive_seed

    client.post("/v1/chat/completions", json=chat(bon_sr={"id": "q7"}))
    assert client.engine.jobs[-1].seed == derive_seed(0, "q7")
    client.post("/v1/chat/completions", json=chat())
    client.post("/v1/chat/completions", json=chat())
    assert client.engine.jobs[-1].seed != client.engine.jobs[-2].seed  # no seed: a fresh one per request


def test_stream_sends_the_selected_answer_then_done(client):
    with client.stream("POST", "/v1/chat/completions",
                       json=chat(stream=True, stream_options={"include_usage": True})) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    text = "".join(e["choices"][0]["delta"]["content"] or "" for e in events if e["choices"])
    assert text == "The answer is 1."
    assert events[-1]["usage"]["completion_tokens"] == 18 and events[-1]["bon_sr"]["selected_index"] == 3
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "stop"


ERROR_CASES = [
    # (body changes, status, param, words in the message)
    (dict(bon_sr={"n": 0}), 400, "bon_sr.n", "between 1 and this server's cap 8"),
    (dict(bon_sr={"n": 9}), 400, "bon_sr.n", "cap 8"),
    (dict(n=5), 400, "n", "bon_sr.n=4"),
    (dict(n=0), 400, "n", "between 1"),
    (dict(bon_sr={"selector": "nope"}), 400, "bon_sr.selector", "Unknown selector 'nope'. Available:"),
    (dict(bon_sr={"selector": "majority"}), 400, "bon_sr.answer", "votes over answers"),
    (dict(bon_sr={"answer": "roman"}), 400, "bon_sr.answer", "Unknown answer extractor"),
    (dict(bon_sr={"token_set": "response+eot"}), 400, "bon_sr.token_set", "token sets response and full"),
    (dict(bon_sr={"nn": 4}), 400, "bon_sr.nn", "unknown field"),
    (dict(max_tokens="16"), 400, "max_tokens", "valid integer"),
    (dict(max_tokens=0), 400, "max_tokens", ">= 1"),
    (dict(temperature=True), 400, "temperature", "number"),
    (dict(temperature=0), 400, "temperature", "greedy"),
    (dict(top_p=1.5), 400, "top_p", "(0, 1]"),
    (dict(top_p=0), 400, "top_p", "(0, 1]"),
    # the ranges vLLM's SamplingParams checks are 400s naming the field (REVIEW §0: was a 500)
    (dict(temperature=1.18e21), 400, "temperature", "temperature must be in [0, 2]"),
    (dict(temperature=2.5), 400, "temperature", "temperature must be in [0, 2]"),
    (dict(temperature=-0.5), 400, "temperature", "temperature must be in [0, 2]"),
    (dict(frequency_penalty={}), 400, "frequency_penalty", "penalties are not supported"),
    (dict(presence_penalty=[]), 400, "presence_penalty", "penalties are not supported"),
    (dict(frequency_penalty=0.5), 400, "frequency_penalty", "penalties are not supported"),
    (dict(seed=-1), 400, "seed", "between 0"),
    (dict(stop=[""]), 400, "stop", "non-empty"),
    (dict(messages=[]), 400, "messages", "empty list"),
    (dict(messages=[{"role": "robot", "content": "hi"}]), 400, "messages", "unknown role"),
    (dict(messages=[{"content": "hi"}]), 400, "messages[0].role", "field required"),
    (dict(messages=[{"role": "user", "content": "x" * 600}]), 400, "messages", "context is 512 tokens"),
    (dict(max_tokens=600), 400, "messages", "600 new tokens"),
    (dict(logprobs=True), 400, "logprobs", "not supported"),
    (dict(model="gpt-4"), 404, "model", "does not exist"),
]


@pytest.mark.parametrize("change,status,param,words", ERROR_CASES, ids=[str(c[0])[:40] for c in ERROR_CASES])
def test_bad_fields_get_openai_errors(client, change, status, param, words):
    r = client.post("/v1/chat/completions", json=chat(**change))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == status and err["param"] == param and words in err["message"], err
    assert err["type"] == ("NotFoundError" if status == 404 else "BadRequestError")


def test_malformed_bodies_and_unknown_routes(client):
    for data, words in ((b"{not json", "not valid JSON"), (b"[1, 2]", "JSON object"), (b"\xff\xfe", "not valid")):
        r = client.post("/v1/chat/completions", content=data, headers={"content-type": "application/json"})
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    r = client.post("/v1/completions", json={"model": MODEL})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": ["a", "b"]})
    assert r.status_code == 400 and "One prompt per request" in r.json()["error"]["message"]
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError"
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == 405


def test_oversized_body_is_413(tiny_tokenizer):
    c, _ = _client(tiny_tokenizer, ServeSettings(model=MODEL, max_body_bytes=2048))
    with c:
        r = c.post("/v1/chat/completions", json=chat(messages=[{"role": "user", "content": "x" * 4000}]))
        assert r.status_code == 413 and "at most 2048" in r.json()["error"]["message"]
        # no Content-Length (chunked): counted while reading
        r = c.post("/v1/chat/completions", content=iter([b"{" + b" " * 3000 + b"}"]))
        assert r.status_code == 413 and r.json()["error"]["type"] == "RequestTooLargeError"


def test_a_stalled_body_is_408_and_a_vanished_client_is_quiet():
    import asyncio
    from types import SimpleNamespace

    from starlette.requests import Request

    from bon_sr.serve.app import ClientGone, read_request
    from bon_sr.serve.errors import ApiError
    from bon_sr.serve.protocol import ChatCompletionRequest

    def request(*messages):
        queue = list(messages)

        async def receive():
            item = queue.pop(0)
            if item == "stall":              # the client stops sending mid-body
                await asyncio.sleep(5)
            return item

        app = SimpleNamespace(state=SimpleNamespace(settings=ServeSettings(model=MODEL, body_timeout=0.2)))
        return Request({"type": "http", "method": "POST", "headers": [], "app": app}, receive)

    part = {"type": "http.request", "body": b'{"model": ', "more_body": True}
    with pytest.raises(ApiError) as err:
        asyncio.run(read_request(request(part, "stall"), ChatCompletionRequest))
    assert err.value.status == 408 and "--body-timeout" in err.value.message
    with pytest.raises(ClientGone):
        asyncio.run(read_request(request(part, {"type": "http.disconnect"}), ChatCompletionRequest))
    with pytest.raises(Exception, match="--body-timeout must be > 0"):
        ServeSettings(model=MODEL, body_timeout=0)


def test_api_key(tiny_tokenizer):
    c, _ = _client(tiny_tokenizer, ServeSettings(model=MODEL, api_key="sekret"))
    with c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            r = c.post("/v1/chat/completions", json=chat(), headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"
            assert c.get("/v1/models", headers=headers).status_code == 401
        ok = {"Authorization": "Bearer sekret"}
        assert c.post("/v1/chat/completions", json=chat(), headers=ok).status_code == 200
        assert c.get("/v1/models", headers=ok).json()["data"][0]["id"] == MODEL
        assert c.get("/health").status_code == 200  # health needs no key


def test_health_is_503_while_loading_and_after_a_failed_load(tiny_tokenizer):
    c, engine = _client(tiny_tokenizer, load_s=0.5)
    with c:
        r = c.get("/health")
        assert r.status_code == 503 and "still loading" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", json=chat())
        assert r.status_code == 503 and r.json()["error"]["type"] == "ServiceUnavailableError"
        time.sleep(0.8)
        assert c.get("/health").status_code == 200
    assert engine.closed
    c, _ = _client(tiny_tokenizer, fail="ModelError: no such model")
    with c:
        time.sleep(0.1)
        r = c.get("/health")
        assert r.status_code == 503 and "no such model" in r.json()["error"]["message"]


def test_internal_errors_are_500_without_traceback(tiny_tokenizer):
    c, engine = _client(tiny_tokenizer)

    async def broken(job):
        raise RuntimeError("secret internals /path/to/file.py")

    engine.sample = broken
    with TestClient(c.app, raise_server_exceptions=False) as c:
        r = c.post("/v1/chat/completions", json=chat())
    assert r.status_code == 500
    assert r.json()["error"]["message"] == "Internal server error (RuntimeError); see the server log."


def test_vllm_validation_and_hook_errors_map_to_400_and_500(tiny_tokenizer):
    """vLLM's request-validation errors (whatever check slipped past the request model) are
    400s naming vLLM's parameter; a HookError is a 500 naming the worker's exception type."""
    from vllm.exceptions import VLLMValidationError

    from bon_sr.hook import HookError

    c, engine = _client(tiny_tokenizer)
    errors = iter([VLLMValidationError("top_k must be 0 (disable), or at least 1, got -5.", parameter="top_k",
                                       value=-5),
                   HookError("bon-sr hook failed in vLLM's worker for this request: RuntimeError: boom",
                             worker_error="RuntimeError")])

    async def failing(job):
        raise next(errors)

    engine.sample = failing
    with TestClient(c.app, raise_server_exceptions=False) as c:
        r = c.post("/v1/chat/completions", json=chat())
        assert r.status_code == 400 and r.json()["error"]["param"] == "top_k", r.text
        assert "top_k must be 0" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", json=chat())
        assert r.status_code == 500, r.text
        assert r.json()["error"]["message"] == ("Internal server error (HookError: RuntimeError in vLLM's worker); "
                                                "see the server log.")
        assert c.get("/health").status_code == 200


def test_a_full_hook_budget_is_503_with_retry_after(tiny_tokenizer):
    from bon_sr.hook.aio import HookBusy

    c, engine = _client(tiny_tokenizer)

    async def busy(job):
        raise HookBusy("The server is at its hook memory budget; retry later.", retry_after=2.0)

    engine.sample = busy
    with TestClient(c.app, raise_server_exceptions=False) as c:
        r = c.post("/v1/chat/completions", json=chat())
    assert r.status_code == 503 and r.headers["retry-after"] == "2", (r.status_code, r.headers)
    assert r.json()["error"]["type"] == "ServiceUnavailableError" and "retry later" in r.json()["error"]["message"]


def test_settings_are_checked_up_front():
    from bon_sr.errors import ConfigError

    with pytest.raises(ConfigError, match="votes over answers"):
        ServeSettings(selector="majority")
    with pytest.raises(ConfigError, match="above --max-n"):
        ServeSettings(sampling=SamplingConfig(n=8), max_n=4)
    with pytest.raises(ConfigError, match="Unknown selector"):
        ServeSettings(selector="best")


# =========================================================================== real server (vLLM)

CHAT = [{"role": "user", "content": "What is 12 * 7? Answer briefly."}]
CHAT_KW = dict(model=MODEL, messages=CHAT, max_tokens=16, seed=7,
               extra_body={"bon_sr": {"return_candidates": True, "selector": "stable-rank"}})


@pytest.fixture
def server(serve_process):
    """The suite's shared server (a new one if a test stopped it)."""
    import openai  # noqa: F401  (a vLLM dependency: the official client is the point)

    return serve_process.get()


def _openai(srv):
    from openai import OpenAI

    return OpenAI(base_url=srv.base + "/v1", api_key=API_KEY, max_retries=0, timeout=300)


@pytest.fixture
def oai(server):
    return _openai(server)


@pytest.fixture(scope="session")
def served_chat():
    """The shared server's reply to CHAT_KW (seed 7, candidates returned), asked once. It
    reaches the server through the holder, not the ``serve_process`` fixture, so that the
    BestOfN comparison (a bf16-engine test) does not keep the server alive."""
    return _openai(HOLDERS["serve_process"].get()).chat.completions.create(**CHAT_KW)


def _log_from(srv, offset: int) -> str:
    return srv.tail(10 ** 9)[offset:]


def _info(resp) -> dict:
    return resp.model_extra["bon_sr"]


@pytest.mark.vllm
@pytest.mark.slow
def test_real_health_is_503_while_loading(server):
    assert 503 in server.health and server.health[-1] == 200


@pytest.mark.vllm
@pytest.mark.slow
def test_real_chat_with_candidates_and_a_fixed_seed_reproduces(oai, served_chat):
    first = served_chat
    info = _info(first)
    assert first.object == "chat.completion" and first.model == MODEL and len(first.choices) == 1
    assert info["n"] == 3 and info["selector"] == "stable-rank" and info["seed"] == 7
    srs = [s["stable_rank"] for s in info["scores"]]
    assert info["selected_index"] == max(range(3), key=lambda i: (srs[i], -i))
    texts = [c["text"] for c in info["candidates"]]
    assert first.choices[0].message.content == texts[info["selected_index"]]
    # usage counts the EOS that ended a candidate, as vLLM's server does (tests/test_serve_usage.py)
    eos = info["finish_reasons"].count("stop")
    assert first.usage.completion_tokens == sum(info["num_tokens"]) + eos and max(info["num_tokens"]) <= 16
    again = oai.chat.completions.create(**CHAT_KW)
    assert [c["text"] for c in _info(again)["candidates"]] == texts
    assert _info(again)["selected_index"] == info["selected_index"]
    for a, b in zip(_info(again)["scores"], info["scores"]):
        assert a["stable_rank"] == pytest.approx(b["stable_rank"], rel=1e-3)


@pytest.mark.vllm
@pytest.mark.slow
def test_real_stream_sends_the_same_selected_answer(oai, served_chat):
    kw = dict(model=MODEL, messages=CHAT, max_tokens=16, seed=7, extra_body={"bon_sr": {"selector": "stable-rank"}})
    chunks = list(oai.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    seen = _info(served_chat)
    assert text == seen["candidates"][seen["selected_index"]]["text"]
    eos = seen["finish_reasons"].count("stop")
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == sum(seen["num_tokens"]) + eos
    assert chunks[-1].model_extra["bon_sr"]["selected_index"] == seen["selected_index"]


@pytest.mark.vllm
@pytest.mark.slow
def test_real_python_answers_run_every_candidate_and_the_greedy_decode(oai, server):
    """The shared server runs with --allow-code-execution: with answer 'python' and an explicit
    test, the N sampled candidates and the greedy decode that joins them by default each run in
    the sandbox, and the pick follows the pass-first vote."""
    assert "--allow-code-execution: requests with answer 'python' run model-written code" in server.tail(10 ** 9)
    r = oai.chat.completions.create(
        model=MODEL, max_tokens=48, seed=3,
        messages=[{"role": "user", "content": "Write a Python function add(a, b) that returns a + b."}],
        extra_body={"bon_sr": {"n": 3, "selector": "majority", "answer": "python", "tests": "assert add(2, 3) == 5",
                               "return_candidates": True}})
    info = _info(r)
    cands = info["candidates"]
    assert info["n"] == 4 and [c.get("greedy", False) for c in cands] == [False, False, False, True]
    assert info["rule"].startswith("exec: ") and "1 explicit test" in info["rule"]
    assert all(isinstance(c["passed"], bool) and len(c["checks"]) == 1 for c in cands)
    assert r.choices[0].message.content == cands[info["selected_index"]]["text"]
    assert r.usage.completion_tokens == sum(info["num_tokens"]) + info["finish_reasons"].count("stop")


@pytest.mark.vllm
@pytest.mark.slow
def test_real_completions_models_and_top_n_choices(oai):
    assert [m.id for m in oai.models.list().data] == [MODEL]
    r = oai.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, seed=3, n=2,
                               extra_body={"bon_sr": {"n": 4, "selector": "majority", "answer": "exact"}})
    info = _info(r)
    assert r.object == "text_completion" and len(r.choices) == 2 and info["n"] == 4
    # majority needs no scores; the hook's stable rank comes free with the sampling pass
    assert info["scorer"] == "hook" and all("stable_rank" in s for s in info["scores"])
    assert sum(info["votes"].values()) <= 4
    assert len(set(info["choice_indices"])) == 2 and info["choice_indices"][0] == info["selected_index"]


@pytest.mark.vllm
@pytest.mark.slow
def test_real_errors(server, oai):
    import httpx
    import openai

    offset = len(server.tail(10 ** 9))

    cases = [
        (openai.BadRequestError, dict(extra_body={"bon_sr": {"n": 9}}), "cap 8"),
        (openai.BadRequestError, dict(extra_body={"bon_sr": {"selector": "best"}}), "Unknown selector 'best'"),
        (openai.BadRequestError, dict(n=4), "bon_sr.n=3"),
        (openai.BadRequestError, dict(messages=[{"role": "user", "content": "word " * 9000}]), "context is"),
        (openai.BadRequestError, dict(max_tokens="many"), "valid integer"),
        (openai.NotFoundError, dict(model="gpt-4"), "does not exist"),
    ]
    for error, change, words in cases:
        kw = {"model": MODEL, "messages": CHAT, "max_tokens": 4, **change}
        with pytest.raises(error, match=words.replace("*", r"\*")):
            oai.chat.completions.create(**kw)
    from openai import OpenAI

    with pytest.raises(openai.AuthenticationError, match="API key"):
        OpenAI(base_url=server.base + "/v1", api_key="wrong", max_retries=0).chat.completions.create(
            model=MODEL, messages=CHAT)
    auth = {"Authorization": f"Bearer {API_KEY}"}
    url = server.base + "/v1/chat/completions"
    r = httpx.post(url, content=b'{"model": ', headers={**auth, "content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(url, json={"model": MODEL, "messages": [{"role": "user", "content": "x" * 70000}]}, headers=auth)
    assert r.status_code == 413 and "65536" in r.json()["error"]["message"]
    assert "Traceback" not in _log_from(server, offset)


@pytest.mark.vllm
@pytest.mark.slow
def test_real_32_concurrent_requests(oai, server):
    from openai import AsyncOpenAI

    from bon_sr.sampling.prompts import derive_seed

    async def run():
        client = AsyncOpenAI(base_url=server.base + "/v1", api_key=API_KEY, max_retries=0, timeout=600)
        return await asyncio.gather(*(client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"What is {i} + {i}?"}], max_tokens=12,
            extra_body={"bon_sr": {"n": 2, "id": f"q{i}", "return_candidates": True}}) for i in range(32)),
            return_exceptions=True)

    replies = asyncio.run(run())
    errors = [r for r in replies if isinstance(r, Exception)]
    assert not errors, errors[:3]
    for i, r in enumerate(replies):
        info = _info(r)
        # each reply is its own request's: the seed derives from its id, its choice is its pick
        assert info["seed"] == derive_seed(0, f"q{i}") and info["n"] == 2
        assert r.choices[0].message.content == info["candidates"][info["selected_index"]]["text"]


@pytest.mark.vllm
@pytest.mark.slow
def test_real_hook_fault_fails_only_its_request(oai, server):
    """A failure inside the worker's hook for one request among concurrent ones: that one
    is a 500 naming the exception type, the others and the engine go on."""
    from openai import AsyncOpenAI

    async def run():
        client = AsyncOpenAI(base_url=server.base + "/v1", api_key=API_KEY, max_retries=0, timeout=600)
        return await asyncio.gather(*(client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=12, seed=seed) for seed in (11, FAULT_SEED, 12, 13)),
            return_exceptions=True)

    import openai

    replies = asyncio.run(run())
    assert isinstance(replies[1], openai.InternalServerError), replies[1]
    assert "HookError: RuntimeError in vLLM's worker" in str(replies[1])
    assert all(r.choices[0].message.content for k, r in enumerate(replies) if k != 1), replies
    assert oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, seed=1).choices[0].message.content


@pytest.mark.vllm
@pytest.mark.slow
def test_real_disconnect_mid_request_leaves_the_server_serving(oai, server):
    import httpx

    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
            "max_tokens": 200, "bon_sr": {"n": 8}}
    offset = len(server.tail(10 ** 9))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base + "/v1/chat/completions", json=body, timeout=2.0,
                   headers={"Authorization": f"Bearer {API_KEY}"})
    r = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, seed=1)
    assert r.choices[0].message.content
    deadline = time.monotonic() + 30
    while "client disconnected" not in _log_from(server, offset) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "its vLLM requests aborted" in _log_from(server, offset)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.stops_shared
def test_real_sigterm_finishes_the_request_in_flight_then_exits(oai, server):
    done = {}

    def request():
        done["reply"] = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, seed=5)

    worker = threading.Thread(target=request)
    worker.start()
    time.sleep(1.0)
    server.proc.send_signal(signal.SIGTERM)
    worker.join(300)
    assert done["reply"].choices[0].message.content
    # uvicorn re-raises the signal once it has shut down cleanly, so the status is -SIGTERM
    assert server.stop() in (0, -signal.SIGTERM)
    log = server.log_path.read_text()
    assert "Application shutdown complete" in log and "Finished server process" in log


@pytest.mark.vllm
@pytest.mark.slow
def test_selected_choice_equals_bestofn(served_chat, reuse_engines):
    """On the suite's bf16 engine, after the server is gone (one vLLM engine at a time):
    BestOfN with the server's options and the request's seed selects the same candidate,
    with the same texts."""
    from bon_sr.api import BestOfN

    served = _info(served_chat)
    with BestOfN(MODEL, backend="vllm", scorer="hook", n=SERVER["n"], max_new_tokens=16, seed=SERVER["seed"],
                 selector="stable-rank") as bon:
        sel = bon.select(CHAT, seed=7)
    assert reuse_engines == ["generate"]
    assert [c.text for c in sel.candidates] == [c["text"] for c in served["candidates"]]
    assert sel.best_index == served["selected_index"]
    for c, s in zip(sel.candidates, served["scores"]):
        assert c.scores["stable_rank"] == pytest.approx(s["stable_rank"], rel=1e-3)


@pytest.mark.vllm
@pytest.mark.slow
def test_real_data_parallel_server_scores_each_request_on_one_engine_core(tmp_path):
    """--data-parallel-size 2 on this CPU (one core per engine core, float32), its own server
    (run while no shared engine is alive): a request's samples, fill step and collect meet one core, so the
    same seeded request gives the same candidates and stable ranks whichever core it lands on."""

    srv = ServeProcess(tmp_path / "dp.log", module_server_args("--data-parallel-size", "2", "--dtype", "float32",
                                                               "--vllm-opt", "kv_cache_memory_bytes=536870912"),
                       env={"BON_SR_HOOK_FAULT_SEED": str(FAULT_SEED)},
                       cores=set(MACHINE_CORES))   # both, also under a pinned xdist worker
    try:
        srv.wait_ready()
        client = _openai(srv)
        prompts = ["What is 2+2?", "Name a prime number.", "What is the capital of Italy?", "Say hello."]
        jobs = [(p, ts, rep) for p in prompts for ts in ("response", "full") for rep in range(2)]

        def ask(job):
            prompt, token_set, _ = job
            resp = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=12, seed=5,
                extra_body={"bon_sr": {"return_candidates": True, "token_set": token_set}})
            info = _info(resp)
            return [c["text"] for c in info["candidates"]], [s["stable_rank"] for s in info["scores"]]

        with ThreadPoolExecutor(8) as pool:
            results = dict(zip(jobs, pool.map(ask, jobs)))
        for p in prompts:
            for ts in ("response", "full"):
                (texts_a, srs_a), (texts_b, srs_b) = results[(p, ts, 0)], results[(p, ts, 1)]
                assert len(texts_a) == SERVER["n"] and all(math.isfinite(x) for x in srs_a)
                assert texts_a == texts_b
                assert srs_a == pytest.approx(srs_b, rel=1e-4)
            # full scores the prompt rows too: other numbers for the same candidates
            assert results[(p, "full", 0)][0] == results[(p, "response", 0)][0]
            assert results[(p, "full", 0)][1] != pytest.approx(results[(p, "response", 0)][1], rel=1e-3)
    finally:
        code = srv.stop()
    log = srv.log_path.read_text(errors="replace")
    assert "missed rows" not in log, log[-3000:]
    assert code in (0, -signal.SIGTERM) and "Application shutdown complete" in log  # as the module's server
