"""``bon-sr show``: what Best-of-N did for each prompt of an output file, in the terminal.

Reads the JSONL that ``bon-sr generate`` and ``bon-sr score`` write and renders, with rich,
one table per prompt: each candidate's first line of text, its tokens and finish reason,
every score (stable rank, MBR utility, log-prob, ...), its answer and that answer's votes,
with the picked candidate marked and the rule that picked it written above the table.

This module knows nothing about models, sampling or how the pick was made: it only draws
the records. A missing file or a line that is not an output record is an InputError
naming file:line.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from .errors import InputError
from .jsonl import iter_json_lines

#: score columns first in this order (when present), the rest alphabetically after them
SCORE_ORDER = ("mbr_utility", "stable_rank", "mean_logprob", "self_certainty", "scored_tokens", "frobenius_sq",
               "spectral_sq")
#: short column headers for the known scores (the legend under each table spells them out)
SHORT = {"mbr_utility": "utility", "stable_rank": "SR", "mean_logprob": "logp", "self_certainty": "cert",
         "scored_tokens": "rows", "frobenius_sq": "‖H‖F²", "spectral_sq": "σ₁²"}
TEXT_WIDTH = 60
RECORD = "a bon-sr output record (a line written by bon-sr generate or score)"


def _check(record: dict[str, Any], where: str) -> None:
    problems = []
    if "best_index" not in record or isinstance(record["best_index"], bool) or \
            not isinstance(record["best_index"], int):
        problems.append("'best_index' is missing or not an integer")
    cands = record.get("candidates")
    if cands is not None:
        if not isinstance(cands, list) or not all(isinstance(c, dict) and isinstance(c.get("text"), str)
                                                  for c in cands):
            problems.append("'candidates' must be a list of objects with a 'text'")
        elif not problems and not 0 <= record["best_index"] < len(cands):
            problems.append(f"'best_index' {record['best_index']} is out of range for {len(cands)} candidates")
        elif any(not isinstance(c.get("scores", {}), dict) for c in cands):
            problems.append("a candidate's 'scores' is not an object")
    if problems:
        raise InputError(f"{where}: not {RECORD}: {'; '.join(problems)}.")


def read_output(path: str, record_id: str | None = None) -> list[dict[str, Any]]:
    """The records of ``path`` (all, or the one whose ``id`` is ``record_id``), checked."""
    records = []
    for _, where, record in iter_json_lines(path, what=RECORD):
        _check(record, where)
        records.append(record)
    if not records:
        raise InputError(f"'{path}' holds no records; write one with bon-sr generate or score.")
    if record_id is None:
        return records
    chosen = [r for r in records if str(r.get("id")) == str(record_id)]
    if not chosen:
        ids = [str(r.get("id")) for r in records]
        more = f", ... ({len(ids)} in all)" if len(ids) > 10 else ""
        raise InputError(f"No record with id '{record_id}' in '{path}'. Its ids: {', '.join(ids[:10])}{more}.")
    return chosen


def first_line(text: str, width: int = TEXT_WIDTH) -> str:
    """The first non-blank line of ``text``, cut to ``width`` characters with an ellipsis
    (and a mark when more lines follow)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return "(empty)"
    line = lines[0] + (" ..." if len(lines) > 1 else "")
    return line if len(line) <= width else line[: width - 1] + "…"


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list):
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return str(users[-1] if users else (prompt[-1].get("content", "") if prompt else ""))
    return str(prompt or "")


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "" if value is None else str(value)
    if math.isnan(value):
        return "nan"
    if float(value).is_integer() and abs(value) < 1e4:   # counts (tokens, rows), small whole scores
        return str(int(value))
    return f"{value:.4g}" if 1e-3 <= abs(value) < 1e5 else f"{value:.2e}"


def score_columns(candidates: Iterable[dict[str, Any]]) -> list[str]:
    keys = {k for c in candidates for k in (c.get("scores") or {})}
    return [k for k in SCORE_ORDER if k in keys] + sorted(keys - set(SCORE_ORDER))


#: parts of the stable rank, dropped first when the terminal is too narrow
SR_PARTS = ("scored_tokens", "frobenius_sq", "spectral_sq")
#: the least room the text column gets before the SR parts are dropped
MIN_TEXT = 24


def render(record: dict[str, Any], width: int = 120) -> Any:
    """One record as a rich renderable for a terminal ``width`` characters wide: a header
    (id, prompt, selector, rule) and a table of the candidates with the pick marked."""
    from rich.console import Group
    from rich.text import Text

    best = record["best_index"]
    head = Text()
    head.append(f"{record.get('id', '?')}", style="bold cyan")
    head.append(f"  {first_line(_prompt_text(record.get('prompt')), 100)}\n")
    head.append("selector ", style="dim")
    head.append(str(record.get("selector", "?")), style="bold")
    head.append("   rule ", style="dim")
    head.append(str(record.get("rule", record.get("selector", "?"))), style="bold")
    utility = (record.get("config") or {}).get("utility")
    if utility:
        head.append("   utility ", style="dim")
        head.append(str(utility))
    head.append(f"   {record.get('num_candidates', len(record.get('candidates') or []))} candidates", style="dim")
    if record.get("model"):
        head.append(f"   {record['model']}", style="dim")
    cands = record.get("candidates")
    if cands is None:
        head.append("\n(candidates not kept: the run used --no-candidates) picked: ", style="dim")
        head.append(first_line(str(record.get("response", "")), 100), style="bold green")
        return head
    votes = record.get("votes") or {}
    all_scores = score_columns(cands)
    answers = "votes" in record or any("answer" in c for c in cands)
    table, scores = _table(cands, best, votes if answers else None, all_scores, width)
    if scores != all_scores:
        head.append(f"\n({', '.join(k for k in all_scores if k not in scores)} hidden: the terminal is narrow)",
                    style="dim")
    parts = [head, table]
    legend = [f"{SHORT[k]} = {k}" for k in scores if k in SHORT]
    if legend:
        parts.append(Text("; ".join(legend), style="dim"))
    if votes:
        parts.append(Text("votes: " + ", ".join(f"{a} ×{v}" for a, v in votes.items()), style="dim"))
    return Group(*parts)


def _table(cands: list[dict[str, Any]], best: int, votes: dict[str, Any] | None, scores: list[str], width: int,
           *, force: bool = False) -> tuple[Any, list[str]]:
    """The candidates' table (``votes``: None = no answer columns) with every score when
    it leaves the text ``MIN_TEXT`` columns; else without the SR parts (``force``: as is)."""
    from rich.table import Table
    from rich.text import Text

    has_answers = votes is not None
    ran = any("passed" in c for c in cands)  # code answers: each candidate ran on the examples
    columns = ["", "#", "tokens", "finish", *(SHORT.get(k, k) for k in scores)]
    rows = []
    for i, c in enumerate(cands):
        row = ["★" if i == best else "", str(c.get("index", i)), _number(c.get("num_tokens")),
               str(c.get("finish_reason") or "")]
        row += [_number((c.get("scores") or {}).get(k)) for k in scores]
        if ran:
            row.append({True: "yes", False: "no"}.get(c.get("passed"), ""))
        if has_answers:
            answer = c.get("answer")
            row += ["" if answer is None else str(answer), "" if answer is None else _number(votes.get(str(answer)))]
        rows.append(row)
    if ran:
        columns.append("pass")
    if has_answers:
        columns += ["answer", "votes"]
    widths = [min(24, max([len(name)] + [len(r[k]) for r in rows])) for k, name in enumerate(columns)]
    text_width = min(TEXT_WIDTH, width - sum(w + 3 for w in widths) - 1)
    if text_width < MIN_TEXT and not force:
        narrow = [k for k in scores if k not in SR_PARTS]
        if narrow != scores:
            return _table(cands, best, votes, narrow, width, force=True)
    text_width = max(text_width, 8)
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    for name, w in zip(columns, widths):
        table.add_column(name, justify="left" if name in ("", "finish", "answer", "pass") else "right", no_wrap=True,
                         width=w)
    table.add_column("text", no_wrap=True, width=text_width)
    for i, (row, c) in enumerate(zip(rows, cands)):
        table.add_row(*(Text(x) for x in row), Text(first_line(c["text"], text_width)),
                      style="bold green" if i == best else None)
    return table, scores


def show_file(path: str, record_id: str | None = None, *, console: Any = None) -> int:
    """Render every record of ``path`` (or the one with ``record_id``); returns how many."""
    from rich.console import Console
    from rich.rule import Rule

    console = console or Console()
    records = read_output(path, record_id)
    for k, record in enumerate(records):
        if k:
            console.print(Rule(style="dim"))
        console.print(render(record, console.width))
    return len(records)
