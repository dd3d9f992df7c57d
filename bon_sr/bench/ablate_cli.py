"""Click command ``ablate``, registered by ``bon_sr.cli``.

A thin layer over ``bench.ablate``: parses the grid, draws rich progress on stderr, turns
bon-sr errors into ``click.ClickException``. Heavy imports happen inside the command.
"""

from __future__ import annotations

import click

from ..cli_runtime import progress_bars


def _parse_layers(value: str) -> tuple[int, ...] | None:
    if value.strip().lower() == "all":
        return None
    try:
        layers = tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected 'all' or comma-separated integers such as -1,12,20, "
                                 f"got {value!r}") from None
    if not layers:
        raise click.BadParameter("give at least one layer")
    return layers


def _split(value: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in value.split(",") if x.strip())


@click.command("ablate")
@click.option("--cache", "cache_dir", required=True, type=click.Path(file_okay=False, exists=True),
              help="Output directory of `bon-sr bench` (reads DIR/cache/<task>.jsonl).")
@click.option("--task", default=None, help="Task in the cache (default: the only one there).")
@click.option("--variants", default=None,
              help="Comma-separated variant specs; join transforms with '+' (e.g. center+drop-massive). "
                   "Default: paper,center,drop-first,drop-special,drop-massive-seq,drop-massive,standardize,"
                   "center+drop-massive,paper+length,center+length.")
@click.option("--consensus", default=None,
              help="Comma-separated embeddings (last, mean): add hidden-state MBR cells (raw and centred, "
                   "named mbr-hidden-*) beside the variants at every layer and norm, from the same pass. "
                   "Default: none.")
@click.option("--layers", default="-1", show_default=True,
              help="Comma-separated decoder layers (Python indexing, -1 = last) or 'all'.")
@click.option("--norms", default="post", show_default=True, help="Comma-separated: post, pre (final norm).")
@click.option("--token-set", type=click.Choice(["response", "response+eot", "full"]), default="response",
              show_default=True, help="Rows of H that are scored.")
@click.option("--scoring-model", default=None,
              help="Frozen model that computes H (default: the generator named in the cache's meta.json). "
                   "Another model scores the cached texts re-encoded with its own tokenizer.")
@click.option("--random-init", is_flag=True,
              help="Control: a randomly initialised copy of the scoring model's architecture (must show no signal).")
@click.option("--calibration-problems", type=int, default=16, show_default=True,
              help="First K problems whose candidates give drop-massive/standardize statistics (labels unused).")
@click.option("--limit", type=int, default=None, help="Use the first K cached problems.")
@click.option("--dtype", default="auto", show_default=True, help="Model dtype: auto, bfloat16, float16, float32.")
@click.option("--device", default=None, help="Torch device (default: cuda if available).")
@click.option("--max-batch-tokens", type=int, default=8192, show_default=True,
              help="Padded tokens per forward pass (bounds memory; every requested layer is held at once).")
@click.option("--bootstrap", type=int, default=1000, show_default=True, help="Bootstrap resamples for the CIs.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap and the random init.")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for OUT/ablate.json, .md, .png and the resumable OUT/cells/.")
def ablate(cache_dir: str, task: str | None, variants: str | None, consensus: str | None, layers: str, norms: str, token_set: str,
           scoring_model: str | None, random_init: bool, calibration_problems: int, limit: int | None, dtype: str,
           device: str | None, max_batch_tokens: int, bootstrap: int, seed: int, out_dir: str) -> None:
    """Scorer ablation over cached bench samples: within-prompt AUC, pairwise and Best-of-N
    accuracy of every variant x norm x layer cell, with a heat map. Resumes from OUT/cells."""
    from ..errors import BonSRError
    from .ablate import AblateConfig, run_ablate

    try:
        extra = {"variants": _split(variants)} if variants else {}
        if consensus:
            extra["consensus"] = _split(consensus)
        config = AblateConfig(cache_dir=cache_dir, task=task, layers=_parse_layers(layers), norms=_split(norms),
                              token_set=token_set, scoring_model=scoring_model, random_init=random_init,
                              calibration_problems=calibration_problems, limit=limit, dtype=dtype, device=device,
                              max_batch_tokens=max_batch_tokens, bootstrap=bootstrap, seed=seed, **extra)
        with progress_bars() as progress:
            summary = run_ablate(config, out_dir, progress=progress)
    except BonSRError as exc:
        raise click.ClickException(str(exc)) from exc
    cells = sorted(summary["cells"], key=lambda c: -(c["auc"] if c["auc"] is not None else -1))
    control = "  [random-init control]" if summary["random_init"] else ""
    click.echo(f"{summary['task']}: {summary['problems']} problems, {summary['mixed_problems']} mixed; "
               f"within-prompt AUC (0.5 = no signal){control}:")
    for c in cells[:10]:
        auc = "n/a" if c["auc"] is None else f"{c['auc']:.3f}  [{c['auc_ci95'][0]:.3f}, {c['auc_ci95'][1]:.3f}]"
        click.echo(f"  {c['variant']:24s} {c['norm']:4s} L{c['layer']:<3d} {auc}")
    click.echo(f"Reports: {out_dir}/ablate.md, .json, .png")
