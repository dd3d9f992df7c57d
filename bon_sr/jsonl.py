"""Crash-safe JSON Lines output: append one complete line per record, resume by id.

Each record is encoded fully in memory and written with a single ``write`` + flush +
fsync, so a crash or Ctrl-C leaves every finished record intact. A torn last line (from
a crash mid-write or a full disk) is cut off on resume. Knows nothing about what the
records mean beyond their ``id`` field.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import stat
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import InputError

logger = logging.getLogger(__name__)


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, +-inf) replaced by None, through dicts,
    lists and tuples (tuples become lists, as JSON writes them): JSON has no NaN, and a
    strict parser (JavaScript's, Go's, ``json.loads(parse_constant=...)``) refuses Python's
    ``NaN`` literal. Why a score is undefined is for the record to say beside it
    (``Candidate.undefined_scores``)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def dumps_json(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` that always gives valid JSON: non-finite floats become null."""
    try:
        return json.dumps(value, allow_nan=False, **kwargs)
    except ValueError:  # a NaN or inf somewhere: the walk is paid only then
        return json.dumps(finite_or_none(value), allow_nan=False, **kwargs)


def dumps_line(record: Any) -> str:
    """One JSONL line (UTF-8 text, newline-terminated) of ``record``, valid JSON."""
    return dumps_json(record, ensure_ascii=False) + "\n"


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


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a whole file so that a crash leaves either the old file or the new one, never
    a torn one: a temporary file beside it, fsync, then rename over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _check_regular(path: Path, what: str) -> None:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        dangling = " (a symbolic link to a missing file)" if path.is_symlink() else ""
        raise InputError(f"{what} '{path}' does not exist{dangling}.") from None
    except OSError as exc:
        raise InputError(f"{what} '{path}' cannot be read: {exc.strerror or exc}.") from exc
    if stat.S_ISDIR(mode):
        raise InputError(f"{what} '{path}' is a directory; give a file.")
    if not stat.S_ISREG(mode):
        # A FIFO or device would block or never end: bon-sr reads the whole file up front.
        raise InputError(f"{what} '{path}' is not a regular file (a pipe or device); write it to a file first.")


def read_text_file(path: str | Path, *, what: str = "Input file") -> str:
    """The text of a UTF-8 input file, or an InputError that names the file (and the line,
    for bytes that are not UTF-8 and NUL bytes). A leading byte-order mark is dropped
    (Windows editors write one)."""
    path = Path(path)
    _check_regular(path, what)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{what} '{path}' cannot be read: {exc.strerror or exc}.") from exc
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        offset = exc.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = data.count(b"\n", 0, offset) + 1
        hint = " (it looks like UTF-16: save it as UTF-8)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise InputError(f"{path}:{line}: not UTF-8 text (byte 0x{data[offset]:02x} at byte offset {offset})"
                         f"{hint}.") from None
    nul = text.find("\x00")
    if nul >= 0:
        raise InputError(f"{path}:{text.count(chr(10), 0, nul) + 1}: contains a NUL byte; is this a binary file?")
    return text


def text_lines(text: str) -> list[str]:
    """Lines split at \\n only (a \\r before it is dropped): ``str.splitlines`` would also
    split inside a JSON string at U+2028, form feeds and the like, which JSON allows raw."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _file_lines(path: Path, what: str) -> Iterator[tuple[int, str, bool]]:
    """(line number, text, ended by a newline) of a UTF-8 file, streamed (an output file may
    be large): a leading byte-order mark dropped, a \\r before the \\n too; bytes that are
    not UTF-8 and NUL bytes are an InputError naming file:line."""
    _check_regular(path, what)
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise InputError(f"{what} '{path}' cannot be read: {exc.strerror or exc}.") from exc
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            ended = raw.endswith(b"\n")
            body = raw[:-1] if ended else raw
            if body.endswith(b"\r"):
                body = body[:-1]
            if lineno == 1 and body.startswith(b"\xef\xbb\xbf"):
                body = body[3:]
            try:
                line = body.decode("utf-8")
            except UnicodeDecodeError as exc:
                hint = (" (it looks like UTF-16: save it as UTF-8)"
                        if lineno == 1 and raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "")
                raise InputError(f"{path}:{lineno}: not UTF-8 text (byte 0x{body[exc.start]:02x} at column "
                                 f"{exc.start + 1}){hint}.") from None
            if "\x00" in line:
                raise InputError(f"{path}:{lineno}: contains a NUL byte; is this a binary file?")
            yield lineno, line, ended


def iter_json_lines(path: str | Path, *, what: str = "a JSON object", text: str | None = None, hint: str = "",
                    torn_tail: bool = False, file_what: str = "Input file"
                    ) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """THE JSONL reader (prompt files, output records, caches, ``bon-sr show``): yield
    ``(line number, "file:line", object)`` for each non-blank line. A byte-order mark, bytes
    that are not UTF-8, NUL bytes, malformed JSON and a line that is not an object are an
    InputError naming file:line (``hint`` is added to the message). ``text``: the file's
    text when the caller has read it already; else the file is streamed. ``torn_tail``: a
    last line without its newline that is not valid JSON (a writer killed mid-line) is
    skipped instead (the writer's ``resume`` cuts it off)."""
    path = Path(path)
    if text is None:
        lines: Iterable[tuple[int, str, bool]] = _file_lines(path, file_what)
    else:
        lines = ((k, line, True) for k, line in enumerate(text_lines(text), start=1))
    for lineno, raw, ended in lines:
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            if torn_tail and not ended:
                logger.warning("%s: skipping a torn last line (a run stopped mid-write)", where)
                return
            raise InputError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno}). "
                             f"Each line must be {what}.{hint}") from None
        except (ValueError, RecursionError) as exc:  # a 5000-digit number, nesting too deep
            raise InputError(f"{where}: JSON that cannot be read ({type(exc).__name__}: {str(exc)[:80]}). "
                             f"Each line must be {what}.{hint}") from None
        if not isinstance(obj, dict):
            raise InputError(f"{where}: expected {what}, got {type(obj).__name__}.{hint}")
        yield lineno, where, obj


def read_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield the records of a JSONL output file, naming file:line on a bad line."""
    for _, _, record in iter_json_lines(path, what="an output record (a JSON object)", file_what="Output",
                                        hint=" Fix or remove that line, or start over with --overwrite."):
        yield record


class JsonlWriter:
    """Appends records to ``path``. ``mode``: ``new`` (fail if it exists and is not empty),
    ``resume`` (keep finished records; ``finished_ids`` lists them) or ``overwrite``.

    Nothing is lost before the first record: ``overwrite`` empties the file only when the
    first record is written, so a run that fails to start (a wrong ``--model``, a load
    error) leaves the earlier output as it was. The writer holds an exclusive lock on the
    file (``flock``) from the start, before it repairs a torn tail or reads the finished ids,
    so a second process on the same output stops at once with a clear error instead of
    resuming into it or cutting the other writer's line."""

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
        try:
            # Unbuffered binary append: each record goes out in one write() of the whole line.
            self._fh = self.path.open("ab", buffering=0)
        except OSError as exc:
            raise InputError(f"Cannot write the output '{self.path}': {exc.strerror}. "
                             "Choose a writable location with -o.") from exc
        try:
            self._lock()
            exists = os.fstat(self._fh.fileno()).st_size > 0
            if exists and mode == "new":
                raise InputError(f"Output '{self.path}' already exists. Pass --resume to continue it "
                                 "or --overwrite to start over.")
            if exists and mode == "resume":
                try:
                    self.repaired_bytes = _repair_tail(self.path)
                except OSError as exc:
                    raise InputError(f"Cannot write the output '{self.path}': {exc.strerror}.") from exc
                self.finished_ids = {str(r.get(id_field)) for r in read_records(self.path)}
        except BaseException:
            self._fh.close()
            raise
        self._truncate_first = exists and mode == "overwrite"

    def _lock(self) -> None:
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"Output '{self.path}' is being written by another process (it holds the file's "
                             "lock); wait for it to finish, or write elsewhere with -o.") from None
        except OSError as exc:  # a filesystem without locks: go on unlocked, say so
            logger.warning("cannot lock %s (%s); make sure no other process writes it", self.path,
                           exc.strerror or exc)

    def write(self, record: dict[str, Any]) -> None:
        """Append one line; on a write error (disk full, file-size limit) cut the file back
        to its last complete line and raise InputError, so what was written stays valid."""
        data = dumps_line(record).encode("utf-8")
        fd = self._fh.fileno()
        before = os.fstat(fd).st_size
        try:
            if self._truncate_first:  # --overwrite: the old output goes only now that a record is ready
                os.ftruncate(fd, 0)
                self._truncate_first = False
                before = 0
            written = 0
            while written < len(data):
                written += self._fh.write(data[written:])
            os.fsync(fd)
        except OSError as exc:
            try:
                os.ftruncate(fd, before)
            except OSError:
                pass  # a torn line is cut off by the next --resume
            raise InputError(f"Cannot write to '{self.path}': {exc.strerror or exc}. The {len(self.finished_ids)} "
                             "records before it are intact; free some space or write elsewhere with -o.") from exc
        self.finished_ids.add(str(record.get(self.id_field)))

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
