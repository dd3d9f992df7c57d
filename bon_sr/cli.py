"""The ``bon-sr`` command line: a thin click layer over ``bon_sr.api``.

Heavy imports (torch, transformers, vLLM) happen inside commands; rich draws progress on
stderr so stdout stays clean for pipes.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import click

from . import __version__
from .models import DEFAULT_MODEL

GENERATE_EXAMPLE = """
\b
Example:
  bon-sr generate examples/prompts.jsonl -o out.jsonl --n 8 --seed 0
  bon-sr generate examples/prompts.jsonl -o out.jsonl --resume   # continue after Ctrl-C

\b
PROMPTS is a .jsonl file with one {"id": ..., "prompt": "..."} or
{"id": ..., "messages": [{"role": "user", "content": "..."}]} object per line,
or a .txt file with one prompt per line. Each output line holds the prompt's id,
the selected response, its scores and (unless --no-candidates) every candidate.
"""


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bon-sr")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages to stderr.")
def main(verbose: bool) -> None:
    """Best-of-N selection by the stable rank of a frozen LLM's hidden states."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        # vLLM logs every engine step at INFO; keep the progress bar readable unless asked.
        import os

        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def _model_progress(console: Any) -> Any:
    """Progress callback for first-use model preparation (download, checksum, convert)."""
    state: dict[str, Any] = {"last": None}

    def report(message: str, done: int | None, total: int | None) -> None:
        if message != state["last"]:
            console.print(f"[dim]model setup:[/] {message}")
            state["last"] = message

    return report


@main.command(epilog=GENERATE_EXAMPLE)
@click.argument("prompts", type=click.Path(dir_okay=False, path_type=str))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="Output JSONL file; one line per prompt, appended as each prompt finishes.")
@click.option("-m", "--model", default=DEFAULT_MODEL, show_default=True,
              help="Built-in alias, local HF model directory, or Hugging Face id.")
@click.option("--backend", type=click.Choice(["auto", "hf", "vllm"]), default="auto", show_default=True,
              help="Sampling backend; auto = vLLM when importable, else transformers.")
@click.option("--scorer", type=click.Choice(["auto", "hf", "vllm"]), default="auto", show_default=True,
              help="Hidden-state scorer; auto = same as the backend.")
@click.option("-n", "--n", "n", type=int, default=8, show_default=True, help="Candidates per prompt.")
@click.option("--temperature", type=float, default=0.7, show_default=True, help="Sampling temperature.")
@click.option("--top-p", type=float, default=0.9, show_default=True, help="Nucleus sampling top-p.")
@click.option("--max-new-tokens", type=int, default=256, show_default=True, help="Tokens per candidate.")
@click.option("--stop", multiple=True, help="Stop string (repeatable); excluded from the text.")
@click.option("--greedy", is_flag=True, help="Greedy decoding (requires --n 1).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Run seed; each prompt's seed derives from it and the prompt id.")
@click.option("--selector", default="stable-rank", show_default=True,
              help="stable-rank, random, first, shortest or longest.")
@click.option("--token-set", type=click.Choice(["response", "response+eot", "full"]), default="response",
              show_default=True, help="Score response tokens only, response + end-of-turn token, or the "
                                      "chat-formatted prompt + response.")
@click.option("--transform", default="raw", show_default=True,
              help="Transform of H before stable rank (raw = the paper; e.g. center, drop-first, drop-special, "
                   "drop-massive-seq; join with '+'). Needs --scorer hf.")
@click.option("--layer", type=int, default=-1, show_default=True, help="Decoder layer to score (-1 = last).")
@click.option("--norm", type=click.Choice(["post", "pre"]), default="post", show_default=True,
              help="Hidden states after (post) or before (pre) the final norm.")
@click.option("--window", type=int, default=None, help="Score only the first WINDOW tokens of the token set.")
@click.option("--batch-tokens", type=int, default=8192, show_default=True,
              help="Padded tokens per scoring forward pass (bounds memory).")
@click.option("--chunk-size", type=int, default=None,
              help="Prompts submitted together (default: 1 for hf, 32 for vllm).")
@click.option("--candidates/--no-candidates", "keep_candidates", default=True, show_default=True,
              help="Keep every candidate (text, token ids, scores) in the output.")
@click.option("--resume", is_flag=True, help="Skip ids already in OUTPUT and append the rest.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--device", default=None, help="torch device for the HF backend (default: cuda if available).")
@click.option("--dtype", default="auto", show_default=True, help="auto, bfloat16, float16 or float32.")
@click.option("--vllm-opt", "vllm_opts", multiple=True, metavar="KEY=VALUE",
              help="vLLM backend option (repeatable), e.g. gpu_memory_utilization=0.4, "
                   "pooling_gpu_memory_utilization=0.2, kv_cache_memory_bytes=2147483648, max_model_len=4096.")
def generate(prompts: str, output: str, model: str, backend: str, scorer: str, n: int, temperature: float,
             top_p: float, max_new_tokens: int, stop: tuple[str, ...], greedy: bool, seed: int, selector: str,
             token_set: str, transform: str, layer: int, norm: str, window: int | None, batch_tokens: int,
             chunk_size: int | None, keep_candidates: bool, resume: bool, overwrite: bool,
             device: str | None, dtype: str, vllm_opts: tuple[str, ...]) -> None:
    """Sample N candidates per prompt in PROMPTS and keep the one with the highest stable rank."""
    from .errors import BonSRError
    from .hidden_states import HiddenStateConfig
    from .jsonl import JsonlWriter
    from .prompts import read_prompt_file
    from .samplers import SamplingConfig
    from .selectors import get_selector

    if resume and overwrite:
        raise click.UsageError("--resume and --overwrite exclude each other.")
    console = _console()
    try:
        # Validate everything cheap before loading a model: bad input fails in a second.
        SamplingConfig(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                       stop=stop, greedy=greedy, seed=seed)
        get_selector(selector)
        HiddenStateConfig(token_set=token_set, layer=layer, norm=norm, window=window, transform=transform,
                          max_batch_tokens=batch_tokens)
        if chunk_size is not None and chunk_size < 1:
            raise click.BadParameter("must be >= 1", param_hint="--chunk-size")
        vllm_options = _parse_options(vllm_opts)
        records = read_prompt_file(prompts)
        writer = JsonlWriter(output, mode="resume" if resume else "overwrite" if overwrite else "new")
    except BonSRError as exc:
        raise click.ClickException(str(exc)) from exc
    with writer:
        todo = [r for r in records if r.id not in writer.finished_ids]
        skipped = len(records) - len(todo)
        if writer.repaired_bytes:
            console.print(f"[yellow]Removed an incomplete last line ({writer.repaired_bytes} bytes) from {output}.[/]")
        if skipped:
            console.print(f"Resuming: {skipped} of {len(records)} prompts already in {output}.")
        if not todo:
            console.print("Nothing to do: every prompt is already in the output.")
            return
        _run_generate(console, writer, todo, skipped, keep_candidates, chunk_size, dict(
            model=model, backend=backend, scorer=scorer, n=n, temperature=temperature, top_p=top_p,
            max_new_tokens=max_new_tokens, stop=stop, greedy=greedy, seed=seed, selector=selector,
            token_set=token_set, transform=transform, layer=layer, norm=norm, window=window, max_batch_tokens=batch_tokens,
            device=device, dtype=dtype, vllm_options=vllm_options))


def _parse_options(items: tuple[str, ...]) -> dict[str, Any]:
    """KEY=VALUE pairs; values parsed as JSON when they are JSON (numbers, true/false)."""
    import json

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--vllm-opt")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _run_generate(console: Any, writer: Any, todo: list[Any], skipped: int, keep_candidates: bool,
                  chunk_size: int | None, options: dict[str, Any]) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    from .api import BestOfN
    from .errors import BonSRError

    started = time.perf_counter()
    try:
        with console.status(f"Loading {options['model']} ({options['backend']} backend)..."):
            bon = BestOfN(progress=_model_progress(console), **options)
    except BonSRError as exc:
        raise click.ClickException(str(exc)) from exc
    load_s = time.perf_counter() - started
    console.print(f"Loaded {bon.model_name} in {load_s:.1f}s (backend {bon.backend}, scorer {bon.scorer_name}).")
    done = tokens = 0
    best_sr: list[float] = []
    t0 = time.perf_counter()
    columns = (TextColumn("[bold]generate"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[rate]}"))
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("generate", total=len(todo), rate="")
        try:
            selections = bon.select_many([r.prompt for r in todo], ids=[r.id for r in todo], chunk_size=chunk_size)
            for record, sel in zip(todo, selections):
                out = {"id": record.id}
                out.update(sel.to_dict(keep_candidates=keep_candidates))
                out["config"] = bon.config_dict()
                writer.write(out)
                done += 1
                tokens += sum(c.num_tokens for c in sel.candidates)
                if "stable_rank" in sel.best.scores:
                    best_sr.append(sel.best.scores["stable_rank"])
                elapsed = time.perf_counter() - t0
                progress.update(task, advance=1, rate=f"{tokens / max(elapsed, 1e-9):.0f} tok/s")
        except BonSRError as exc:
            raise click.ClickException(f"{exc}\n{done} prompts were written to {writer.path}; "
                                       "fix the problem and rerun with --resume.") from exc
        except KeyboardInterrupt:
            console.print(f"[yellow]Interrupted: {done} prompts written to {writer.path}; "
                          "rerun with --resume to continue.[/]")
            raise SystemExit(130) from None
    elapsed = time.perf_counter() - t0
    mean_sr = sum(best_sr) / len(best_sr) if best_sr else float("nan")
    console.print(
        f"[green]Done:[/] {done} prompts written to {writer.path} ({skipped} skipped as already done); "
        f"{tokens} candidate tokens in {elapsed:.1f}s ({tokens / max(elapsed, 1e-9):.0f} tok/s); "
        f"mean stable rank of the selected responses {mean_sr:.3f}."
    )


def _register_optional_commands() -> None:
    """Commands that live in their own subpackages (bench, training)."""
    import importlib

    for module, names in (("bon_sr.bench.cli", ("bench", "rank_eval", "ablate")), ("bon_sr.train.cli", ("train",))):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("bon_sr"):
                continue
            raise
        for name in names:
            cmd = getattr(mod, name, None)
            if cmd is not None:
                main.add_command(cmd)


_register_optional_commands()


if __name__ == "__main__":  # pragma: no cover
    main()
