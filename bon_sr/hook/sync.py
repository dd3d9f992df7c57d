"""The hook's driver for a synchronous ``vllm.LLM``: steps a plan (``plan.py``) through
``llm.generate`` and ``llm.collective_rpc``.

Runs on the DRIVER. Knows nothing of vLLM's internals (``worker.py``) or of the order of
the steps (``plan.py``). A call that ends early (an exception, Ctrl-C) releases its rows in
the worker before it propagates, so an abandoned call leaves nothing behind.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from ..scoring.hidden_states import HiddenStateConfig
from ..types import Candidate
from .budget import batches, default_row_budget, job_bytes
from .plan import Collect, Generate, Group, Sample, ScoredSampling, Steps, score_steps
from .protocol import check_also, check_hook_config, engine_context, require_hook

logger = logging.getLogger(__name__)


def install_hook(llm: Any, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Install (idempotently) the hook in every worker of ``llm``; returns rank 0's report."""
    require_hook(llm)
    return llm.collective_rpc("bon_sr_install_hook", args=(dict(options or {}),))[0]


def hook_stats(llm: Any) -> dict[str, int]:
    """Rank 0's live entries (``candidates``, ``groups``, ``rows``, ``row_bytes``, ...)."""
    return llm.collective_rpc("bon_sr_hook_stats")[0]


def _generate(llm: Any, requests: Sequence[tuple[Any, Any]]) -> list[Any]:
    if not requests:
        return []
    return llm.generate([r[0] for r in requests], [r[1] for r in requests], use_tqdm=False)


def drive(llm: Any, steps: Steps, tags: Sequence[str] = ()) -> Any:
    """Run ``steps`` to the end on ``llm``; on any exception release ``tags``' rows first."""
    try:
        step = next(steps)
        while True:
            if isinstance(step, Sample):
                outputs = _generate(llm, step.requests)
                fills = [f for f in (step.follow(k, o) for k, o in enumerate(outputs)) if f is not None]
                _generate(llm, fills)
                reply: Any = outputs
            elif isinstance(step, Generate):
                _generate(llm, step.requests)
                reply = None
            elif isinstance(step, Collect):
                reply = llm.collective_rpc("bon_sr_collect", args=(step.specs,))[0] if step.specs else []
            else:  # pragma: no cover - a plan yields only the steps above
                raise TypeError(f"unknown plan step {step!r}")
            step = steps.send(reply)
    except StopIteration as stop:
        return stop.value
    except BaseException:
        if tags:
            try:
                llm.collective_rpc("bon_sr_release", args=(list(tags),))
            except Exception as exc:  # the original error matters more
                logger.warning("bon-sr hook: could not release the rows of an abandoned call: %s", exc)
        raise


class HookSampler:
    """Samples with a hooked ``vllm.LLM`` and returns candidates whose ``scores`` already
    hold the stable rank (and, with ``logit_stats``, mean_logprob / self_certainty).
    ``also``: token sets scored too, from the same rows, as ``sr_<token set>`` (e.g.
    ``token_set='full'`` with ``also=('response',)`` gives both of the paper's readings).
    ``embed``: each candidate also carries ``embeddings`` (``{"last", "mean"}``, d floats
    each, from the rows its stable rank reads) for the hidden consensus utilities."""

    def __init__(self, llm: Any, config: Any, scoring: HiddenStateConfig | None = None, *,
                 logit_stats: bool = False, logprobs: bool = False, per_request_seeds: bool = True,
                 also: Sequence[str] = (), embed: bool = False, row_budget: int | None = None):
        from ..sampling.vllm import VLLMSampler

        self.scoring = scoring or HiddenStateConfig()
        check_hook_config(self.scoring)
        self.also = check_also(self.scoring, also)
        require_hook(llm)
        self.llm = llm
        self.config = config
        self.logit_stats = bool(logit_stats)
        self.embed = bool(embed)
        self._base = VLLMSampler(llm, config, logprobs=logprobs, per_request_seeds=per_request_seeds)
        # for the extra decoded token's trim (plan.ScoredSampling); an engine without one fills
        get_tokenizer = getattr(llm, "get_tokenizer", None)
        self.tokenizer = get_tokenizer() if callable(get_tokenizer) else None
        self.context = engine_context(getattr(llm, "llm_engine", None))
        self.row_budget, self.row_bytes = self._budget(llm, row_budget)

    @staticmethod
    def _budget(llm: Any, row_budget: int | None) -> tuple[int | None, int]:
        """(bytes of rows one batch may hold, bytes per row): ``row_budget`` or what vLLM
        leaves free (``budget.default_row_budget``); (None, 0) for an engine without a config."""
        config = getattr(getattr(llm, "llm_engine", None), "vllm_config", None)
        if config is None:
            return row_budget, 0
        memory = install_hook(llm)  # idempotent: the worker's device memory report
        default, row = default_row_budget(config, memory)
        return (default if row_budget is None else int(row_budget)), row

    def _run(self, prompt_ids: Sequence[Sequence[int]], groups: Sequence[tuple[int, int | None, bool]]
             ) -> list[list[Candidate]]:
        """groups: (n, seed, greedy) per prompt. The prompts run in batches whose worst-case
        rows fit the row budget (a prompt larger than it alone), as the server admits its
        requests: one ``generate`` call over every prompt would hold all their rows at once."""
        todo = []
        for ids, (n, seed, greedy) in zip(prompt_ids, groups):
            base = self._base.request_params(1, seed or 0, greedy=greedy)
            todo.append(Group(tuple(int(t) for t in ids), base, n, base.seed))
        sizes = [job_bytes(len(g.prompt_ids), g.n, int(g.params.max_tokens), self.scoring, self.row_bytes)
                 for g in todo]
        out: list[list[Candidate]] = []
        for batch in batches(sizes, self.row_budget if self.row_bytes else None):
            plan = ScoredSampling([todo[k] for k in batch], self.scoring, self._base.to_candidate,
                                  logit_stats=self.logit_stats, also=self.also, embed=self.embed,
                                  tokenizer=self.tokenizer, context=self.context)
            out += drive(self.llm, plan.steps(), plan.tags())
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
        return self._run(prompt_token_ids, response_token_ids, embed=False)

    def score_and_embed(self, prompt_token_ids: Sequence[Sequence[int]], response_token_ids: Sequence[Sequence[int]]
                        ) -> tuple[list[dict[str, float]], list[Any]]:
        """``score``'s dicts and each pair's ``Candidate.embeddings`` from the same prefill
        (``HFScorer.score_and_embed``'s contract)."""
        return self._run(prompt_token_ids, response_token_ids, embed=True)

    def _run(self, prompt_token_ids: Sequence[Sequence[int]], response_token_ids: Sequence[Sequence[int]], *,
             embed: bool) -> Any:
        from .protocol import new_tag

        tag = new_tag()
        steps = score_steps(prompt_token_ids, response_token_ids, self.scoring, logit_stats=self.logit_stats,
                            tag=tag, embed=embed)
        return drive(self.llm, steps, [tag])
