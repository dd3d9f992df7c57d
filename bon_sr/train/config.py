"""SR-GRPO training configuration: one frozen dataclass and two named presets.

``paper`` is the paper's recipe (PAPER.md, SR-GRPO) for a GPU; ``cpu-smoke`` runs two tiny
steps of the offline default model on a laptop CPU. ``get_preset(name, **overrides)`` is
the only way in from names. Every check that needs nothing but the numbers happens in
``__post_init__`` and says what to change; checks that need the model (context length,
layer count) or the prompts live in ``trainer.py``, before any weights load.

This module knows nothing about TRL, peft or models: it imports neither, so a bad option
fails before the heavy imports.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from ..errors import ConfigError
from ..scoring.hidden_states import HiddenStateConfig
from ..models import DEFAULT_MODEL
from ..sampling import SamplingConfig

#: Attention and MLP projections of Llama/Qwen/Mistral-style decoders.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
DTYPES = ("auto", "float32", "bfloat16", "float16")
VLLM_MODES = ("colocate", "server")


@dataclass(frozen=True)
class TrainConfig:
    """Everything one SR-GRPO run needs besides the prompts and the output directory.

    Batch arithmetic (TRL's): one optimizer step sees ``per_device_train_batch_size *
    gradient_accumulation_steps * num_processes`` completions, i.e. that number divided by
    ``num_generations`` prompts, each sampled ``num_generations`` times.

    Sampling options keep TRL's ``GRPOConfig`` names and defaults (``num_generations``,
    ``max_completion_length``, ``temperature`` 1.0, ``top_p`` 1.0), which TRL users expect;
    they are checked by ``SamplingConfig`` (``sampling_config()``), the one place for those
    checks. The reward's hidden states are one ``HiddenStateConfig`` (``scoring``), as in
    ``BestOfN``, the server and the bench; ``get_preset`` also takes its field names
    (``token_set``, ``layer``, ...) as overrides.
    """

    preset: str = "custom"
    model: str = DEFAULT_MODEL
    dtype: str = "auto"

    # lengths (TRL 1.16 has no prompt truncation: prompts longer than this are refused)
    max_prompt_length: int = 512
    max_completion_length: int = 512

    # GRPO
    num_generations: int = 8
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_steps: int = 400
    learning_rate: float = 1e-6
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.1
    beta: float = 0.04
    loss_type: str = "grpo"
    temperature: float = 1.0
    top_p: float = 1.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    bf16: bool = False
    gradient_checkpointing: bool = False
    seed: int = 0
    #: torch CPU threads (None = torch's default). On a busy shared CPU, 1 thread avoids
    #: OpenMP oversubscription, measured 4-7x faster here than 2 threads under load.
    torch_threads: int | None = None

    # checkpoints and logs
    save_steps: int = 50
    save_total_limit: int | None = 3
    logging_steps: int = 1
    report_to: str = "none"

    # LoRA
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_target_modules: tuple[str, ...] = LORA_TARGETS

    # reward
    scoring: HiddenStateConfig = field(default_factory=HiddenStateConfig)
    strip_eos: bool = True

    # scale-out
    use_vllm: bool = False
    vllm_mode: str = "colocate"

    def __post_init__(self) -> None:
        if isinstance(self.lora_target_modules, (list, str)):
            targets = (self.lora_target_modules,) if isinstance(self.lora_target_modules, str) else self.lora_target_modules
            object.__setattr__(self, "lora_target_modules", tuple(targets))
        _positive_int(self, "max_prompt_length", "max_completion_length", "num_generations",
                      "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps", "save_steps",
                      "logging_steps", "lora_r")
        if self.num_generations < 2:
            raise ConfigError(f"num_generations is {self.num_generations}; GRPO needs at least 2 samples per prompt "
                              "to compute advantages. Set num_generations >= 2.")
        batch = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if batch % self.num_generations:
            raise ConfigError(
                f"per_device_train_batch_size * gradient_accumulation_steps = {batch} completions per step is not a "
                f"multiple of num_generations = {self.num_generations}: every prompt needs all its samples in one "
                f"batch. Use a batch of {self.num_generations * max(1, batch // self.num_generations)} or change "
                "num_generations.")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.beta < 0:
            raise ConfigError(f"beta (KL weight) must be >= 0, got {self.beta}")
        if not self.lora_alpha > 0:
            raise ConfigError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_target_modules or not all(isinstance(t, str) and t for t in self.lora_target_modules):
            raise ConfigError("lora_target_modules is empty; name the projections to adapt (e.g. q_proj,v_proj) "
                              "or use all-linear.")
        _choice(self, "loss_type", LOSS_TYPES)
        _choice(self, "lr_scheduler_type", SCHEDULERS)
        _choice(self, "dtype", DTYPES)
        _choice(self, "vllm_mode", VLLM_MODES)
        if self.torch_threads is not None and (isinstance(self.torch_threads, bool) or self.torch_threads < 1):
            raise ConfigError(f"torch_threads must be >= 1 or None, got {self.torch_threads!r}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ConfigError(f"save_total_limit must be >= 1 or None, got {self.save_total_limit}")
        self.sampling_config()  # temperature / top_p checks live there

    def sampling_config(self) -> SamplingConfig:
        """The GRPO sampling options as bon-sr's ``SamplingConfig`` (TRL's names mapped)."""
        return SamplingConfig(n=self.num_generations, temperature=self.temperature, top_p=self.top_p,
                              max_new_tokens=self.max_completion_length, seed=self.seed)

    @property
    def completions_per_step(self) -> int:
        """Completions per optimizer step on one process."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["lora_target_modules"] = list(self.lora_target_modules)
        return out


def _positive_int(cfg: TrainConfig, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")


def _choice(cfg: TrainConfig, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in allowed:
        raise ConfigError(f"Unknown {name} '{value}'. Available: {', '.join(allowed)}")


# --------------------------------------------------------------------------- presets

def _paper() -> TrainConfig:
    # PAPER.md, SR-GRPO: Qwen2.5-1.5B-Instruct, 400 steps, LoRA r16/a32/0.1 on all attention
    # and MLP projections, lr 1e-6 cosine, 10% warm-up, effective batch 128, bf16, prompt and
    # completion 4096, paged AdamW 8-bit, grad-norm 1.0, K=8. Decisions where the paper is
    # vague: "effective batch 128" is read as 128 completions per step (16 prompts x 8, the
    # TRL meaning); beta 0.04 (appendix) over 0.01 (main text); sampling temperature 1.0
    # (not given; TRL's default); loss_type "grpo" (per-sequence normalisation, the GRPO of
    # the paper's formula) rather than TRL's default "dapo".
    return TrainConfig(
        preset="paper", model="Qwen/Qwen2.5-1.5B-Instruct", dtype="bfloat16",
        max_prompt_length=4096, max_completion_length=4096,
        num_generations=8, per_device_train_batch_size=8, gradient_accumulation_steps=16,
        max_steps=400, learning_rate=1e-6, lr_scheduler_type="cosine", warmup_ratio=0.1,
        beta=0.04, loss_type="grpo", temperature=1.0, top_p=1.0, max_grad_norm=1.0,
        optim="paged_adamw_8bit", bf16=True, gradient_checkpointing=True,
        save_steps=50, save_total_limit=3, logging_steps=1,
    )


def _cpu_smoke() -> TrainConfig:
    # Two steps of the offline default model on 2 CPU cores: one prompt x 4 samples x 16
    # tokens per step. fp32 (bf16 autocast buys nothing at 135M on CPU). The learning rate is
    # far above the paper's so that two steps move the adapter measurably; this preset checks
    # the plumbing, it is not meant to improve the model.
    return TrainConfig(
        preset="cpu-smoke", model=DEFAULT_MODEL, dtype="float32",
        max_prompt_length=96, max_completion_length=16,
        num_generations=4, per_device_train_batch_size=4, gradient_accumulation_steps=1,
        max_steps=2, learning_rate=1e-4, lr_scheduler_type="constant", warmup_ratio=0.0,
        beta=0.04, loss_type="grpo", temperature=1.0, top_p=1.0, max_grad_norm=1.0,
        optim="adamw_torch", bf16=False, gradient_checkpointing=False,
        save_steps=1, save_total_limit=2, logging_steps=1, scoring=HiddenStateConfig(max_batch_tokens=2048),
    )


PRESETS = {"cpu-smoke": _cpu_smoke, "paper": _paper}


def get_preset(name: str, **overrides: Any) -> TrainConfig:
    """The named preset with ``overrides`` applied (None values are ignored). ``scoring``'s
    fields (``token_set``, ``layer``, ``norm``, ``window``, ...) may be given by name."""
    if name not in PRESETS:
        raise ConfigError(f"Unknown preset '{name}'. Available: {', '.join(sorted(PRESETS))}")
    base = PRESETS[name]()
    own = {f.name for f in fields(TrainConfig)}
    scoring = {f.name for f in fields(HiddenStateConfig)}
    unknown = sorted(set(overrides) - own - scoring)
    if unknown:
        raise ConfigError(f"Unknown training option(s) {', '.join(unknown)}. "
                          f"Available: {', '.join(sorted(own | scoring))}")
    given = {k: v for k, v in overrides.items() if v is not None}
    changes = {k: v for k, v in given.items() if k in own}
    scoring_changes = {k: v for k, v in given.items() if k in scoring}
    if scoring_changes:
        changes["scoring"] = replace(changes.get("scoring", base.scoring), **scoring_changes)
    return replace(base, **changes)
