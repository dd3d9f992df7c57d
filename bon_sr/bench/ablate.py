"""Scorer ablation over cached bench samples: variants x norms x layers, no regeneration.

Reads one task's cache written by ``bon-sr bench`` (``DIR/cache/<task>.jsonl``), re-runs a
frozen *scoring* model over the cached candidates and, for every cell (variant, norm,
layer), computes each candidate's score, then the within-prompt AUC, pairwise accuracy
and Best-of-N accuracy (``bench.metrics``) next to greedy, random, majority vote, the
oracle and the cache's own reference scores (mean log-prob, self-certainty, length).

- Scoring model: the generator (``meta.json``'s model) by default; then the cached token
  ids are used exactly. Another model gets the cached *texts* re-encoded with its own
  tokenizer and chat template (token ids do not cross tokenizers).
- ``random_init``: a randomly initialised copy of the scoring model's architecture (seeded),
  the control: it knows nothing about the answers, so its cells must show no signal.
- One teacher-forced pass per micro-batch captures every requested layer at once (hooks),
  with the same layer/norm semantics as ``hidden_states.iter_hidden_states``; the cell
  (``paper``, post, last layer) is always added as the reference.
- Calibrated variants (``drop-massive``, ``standardize``) take per-dimension statistics
  from the candidates of the first ``calibration_problems`` problems, at the same layer
  and norm, before any transform. Correctness labels are never used for calibration.
- Only problems with mixed correctness are run through the model: the AUC and pairwise
  accuracy use only them, and on an all-right or all-wrong problem every pick scores the
  same, so those candidates get a constant score (0.0) and BoN accuracy is unchanged. On
  the GSM8K cache this skips about 40% of the forward passes. Calibration still reads the
  first ``calibration_problems`` problems whatever their labels.
- Resumable: each finished cell is written to ``OUT/cells/<variant>__<norm>__L<layer>.json``
  (and calibration statistics next to them); a rerun computes only missing cells.
  ``OUT/cells/meta.json`` pins what the cells were made from; a mismatch is refused.
- Consensus cells (``consensus=("last", "mean")``, ``--consensus``; off by default): for every
  requested norm and layer, hidden-state MBR beside the SR variants, from the SAME pass's
  states: each candidate's embedding of its scored rows (``hidden_states.embedding_summary``:
  the last row, the mean row), cosine similarities within its prompt's candidates, raw and
  centred (``consensus.hidden_similarity``), and its MBR utility (``consensus.mbr_utilities``)
  as the cell's score, so the AUC and the max-score pick are the MBR selector's. Their variant
  names are ``mbr-`` + the product's utility name (``mbr-hidden-last-centred``).

Reports: ``OUT/ablate.json``, ``OUT/ablate.md`` and ``OUT/ablate.png`` (layer x variant
heat map of the within-prompt AUC, one panel per norm). This module draws no progress
bars (it calls ``progress``) and knows nothing about the CLI.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .ablate_report import write_ablate_report
from ..selection.consensus import EMBEDDING_KEYS, UTILITIES, Utility, hidden_similarity, mbr_utilities
from ..errors import ConfigError, InputError
from ..jsonl import write_text_atomic
from ..scoring.hidden_states import (NORMS, TOKEN_SETS, HiddenStateConfig, decoder_parts, embedding_summary,
                             end_of_turn_id, extract, model_special_ids, scored_token_ids, with_end_of_turn)
from ..models import ProgressFn
from ..scoring.stable_rank import stable_rank
from ..scoring.variants import CalibrationAccumulator, CalibrationStats, TransformContext, length_corrected, parse_variant
from .metrics import bon_accuracy, bootstrap_ci, bootstrap_indices, mean_ci, pairwise_accuracy, within_prompt_auc
from .runner import scored_candidate, cache_paths, is_mixed, read_cache
from .selectors import get_bench_selector

logger = logging.getLogger(__name__)

PAPER = "paper"
DEFAULT_VARIANTS = ("paper", "center", "drop-first", "drop-special", "drop-massive-seq", "drop-massive",
                    "standardize", "center+drop-massive", "paper+length", "center+length")
#: cached scores reported as reference rows (name -> cache key)
REFERENCE_SCORES = {"sr-response (cached)": "sr_response", "mean-logprob": "mean_logprob",
                    "self-certainty": "self_certainty", "length (longer)": "num_tokens"}
NOTE = ("AUC = within-prompt Mann-Whitney AUC of the score for right vs wrong candidates, mean over prompts "
        "with mixed correctness (0.5 = no signal, < 0.5 = the score prefers wrong answers); BoN = accuracy of "
        "the max-score candidate over all N, ties split; 95% CI = percentile bootstrap over prompts "
        "(paired for the difference with the paper's cell). Many cells are compared: about 1 in 20 is expected "
        "to clear 0.5 by chance, and the best cell's AUC is optimistic.")
#: prefix of a consensus cell's variant name: ``mbr-`` + a hidden utility of ``bon_sr.selection.consensus``
CONSENSUS_PREFIX = "mbr-"
CONSENSUS_NOTE = (" mbr-hidden-* cells: hidden-state MBR at that norm and layer; a candidate's score is its "
                  "mean cosine similarity to the other candidates of its prompt (centred: the group's mean "
                  "embedding removed first), so BoN is the MBR pick.")


@dataclass(frozen=True)
class AblateConfig:
    """One ablation run over one task's cache. ``layers=None`` means every layer."""

    cache_dir: str
    task: str | None = None
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    layers: tuple[int, ...] | None = (-1,)
    norms: tuple[str, ...] = ("post",)
    token_set: str = "response"
    scoring_model: str | None = None
    random_init: bool = False
    calibration_problems: int = 16
    limit: int | None = None
    dtype: str = "auto"
    device: str | None = None
    max_batch_tokens: int = 8192
    bootstrap: int = 1000
    seed: int = 0
    consensus: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for v in self.variants:
            parse_variant(v)
        for key in self.consensus:
            if key not in EMBEDDING_KEYS:
                raise ConfigError(f"Unknown consensus embedding '{key}'. Available: {', '.join(EMBEDDING_KEYS)}")
        if self.consensus and self.token_set == "full":
            raise ConfigError("Consensus cells embed the response rows; use --token-set response or "
                              "response+eot with --consensus.")
        for n in self.norms:
            if n not in NORMS:
                raise ConfigError(f"Unknown norm '{n}'. Available: {', '.join(NORMS)}")
        if self.token_set not in TOKEN_SETS:
            raise ConfigError(f"Unknown token set '{self.token_set}'. Available: {', '.join(TOKEN_SETS)}")
        if self.calibration_problems < 1:
            raise ConfigError(f"calibration_problems must be >= 1, got {self.calibration_problems}")
        if self.bootstrap < 100:
            raise ConfigError(f"bootstrap must be >= 100 resamples, got {self.bootstrap}")
        if not self.variants or not self.norms:
            raise ConfigError("Give at least one variant and one norm.")


Cell = tuple[str, str, int]   # (variant spec, norm, layer index >= 0)


def _score(scores: Mapping[str, Any], key: str) -> float:
    """A cached score as a float: missing or null (an undefined score: JSON has no NaN) is NaN."""
    value = scores.get(key)
    return math.nan if value is None else float(value)


def cell_name(cell: Cell) -> str:
    """The stem of a cell's file in OUT/cells/, e.g. ``paper__post__L23``."""
    return f"{cell[0]}__{cell[1]}__L{cell[2]}"


def consensus_variants(keys: Sequence[str]) -> list[str]:
    """The consensus cells' variant names for embedding ``keys`` (raw and centred each)."""
    return [CONSENSUS_PREFIX + u.name for u in UTILITIES.values() if u.embedding in keys]


def consensus_utility(variant: str) -> Utility | None:
    """The hidden utility a consensus cell's variant names; None for an SR variant."""
    if not variant.startswith(CONSENSUS_PREFIX):
        return None
    return UTILITIES[variant[len(CONSENSUS_PREFIX):]]


def length_correction(variant: str) -> bool:
    """Whether a cell's scores are length-corrected (never for a consensus cell)."""
    return consensus_utility(variant) is None and parse_variant(variant).length_correction


# -- inputs ----------------------------------------------------------------------------------

def find_cache(cache_dir: str | Path, task: str | None) -> tuple[str, Path, dict[str, Any]]:
    """(task name, cache path, meta) of the bench cache in ``cache_dir``."""
    base = Path(cache_dir) / "cache"
    tasks = sorted(p.stem for p in base.glob("*.jsonl") if p.stem != "rank_eval") if base.is_dir() else []
    if task is None:
        if len(tasks) != 1:
            found = ", ".join(tasks) or "none"
            raise InputError(f"{base} must hold exactly one task cache to pick it implicitly (found: {found}); "
                             "pass --task.")
        task = tasks[0]
    path, meta_path = cache_paths(Path(cache_dir), task)
    if not path.is_file():
        raise InputError(f"No bench cache {path}; run `bon-sr bench --task {task} -o {cache_dir}` first.")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return task, path, meta


def _load_scoring_model(name: str, config: AblateConfig, progress: ProgressFn | None) -> tuple[Any, Any]:
    from ..models import load_hf_model
    from ..models import resolve_model

    model, tokenizer = load_hf_model(resolve_model(name, progress=progress), device=config.device,
                                     dtype=config.dtype)
    if config.random_init:
        from transformers import AutoModelForCausalLM

        # Same architecture, tokenizer and dtype; only the weights are noise.
        torch.manual_seed(config.seed)
        dtype = next(model.parameters()).dtype
        device = next(model.parameters()).device
        rand = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
        rand.generation_config = model.generation_config
        del model
        model = rand.to(device).eval()
        model.requires_grad_(False)
    return model, tokenizer


def _token_ids(records: Sequence[Mapping[str, Any]], tokenizer: Any, reuse: bool) -> tuple[list, list, list]:
    """Flat (prompt ids, response ids, problem index) over every problem's candidates."""
    from ..sampling.prompts import encode_prompt, encode_response

    prompts, responses, owner = [], [], []
    for k, rec in enumerate(records):
        p = list(rec["prompt_token_ids"]) if reuse else encode_prompt(tokenizer, rec["prompt"])
        for c in rec["candidates"]:
            prompts.append(p)
            responses.append(list(c["token_ids"]) if reuse else encode_response(tokenizer, c["text"]))
            owner.append(k)
    return prompts, responses, owner


# -- the run ---------------------------------------------------------------------------------

@dataclass
class _Inputs:
    prompts: list
    responses: list
    owner: list
    special_ids: frozenset = field(default_factory=frozenset)


def _calibrate(model: Any, inputs: _Inputs, keys: Sequence[tuple[str, int]], config: AblateConfig,
               report: ProgressFn) -> dict[tuple[str, int], CalibrationStats]:
    sel = [i for i, k in enumerate(inputs.owner) if k < config.calibration_problems]
    accs = {key: CalibrationAccumulator() for key in keys}
    done = 0
    for b in extract(model, [inputs.prompts[i] for i in sel], [inputs.responses[i] for i in sel], views=keys,
                     token_set=config.token_set, max_batch_tokens=config.max_batch_tokens):
        for key, h in b.states.items():
            accs[key].update(h, b.mask)
        done += len(b.indices)
        report("calibrating", done, len(sel))
    return {key: acc.finish() for key, acc in accs.items()}


def score_cells(model: Any, inputs: _Inputs, cells: Sequence[Cell],
                stats: Mapping[tuple[str, int], CalibrationStats], config: AblateConfig,
                report: ProgressFn) -> dict[Cell, list[float]]:
    """Per-candidate SR of each cell's row transforms (length correction comes later), and
    the MBR utilities of the consensus cells, from one pass."""
    keys = sorted({(n, lay) for _, n, lay in cells})
    mbr_cells = [c for c in cells if consensus_utility(c[0]) is not None]
    sr_cells = [c for c in cells if c not in mbr_cells]
    row_specs = {cell: "+".join(p.name for p in parse_variant(cell[0]).row_parts) or "raw" for cell in sr_cells}
    sr: dict[tuple[str, str, int], list[float]] = {}
    # (norm, layer) -> per candidate {"last": ..., "mean": ...} of its scored rows
    embs: dict[tuple[str, int], list] = {(n, lay): [None] * len(inputs.owner) for _, n, lay in mbr_cells}
    span_cfg = HiddenStateConfig(token_set=config.token_set)
    done = 0
    for b in extract(model, inputs.prompts, inputs.responses, views=keys, token_set=config.token_set,
                     max_batch_tokens=config.max_batch_tokens):
        batch, states, mask = b.indices, b.states, b.mask
        ids = scored_token_ids(inputs.prompts, inputs.responses, batch, mask.shape[1], span_cfg)
        for (norm, layer), h in states.items():
            if (norm, layer) in embs:
                for row, i in enumerate(batch):
                    embs[(norm, layer)][i] = embedding_summary(h[row, : int(mask[row].sum())])
            for spec in sorted({row_specs[c] for c in sr_cells if c[1] == norm and c[2] == layer}):
                variant = parse_variant(spec)
                ctx = TransformContext(stats=stats.get((norm, layer)), token_ids=ids, special_ids=inputs.special_ids)
                hv, mv = variant.apply(h, mask, ctx)
                values = stable_rank(hv, mv).stable_rank.tolist()
                out = sr.setdefault((spec, norm, layer), [math.nan] * len(inputs.owner))
                for row, i in enumerate(batch):
                    out[i] = float(values[row]) if len(inputs.responses[i]) else math.nan
        done += len(batch)
        report("scoring cells", done, len(inputs.owner))
    # No problem with mixed correctness means no rows at all: every cell is empty, not a KeyError.
    result = {cell: sr.get((row_specs[cell], cell[1], cell[2]), [math.nan] * len(inputs.owner)) for cell in sr_cells}
    groups: dict[int, list[int]] = {}
    for i, k in enumerate(inputs.owner):
        groups.setdefault(k, []).append(i)
    for cell in mbr_cells:
        utility = consensus_utility(cell[0])
        values = [math.nan] * len(inputs.owner)
        for members in groups.values():
            vectors = [embs[(cell[1], cell[2])][i][utility.embedding] for i in members]
            for i, u in zip(members, mbr_utilities(hidden_similarity(vectors, centred=utility.centred))):
                values[i] = u
        result[cell] = values
    return result


def cell_groups(records: Sequence[Mapping[str, Any]], values: Sequence[float], owner: Sequence[int],
                length: bool) -> list[tuple[list[float], list[bool]]]:
    """One ``(scores, correct)`` group per record from a cell's per-candidate ``values``
    (``owner[i]``: the record of candidate i), length-corrected when ``length``."""
    groups: list[tuple[list[float], list[bool]]] = [([], []) for _ in records]
    for v, k in zip(values, owner):
        groups[k][0].append(v)
    for k, rec in enumerate(records):
        groups[k][1].extend(bool(c["correct"]) for c in rec["candidates"])
        if length:
            lengths = [len(c["token_ids"]) for c in rec["candidates"]]
            groups[k] = (length_corrected(groups[k][0], lengths), groups[k][1])
    return groups


def cell_metrics(groups: Sequence[tuple[Sequence[float], Sequence[bool]]], config: AblateConfig) -> dict[str, Any]:
    """A cell's within-prompt AUC, pairwise and Best-of-N accuracy with CIs (the report's row)."""
    kw = {"bootstrap": config.bootstrap, "seed": config.seed}
    auc = within_prompt_auc(groups, **kw)
    bon = bon_accuracy(groups, **kw)
    return {"auc": auc["auc"], "auc_ci95": auc["ci95"], "prompts": auc["prompts"],
            "pairwise": pairwise_accuracy(groups, **kw), "bon": {k: v for k, v in bon.items() if k != "per_problem"},
            "_bon_per_problem": bon["per_problem"]}


def _per_prompt_auc(groups: Sequence[tuple[Sequence[float], Sequence[bool]]]) -> list[float | None]:
    from .metrics import prompt_auc

    return [prompt_auc(s, c) for s, c in groups]


def _baselines(records: Sequence[Mapping[str, Any]], config: AblateConfig) -> dict[str, Any]:
    kw = {"bootstrap": config.bootstrap, "seed": config.seed}
    majority = get_bench_selector("majority").fn
    per: dict[str, list[float]] = {"greedy": [], "random": [], "majority": [], "oracle": []}
    for rec in records:
        correct = [bool(c["correct"]) for c in rec["candidates"]]
        per["greedy"].append(float(rec["greedy"]["correct"]) if "greedy" in rec else math.nan)
        per["random"].append(sum(correct) / len(correct))
        w = majority([scored_candidate(c) for c in rec["candidates"]])
        per["majority"].append(float(sum(wi * c for wi, c in zip(w, correct))))
        per["oracle"].append(float(any(correct)))
    if any(math.isnan(x) for x in per["greedy"]):
        del per["greedy"]
    return {name: mean_ci(values, **kw) for name, values in per.items()}


def _read_saved(path: Path) -> dict[str, Any] | None:
    """A finished cell or calibration file; None when missing or cut short (an older
    version's crash mid-write): it is then computed again."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        logger.warning("Recomputing %s: the file is incomplete (an interrupted run)", path)
        return None


def run_ablate(config: AblateConfig, out_dir: str | Path, *, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Compute the missing cells, write ``OUT/ablate.{json,md,png}``, return the summary."""
    report = progress or (lambda msg, done, total: None)
    out_dir = Path(out_dir)
    task, cache_path, meta = find_cache(config.cache_dir, config.task)
    all_records = read_cache(cache_path)
    records = list(all_records.values())[: config.limit] if config.limit else list(all_records.values())
    records = [r for r in records if r.get("candidates")]
    if not records:
        raise InputError(f"{cache_path} holds no problems with candidates.")
    generator = meta.get("model")
    scorer_name = config.scoring_model or generator
    if not scorer_name:
        raise ConfigError(f"{cache_path.parent} has no meta.json naming the generator; pass --scoring-model.")
    reuse_ids = scorer_name == generator

    cells_dir = out_dir / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    identity = {"cache": str(cache_path.resolve()), "task": task, "generator": generator,
                "scoring_model": scorer_name, "random_init": config.random_init, "token_set": config.token_set,
                "dtype": config.dtype, "seed": config.seed, "calibration_problems": config.calibration_problems,
                "problem_ids": [str(r["id"]) for r in records], "uniform_problems": "constant score"}
    meta_path = cells_dir / "meta.json"
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        diff = [k for k in identity if old.get(k) != identity[k]]
        if diff:
            raise ConfigError(f"{out_dir} holds cells made with other settings ({', '.join(diff)} differ); "
                              "use another output directory, or the same settings to resume.")
    write_text_atomic(meta_path, json.dumps(identity, indent=2))

    report(f"loading {scorer_name}{' (random init)' if config.random_init else ''}", None, None)
    model, tokenizer = _load_scoring_model(scorer_name, config, progress)
    num_layers = len(decoder_parts(model)[1])
    if config.layers is None:
        layers = list(range(num_layers))
    else:
        for lay in config.layers:
            if not -num_layers <= lay < num_layers:
                raise ConfigError(f"layer {lay} is out of range for a model with {num_layers} layers "
                                  f"(use -{num_layers}..{num_layers - 1} or 'all')")
        layers = sorted({lay % num_layers for lay in config.layers})
    reference: Cell = (PAPER, "post", num_layers - 1)
    mbr_variants = consensus_variants(config.consensus)
    cells: list[Cell] = [(v, n, lay) for v in [*config.variants, *mbr_variants] for n in config.norms
                         for lay in layers]
    if reference not in cells:
        cells.insert(0, reference)

    results: dict[Cell, list[float]] = {}
    for cell in cells:
        saved = _read_saved(cells_dir / f"{cell_name(cell)}.json")
        if saved is not None:
            results[cell] = [math.nan if v is None else v for v in saved["scores"]]
    todo = [c for c in cells if c not in results]
    if todo:
        prompts, responses, owner = _token_ids(records, tokenizer, reuse_ids)
        if config.token_set == "response+eot":
            responses = with_end_of_turn(responses, end_of_turn_id(model, tokenizer))
        special = frozenset(getattr(tokenizer, "all_special_ids", []) or []) | model_special_ids(model)
        inputs = _Inputs(prompts, responses, owner, special)
        stats: dict[tuple[str, int], CalibrationStats] = {}
        need = sorted({(n, lay) for v, n, lay in todo
                       if consensus_utility(v) is None and parse_variant(v).needs_calibration})
        missing = []
        for key in need:
            saved = _read_saved(cells_dir / f"calibration__{key[0]}__L{key[1]}.json")
            if saved is not None:
                stats[key] = CalibrationStats.from_dict(saved)
            else:
                missing.append(key)
        if missing:
            for key, st in _calibrate(model, inputs, missing, config, report).items():
                stats[key] = st
                write_text_atomic(cells_dir / f"calibration__{key[0]}__L{key[1]}.json",
                                  json.dumps(st.to_dict()))
        mixed_problems = {k for k, rec in enumerate(records) if is_mixed(rec)}
        sel = [i for i, k in enumerate(owner) if k in mixed_problems]
        scored = _Inputs([prompts[i] for i in sel], [responses[i] for i in sel], [owner[i] for i in sel], special)
        for cell, part in score_cells(model, scored, todo, stats, config, report).items():
            values = [0.0] * len(owner)
            for j, i in enumerate(sel):
                values[i] = part[j]
            results[cell] = values
            clean = [None if math.isnan(v) else v for v in values]
            # Atomic: a run killed while writing cells leaves whole cells, never a torn one.
            write_text_atomic(cells_dir / f"{cell_name(cell)}.json",
                              json.dumps({"cell": list(cell), "scores": clean}))
    del model

    owner = [k for k, rec in enumerate(records) for _ in rec["candidates"]]
    report("evaluating", None, None)
    summary_cells = []
    ref_groups = cell_groups(records, results[reference], owner, False)
    ref_auc = _per_prompt_auc(ref_groups)
    mixed = [i for i, a in enumerate(ref_auc) if a is not None]
    idx = bootstrap_indices(len(mixed), config.bootstrap, config.seed) if mixed else None
    for cell in cells:
        groups = cell_groups(records, results[cell], owner, length_correction(cell[0]))
        m = cell_metrics(groups, config)
        m.pop("_bon_per_problem")
        entry = {"variant": cell[0], "norm": cell[1], "layer": cell[2], **m}
        if idx is not None and cell != reference:
            aucs = _per_prompt_auc(groups)
            diff = np.array([aucs[i] - ref_auc[i] for i in mixed], dtype=float)
            lo, hi = bootstrap_ci(diff, idx)
            entry["auc_vs_paper"] = {"diff": float(diff.mean()), "ci95": [lo, hi]}
        summary_cells.append(entry)
    refs = {}
    for name, key in REFERENCE_SCORES.items():
        values = [_score(c.get("scores") or {}, key) for rec in records for c in rec["candidates"]]
        m = cell_metrics(cell_groups(records, values, owner, False), config)
        m.pop("_bon_per_problem")
        refs[name] = m
    summary = {
        "task": task, "cache": str(cache_path), "generator": generator, "scoring_model": scorer_name,
        "random_init": config.random_init, "token_set": config.token_set, "reused_token_ids": reuse_ids,
        "problems": len(records), "mixed_problems": len(mixed),
        "n_samples": min(len(r["candidates"]) for r in records), "num_layers": num_layers, "layers": layers,
        "norms": list(config.norms), "variants": list(dict.fromkeys([PAPER, *config.variants, *mbr_variants])),
        "reference_cell": list(reference), "cells": summary_cells, "reference_scores": refs,
        "baselines": _baselines(records, config), "config": asdict(config),
        "note": NOTE + (CONSENSUS_NOTE if mbr_variants else ""),
    }
    if not config.consensus:
        del summary["config"]["consensus"]   # without the option, the report's layout is the old one
    write_ablate_report(summary, out_dir)
    return summary


# -- reports ---------------------------------------------------------------------------------
