"""Request and response bodies of the OpenAI-compatible server, with OpenAI's field names.

Requests allow unknown top-level fields (the ``openai`` client sends ``extra_body`` keys
at the top level; vLLM's server does the same), but bon-sr's own ``bon_sr`` object
forbids unknown keys, so a typo there is a 400, not a silently ignored option. Numbers are
strict: ``"8"`` or ``true`` for an integer is a 400, as in OpenAI's API. OpenAI fields that
bon-sr cannot honour (``logprobs``, ``tools``, ...) are listed in ``UNSUPPORTED`` and
refused when set.

This module knows nothing about engines, sampling or selection: it only names the shapes.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr


def _number(value: Any) -> Any:
    # bools are ints to Python; a JSON true is not a temperature
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("Input should be a number")
    return float(value)


Number = Annotated[float, BeforeValidator(_number)]


def _range(name: str, lo: float, hi: float, *, open_lo: bool = False) -> BeforeValidator:
    """The range vLLM's ``SamplingParams`` checks, checked here so it is a 400 naming the
    field, not vLLM's error after the request was accepted (inf and nan are outside)."""
    shown = f"{'(' if open_lo else '['}{lo:g}, {hi:g}]"

    def check(value: Any) -> float:
        x = _number(value)
        if not ((lo < x) if open_lo else (lo <= x)) or not x <= hi:
            raise ValueError(f"{name} must be in {shown}, got {x:g}")
        return x

    return BeforeValidator(check)

#: OpenAI request fields bon-sr cannot honour -> (what instead, the values that mean "not
#: used"); a request that sets one to anything else is refused.
_OFF = (None, False, [], {})
UNSUPPORTED: dict[str, tuple[str, tuple[Any, ...]]] = {
    "logprobs": ("token log-probs are not returned; the candidates' scores are in the response's 'bon_sr' "
                 "object", _OFF),
    "top_logprobs": ("token log-probs are not returned", (*_OFF, 0)),
    "tools": ("tool calls are not supported", _OFF),
    "tool_choice": ("tool calls are not supported", (*_OFF, "none", "auto")),
    "functions": ("function calls are not supported", _OFF),
    "response_format": ("structured output is not supported", (*_OFF, {"type": "text"})),
    "logit_bias": ("logit bias is not supported", _OFF),
    "presence_penalty": ("penalties are not supported", (None, 0, 0.0)),
    "frequency_penalty": ("penalties are not supported", (None, 0, 0.0)),
    "best_of": ("the number of candidates is extra_body={'bon_sr': {'n': N}}", (*_OFF, 1)),
    "echo": ("echo is not supported", _OFF),
    "suffix": ("suffix is not supported", (*_OFF, "")),
}


class BonSROptions(BaseModel):
    """bon-sr's own per-request options (``extra_body={"bon_sr": {...}}``); None: the
    server's default. ``id``: the seed then derives from the server's run seed and this id,
    as ``bon-sr generate`` derives a prompt's seed from its id (a request ``seed`` wins)."""

    model_config = ConfigDict(extra="forbid")

    n: StrictInt | None = None
    selector: StrictStr | None = None
    utility: StrictStr | None = None
    answer: StrictStr | None = None
    answer_regex: StrictStr | None = None
    token_set: StrictStr | None = None
    #: tests for ``answer: python`` (assert lines or doctest text), instead of the prompt's examples
    tests: StrictStr | list[StrictStr] | None = None
    return_candidates: StrictBool = False
    id: StrictStr | StrictInt | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: StrictStr
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: StrictBool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr
    max_tokens: StrictInt | None = None
    temperature: Annotated[float, _range("temperature", 0, 2)] | None = None
    top_p: Annotated[float, _range("top_p", 0, 1, open_lo=True)] | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    n: StrictInt | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    bon_sr: BonSROptions | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        """(field, why) for each set OpenAI field bon-sr cannot honour."""
        extra = self.model_extra or {}
        return [(k, why) for k, (why, off) in UNSUPPORTED.items() if k in extra and not _neutral(extra[k], off)]

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


def _neutral(value: Any, off: tuple[Any, ...]) -> bool:
    # type-checked: True == 1 in Python, but best_of=true is no neutral value
    return any(value == v and type(value) is type(v) for v in off)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage]
    max_completion_tokens: StrictInt | None = None


class CompletionRequest(_Request):
    prompt: StrictStr | list[StrictInt] | list[StrictStr]


# --------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class _Response(BaseModel):
    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str


class ChatCompletion(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage | None = None
    bon_sr: dict[str, Any] | None = None


class Completion(_Response):
    """Also each streamed event of /v1/completions (OpenAI streams Completion objects)."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None
    bon_sr: dict[str, Any] | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    bon_sr: dict[str, Any] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "bon-sr"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo


AnyRequest = Union[ChatCompletionRequest, CompletionRequest]
