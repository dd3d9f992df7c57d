"""One request's Best-of-N: OpenAI request -> ``Job`` -> candidates -> decision -> OpenAI reply.

``plan`` checks and resolves a request against the server's settings with the functions
``BestOfN`` uses (``get_selector``, ``get_extractor``, ``score_keys``/``check_scores``,
``validate_prompt``/``encode_prompt``/``check_fits``, ``derive_seed``), so a bad field
fails here with a 400 naming it, before anything is sampled. ``complete`` plans in a worker
thread, samples through the engine, decides with ``bon_sr.selection.decide.ranked`` (once
per request) and renders in a worker thread again the ChatCompletion /
Completion (or its SSE chunks) with the ``bon_sr`` object that explains the choice.

Choices (OpenAI ``n``): the top ``n`` candidates in the selector's order, defined by
selecting repeatedly: choice 0 is the selector's pick among all N candidates, choice 1 its
pick among the other N-1, and so on (for ``stable-rank``: descending stable rank; for
``majority``: the pick, then the majority answer among the rest, whose ties go to the
earlier candidate). Any selector, a user's too, has such an order.

Seeds: a request's ``seed`` is its sampling seed (``BestOfN.select(prompt, seed=S)``);
without one the seed derives from the server's run seed and ``bon_sr.id`` (as
``bon-sr generate`` derives it from a prompt id), or else from the request id.

Prompts: chat messages go through the model's chat template (``encode_prompt``, as
``BestOfN``); a /v1/completions ``prompt`` is raw text (OpenAI's meaning) or token ids.

This module knows nothing about HTTP or how the engine batches.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, replace
from typing import Any, Sequence

from ..selection.answers import AnswerExtractor
from ..errors import BonSRError, OptionError, spell
from ..jsonl import dumps_json, finite_or_none
from ..scoring.hidden_states import HiddenStateConfig
from ..sampling.prompts import encode_prompt, validate_prompt
from ..sampling import SamplingConfig
from ..selection.consensus import Utility
from ..scoring.scorers import STAT_KEYS
from ..selection.decide import Decision, ranked
from ..selection.execution import PromptContext
from ..selection.selectors import SelectorSpec
from ..types import Candidate
from ..options import RunPlan, resolve
from .errors import ApiError, bad_field
from .protocol import (AssistantMessage, BonSROptions, ChatChoice, ChatChunkChoice, ChatCompletion,
                       ChatCompletionChunk, ChatCompletionRequest, Completion, CompletionChoice, CompletionRequest,
                       Delta, Usage, new_id)
from .settings import SCORER, ServeSettings

MAX_SEED = 2**62


@dataclass(frozen=True)
class Job:
    """Everything one request's Best-of-N needs, resolved and checked."""

    request_id: str
    kind: str  # "chat" | "completion"
    prompt_ids: tuple[int, ...]
    sampling: SamplingConfig
    seed: int
    selector: SelectorSpec
    answers: AnswerExtractor | None
    scoring: HiddenStateConfig
    score_keys: frozenset[str]
    choices: int
    return_candidates: bool
    stream: bool
    include_usage: bool
    utility: Utility | None = None  # the consensus selectors' similarity
    context: PromptContext | None = None  # the prompt's text and explicit tests (answer: python)
    include_greedy: bool = False  # one greedy decode joins the candidates, last (RunPlan.include_greedy)

    @property
    def logit_stats(self) -> bool:
        return bool(self.score_keys & set(STAT_KEYS))

    @property
    def embed(self) -> bool:
        """Whether the hook also returns each candidate's embeddings (a hidden utility)."""
        return bool(self.selector.needs_similarity and self.utility is not None and self.utility.needs_embeddings)


@dataclass(frozen=True)
class Reply:
    """The rendered answer: ``body`` (the whole object), or ``chunks`` when streamed."""

    body: ChatCompletion | Completion
    chunks: list[str] | None = None


def _resolve_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(...)`` with an option error answered as a 400 naming the request's field."""
    try:
        return fn(*args, **kwargs)
    except OptionError as exc:
        raise bad_field(spell(exc.option, "server"), exc.render("server")) from None


def _resolve(**options: Any) -> RunPlan:
    return _resolve_call(resolve, **options)


def _check(param: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except BonSRError as exc:
        raise bad_field(param, exc) from None


def require_ready(engine: Any) -> None:
    if engine.state == "ready":
        return
    if engine.state == "failed":
        raise ApiError(503, f"The model failed to load: {engine.error}")
    raise ApiError(503, "The model is still loading; retry when GET /health answers 200.")


def plan(request: ChatCompletionRequest | CompletionRequest, settings: ServeSettings, engine: Any) -> Job:
    """Resolve ``request`` against the server's defaults; ApiError (400/404/503) if it cannot run."""
    require_ready(engine)
    for field, why in request.unsupported():
        raise ApiError(400, f"'{field}' is not supported by bon-sr serve: {why}.", param=field)
    if request.model != settings.name:
        raise ApiError(404, f"The model '{request.model}' does not exist; this server serves '{settings.name}' "
                            "(GET /v1/models).", param="model")
    kind = "chat" if isinstance(request, ChatCompletionRequest) else "completion"
    bon = request.bon_sr or BonSROptions()
    n = settings.sampling.n if bon.n is None else bon.n
    if not 1 <= n <= settings.max_n:
        raise ApiError(400, f"bon_sr.n must be between 1 and this server's cap {settings.max_n} (--max-n), got {n}.",
                       param="bon_sr.n")
    choices = 1 if request.n is None else request.n
    if not 1 <= choices <= n:
        raise ApiError(400, f"n (choices returned) must be between 1 and the number of candidates bon_sr.n={n}, "
                            f"got {choices}.", param="n")
    # what a request may override: selector, answer format (with its regex), utility,
    # token set, the sampling fields; the scorer is the server's (the hook)
    answer, answer_regex = ((bon.answer, bon.answer_regex) if bon.answer is not None or bon.answer_regex is not None
                            else (settings.answer, settings.answer_regex))
    run = _resolve(selector=bon.selector or settings.selector, answer=answer, answer_regex=answer_regex,
                   utility=bon.utility or settings.utility, backend="vllm", scorer=SCORER,
                   sampling=_sampling(request, settings, n),
                   scoring=_check("bon_sr.token_set", replace, settings.scoring,
                                  token_set=bon.token_set or settings.scoring.token_set))
    if run.answers is not None and run.answers.runs_code and not settings.allow_code_execution:
        raise ApiError(400, f"Answer format '{run.answers.name}' runs model-written code, which this server does not "
                            "do: its operator can start it with --allow-code-execution (the code then runs in "
                            "bon-sr's sandbox).", param="bon_sr.answer")
    request_id = new_id("chatcmpl" if kind == "chat" else "cmpl")
    prompt_ids, where, text = _encode(request, engine.tokenizer)
    _check(where, run.check_fits, prompt_ids, engine.context, where)
    seed = _resolve_call(run.seed_for, str(bon.id if bon.id is not None else request_id), request.seed)
    # candidates the hook returned no embedding for rank last (never a 400 about a scorer the
    # client cannot choose)
    utility = replace(run.utility, missing_ok=True) if run.utility.needs_embeddings else run.utility
    stream = bool(request.stream)
    return Job(request_id=request_id, kind=kind, prompt_ids=tuple(prompt_ids), sampling=run.sampling, seed=seed,
               selector=run.selector, answers=run.answers, scoring=run.scoring, score_keys=run.score_keys,
               choices=choices, return_candidates=bon.return_candidates, stream=stream, utility=utility,
               context=PromptContext.of(text, bon.tests), include_greedy=run.include_greedy,
               include_usage=stream and request.stream_options is not None and request.stream_options.include_usage)


def _sampling(request: ChatCompletionRequest | CompletionRequest, settings: ServeSettings, n: int) -> dict[str, Any]:
    """The sampling values of a request under the server's policy (its defaults, temperature
    0 as greedy decoding); ``resolve`` checks them."""
    # only a chat request has the field: on /v1/completions a top-level "max_completion_tokens"
    # is an unknown extra, and getattr would hand back its unchecked value (a string: a 500)
    completion_cap = request.max_completion_tokens if isinstance(request, ChatCompletionRequest) else None
    max_tokens = completion_cap or request.max_tokens
    param = "max_completion_tokens" if completion_cap else "max_tokens"
    max_tokens = settings.sampling.max_new_tokens if max_tokens is None else max_tokens
    if max_tokens < 1:
        raise ApiError(400, f"{param} must be >= 1, got {max_tokens}.", param=param)
    temperature = settings.sampling.temperature if request.temperature is None else request.temperature
    if temperature < 0:
        raise ApiError(400, f"temperature must be >= 0, got {temperature}.", param="temperature")
    greedy = temperature == 0
    if greedy and n > 1:
        raise ApiError(400, f"temperature 0 is greedy decoding: all {n} candidates would be the same. Set "
                            "temperature > 0, or bon_sr.n to 1.", param="temperature")
    top_p = settings.sampling.top_p if request.top_p is None else request.top_p
    if not 0 < top_p <= 1:
        raise ApiError(400, f"top_p must be in (0, 1], got {top_p}.", param="top_p")
    stop = request.stop_list()
    if any(not s for s in stop):
        raise ApiError(400, "stop strings must be non-empty.", param="stop")
    return dict(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_tokens, stop=stop, greedy=greedy,
                seed=settings.sampling.seed)


#: plans run in worker threads; a Rust tokenizer used from two threads at once can fail with
#: "Already borrowed", so encoding takes turns (it is short next to sampling)
_TOKENIZER_LOCK = threading.Lock()


def _encode(request: ChatCompletionRequest | CompletionRequest, tokenizer: Any) -> tuple[list[int], str, Any]:
    """The prompt's token ids, the field they came from, and the prompt as text or chat
    messages (None for token ids: only explicit tests reach a code answer then)."""
    with _TOKENIZER_LOCK:
        return _encode_unlocked(request, tokenizer)


def _encode_unlocked(request: ChatCompletionRequest | CompletionRequest, tokenizer: Any) -> tuple[list[int], str, Any]:
    if isinstance(request, ChatCompletionRequest):
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        prompt = _check("messages", validate_prompt, messages, "messages")
        return _check("messages", encode_prompt, tokenizer, prompt), "messages", prompt
    prompt = request.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise ApiError(400, f"One prompt per request (got {len(prompt)}); send one request per prompt.",
                           param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        _check("prompt", validate_prompt, prompt, "prompt")
        return list(tokenizer(prompt)["input_ids"]), "prompt", prompt
    vocab = len(tokenizer)
    if not prompt or any(not 0 <= t < vocab for t in prompt):
        raise ApiError(400, f"prompt token ids must be a non-empty list of ids in [0, {vocab}).", param="prompt")
    return list(prompt), "prompt", None


# --------------------------------------------------------------------------- selection


def rank(candidates: Sequence[Candidate], job: Job) -> tuple[Decision, list[int]]:
    """The decision over all candidates and the first ``job.choices`` in the selector's
    order (one decision, whatever ``job.choices``: ``ranked``). An answer regex that runs past
    its time limit is a 400 naming ``bon_sr.answer_regex``."""
    return _resolve_call(ranked, candidates, job.selector, job.answers, seed=job.seed, k=job.choices,
                         utility=job.utility, context=job.context)


def select_and_render(candidates: Sequence[Candidate], job: Job, settings: ServeSettings) -> Reply:
    decision, order = rank(candidates, job)
    return render(job, settings, decision, order)


async def complete(request: ChatCompletionRequest | CompletionRequest, settings: ServeSettings,
                   engine: Any) -> Reply:
    """One request's Best-of-N. What the client sent is worked on in worker threads, never
    on the event loop: the plan (tokenising the prompt, compiling its answer regex) and the
    selection (answer extraction, math-verify, the MBR matrix, the rendering), so a slow
    request holds a thread, not every other request and ``/health``. The regex and
    math-verify are time-bounded there (``selection.answers``: REGEX_TIMEOUT, MATH_TIMEOUT)."""
    job = await asyncio.to_thread(plan, request, settings, engine)
    candidates = await engine.sample(job)
    return await asyncio.to_thread(select_and_render, candidates, job, settings)


# --------------------------------------------------------------------------- rendering


def explain(job: Job, decision: Decision, order: list[int]) -> dict[str, Any]:
    """The response's ``bon_sr`` object."""
    cands = decision.candidates
    by_index = {c.index: c for c in cands}
    info: dict[str, Any] = {
        "n": len(cands),
        "selected_index": order[0],
        "choice_indices": order,
        "selector": job.selector.name,
        "rule": decision.pick.rule,
        "utility": job.utility.name if job.selector.needs_similarity and job.utility else None,
        "scorer": SCORER if job.score_keys or job.embed else None,
        "seed": job.seed,
        "scores": [dict(c.scores) for c in cands],
        "num_tokens": [c.num_tokens for c in cands],
        "finish_reasons": [c.finish_reason for c in cands],
    }
    if decision.votes is not None:
        info.update(answer=by_index[order[0]].answer, answers=[c.answer for c in cands],
                    vote_shares=[c.vote_share for c in cands], votes=dict(decision.votes))
    undefined = [c.undefined_scores() for c in cands]
    if any(undefined):  # why a score is null, per candidate ({} where all are numbers)
        info["undefined_scores"] = undefined
    if job.return_candidates:
        info["candidates"] = [c.to_dict(include_token_ids=False) for c in cands]
    return finite_or_none(info)  # JSON has no NaN: an undefined score is null


def render(job: Job, settings: ServeSettings, decision: Decision, order: list[int]) -> Reply:
    by_index = {c.index: c for c in decision.candidates}
    picked = [by_index[i] for i in order]
    # vLLM's server counts len(output.token_ids): the EOS / stop token that ended a candidate
    # too, which Candidate.token_ids (the scored response) leave out
    completion_tokens = sum(c.generated_tokens for c in decision.candidates)
    usage = Usage(prompt_tokens=len(job.prompt_ids), completion_tokens=completion_tokens,
                  total_tokens=len(job.prompt_ids) + completion_tokens)
    info = explain(job, decision, order)
    common = dict(id=job.request_id, model=settings.name)
    body: ChatCompletion | Completion
    if job.kind == "chat":
        body = ChatCompletion(**common, usage=usage, bon_sr=info, choices=[
            ChatChoice(index=k, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason)
            for k, c in enumerate(picked)])
    else:
        body = Completion(**common, usage=usage, bon_sr=info, choices=[
            CompletionChoice(index=k, text=c.text, finish_reason=c.finish_reason) for k, c in enumerate(picked)])
    if not job.stream:
        return Reply(body)
    return Reply(body, _chunks(job, body, picked, usage, info))


def _chunks(job: Job, body: Any, picked: list[Candidate], usage: Usage, info: dict[str, Any]) -> list[str]:
    """SSE events of an already finished Best-of-N: per choice its text, then its finish
    reason; the ``bon_sr`` object rides on the last event (the usage event when asked)."""
    common = dict(id=body.id, created=body.created, model=body.model)
    events: list[Any] = []
    for k, c in enumerate(picked):
        if job.kind == "chat":
            events.append(ChatCompletionChunk(**common, choices=[
                ChatChunkChoice(index=k, delta=Delta(role="assistant", content=""))]))
            events.append(ChatCompletionChunk(**common, choices=[
                ChatChunkChoice(index=k, delta=Delta(content=c.text))]))
            events.append(ChatCompletionChunk(**common, choices=[
                ChatChunkChoice(index=k, delta=Delta(), finish_reason=c.finish_reason)]))
        else:
            events.append(Completion(**common, choices=[CompletionChoice(index=k, text=c.text,
                                                                              finish_reason=None)]))
            events.append(Completion(**common, choices=[CompletionChoice(index=k, text="",
                                                                              finish_reason=c.finish_reason)]))
    if job.include_usage:
        cls = ChatCompletionChunk if job.kind == "chat" else Completion
        events.append(cls(**common, choices=[], usage=usage))
    events[-1] = events[-1].model_copy(update={"bon_sr": info})
    return [f"data: {dumps_json(e.model_dump())}\n\n" for e in events] + ["data: [DONE]\n\n"]
