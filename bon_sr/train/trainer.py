"""SR-GRPO on TRL + peft: build the LoRA policy, the GRPO config and the trainer, then train.

Order of work, so that a bad run fails before anything heavy: check the config (dataclass),
check the extras are installed, read the prompts, read the model's config (context length,
layer count), tokenise the prompts and check they fit, and only then load weights.

The policy is the base model with LoRA adapters (``TrainConfig.lora_*``); the reward is
:class:`~bon_sr.train.reward.StableRankReward`, which scores with the adapters disabled, so
the frozen base model is both the reward model and the KL reference (TRL computes the
reference log-probs with the adapters disabled too), and no second copy of the weights is
held in memory.

Scaling out uses the same entry point (``train()`` / ``bon-sr train``); nothing here is
CPU-specific:

- vLLM generation: ``use_vllm=True`` (``--use-vllm``) hands sampling to TRL's vLLM
  integration; ``vllm_mode="colocate"`` runs vLLM inside each training process,
  ``"server"`` talks to ``trl vllm-serve`` on other GPUs. The reward is unaffected: TRL
  returns the sampled prompt/completion ids from either path, and the SR forward pass
  runs on the training model with adapters disabled (vLLM does not expose hidden states
  from generate()).
- multi-GPU: ``accelerate launch -m bon_sr.cli train ...`` (or ``accelerate launch
  $(which bon-sr) train ...``). Each process scores its own completions; TRL gathers the
  rewards before the per-group advantages. ``completions_per_step`` is per process.
- DeepSpeed: add ``--config_file`` with a ZeRO-2/3 accelerate config to the same
  ``accelerate launch``; TRL keeps LoRA adapters in the base dtype under ZeRO-3.
- The ``paper`` preset's ``paged_adamw_8bit`` optimizer needs ``bitsandbytes`` (CUDA).

What was run where: the ``cpu-smoke`` preset and the unit tests ran on a 2-core CPU. vLLM
generation, multi-GPU accelerate, DeepSpeed and the ``paper`` preset were NOT run here.

This module knows nothing about the CLI or about how SR is computed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Sequence

from ..errors import ConfigError, InputError, MissingExtraError, ModelError
from ..jsonl import dumps_json
from ..models import ProgressFn, resolve_model
from ..sampling.prompts import read_prompt_file, to_messages
from .config import TrainConfig
from .reward import StableRankReward, tokenise_prompts_like_trl

logger = logging.getLogger(__name__)

LOG_FILE = "train_log.jsonl"
CONFIG_FILE = "bon_sr_train.json"
PROMPT_SUFFIXES = (".jsonl", ".json", ".ndjson", ".txt")


def train_extras_available() -> bool:
    return find_spec("trl") is not None and find_spec("peft") is not None


def require_train_extras() -> None:
    for package in ("trl", "peft"):
        if find_spec(package) is None:
            raise MissingExtraError(package, "train", "SR-GRPO training")


# --------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class PromptSet:
    """Training prompts in TRL's format: chat messages (conversational) or plain strings."""

    ids: list[str]
    prompts: list[Any]
    source: str

    def to_dataset(self) -> Any:
        from datasets import Dataset

        return Dataset.from_dict({"prompt": self.prompts, "prompt_key": self.ids})


def load_prompts(source: str | os.PathLike[str], *, split: str = "train", limit: int | None = None) -> PromptSet:
    """Prompts from a local ``.jsonl``/``.txt`` file (``prompt`` or ``messages`` per line) or,
    when ``source`` is not a local path, a hub dataset with a ``prompt`` or ``messages``
    column (trailing assistant turns are dropped so the model has something to answer)."""
    text = str(source)
    path = Path(text)
    if path.exists() or path.suffix.lower() in PROMPT_SUFFIXES or "/" not in text:
        records = read_prompt_file(path)
        ids = [r.id for r in records]
        prompts = [to_messages(r.prompt) for r in records]
    else:
        ids, prompts = _load_hub_prompts(text, split)
    if limit is not None:
        ids, prompts = ids[:limit], prompts[:limit]
    return PromptSet(ids=ids, prompts=prompts, source=text)


def _load_hub_prompts(name: str, split: str) -> tuple[list[str], list[Any]]:
    if find_spec("datasets") is None:
        raise MissingExtraError("datasets", "train", f"loading the hub dataset '{name}'")
    from datasets import load_dataset

    try:
        ds = load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many types for "not found / offline"
        raise InputError(f"Could not load the hub dataset '{name}' (split '{split}'): {exc}. Check the name and "
                         "the network, or pass a local JSONL file with 'prompt' or 'messages' per line.") from exc
    column = "prompt" if "prompt" in ds.column_names else "messages" if "messages" in ds.column_names else None
    if column is None:
        raise InputError(f"Hub dataset '{name}' has no 'prompt' or 'messages' column "
                         f"(columns: {', '.join(ds.column_names)}).")
    ids, prompts = [], []
    for i, row in enumerate(ds):
        value = row[column]
        if isinstance(value, str):
            messages = to_messages(value)
        else:
            messages = [{"role": m["role"], "content": m["content"]} for m in value]
            while messages and messages[-1]["role"] == "assistant":
                messages.pop()
        if not messages or not any(str(m["content"]).strip() for m in messages):
            continue
        ids.append(str(row.get("id", i)))
        prompts.append(messages)
    if not prompts:
        raise InputError(f"Hub dataset '{name}' (split '{split}') gave no usable prompts.")
    return ids, prompts


# --------------------------------------------------------------------------- checks


def _model_shape(model_config: Any) -> tuple[int | None, int | None]:
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    context = None
    for name in ("max_position_embeddings", "max_model_len", "n_positions"):
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value > 0:
            context = value
            break
    layers = getattr(text_config, "num_hidden_layers", None)
    return context, layers if isinstance(layers, int) else None


def check_against_model(config: TrainConfig, model_config: Any) -> None:
    """Lengths and layer index against the model's own numbers (no weights needed)."""
    context, layers = _model_shape(model_config)
    total = config.max_prompt_length + config.max_completion_length
    if context is not None and total > context:
        raise ConfigError(
            f"max_prompt_length ({config.max_prompt_length}) + max_completion_length "
            f"({config.max_completion_length}) = {total} tokens does not fit the model's context of {context} "
            f"tokens. Lower --max-completion-length or --max-prompt-length so they sum to at most {context}.")
    if layers is not None and not -layers <= config.scoring.layer < layers:
        raise ConfigError(f"layer {config.scoring.layer} is out of range for a model with {layers} layers "
                          f"(use -{layers}..{layers - 1}; -1 is the method).")


def check_prompt_lengths(prompts: PromptSet, tokenizer: Any, config: TrainConfig) -> list[int]:
    """Tokenise every prompt exactly as TRL will; refuse any longer than max_prompt_length
    (TRL 1.16 does not truncate prompts, so an overlong one would overflow the context)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("The model's tokenizer has no chat template; SR-GRPO trains chat models on chat "
                          "prompts. Use an instruct/chat model.")
    lengths = [len(ids) for ids in tokenise_prompts_like_trl(tokenizer, prompts.prompts)]
    too_long = [(key, n) for key, n in zip(prompts.ids, lengths) if n > config.max_prompt_length]
    if too_long:
        shown = ", ".join(f"{key} ({n} tokens)" for key, n in too_long[:5])
        more = f" and {len(too_long) - 5} more" if len(too_long) > 5 else ""
        raise ConfigError(
            f"{len(too_long)} prompt(s) from {prompts.source} are longer than max_prompt_length="
            f"{config.max_prompt_length}: {shown}{more}. Shorten or drop them, or raise --max-prompt-length "
            f"(up to the model context minus --max-completion-length).")
    return lengths


# --------------------------------------------------------------------------- trainer


_TRAINER_CLASS: Any = None


def sr_grpo_trainer_class() -> Any:
    """``SRGRPOTrainer``: GRPOTrainer that binds StableRankReward and hands it the prompt ids.

    Built on first use so that importing this module does not import TRL.
    """
    global _TRAINER_CLASS
    if _TRAINER_CLASS is not None:
        return _TRAINER_CLASS
    require_train_extras()
    from trl import GRPOTrainer

    class SRGRPOTrainer(GRPOTrainer):
        """GRPOTrainer whose generation step also reports the prompt ids it sampled from.

        TRL 1.16 passes ``completion_ids`` to reward functions but not the prompt ids. Its
        ``_generate`` returns an ``extra_fields`` dict that TRL merges, per row, into the
        inputs whose columns become reward kwargs; adding ``prompt_ids`` there gives the
        reward exactly the tokens the policy was conditioned on.
        """

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            for func in self.reward_funcs:
                if isinstance(func, StableRankReward):
                    func.bind(self)

        def _generate(self, prompts: list) -> Any:
            out = super()._generate(prompts)
            if not (isinstance(out, tuple) and len(out) == 8 and isinstance(out[5], dict)):
                raise RuntimeError("This TRL version's GRPOTrainer._generate returns an unexpected shape; bon-sr "
                                   "was written against trl 1.16. Pin trl or update bon_sr.train.trainer.")
            extra = dict(out[5])
            extra["prompt_ids"] = [[int(t) for t in ids] for ids in out[0]]
            return (*out[:5], extra, *out[6:])

    _TRAINER_CLASS = SRGRPOTrainer
    return SRGRPOTrainer


def _jsonl_callback_class() -> Any:
    from transformers import TrainerCallback

    class JsonlMetricsCallback(TrainerCallback):
        """Appends every log dict (TRL's metrics + ours) as one JSON line per logging step."""

        def __init__(self, path: Path):
            self.path = path

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            if not logs or not state.is_world_process_zero:
                return
            row = {"step": state.global_step, "time": round(time.time(), 3), **logs}
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(dumps_json(row, default=float) + "\n")  # a NaN loss is null: valid JSON

    return JsonlMetricsCallback


def last_checkpoint(output_dir: str | os.PathLike[str]) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    directory = Path(output_dir)
    return get_last_checkpoint(str(directory)) if directory.is_dir() else None


def grpo_args(config: TrainConfig, output_dir: str | os.PathLike[str], **extra: Any) -> Any:
    """TRL's GRPOConfig for ``config``; TRL's own validation errors become ConfigError."""
    require_train_extras()
    import torch
    from trl import GRPOConfig

    if config.optim.startswith(("paged_", "adamw_8bit", "adamw_bnb")) and find_spec("bitsandbytes") is None:
        raise ConfigError(f"optim '{config.optim}' needs bitsandbytes (CUDA): pip install bitsandbytes, or pass "
                          "--optim adamw_torch.")
    if config.bf16 and not torch.cuda.is_available() and config.optim.startswith("paged_"):
        raise ConfigError("The paper preset is for a GPU (bf16, paged 8-bit AdamW). On CPU use --preset cpu-smoke.")
    if config.use_vllm and find_spec("vllm") is None:
        raise MissingExtraError("vllm", "vllm", "--use-vllm generation")
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        num_generations=config.num_generations,
        max_completion_length=config.max_completion_length,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        # transformers >= 5 reads a float warmup_steps < 1 as a ratio, 4.x as a step count: hand
        # both the step count (their own rounding: ceil(max_steps * ratio)).
        warmup_steps=math.ceil(config.max_steps * config.warmup_ratio),
        beta=config.beta,
        loss_type=config.loss_type,
        scale_rewards="group",
        temperature=config.temperature,
        top_p=config.top_p,
        max_grad_norm=config.max_grad_norm,
        optim=config.optim,
        bf16=config.bf16,
        gradient_checkpointing=config.gradient_checkpointing,
        seed=config.seed,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        logging_steps=config.logging_steps,
        report_to=config.report_to,
        use_vllm=config.use_vllm,
        vllm_mode=config.vllm_mode,
        use_cpu=not torch.cuda.is_available(),
    )
    kwargs.update(extra)
    try:
        return GRPOConfig(**kwargs)
    except ValueError as exc:
        raise ConfigError(f"TRL rejected the training configuration: {exc}") from exc


def lora_config(config: TrainConfig) -> Any:
    require_train_extras()
    from peft import LoraConfig

    targets: Any = list(config.lora_target_modules)
    if targets == ["all-linear"]:
        targets = "all-linear"
    return LoraConfig(task_type="CAUSAL_LM", r=config.lora_r, lora_alpha=config.lora_alpha,
                      lora_dropout=config.lora_dropout, target_modules=targets)


def build_trainer(
    config: TrainConfig,
    prompts: PromptSet | str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    callbacks: Sequence[Any] = (),
    progress: ProgressFn | None = None,
    print_logs: bool = True,
    **args_overrides: Any,
) -> Any:
    """An ``SRGRPOTrainer`` ready to ``train()``; its reward is ``trainer.sr_reward``.

    print_logs: False drops transformers' stdout log printer (the JSONL log and the
    caller's callbacks still get every log). ``args_overrides`` go to GRPOConfig.
    """
    require_train_extras()
    if config.torch_threads is not None:
        import torch

        torch.set_num_threads(config.torch_threads)
    prompt_set = prompts if isinstance(prompts, PromptSet) else load_prompts(prompts)
    from transformers import AutoConfig, AutoTokenizer

    from ..models import load_hf_model

    model_path = resolve_model(config.model, progress=progress)
    try:
        model_config = AutoConfig.from_pretrained(model_path)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"Could not read model '{config.model}': {exc}. Check the name, or use a local directory "
                         "(offline machines: the built-in 'smollm2-135m-instruct').") from exc
    check_against_model(config, model_config)
    check_prompt_lengths(prompt_set, tokenizer, config)
    tokenizer.padding_side = "left"  # TRL requires left padding for generation

    args = grpo_args(config, output_dir, **args_overrides)
    model, _ = load_hf_model(model_path, device="cpu", dtype=config.dtype)
    reward = StableRankReward(config.scoring, tokenizer=tokenizer, strip_eos=config.strip_eos)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    all_callbacks = [_jsonl_callback_class()(Path(output_dir) / LOG_FILE), *callbacks]
    trainer_cls = sr_grpo_trainer_class()
    try:
        trainer = trainer_cls(model=model, reward_funcs=[reward], args=args, train_dataset=prompt_set.to_dataset(),
                              processing_class=tokenizer, peft_config=lora_config(config), callbacks=all_callbacks)
    except ValueError as exc:
        if "Target modules" in str(exc) or "target_modules" in str(exc):
            raise ConfigError(f"{exc}. Pass --lora-target-modules with this model's projection names, "
                              "or all-linear.") from exc
        raise
    if not print_logs:
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    trainer.sr_reward = reward
    trainer.bon_sr_model_path = model_path
    return trainer


@dataclass
class TrainResult:
    output_dir: str
    global_step: int
    resumed_from: str | None
    train_runtime_s: float
    seconds_per_step: float | None
    last_log: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def train(
    config: TrainConfig,
    prompts: PromptSet | str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    resume: bool = True,
    callbacks: Sequence[Any] = (),
    progress: ProgressFn | None = None,
    print_logs: bool = True,
    **args_overrides: Any,
) -> TrainResult:
    """Run SR-GRPO; save the LoRA adapter (and tokenizer) in ``output_dir``.

    resume: continue from the newest ``checkpoint-*`` in ``output_dir`` if there is one.
    With ``resume=False`` an output directory that already holds checkpoints is refused,
    so two runs never mix their logs and checkpoints.
    """
    out = Path(output_dir)
    previous = last_checkpoint(out)
    if previous and not resume:
        raise ConfigError(f"{out} already holds checkpoints (latest: {Path(previous).name}). Pass --resume to "
                          "continue that run, or choose a new --output-dir.")
    done_steps = _checkpoint_step(previous) if previous and resume else 0
    if done_steps >= config.max_steps:
        # transformers would still run one more step when resumed at max_steps.
        logger.info("%s is at step %d >= max_steps=%d: nothing to train", previous, done_steps, config.max_steps)
        _export_adapter(Path(previous), out)
        return TrainResult(output_dir=str(out), global_step=done_steps, resumed_from=previous,
                           train_runtime_s=0.0, seconds_per_step=None)
    trainer = build_trainer(config, prompts, out, callbacks=callbacks, progress=progress, print_logs=print_logs,
                            **args_overrides)
    (out / CONFIG_FILE).write_text(json.dumps(
        {"config": config.to_dict(), "model_path": trainer.bon_sr_model_path,
         "resumed_from": previous if resume else None}, indent=2))
    if done_steps:
        logger.info("Resuming from %s (step %d)", previous, done_steps)
    output = trainer.train(resume_from_checkpoint=previous if resume else None)
    trainer.save_model(str(out))
    steps_run = trainer.state.global_step - done_steps
    runtime = float(output.metrics.get("train_runtime", 0.0))
    logs = [h for h in trainer.state.log_history if "loss" in h or "reward" in h]
    return TrainResult(output_dir=str(out), global_step=trainer.state.global_step,
                       resumed_from=previous if resume else None, train_runtime_s=runtime,
                       seconds_per_step=runtime / steps_run if steps_run > 0 else None,
                       last_log=dict(logs[-1]) if logs else {})


def _checkpoint_step(checkpoint: str) -> int:
    state_file = Path(checkpoint) / "trainer_state.json"
    if not state_file.is_file():
        return 0
    return int(json.loads(state_file.read_text()).get("global_step", 0))


def _export_adapter(checkpoint: Path, out: Path) -> None:
    """Copy the checkpoint's adapter to ``out`` unless a final adapter is already there."""
    import shutil

    if (out / "adapter_model.safetensors").is_file():
        return
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        if (checkpoint / name).is_file():
            shutil.copy2(checkpoint / name, out / name)
