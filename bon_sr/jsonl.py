"""Crash-safe JSON Lines output: append one complete line per record, resume by id.

Each record is encoded fully in memory and written with a single ``write`` + flush +
fsync, so a crash or Ctrl-C leaves every finished record intact. A torn last line (from
a crash mid-write or a full disk) is cut off on resume. Knows nothing about what the
records mean beyond their ``id`` field.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from .errors import InputError


def _repair_tail(path: Path) -> int:
    """Cut a trailing partial line; return how many bytes were removed."""
    with path.open("rb+") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        if size == 0:
            return 0
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return 0
        # Scan back to the last newline: everything after it was never completed.
        pos = size - 1
        chunk = 1 << 16
        while pos > 0:
            start = max(0, pos - chunk)
            fh.seek(start)
            data = fh.read(pos - start)
            idx = data.rfind(b"\n")
            if idx >= 0:
                keep = start + idx + 1
                fh.truncate(keep)
                return size - keep
            pos = start
        fh.truncate(0)
        return size


def iter_json_lines(path: str | Path, *, what: str = "a JSON object") -> Iterator[tuple[int, str, dict[str, Any]]]:
    """Yield ``(line number, "file:line", object)`` for each non-blank line of a JSONL input file;
    malformed JSON or a non-object raises InputError naming file:line."""
    path = Path(path)
    # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first line.
    for lineno, raw in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno}). "
                             f"Each line must be {what}.") from exc
        if not isinstance(obj, dict):
            raise InputError(f"{where}: expected {what}, got {type(obj).__name__}.")
        yield lineno, where, obj


def read_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield the records of a JSONL file, naming file:line on a malformed line."""
    path = Path(path)
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{lineno}: malformed JSON in existing output ({exc.msg}). "
                                 "Fix or remove that line, or start over with --overwrite.") from exc


class JsonlWriter:
    """Appends records to ``path``. ``mode``: ``new`` (fail if it exists and is not empty),
    ``resume`` (keep finished records; ``finished_ids`` lists them) or ``overwrite``."""

    def __init__(self, path: str | Path, *, mode: str = "new", id_field: str = "id"):
        self.path = Path(path)
        self.id_field = id_field
        self.finished_ids: set[str] = set()
        self.repaired_bytes = 0
        if mode not in ("new", "resume", "overwrite"):
            raise ValueError(f"unknown mode {mode!r}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"Cannot create the output folder '{self.path.parent}': {exc.strerror}.") from exc
        if self.path.is_dir():
            raise InputError(f"Output '{self.path}' is a directory; give a file name such as out.jsonl.")
        exists = self.path.exists() and self.path.stat().st_size > 0
        if exists and mode == "new":
            raise InputError(f"Output '{self.path}' already exists. Pass --resume to continue it "
                             "or --overwrite to start over.")
        if exists and mode == "resume":
            try:
                self.repaired_bytes = _repair_tail(self.path)
            except OSError as exc:
                raise InputError(f"Cannot write the output '{self.path}': {exc.strerror}.") from exc
            self.finished_ids = {str(r.get(id_field)) for r in read_records(self.path)}
        try:
            # Unbuffered binary: each record goes out in one write() of the whole line.
            self._fh = self.path.open("wb" if mode == "overwrite" else "ab", buffering=0)
        except OSError as exc:
            raise InputError(f"Cannot write the output '{self.path}': {exc.strerror}. "
                             "Choose a writable location with -o.") from exc

    def write(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        written = 0
        while written < len(data):
            written += self._fh.write(data[written:])
        os.fsync(self._fh.fileno())
        self.finished_ids.add(str(record.get(self.id_field)))

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
