"""A property-based fuzz of ``bon-sr serve`` (Hypothesis), in process: the app from
``create_app`` with a fake engine, no model, no port.

Two properties, each over a bounded, derandomized example count (CI sees the same cases every
run; ``BON_SR_FUZZ_EXAMPLES`` raises the count for a longer local hunt):

- over the request models (chat and completions: every field valid, out of range or of the
  wrong type, unknown and unsupported fields, bon-sr's own options), and
- over adversarial candidate sets a model can return (empty, whitespace-only, NaN and
  infinite scores, one token, cut at max_tokens, identical, huge, non-ASCII, without
  embeddings) under every selector, utility and answer format, streamed or not,

every reply is valid JSON (parsed strictly: NaN and Infinity refused), every streamed event
too, no reply is a 500, and every 4xx names its field (``error.param``). The cases tried
are counted in ``CASES`` and printed (``pytest -s``).
"""

from __future__ import annotations

import json
import math
import os
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import FakeEngine

from bon_sr.sampling import SamplingConfig
from bon_sr.selection.selectors import SELECTORS
from bon_sr.serve.app import create_app
from bon_sr.serve.protocol import UNSUPPORTED
from bon_sr.serve.settings import ServeSettings
from bon_sr.types import Candidate

MODEL = "smollm2-135m-instruct"
EXAMPLES = int(os.environ.get("BON_SR_FUZZ_EXAMPLES", "250"))
FUZZ = settings(max_examples=EXAMPLES, deadline=timedelta(seconds=20), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])
#: cases tried per property (the README's reliability section reports the sum)
CASES: dict[str, int] = {}
NAN, INF = float("nan"), float("inf")


# --------------------------------------------------------------------------- the engine

KINDS = ("normal", "empty", "whitespace", "nan", "inf", "one_token", "cut", "identical", "huge", "non_ascii",
         "missing_embedding")
STATS = ("stable_rank", "scored_tokens", "frobenius_sq", "spectral_sq", "mean_logprob", "self_certainty")


def candidate(kind: str, i: int, job) -> Candidate:
    vec = (1.0, float(i), 0.5, -0.25)
    text, ids, finish = f"The answer is {i % 3}. \\boxed{{{i % 3}}}", tuple(range(1, 6 + i)), "stop"
    scores = {"stable_rank": float(i + 1), "scored_tokens": float(len(ids)), "frobenius_sq": 2.0,
              "spectral_sq": 1.0, "mean_logprob": -0.5 - i, "self_certainty": 0.1 * i}
    emb: dict | None = {"last": vec, "mean": vec}
    if kind == "empty":
        text, ids, emb = "", (), None
        scores.update(stable_rank=0.0, scored_tokens=0.0, mean_logprob=NAN, self_certainty=NAN)
    elif kind == "whitespace":
        text, ids = " \n\t  ", (3, 4)
    elif kind == "nan":
        scores.update(stable_rank=NAN, mean_logprob=NAN, self_certainty=NAN)
    elif kind == "inf":
        scores.update(stable_rank=INF, mean_logprob=-INF, self_certainty=INF)
        emb = {"last": (INF, 1.0, 0.0, 0.0), "mean": (1.0, -INF, 0.0, 0.0)}
    elif kind == "one_token":
        text, ids = "7", (9,)
    elif kind == "cut":
        text, ids, finish = "The answer is 1 and then we keep going and", tuple(range(job.sampling.max_new_tokens)), \
            "length"
    elif kind == "identical":
        text = "The answer is 0. \\boxed{0}"
    elif kind == "huge":
        text, ids = "word " * 2000 + "so the answer is 42", tuple(range(2500))
    elif kind == "non_ascii":
        text = "答え: ४२ 🎉\u2028é \\boxed{½} Ответ: 3"
    elif kind == "missing_embedding":
        emb = None
    return Candidate(text=text, token_ids=ids, index=i, finish_reason=finish,
                     scores=scores if (job.score_keys or job.embed) else {},
                     embeddings=emb if job.embed else None)


class AdversarialEngine(FakeEngine):
    """Returns ``job.sampling.n`` candidates of the kinds in ``self.kinds`` (cycled)."""

    kinds: tuple[str, ...] = ("normal",)

    async def sample(self, job):
        self.jobs.append(job)
        return [candidate(self.kinds[i % len(self.kinds)], i, job) for i in range(job.sampling.n)]


SETTINGS = ServeSettings(model=MODEL, sampling=SamplingConfig(n=3, max_new_tokens=16), max_n=6)


@pytest.fixture(scope="module")
def served(tiny_tokenizer):
    engine = AdversarialEngine(tiny_tokenizer, context=512)
    engine.state = "ready"
    with TestClient(create_app(engine, SETTINGS), raise_server_exceptions=False) as client:
        yield client, engine


# --------------------------------------------------------------------------- checks


def strict(text: str):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def check_reply(response, body) -> int:
    """The properties of one reply; returns its status."""
    status = response.status_code
    assert status < 500, (status, response.text[:500], body)
    if status == 200 and response.headers.get("content-type", "").startswith("text/event-stream"):
        lines = [line for line in response.text.split("\n") if line]
        assert lines[-1] == "data: [DONE]", lines[-1:]
        events = [strict(line.removeprefix("data: ")) for line in lines[:-1]]
        assert events and events[-1]["bon_sr"]["selected_index"] in range(events[-1]["bon_sr"]["n"])
        return status
    payload = strict(response.text)
    if status >= 400:
        err = payload["error"]
        assert isinstance(err.get("param"), str) and err["param"], (status, err, body)
        assert err["code"] == status and isinstance(err["message"], str)
    else:
        info = payload["bon_sr"]
        assert len(payload["choices"]) == len(info["choice_indices"]) >= 1
        assert len(set(info["choice_indices"])) == len(info["choice_indices"])
        for scores in info["scores"]:
            assert all(v is None or math.isfinite(v) for v in scores.values())
    return status


# --------------------------------------------------------------------------- strategies

junk = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                 st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8),
                 st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                          max_size=2))
words = st.text(st.characters(codec="utf-8"), min_size=1, max_size=40).filter(str.strip)
text = st.one_of(*[words] * 8, st.just(""), st.just("  "))
role = st.sampled_from(["user"] * 6 + ["system", "assistant", "robot", ""])
content = st.one_of(text, text, st.none(), st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}),
                                                    max_size=3))
message = st.fixed_dictionaries({"role": role, "content": content})
messages = st.one_of(st.lists(message, min_size=1, max_size=3), st.just([]))
prompt = st.one_of(text, st.lists(st.integers(-2, 200), max_size=5), st.lists(text, min_size=1, max_size=2))

#: each field's in-range (or nearly) values; ``requests`` corrupts a few with junk
BON_FIELDS = {
    "n": st.integers(1, 6),
    "selector": st.one_of(st.sampled_from(sorted(SELECTORS)), st.just("nope")),
    "utility": st.sampled_from(["lexical", "hidden-last", "hidden-mean-centred", "bleu"]),
    "answer": st.sampled_from(["numeric", "math", "choice", "exact", "roman"]),
    "answer_regex": st.sampled_from([r"answer is (\d+)", r"\d+", "(", "[a-", r"(?P<x>\w+)"]),
    "token_set": st.sampled_from(["response", "full", "response+eot"]),
    "return_candidates": st.booleans(),
    "id": st.one_of(text, st.integers(-(2**70), 2**70)),
}
FIELDS = {
    "max_tokens": st.integers(1, 64),
    "max_completion_tokens": st.integers(1, 64),
    "temperature": st.floats(0.05, 2),
    "top_p": st.floats(0.05, 1),
    "n": st.integers(1, 3),
    "stop": st.one_of(text, st.lists(text, max_size=3)),
    "seed": st.integers(0, 2**62 - 1),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "user": text,
    **{k: st.sampled_from([None, None, None, False, 0, 1, "x", [1], {"a": 1}]) for k in sorted(UNSUPPORTED)},
    "unknown_field": junk,
}


@st.composite
def requests(draw):
    """A chat or completions body: fields drawn from their (nearly) valid values, then up to
    two of them (a top-level field, a bon_sr option, or the whole bon_sr object) replaced by
    a value of any JSON type."""
    chat = draw(st.booleans())
    body: dict = {"model": draw(st.sampled_from([MODEL] * 12 + ["gpt-4"]))}
    body["messages" if chat else "prompt"] = draw(messages if chat else prompt)
    for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=4, unique=True)):
        if name != "max_completion_tokens" or chat:
            body[name] = draw(FIELDS[name])
    bon = {name: draw(BON_FIELDS[name])
           for name in draw(st.lists(st.sampled_from(sorted(BON_FIELDS)), max_size=4, unique=True))}
    if bon or draw(st.booleans()):
        body["bon_sr"] = bon
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2]))):
        where = draw(st.sampled_from(["top", "bon_sr", "bon_sr_object", "model", "body_field"]))
        if where == "top":
            body[draw(st.sampled_from(sorted(FIELDS)))] = draw(junk)
        elif where == "bon_sr" and isinstance(body.get("bon_sr"), dict):
            body["bon_sr"][draw(st.sampled_from([*sorted(BON_FIELDS), "nn"]))] = draw(junk)
        elif where == "bon_sr_object":
            body["bon_sr"] = draw(junk)
        elif where == "model":
            body["model"] = draw(junk)
        else:
            body["messages" if chat else "prompt"] = draw(junk)
    return ("/v1/chat/completions" if chat else "/v1/completions"), body


kinds = st.lists(st.sampled_from(KINDS), min_size=1, max_size=6).map(tuple)


# --------------------------------------------------------------------------- properties


def test_fuzz_request_models(served):
    """Any request body (fields valid, out of range, mistyped, unknown): no 500, valid JSON,
    every 4xx names its field."""
    client, engine = served
    CASES["requests"] = 0
    seen: dict[int, int] = {}

    @FUZZ
    @given(req=requests(), cands=kinds)
    def check(req, cands):
        route, body = req
        engine.kinds = cands
        status = check_reply(client.post(route, json=body), body)
        seen[status] = seen.get(status, 0) + 1
        CASES["requests"] += 1

    check()
    print(f"\nfuzz: {CASES['requests']} request bodies, statuses {dict(sorted(seen.items()))}")
    assert seen.get(200, 0) > 0 and seen.get(400, 0) > 0  # both sides of the models were reached


valid_bon = st.fixed_dictionaries({
    "n": st.integers(1, 6),
    "selector": st.sampled_from(sorted(SELECTORS)),
}, optional={
    "utility": st.sampled_from(["lexical", "hidden-last", "hidden-mean", "hidden-last-centred",
                                "hidden-mean-centred"]),
    "return_candidates": st.booleans(),
})


@st.composite
def valid_requests(draw):
    bon = draw(valid_bon)
    if SELECTORS[bon["selector"]].needs_answers or draw(st.booleans()):
        if draw(st.booleans()):
            bon["answer"] = draw(st.sampled_from(["numeric", "math", "choice", "exact"]))
        else:
            bon["answer_regex"] = draw(st.sampled_from([r"answer is (\d+)", r"\\boxed\{(.*?)\}", r"\S+$"]))
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Give an answer."}], "bon_sr": bon,
            "n": draw(st.integers(1, bon["n"])), "max_tokens": 16}
    if draw(st.booleans()):
        body["stream"] = True
        body["stream_options"] = {"include_usage": draw(st.booleans())}
    return body


def test_fuzz_adversarial_candidates(served):
    """Valid requests over every selector / utility / answer format, and candidate sets a
    model can return: always a 200 with valid JSON (streamed events too)."""
    client, engine = served
    CASES["candidates"] = 0

    @FUZZ
    @given(body=valid_requests(), cands=kinds)
    def check(body, cands):
        engine.kinds = cands
        status = check_reply(client.post("/v1/chat/completions", json=body), body)
        assert status == 200, (status, body, cands)
        CASES["candidates"] += 1

    check()
    print(f"\nfuzz: {CASES['candidates']} adversarial candidate sets")
