"""The ``bon-sr`` command line: a thin click layer over ``bon_sr.api``.

Heavy imports (torch, transformers, vLLM) happen inside commands; rich draws progress on
stderr so stdout stays clean for pipes. ``generate`` and ``score`` live here; ``bench``,
``rank-eval``, ``ablate``, ``serve`` and ``train`` live beside the code they drive and are
registered below. What every command shares at run time is in ``bon_sr.cli_runtime``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

if os.environ.get("BON_SR_ENGINE_PARENT"):
    # A vLLM engine process spawned by `bon-sr` imports this module first (multiprocessing
    # re-imports the main module): arm die-with-parent before anything slow (see vllm_plugin).
    from .sampling.vllm_plugin import die_with_parent

    die_with_parent()

import click

from . import __version__
from .bench.ablate_cli import ablate
from .bench.cli import bench, rank_eval
from .cli_runtime import click_error, engine_log_path, engine_output_to, parse_options, stop_on_signals, \
    stopped_runs_resume, uses_vllm
from .models import DEFAULT_MODEL
from .sampling import SamplingConfig
from .serve.cli import serve
from .train.cli import train

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
    # vLLM logs to stdout by default (in every engine process): stdout stays clean for pipes.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    if not verbose:
        # vLLM logs every engine step at INFO; keep the progress bar readable unless asked.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def _model_progress(console: Any) -> Any:
    """Progress callback for first-use model preparation (download, checksum, convert)."""
    state: dict[str, Any] = {"last": None}

    def report(message: str, done: int | None, total: int | None) -> None:
        if message != state["last"]:
            console.print(f"[dim]model setup:[/] {message}")
            state["last"] = message

    return report


def _selection_options(fn: Any) -> Any:
    """Options shared by ``generate`` and ``score``: model, scorer, selector, answers, scoring."""
    from .selection.answers import ANSWER_FORMATS
    from .scoring.hidden_states import HiddenStateConfig as H
    from .selection.consensus import DEFAULT_UTILITY, UTILITIES
    from .selection.selectors import DEFAULT_SELECTOR, SELECTORS

    options = [
        click.option("-m", "--model", default=DEFAULT_MODEL, show_default=True,
                     help="Built-in alias, local HF model directory, or Hugging Face id."),
        click.option("--scorer", type=click.Choice(["auto", "hook", "pooling", "hf", "vllm"]), default="auto",
                     show_default=True,
                     help="Who computes the scores: hook = inside vLLM's sampling pass (one engine), pooling = a "
                          "second vLLM engine ('vllm' is its old name), hf = transformers; auto = hook with the "
                          "vLLM backend, else hf."),
        click.option("--selector", type=click.Choice(sorted(SELECTORS)), default=DEFAULT_SELECTOR, show_default=True,
                     help="How the best candidate is chosen. auto (the default) votes when --answer is given, else "
                          "mbr; chosen by the best worst case across the measured tasks "
                          "(benchmarks/results/default_selector.md); stable-rank is the paper's."),
        click.option("--utility", type=click.Choice(sorted(UTILITIES)), default=DEFAULT_UTILITY, show_default=True,
                     help="Similarity for the consensus selectors (mbr, auto): lexical = chrF of the texts (no "
                          "hidden states); hidden-last / hidden-mean = cosine of the frozen model's last-layer "
                          "state at the last response token / averaged over the response, -centred = minus the "
                          "prompt's candidate mean (from the scoring pass: --scorer hook or hf, not pooling)."),
        click.option("--embeddings", "keep_embeddings", is_flag=True,
                     help="Write each candidate's embeddings (last, mean) to OUTPUT when a hidden utility "
                          "computed them (d floats each; large)."),
        click.option("--answer", type=click.Choice(sorted(ANSWER_FORMATS)), default=None,
                     help="Extract each candidate's final answer (needed by majority, majority-sr, "
                          "sr-weighted-vote; reported with any selector)."),
        click.option("--answer-regex", default=None, metavar="PATTERN",
                     help="Extract answers with a regex instead (last match; its first group if it has one), "
                          "e.g. 'answer is (.*)'."),
        click.option("--score/--no-score", "score", default=None,
                     help="Always compute stable rank / never score. Default: what the selector needs, plus stable "
                          "rank with the hook scorer (free in vLLM's sampling pass); with --scorer hf, "
                          "majority and random skip the hidden-state pass."),
        click.option("--logit-stats", is_flag=True,
                     help="Also compute mean token log-prob and self-certainty (automatic for the selectors "
                          "that use them)."),
        click.option("--token-set", type=click.Choice(["response", "response+eot", "full"]), default=H.token_set,
                     show_default=True, help="Score response tokens only, response + end-of-turn token, or the "
                                             "chat-formatted prompt + response."),
        click.option("--transform", default=H.transform, show_default=True,
                     help="Transform of H before stable rank (raw = the paper; e.g. center, drop-first, "
                          "drop-special, drop-massive-seq; join with '+'). Needs --scorer hf."),
        click.option("--layer", type=int, default=H.layer, show_default=True,
                     help="Decoder layer to score (-1 = last)."),
        click.option("--norm", type=click.Choice(["post", "pre"]), default=H.norm, show_default=True,
                     help="Hidden states after (post) or before (pre) the final norm."),
        click.option("--window", type=int, default=H.window,
                     help="Score only the first WINDOW tokens of the token set."),
        click.option("--batch-tokens", type=int, default=H.max_batch_tokens, show_default=True,
                     help="Padded tokens per scoring forward pass (bounds memory)."),
        click.option("--chunk-size", type=int, default=None,
                     help="Prompts submitted together (default: 1 for hf, 32 for vllm)."),
        click.option("--candidates/--no-candidates", "keep_candidates", default=True, show_default=True,
                     help="Keep every candidate (text, token ids, scores) in the output."),
        click.option("--resume", is_flag=True, help="Skip ids already in OUTPUT and append the rest."),
        click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists."),
        click.option("--device", default=None, help="torch device for the HF backend (default: cuda if available)."),
        click.option("--dtype", default="auto", show_default=True, help="auto, bfloat16, float16 or float32."),
        click.option("--vllm-opt", "vllm_opts", multiple=True, metavar="KEY=VALUE",
                     help="vLLM backend option (repeatable), e.g. gpu_memory_utilization=0.4, "
                          "kv_cache_memory_bytes=2147483648, max_model_len=4096."),
        click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=str),
                     help="Output JSONL file; one line per prompt, appended as each prompt finishes."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@main.command(epilog=GENERATE_EXAMPLE)
@click.argument("prompts", type=click.Path(dir_okay=False, path_type=str))
@click.option("--backend", type=click.Choice(["auto", "hf", "vllm"]), default="auto", show_default=True,
              help="Sampling backend; auto = vLLM when importable, else transformers.")
@click.option("-n", "--n", "n", type=int, default=SamplingConfig.n, show_default=True, help="Candidates per prompt.")
@click.option("--temperature", type=float, default=SamplingConfig.temperature, show_default=True,
              help="Sampling temperature.")
@click.option("--top-p", type=float, default=SamplingConfig.top_p, show_default=True, help="Nucleus sampling top-p.")
@click.option("--max-new-tokens", type=int, default=SamplingConfig.max_new_tokens, show_default=True,
              help="Tokens per candidate.")
@click.option("--stop", multiple=True, help="Stop string (repeatable); excluded from the text.")
@click.option("--greedy", is_flag=True, help="Greedy decoding (requires --n 1).")
@click.option("--include-greedy/--no-include-greedy", default=None,
              help="Add one greedy decode per prompt to the N sampled candidates (same vLLM call); with "
                   "--answer python it is kept when it passes the prompt's examples. Default: on exactly "
                   "when candidates run as code (--answer python with a voting selector).")
@click.option("--seed", type=int, default=SamplingConfig.seed, show_default=True,
              help="Run seed; each prompt's seed derives from it and the prompt id.")
@click.option("--ray", "ray", is_flag=True,
              help="Run on Ray (pip install 'bon-sr[ray]'): a Ray Data pipeline over --replicas model replicas; "
                   "this process alone writes OUTPUT.")
@click.option("--ray-address", default=None, metavar="ADDR",
              help="Ray cluster to join (auto, HEAD:6379, ray://HEAD:10001); default: RAY_ADDRESS, else a local Ray.")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
              help="Ray actors, each holding one model (with --ray).")
@click.option("--gpus-per-replica", type=click.FloatRange(min=0), default=None,
              help="GPUs Ray gives each replica (with --ray; default: TP x PP when the cluster has GPUs, else 0).")
@click.option("--tensor-parallel-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="vLLM tensor parallelism: devices one engine spans (vLLM backend).")
@click.option("--pipeline-parallel-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="vLLM pipeline parallelism: stages one engine spans (vLLM backend).")
@_selection_options
def generate(prompts: str, backend: str, n: int, temperature: float, top_p: float, max_new_tokens: int,
             stop: tuple[str, ...], greedy: bool, seed: int, ray: bool, ray_address: str | None, replicas: int,
             gpus_per_replica: float | None, tensor_parallel_size: int, pipeline_parallel_size: int,
             **common: Any) -> None:
    """Sample N candidates per prompt in PROMPTS and keep the one the selector picks."""
    scale = dict(ray=ray, ray_address=ray_address, replicas=replicas, gpus_per_replica=gpus_per_replica,
                 tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size)
    _run_command(prompts, common, dict(backend=backend, n=n, temperature=temperature, top_p=top_p,
                                       max_new_tokens=max_new_tokens, stop=stop, greedy=greedy, seed=seed),
                 candidates="forbid", scale=scale)


SCORE_EXAMPLE = """
\b
Example:
  bon-sr score answers.jsonl -o picked.jsonl --selector majority --answer numeric

\b
FILE is a .jsonl file with one {"id": ..., "prompt": "...", "candidates": [...]} object per
line ("messages" instead of "prompt" for chats); each candidate is a string or
{"text": "...", "token_ids": [...]} (token ids are scored as given, else the text is
tokenised). Nothing is sampled.
"""


@main.command(epilog=SCORE_EXAMPLE)
@click.argument("file", type=click.Path(dir_okay=False, path_type=str))
@click.option("--backend", type=click.Choice(["auto", "hf", "vllm"]), default="auto", show_default=True,
              help="Engine that scores: auto = vLLM when importable, else transformers; vllm = the vLLM hook "
                   "(teacher-forced prefills) or pooling scorer; hf = transformers.")
@click.option("--seed", type=int, default=SamplingConfig.seed, show_default=True,
              help="Run seed (the random selector's per-prompt seed derives from it and the id).")
@_selection_options
def score(file: str, backend: str, seed: int, **common: Any) -> None:
    """Score and select the candidates each line of FILE brings (rerank your own samples)."""
    _run_command(file, common, dict(backend=backend, seed=seed), candidates="require")


SHOW_EXAMPLE = """
\b
Example:
  bon-sr show out.jsonl --id capital
"""


@main.command(epilog=SHOW_EXAMPLE)
@click.argument("file", type=click.Path(dir_okay=False, path_type=str))
@click.option("--id", "record_id", default=None, metavar="ID", help="Show only the prompt with this id.")
def show(file: str, record_id: str | None) -> None:
    """Show each prompt's candidates in FILE (written by generate or score): text, tokens,
    scores, utilities, answers and votes, with the pick and the rule that chose it marked."""
    from .errors import BonSRError
    from .show import show_file

    try:
        show_file(file, record_id)
    except BonSRError as exc:
        raise click_error(exc) from exc


def _run_command(path: str, common: dict[str, Any], sampling: dict[str, Any], *, candidates: str,
                 scale: dict[str, Any] | None = None) -> None:
    from .errors import BonSRError
    from .jsonl import JsonlWriter
    from .options import resolve
    from .sampling.prompts import read_prompt_file

    output, resume, overwrite = common.pop("output"), common.pop("resume"), common.pop("overwrite")
    keep_candidates, chunk_size = common.pop("keep_candidates"), common.pop("chunk_size")
    keep_embeddings = common.pop("keep_embeddings")
    if resume and overwrite:
        raise click.UsageError("--resume and --overwrite exclude each other.")
    console = _console()
    try:
        # Validate everything cheap before loading a model: bad input fails in a second.
        resolve(selector=common["selector"], answer=common["answer"], answer_regex=common["answer_regex"],
                utility=common["utility"], score=common["score"], logit_stats=common["logit_stats"],
                backend=sampling["backend"], scorer=common["scorer"],
                sampling={k: v for k, v in sampling.items() if k != "backend"},
                scoring=dict(token_set=common["token_set"], layer=common["layer"], norm=common["norm"],
                             window=common["window"], transform=common["transform"],
                             max_batch_tokens=common["batch_tokens"]),
                include_greedy=common.get("include_greedy"))
        if chunk_size is not None and chunk_size < 1:
            raise click.BadParameter("must be >= 1", param_hint="--chunk-size")
        vllm_options = parse_options(common.pop("vllm_opts"))
        ray_config = None
        if scale is not None:
            from .scale.cli import scale_options

            vllm_options, ray_config = scale_options(scale, vllm_options, backend=sampling["backend"],
                                                     scorer=common["scorer"])
            if ray_config is not None and keep_embeddings:
                raise click.UsageError("--embeddings is not written on the Ray path; drop it or --ray.")
        records = read_prompt_file(path, candidates=candidates)
        if "max_new_tokens" in sampling:
            _check_fits_early(path, records, common["model"], sampling["max_new_tokens"], console)
        writer = JsonlWriter(output, mode="resume" if resume else "overwrite" if overwrite else "new")
    except BonSRError as exc:
        raise click_error(exc) from exc
    common["max_batch_tokens"] = common.pop("batch_tokens")
    options = dict(common, **sampling, vllm_options=vllm_options)
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
        if ray_config is not None:
            from .scale.cli import run_ray_generate

            return run_ray_generate(console, writer, todo, skipped, keep_candidates, chunk_size, options, ray_config)
        _run_generate(console, writer, todo, skipped, keep_candidates, chunk_size, options,
                      given=candidates == "require", keep_embeddings=keep_embeddings)


def _check_fits_early(path: str, records: list[Any], model: str, max_new_tokens: int, console: Any) -> None:
    """A prompt longer than the model's context fails here, naming file:line, with the
    tokenizer alone: before the model loads (seconds to minutes) and before any output.
    Anything else that goes wrong here is left for the model load to report."""
    from .errors import InputError
    from .models import model_context, resolve_model
    from .sampling.prompts import check_fits, encode_prompt

    try:
        from transformers import AutoConfig, AutoTokenizer

        model_path = resolve_model(model, progress=_model_progress(console))
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        context = model_context(AutoConfig.from_pretrained(model_path))
    except Exception as exc:  # the load reports it with its own message
        logging.getLogger(__name__).debug("early context check skipped: %s", exc)
        return
    if context is None:
        return
    for record in records:
        try:
            ids = encode_prompt(tokenizer, record.prompt)
        except InputError:
            return  # e.g. chat messages for a model without a chat template: the load says so
        check_fits(ids, max_new_tokens, context, f"{path}:{record.line} (id {record.id!r})")


def _run_generate(console: Any, writer: Any, todo: list[Any], skipped: int, keep_candidates: bool,
                  chunk_size: int | None, options: dict[str, Any], *, given: bool = False,
                  keep_embeddings: bool = False) -> None:
    verbose = bool(click.get_current_context().find_root().params.get("verbose"))
    log_path = engine_log_path(str(writer.path)) if uses_vllm(options) and not verbose else None
    done = [0]
    with stopped_runs_resume(console, writer, done), stop_on_signals(), engine_output_to(log_path, console):
        _generate_loop(console, writer, todo, skipped, keep_candidates, chunk_size, options, given=given,
                       done=done, log_path=log_path, keep_embeddings=keep_embeddings)


def _generate_loop(console: Any, writer: Any, todo: list[Any], skipped: int, keep_candidates: bool,
                   chunk_size: int | None, options: dict[str, Any], *, given: bool, done: list[int],
                   log_path: Path | None, keep_embeddings: bool = False) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    from .api import BestOfN
    from .errors import BonSRError

    started = time.perf_counter()
    try:
        with console.status(f"Loading {options['model']} ({options['backend']} backend)..."):
            bon = BestOfN(progress=_model_progress(console), **options)
    except BonSRError as exc:
        raise click_error(exc) from exc
    try:
        load_s = time.perf_counter() - started
        log_note = f"; vLLM's log: {log_path}" if log_path is not None else ""
        console.print(f"Loaded {bon.model_name} in {load_s:.1f}s (backend {bon.backend}, scorer {bon.scorer_name})"
                      f"{log_note}.")
        tokens = 0
        best_sr: list[float] = []
        t0 = time.perf_counter()
        label = "score" if given else "generate"
        columns = (TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), TextColumn("{task.fields[rate]}"))
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task(label, total=len(todo), rate="")
            selections = bon.select_many([r.prompt for r in todo], ids=[r.id for r in todo],
                                         chunk_size=chunk_size,
                                         candidates=[list(r.candidates or ()) for r in todo] if given else None,
                                         tests=[r.tests for r in todo])
            for record, sel in zip(todo, selections):
                out = {"id": record.id}
                out.update(sel.to_dict(keep_candidates=keep_candidates, include_embeddings=keep_embeddings))
                out["config"] = bon.config_dict()
                writer.write(out)
                done[0] += 1
                tokens += sum(c.num_tokens for c in sel.candidates)
                if "stable_rank" in sel.best.scores:
                    best_sr.append(sel.best.scores["stable_rank"])
                elapsed = time.perf_counter() - t0
                progress.update(task, advance=1, rate=f"{tokens / max(elapsed, 1e-9):.0f} tok/s")
    finally:
        # Engines shut down before the interpreter exits, the way vLLM expects: at exit its
        # monitor thread would see them die first and report "engine core exited unexpectedly".
        bon.close()
    elapsed = time.perf_counter() - t0
    sr_note = (f"; mean stable rank of the selected responses {sum(best_sr) / len(best_sr):.3f}"
               if best_sr else "")
    console.print(
        f"[green]Done:[/] {done[0]} prompts written to {writer.path} ({skipped} skipped as already done); "
        f"{tokens} candidate tokens in {elapsed:.1f}s ({tokens / max(elapsed, 1e-9):.0f} tok/s){sr_note}."
    )


# The sub-commands live beside the code they drive; each imports its heavy parts inside the
# command, so registering them here keeps `bon-sr --help` fast.
for _command in (bench, rank_eval, ablate, train, serve):
    main.add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    main()
