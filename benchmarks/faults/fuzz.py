"""Fuzzed prompt files: seeded bad JSONL/text files (each mutation breaks one line) and fixed
special cases (empty, FIFO, unreadable, 10 MB line, 100k lines, UTF-16), read in process and
through the real CLI: a bad file fails with one message naming the file and line, no traceback.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .proc import run_cli

@dataclass
class FuzzCase:
    name: str
    path: Path
    valid: bool = False     # a valid file (BOM, CRLF, ...): must read, not fail


def _good_line(rng: random.Random, k: int) -> str:
    words = ["alpha", "beta", "gamma", "delta", "sum", "why", "éclair", "東京", "\u2028sep"]
    if rng.random() < 0.5:
        return json.dumps({"id": f"q{k}", "prompt": " ".join(rng.choice(words) for _ in range(rng.randint(1, 8)))},
                          ensure_ascii=rng.random() < 0.5)
    return json.dumps({"id": k, "messages": [{"role": "user", "content": rng.choice(words)}]})


BAD_VALUES: list[Any] = [None, 3, 2.5, True, [], {}, [1, 2], {"a": {"b": [1]}}, ["x"], [{"role": "user"}],
                         [{"role": "robot", "content": "x"}], [{"role": "user", "content": 5}],
                         [{"role": "assistant", "content": "x"}], "", "   "]


def _mutations(rng: random.Random, lines: list[str]) -> list[tuple[str, bytes]]:
    """(kind, file bytes) for one set of good lines: each mutation makes exactly one line bad."""
    k = rng.randrange(len(lines))
    good = [x.encode() for x in lines]

    def with_line(bad: bytes) -> bytes:
        return b"\n".join(good[:k] + [bad] + good[k + 1:]) + b"\n"

    line = good[k]
    cut = rng.randint(1, max(1, len(line) - 1))
    out = [
        ("truncated-json", with_line(line[:cut])),
        ("invalid-utf8", with_line(line[:cut] + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80"])
                                   + line[cut:])),
        ("nul-byte", with_line(line[:cut] + b"\x00" + line[cut:])),
        ("wrong-type-prompt", with_line(json.dumps({"id": f"x{k}", "prompt": rng.choice(BAD_VALUES)}).encode())),
        ("wrong-type-messages", with_line(json.dumps({"id": f"x{k}",
                                                      "messages": rng.choice(BAD_VALUES[:8] + BAD_VALUES[9:13])})
                                          .encode())),
        ("wrong-type-id", with_line(json.dumps({"id": rng.choice([None, 1.5, [1], {"a": 1}, True]),
                                                "prompt": "x"}).encode())),
        ("not-an-object", with_line(json.dumps(rng.choice([[1, 2], "text", 7, None])).encode())),
        ("nested-deep", with_line(b"[" * rng.choice([50, 5000, 200000]) + b"]" * 3)),
        ("huge-number", with_line(b'{"id": ' + b"9" * 6000 + b', "prompt": "x"}')),
        ("both-fields", with_line(json.dumps({"id": "b", "prompt": "x", "messages": []}).encode())),
        ("missing-prompt", with_line(json.dumps({"id": "m", "text": "x"}).encode())),
        ("duplicate-id", b"\n".join(good + [good[k]]) + b"\n"),
        ("candidates-in-generate", with_line(json.dumps({"id": "c", "prompt": "x", "candidates": ["a"]}).encode())),
        ("crlf+truncated", with_line(line[:cut]).replace(b"\n", b"\r\n")),
        ("bom+bad", b"\xef\xbb\xbf" + with_line(line[:cut])),
    ]
    return out


def fuzz_cases(root: Path, seed: int, count: int) -> list[FuzzCase]:
    """``count`` seeded bad prompt files plus the fixed special cases, written under ``root``."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    cases: list[FuzzCase] = []
    while len(cases) < count:
        lines = [_good_line(rng, k) for k in range(rng.randint(1, 12))]
        for kind, data in _mutations(rng, lines):
            if len(cases) >= count:
                break
            p = root / f"{len(cases):04d}-{kind}.jsonl"
            p.write_bytes(data)
            cases.append(FuzzCase(kind, p))
    # Valid variants that must be read (not fail): BOM, CRLF, U+2028 inside strings.
    lines = [_good_line(rng, k) for k in range(5)]
    for kind, data in (("valid-bom", b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n"),
                       ("valid-crlf", "\r\n".join(lines).encode() + b"\r\n"),
                       ("valid-u2028", (json.dumps({"id": 1, "prompt": "a\u2028b\x0cc"}, ensure_ascii=False)
                                        + "\n").encode())):
        p = root / f"{kind}.jsonl"
        p.write_bytes(data)
        cases.append(FuzzCase(kind, p, valid=True))
    special = root / "special"
    special.mkdir(exist_ok=True)
    (special / "empty.jsonl").write_bytes(b"")
    cases.append(FuzzCase("empty-file", special / "empty.jsonl"))
    (special / "blank.txt").write_bytes(b"\n \n\t\n")
    cases.append(FuzzCase("only-blank-lines", special / "blank.txt"))
    (special / "dir.jsonl").mkdir(exist_ok=True)
    cases.append(FuzzCase("directory", special / "dir.jsonl"))
    fifo = special / "fifo.jsonl"
    if not fifo.exists():
        os.mkfifo(fifo)
    cases.append(FuzzCase("fifo", fifo))
    # Unreadable: chmod does not stop root, so a path whose read() fails (EIO) stands in.
    unreadable = special / "unreadable.jsonl"
    if not unreadable.is_symlink():
        unreadable.symlink_to("/proc/self/mem")
    cases.append(FuzzCase("unreadable", unreadable))
    dangling = special / "dangling.jsonl"
    if not dangling.is_symlink():
        dangling.symlink_to(special / "no-such-file")
    cases.append(FuzzCase("dangling-symlink", dangling))
    cases.append(FuzzCase("missing", special / "missing.jsonl"))
    big = special / "10mb-line.jsonl"
    big.write_bytes(b'{"id": "big", "prompt": "' + b"word " * (2 * 1024 * 1024) + b'"\n{"id": 2, "prompt": "x"}\n')
    cases.append(FuzzCase("10mb-line-truncated", big))
    many = special / "100k-lines.jsonl"
    body = [json.dumps({"id": k, "prompt": f"p{k}"}) for k in range(100_000)]
    body[99_990] = body[99_990][:-3]
    many.write_text("\n".join(body) + "\n")
    cases.append(FuzzCase("100k-lines-one-bad", many))
    txt = special / "nul.txt"
    txt.write_bytes(b"first prompt\nsecond\x00prompt\n")
    cases.append(FuzzCase("txt-nul", txt))
    utf16 = special / "utf16.txt"
    utf16.write_bytes("a prompt\n".encode("utf-16"))
    cases.append(FuzzCase("txt-utf16", utf16))
    return cases


@dataclass
class FuzzOutcome:
    case: str
    ok: bool
    traceback: bool
    wrong_exit: bool
    message: str


def _names_place(message: str, path: Path) -> bool:
    return str(path) in message


def fuzz_in_process(cases: Sequence[FuzzCase]) -> list[FuzzOutcome]:
    """read_prompt_file on each case: bad ones raise InputError naming the file (and line)."""
    from bon_sr.errors import InputError
    from bon_sr.sampling.prompts import read_prompt_file

    out = []
    for case in cases:
        try:
            read_prompt_file(case.path)
        except InputError as exc:
            msg = str(exc)
            ok = not case.valid and _names_place(msg, case.path) and "\n" not in msg
            out.append(FuzzOutcome(case.name, ok, False, case.valid, msg))
        except BaseException as exc:  # anything else would reach the user as a traceback
            out.append(FuzzOutcome(case.name, False, True, True, f"{type(exc).__name__}: {exc}"[:300]))
        else:
            out.append(FuzzOutcome(case.name, case.valid, False, not case.valid, "read"))
    return out


def fuzz_cli(cases: Sequence[FuzzCase], work: Path) -> list[FuzzOutcome]:
    """The real CLI on each case: a non-zero exit, one message naming the file, no
    traceback, no output file."""
    out = []
    for i, case in enumerate(cases):
        target = work / f"fuzz-out-{i}.jsonl"
        target.unlink(missing_ok=True)
        r = run_cli(["generate", str(case.path), "-o", str(target), "--backend", "hf"], timeout=300)
        err = r.stderr
        tb = "Traceback (most recent call last)" in err
        wrote = target.exists()
        lines = [x for x in err.splitlines() if x.strip()]
        one_message = len(lines) <= 3 and _names_place(" ".join(err.split()), case.path)  # rich/click may wrap
        ok = r.returncode != 0 and not tb and not wrote and one_message
        out.append(FuzzOutcome(case.name, ok, tb, r.returncode == 0, " ".join(err.split())[:300]))
    return out
