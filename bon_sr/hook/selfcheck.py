"""The hook's start-up self-check: one short fixed job through a freshly hooked engine,
its rows checked against the tokens sampled, so that a vLLM release whose runner changed
its step layout (and still passes the static probe) fails at start, naming its version,
instead of giving wrong scores.

The job: two prompts of different lengths, two greedy candidates each, exactly
``RESPONSE_TOKENS`` tokens per candidate (EOS ignored), token set ``full`` with
``response`` too and the logit statistics; then the same (prompt, response) pairs scored
teacher-forced (score mode). What must hold, per candidate:

- rows: ``scored_tokens`` is prompt + response length in both passes (a dropped or
  misplaced position is missing or extra), and 1 <= SR <= rows;
- positions: the mean log-probability of the sampled tokens that the SAMPLE pass took from
  vLLM's own logits equals the one the SCORE pass computes from the hook's rows
  (``model.compute_logits`` on the row it took for each position): a row taken from the
  wrong place of the step predicts another token;
- the rows themselves: SR and ||H||_F^2 agree between the two passes (decode steps vs one
  prefill), and between the two identical candidates of a prompt (other batch slots).

Runs on the DRIVER, through the same plan and drivers as every scored job
(``plan.ScoredSampling``, ``plan.score_steps``; ``sync.drive`` or ``aio.drive_async``).
Knows nothing of vLLM's internals; vLLM itself is imported inside functions.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Sequence

from ..errors import BonSRError
from ..scoring.hidden_states import HiddenStateConfig
from ..types import Candidate
from .aio import Collector, drive_async
from .plan import Group, ScoredSampling, Steps, score_steps
from .protocol import HookError, engine_context, new_tag
from .sync import drive

logger = logging.getLogger(__name__)

#: fixed prompts of different lengths (so a request's rows do not start at row 0 of a step)
PROMPTS = ("The capital of France is",
           "Count from one to ten in words: one, two, three,")
RESPONSE_TOKENS = 6
CANDIDATES = 2
SCORING = HiddenStateConfig(token_set="full")
#: sample pass vs score pass (decode rows vs prefill rows) and candidate vs candidate:
#: relative for SR and ||H||_F^2, absolute (nats) for the mean log-probability. A shifted
#: row changes the mean log-probability by nats and SR by tens of percent; bf16 numerics
#: stay near 1e-2 (measured on SmolLM2-135M, see docs/vllm-versions.md).
REL_TOL = 0.05
LOGPROB_TOL = 0.25


class HookSelfCheckError(BonSRError):
    """The hook's rows did not match what the engine sampled: this vLLM's runner layout is
    not the one the hook reads. The message names the vLLM version and each mismatch."""


def _vllm_version() -> str:
    import vllm

    return str(vllm.__version__)


def _prompt_ids(tokenizer: Any) -> list[tuple[int, ...]]:
    """The prompts' token ids; without a tokenizer, fixed ids of the same two lengths."""
    if tokenizer is None:
        return [tuple(range(100, 105)), tuple(range(100, 112))]
    return [tuple(int(t) for t in tokenizer.encode(text, add_special_tokens=False)) for text in PROMPTS]


def _params() -> Any:
    from vllm import SamplingParams

    return SamplingParams(n=1, temperature=0.0, max_tokens=RESPONSE_TOKENS, min_tokens=RESPONSE_TOKENS,
                          ignore_eos=True, skip_special_tokens=True)


def verify(prompts: Sequence[Sequence[int]], cands: Sequence[Candidate], scored: Sequence[dict[str, float]],
           version: str) -> dict[str, Any]:
    """The self-check's report, or HookSelfCheckError naming ``version`` and every mismatch.
    ``prompts[k]``: candidate k's prompt ids; ``cands[k].scores``: its sample pass's scores
    (candidates come in runs of ``CANDIDATES`` with the same prompt); ``scored[k]``: the
    score pass's scores of the same (prompt, response)."""
    problems: list[str] = []
    if not len(prompts) == len(cands) == len(scored) == len(PROMPTS) * CANDIDATES:
        problems.append(f"{len(cands)} candidates sampled and {len(scored)} scored, the job has "
                        f"{len(PROMPTS) * CANDIDATES}")
    worst = {"sr_rel": 0.0, "frobenius_rel": 0.0, "logprob_abs": 0.0}

    def close(what: str, k: int, a: float, b: float, rel: bool) -> None:
        diff = abs(a - b) / max(abs(b), 1e-12) if rel else abs(a - b)
        key = "logprob_abs" if not rel else "sr_rel" if what.startswith("SR") else "frobenius_rel"
        worst[key] = max(worst[key], diff if math.isfinite(diff) else math.inf)
        if not diff <= (REL_TOL if rel else LOGPROB_TOL):
            problems.append(f"candidate {k}: {what} {a:.6g} vs {b:.6g}")

    for k, (p, cand, s2) in enumerate(zip(prompts, cands, scored)):
        s1 = cand.scores
        rows = len(p) + cand.num_tokens
        if cand.num_tokens != RESPONSE_TOKENS:
            problems.append(f"candidate {k}: {cand.num_tokens} tokens sampled, asked for exactly "
                            f"{RESPONSE_TOKENS}")
        for name, s in (("sample", s1), ("score", s2)):
            got, sr = int(s["scored_tokens"]), float(s["stable_rank"])
            if got != rows:
                problems.append(f"candidate {k}: the {name} pass scored {got} rows, the job has {rows} "
                                f"({len(p)} prompt + {cand.num_tokens} sampled tokens)")
            if not 1.0 <= sr <= max(got, 1):
                problems.append(f"candidate {k}: the {name} pass's SR {sr:.6g} is outside [1, {got}]")
        sr_response = s1.get("sr_response", math.nan)  # the response rows alone, from the same kept rows
        if not 1.0 <= sr_response <= cand.num_tokens:
            problems.append(f"candidate {k}: SR of the response rows {sr_response:.6g} is outside "
                            f"[1, {cand.num_tokens}]")
        close("SR (sample vs score pass)", k, s1["stable_rank"], s2["stable_rank"], True)
        close("||H||_F^2 (sample vs score pass)", k, s1["frobenius_sq"], s2["frobenius_sq"], True)
        close("mean log p of the sampled tokens (vLLM's logits vs the hook's rows)", k, s1["mean_logprob"],
              s2["mean_logprob"], False)
        if k % CANDIDATES:  # the same greedy tokens as the previous candidate, in another batch slot
            first = cands[k - 1]
            if first.token_ids != cand.token_ids:
                problems.append(f"candidate {k}: greedy tokens differ from candidate {k - 1}'s")
            close("SR (candidate vs its greedy twin)", k, s1["stable_rank"], first.scores["stable_rank"], True)
    if problems:
        raise HookSelfCheckError(
            f"bon-sr hook self-check failed on vLLM {version}: the rows the hook collected do not match what "
            f"the engine sampled, so this vLLM's model runner does not lay out its steps as the hook reads "
            f"them (bon-sr knows {_known()}). {'; '.join(problems)}. Use scorer='pooling', or a vLLM the "
            "hook knows.")
    return {"vllm": version, "candidates": len(cands), "rows": [len(p) + c.num_tokens for p, c in
                                                                 zip(prompts, cands)], **worst}


class SelfCheck:
    """One self-check job: ``steps()`` for a driver, then ``verify(result, version)``."""

    def __init__(self, tokenizer: Any, context: int | None):
        from ..sampling import SamplingConfig
        from ..sampling.vllm import VLLMSampler

        self.prompts = _prompt_ids(tokenizer)
        params = _params()
        groups = [Group(p, params, CANDIDATES, None) for p in self.prompts]
        self.sampling = ScoredSampling(groups, SCORING, VLLMSampler(None, SamplingConfig()).to_candidate,
                                       logit_stats=True, also=("response",), tokenizer=tokenizer, context=context)
        self.score_tag = new_tag()
        # the longest candidate decodes one token past RESPONSE_TOKENS (plan's extra token); an
        # engine whose context cannot hold that is too small to check (and to be of use)
        self.fits = context is None or max(map(len, self.prompts)) + RESPONSE_TOKENS + 1 < context

    def tags(self) -> list[str]:
        return [*self.sampling.tags(), self.score_tag]

    def steps(self) -> Steps:
        groups = yield from self.sampling.steps()
        cands = [c for g in groups for c in g]
        prompts = [p for p, g in zip(self.prompts, groups) for _ in g]
        scored = yield from score_steps(prompts, [c.token_ids for c in cands], SCORING, logit_stats=True,
                                        tag=self.score_tag)
        return prompts, cands, scored

    def verify(self, result: tuple[list[tuple[int, ...]], list[Any], list[dict[str, float]]],
               version: str) -> dict[str, Any]:
        return verify(*result, version)


def _known() -> str:
    from .protocol import KNOWN_VLLM

    return ", ".join(v + "x" for v in KNOWN_VLLM)


def _failed(exc: HookError, version: str) -> HookSelfCheckError:
    return HookSelfCheckError(f"bon-sr hook self-check failed on vLLM {version}: {exc}. This vLLM's model runner "
                              f"does not lay out its steps as the hook reads them (bon-sr knows {_known()}); use "
                              "scorer='pooling', or a vLLM the hook knows.")


def _finish(check: SelfCheck, result: Any, version: str, started: float) -> dict[str, Any]:
    report = check.verify(result, version)
    report["seconds"] = time.perf_counter() - started
    logger.info("bon-sr hook self-check passed on vLLM %s in %.2f s (%d candidates, worst SR diff %.1e, "
                "log p diff %.1e)", version, report["seconds"], report["candidates"], report["sr_rel"],
                report["logprob_abs"])
    return report


def _skipped(check: SelfCheck, version: str, context: int | None) -> dict[str, Any] | None:
    if check.fits:
        return None
    logger.warning("bon-sr hook self-check skipped: the engine's context (%s tokens) cannot hold its job", context)
    return {"vllm": version, "skipped": f"context {context} too small"}


def run_selfcheck(llm: Any) -> dict[str, Any]:
    """The self-check on a hooked ``vllm.LLM`` (after ``install_hook``); returns its report,
    raises HookSelfCheckError naming the vLLM version."""
    started = time.perf_counter()
    version = _vllm_version()
    get_tokenizer = getattr(llm, "get_tokenizer", None)
    context = engine_context(getattr(llm, "llm_engine", None))
    check = SelfCheck(get_tokenizer() if callable(get_tokenizer) else None, context)
    skipped = _skipped(check, version, context)
    if skipped:
        return skipped
    try:
        result = drive(llm, check.steps(), check.tags())
    except HookError as exc:
        raise _failed(exc, version) from exc
    return _finish(check, result, version, started)


async def run_selfcheck_async(engine: Any) -> dict[str, Any]:
    """``run_selfcheck`` for an ``AsyncLLM`` (after ``install_hook_async``)."""
    started = time.perf_counter()
    version = _vllm_version()
    get_tokenizer = getattr(engine, "get_tokenizer", None)
    check = SelfCheck(get_tokenizer() if callable(get_tokenizer) else None, engine_context(engine))
    skipped = _skipped(check, version, engine_context(engine))
    if skipped:
        return skipped
    try:
        result = await drive_async(engine, check.steps(), check.tags(), collector=Collector(engine))
    except HookError as exc:
        raise _failed(exc, version) from exc
    return _finish(check, result, version, started)


