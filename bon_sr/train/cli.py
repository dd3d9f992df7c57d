"""``bon-sr train``: a thin click layer over ``bon_sr.train.trainer.train``.

A standalone command; ``bon_sr/cli.py`` registers it with ``main.add_command(train)``.
Progress and per-step metric lines go to stderr through rich; the final summary is one
JSON object on stdout. TRL, peft and transformers' Trainer are imported inside the
command, so ``bon-sr --help`` stays fast and works without the ``train`` extra.

This module knows nothing about how SR is computed or how the trainer is built.
"""

from __future__ import annotations

import json
from typing import Any

import click

from ..errors import BonSRError
from .config import PRESETS

# The per-step line shows these log keys, in this order, when present.
STEP_KEYS = (
    ("reward", "reward"),
    ("reward_std", "reward_std"),
    ("stable_rank/mean", "SR"),
    ("completions/mean_length", "len"),
    ("kl", "kl"),
    ("completions/repeated_4gram_frac", "rep4"),
    ("step_time", "s/step"),
)


def _rich_callback(console: Any, total: int) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from transformers import TrainerCallback

    class RichProgress(TrainerCallback):
        def __init__(self) -> None:
            self.progress = Progress(TextColumn("[bold]SR-GRPO"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=console, transient=False)
            self.task: Any = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero:
                self.progress.start()
                self.task = self.progress.add_task("train", total=state.max_steps or total,
                                                   completed=state.global_step)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.task is not None:
                self.progress.update(self.task, completed=state.global_step)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            if self.task is None or not logs:
                return
            parts = [f"{label}={logs[key]:.4g}" for key, label in STEP_KEYS
                     if isinstance(logs.get(key), (int, float))]
            if parts:
                self.progress.console.log(f"step {state.global_step}: " + "  ".join(parts))

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.task is not None:
                self.progress.stop()

    return RichProgress()


@click.command("train")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="cpu-smoke", show_default=True,
              help="Hyperparameter preset: 'paper' (the paper's recipe, GPU) or 'cpu-smoke' (2 tiny steps, CPU).")
@click.option("--prompts", "prompts", required=True,
              help="JSONL file with 'prompt' or 'messages' per line (or .txt, one prompt a line), or a hub "
                   "dataset name (org/name) with a 'prompt' or 'messages' column when online.")
@click.option("--split", default="train", show_default=True, help="Split of a hub dataset given to --prompts.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N prompts.")
@click.option("--output-dir", "-o", required=True, type=click.Path(file_okay=False),
              help="Directory for checkpoints, the JSONL metric log and the final LoRA adapter.")
@click.option("--model", default=None, help="Model to train (HF id, local dir or built-in alias); default: the preset's.")
@click.option("--max-steps", type=int, default=None, help="Optimizer steps (default: the preset's).")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue from the newest checkpoint in --output-dir; --no-resume refuses a directory "
                   "that already holds checkpoints.")
@click.option("--learning-rate", "--lr", "learning_rate", type=float, default=None, help="Peak learning rate.")
@click.option("--num-generations", type=int, default=None, help="Samples per prompt (K).")
@click.option("--batch-size", "per_device_train_batch_size", type=int, default=None,
              help="Completions per device per micro-batch (a multiple of K with --grad-accum).")
@click.option("--grad-accum", "gradient_accumulation_steps", type=int, default=None,
              help="Gradient accumulation steps.")
@click.option("--max-prompt-length", type=int, default=None, help="Refuse prompts longer than this (tokens).")
@click.option("--max-completion-length", type=int, default=None, help="Tokens sampled per completion.")
@click.option("--beta", type=float, default=None, help="KL weight to the frozen base model.")
@click.option("--temperature", type=float, default=None, help="Sampling temperature.")
@click.option("--token-set", type=click.Choice(["response", "full"]), default=None,
              help="Rows scored by SR: response tokens or the whole prompt+response.")
@click.option("--layer", type=int, default=None, help="Decoder layer for SR (-1 = last, the method).")
@click.option("--norm", type=click.Choice(["post", "pre"]), default=None, help="Post- or pre-final-norm states.")
@click.option("--window", type=click.IntRange(min=1), default=None, help="Score at most the first N tokens.")
@click.option("--lora-r", type=int, default=None, help="LoRA rank (default 16).")
@click.option("--lora-alpha", type=int, default=None, help="LoRA alpha (default 32).")
@click.option("--lora-dropout", type=float, default=None, help="LoRA dropout (default 0.1).")
@click.option("--lora-target-modules", default=None,
              help="Comma-separated module names to adapt, or all-linear (default: q,k,v,o,gate,up,down projections).")
@click.option("--optim", default=None, help="Optimizer name as in transformers (e.g. adamw_torch).")
@click.option("--use-vllm/--no-vllm", default=None, help="Sample with TRL's vLLM integration (needs vllm and a GPU).")
@click.option("--vllm-mode", type=click.Choice(["colocate", "server"]), default=None,
              help="vLLM inside the trainer (colocate) or a separate 'trl vllm-serve' (server).")
@click.option("--save-steps", type=int, default=None, help="Checkpoint every N steps.")
@click.option("--seed", type=int, default=None, help="Random seed.")
@click.option("--threads", "torch_threads", type=click.IntRange(min=1), default=None,
              help="torch CPU threads (1 is fastest on a busy shared CPU).")
def train(preset: str, prompts: str, split: str, limit: int | None, output_dir: str, resume: bool,
          lora_target_modules: str | None, **overrides: Any) -> None:
    """Train a LoRA policy with GRPO, rewarded by the frozen base model's stable rank."""
    from rich.console import Console

    console = Console(stderr=True)
    try:
        from .config import get_preset
        from .trainer import last_checkpoint, load_prompts, require_train_extras
        from .trainer import train as run_train

        if lora_target_modules is not None:
            overrides["lora_target_modules"] = tuple(t.strip() for t in lora_target_modules.split(",") if t.strip())
        config = get_preset(preset, **overrides)
        require_train_extras()
        prompt_set = load_prompts(prompts, split=split, limit=limit)
        previous = last_checkpoint(output_dir)
        console.log(f"preset {config.preset}: model {config.model}, {len(prompt_set.prompts)} prompts, "
                    f"{config.max_steps} steps x {config.completions_per_step} completions (K={config.num_generations})"
                    + (f"; resuming from {previous}" if previous and resume else ""))

        def progress(message: str, done: int | None, total: int | None) -> None:
            console.log(message if total is None else f"{message}: {done}/{total}")

        callback = _rich_callback(console, config.max_steps)
        result = run_train(config, prompt_set, output_dir, resume=resume, callbacks=[callback], progress=progress,
                           print_logs=False, disable_tqdm=True)
    except BonSRError as exc:
        raise click.ClickException(str(exc)) from exc
    console.log(f"adapter saved to {result.output_dir}; {result.global_step} steps"
                + (f", {result.seconds_per_step:.1f} s/step" if result.seconds_per_step else ""))
    click.echo(json.dumps(result.to_dict(), default=float))
