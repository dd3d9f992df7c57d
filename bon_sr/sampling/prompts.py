"""Prompt files and chat formatting.

Reads .jsonl / .txt prompt files into validated records (errors name file:line and the
fix) and turns a prompt into the token ids the model sees. Knows nothing about models
beyond their tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import InputError
from ..jsonl import iter_json_lines, read_text_file, text_lines
from ..types import PromptInput

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class PromptRecord:
    """One input line. ``candidates``: the caller's own responses to score (``bon-sr score``),
    each a string or ``{"text": ..., "token_ids": [...]}``; None when the line has none."""

    id: str
    prompt: PromptInput
    line: int
    candidates: tuple[Any, ...] | None = None
    #: tests the caller gives for code answers (``--answer python``): assert lines or doctest
    #: text; they replace the examples the prompt shows
    tests: tuple[str, ...] | None = None


def _validate_tests(value: Any, where: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(t, str) and t.strip() for t in value):
        raise InputError(f"{where}: 'tests' must be a non-empty string or list of strings (assert lines or doctest "
                         "text), read by --answer python.")
    return tuple(value)


def _validate_candidates(value: Any, where: str) -> tuple[Any, ...]:
    if not isinstance(value, list) or not value:
        raise InputError(f"{where}: 'candidates' must be a non-empty list of responses (strings or objects "
                         "with 'text').")
    for j, c in enumerate(value):
        if isinstance(c, str):
            continue
        if not isinstance(c, dict) or not isinstance(c.get("text"), str):
            raise InputError(f"{where}: candidate {j} must be a string or an object with a string 'text'.")
        ids = c.get("token_ids")
        if ids is not None and (not isinstance(ids, list)
                                or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)):
            raise InputError(f"{where}: candidate {j} 'token_ids' must be a list of non-negative integers.")
    return tuple(value)


def validate_prompt(prompt: Any, where: str = "prompt") -> PromptInput:
    """Check a prompt (text or chat messages); return it unchanged or raise InputError."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise InputError(f"{where}: the prompt is empty. Give a non-empty prompt or remove the entry.")
        return prompt
    if isinstance(prompt, (list, tuple)):
        if not prompt:
            raise InputError(f"{where}: 'messages' is an empty list. Give at least one user message.")
        for j, msg in enumerate(prompt):
            if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
                raise InputError(f"{where}: message {j} must be an object with 'role' and 'content'.")
            if msg["role"] not in ROLES:
                raise InputError(f"{where}: message {j} has unknown role {msg['role']!r}; use one of {', '.join(ROLES)}.")
            if not isinstance(msg["content"], str):
                raise InputError(f"{where}: message {j} content must be a string.")
        if not any(str(m["content"]).strip() for m in prompt):
            raise InputError(f"{where}: every message is empty. Give a non-empty prompt.")
        if prompt[-1]["role"] == "assistant":
            raise InputError(f"{where}: the last message is from the assistant; end with a user message "
                             "so the model has something to answer.")
        return [dict(m) for m in prompt]
    raise InputError(f"{where}: a prompt must be a string or a list of chat messages, got {type(prompt).__name__}.")


def read_prompt_file(path: str | Path, *, candidates: str = "forbid") -> list[PromptRecord]:
    """Read prompts from ``.jsonl`` (``{"id", "prompt"}`` or ``{"id", "messages"}`` per line)
    or any other extension as text (one prompt per non-blank line, id = line number).

    candidates: ``forbid`` (a line with ``candidates`` is an error that points to
    ``bon-sr score``) or ``require`` (every line must bring its ``candidates``)."""
    path = Path(path)
    text = read_text_file(path, what="Prompt file")
    records: list[PromptRecord] = []
    seen: dict[str, int] = {}
    is_jsonl = path.suffix.lower() in (".jsonl", ".json", ".ndjson")
    if is_jsonl:
        entries: Iterable[tuple[int, str, Any]] = iter_json_lines(path, text=text)
    else:
        entries = ((n, f"{path}:{n}", raw) for n, raw in enumerate(text_lines(text), start=1) if raw.strip())
    for lineno, where, obj in entries:
        if is_jsonl:
            if "prompt" in obj and "messages" in obj:
                raise InputError(f"{where}: give either 'prompt' or 'messages', not both.")
            if "prompt" in obj:
                prompt = validate_prompt(obj["prompt"], where)
            elif "messages" in obj:
                if not isinstance(obj["messages"], list):
                    raise InputError(f"{where}: 'messages' must be a list of chat messages.")
                prompt = validate_prompt(obj["messages"], where)
            else:
                raise InputError(f"{where}: missing 'prompt' (text) or 'messages' (chat) field.")
            rid = obj.get("id", lineno)
            if not isinstance(rid, (str, int)) or isinstance(rid, bool):
                raise InputError(f"{where}: 'id' must be a string or an integer.")
            rid = str(rid)
            given = obj.get("candidates")
            if given is not None and candidates == "forbid":
                raise InputError(f"{where}: this line brings 'candidates'; to score and select given responses "
                                 "use `bon-sr score`, which samples nothing.")
            if candidates == "require":
                if given is None:
                    raise InputError(f"{where}: missing 'candidates' (the responses to score); to sample "
                                     "responses use `bon-sr generate`.")
                given = _validate_candidates(given, where)
            tests = _validate_tests(obj.get("tests"), where)
        else:
            if candidates == "require":
                raise InputError(f"{path}: `bon-sr score` reads .jsonl lines with 'prompt' (or 'messages') and "
                                 "'candidates'.")
            prompt = validate_prompt(obj, where)
            rid = str(lineno)
            given = tests = None
        if rid in seen:
            raise InputError(f"{where}: duplicate id {rid!r} (first used on line {seen[rid]}). Ids must be unique "
                             "so that --resume can tell finished prompts apart.")
        seen[rid] = lineno
        records.append(PromptRecord(id=rid, prompt=prompt, line=lineno, candidates=given, tests=tests))
    if not records:
        raise InputError(f"{path}: no prompts found.")
    return records


def to_messages(prompt: PromptInput) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def encode_prompt(tokenizer: Any, prompt: PromptInput) -> list[int]:
    """Token ids of the prompt as the model sees it: the chat template with the generation
    prompt when the tokenizer has one, else the raw text."""
    prompt = validate_prompt(prompt)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(to_messages(prompt), tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not isinstance(prompt, str):
        raise InputError("This model's tokenizer has no chat template; pass plain-text prompts, not messages.")
    return list(tokenizer(prompt)["input_ids"])


def encode_response(tokenizer: Any, text: str) -> list[int]:
    """Token ids for a caller-supplied response text (no special tokens added)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def derive_seed(seed: int, key: str | int) -> int:
    """A per-prompt seed from the run seed and the prompt id, stable across runs and
    processes, so a resumed run samples exactly what the uninterrupted run would have."""
    import hashlib

    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def check_fits(prompt_ids: Sequence[int], max_new_tokens: int, context: int | None, where: str = "prompt") -> None:
    if context is not None and len(prompt_ids) + max_new_tokens > context:
        raise InputError(
            f"{where}: the prompt is {len(prompt_ids)} tokens and {max_new_tokens} new tokens are asked for, "
            f"but the model's context is {context} tokens. Shorten the prompt or lower --max-new-tokens."
        )
