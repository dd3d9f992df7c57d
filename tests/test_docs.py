"""The front page (README.md) and the docs site (docs/) tell the same numbers.

The front page quotes a few headline numbers whose measurements live on a docs page: the
verdict's Best-of-N accuracies (docs/does-it-work.md), the consensus rows of the selector
table (the same page's consensus table), the hook's cost and equality (docs/measured-numbers.md)
and the server's load test (docs/serving.md). Each is parsed from both files here and must be
equal, so an edit of one without the other fails. The links and anchors of both are checked
by the strict docs build in ``make lint`` (docs/development.md). Text only: no model, fast.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = ROOT / "docs"
MAX_FRONT_PAGE_LINES = 250


def doc(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def flat(text: str) -> str:
    """Text with blockquote marks dropped and every run of white space one space."""
    return " ".join(re.sub(r"^> ?", "", text, flags=re.M).split())


def table_after(text: str, marker: str) -> list[tuple[str, list[str]]]:
    """The body rows of the first Markdown table after ``marker``: (first cell, the others)."""
    lines = text[text.index(marker):].splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[first + 2:]:  # after the header and its |---| line
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows.append((cells[0], cells[1:]))
    assert rows, f"no table after {marker!r}"
    return rows


def number(cell: str) -> float | str:
    """A cell's first number ('15.0 [8, 22]', '**0.96**', '25.2: +3.7 [...]'), or its text."""
    m = re.search(r"-?\d+(?:\.\d+)?", cell)
    return float(m.group()) if m else cell.strip()


def row(table: list[tuple[str, list[str]]], name: str) -> list[str]:
    """The one row whose label, without ** and backticks, is ``name`` or ``name`` followed by
    a space, comma or parenthesis ("majority vote (shortest answer: also 13.0)")."""
    def named(label: str) -> bool:
        label = label.replace("*", "").replace("`", "")
        return label == name or (label.startswith(name) and label[len(name)] in " ,(")

    hits = [cells for label, cells in table if named(label)]
    assert len(hits) == 1, f"{len(hits)} rows named {name!r}: {[label for label, _ in table]}"
    return hits[0]


# The verdict on the front page, per run: its pattern (numbers in order) and, per number, the
# row of that run's table in docs/does-it-work.md (accuracy column).
VERDICT = {
    "GSM8K, 0.5B, n = 16": (
        r"highest-SR of 16 samples scored ([\d.]+)% against ([\d.]+)% for a random pick and ([\d.]+)% for "
        r"greedy decoding \(both differences clear of zero\), while majority vote scored ([\d.]+)%",
        "Best-of-N on GSM8K (`benchmarks/results/gsm8k-qwen2.5-coder-0.5b/`)",
        ["SR, response tokens", "random@16", "greedy", "majority vote"]),
    "GSM8K, 1.5B, n = 8": (
        r"SR of 8 samples scored ([\d.]+)% against ([\d.]+)% random, ([\d.]+)% greedy and ([\d.]+)% majority",
        "Best-of-N on GSM8K with the 1.5B as the generator",
        ["SR, response tokens", "random@8", "greedy", "majority vote"]),
    "MATH-500, 0.5B, n = 8": (
        r"\(8 samples\) SR scored ([\d.]+)% against ([\d.]+)% random, ([\d.]+)% greedy and ([\d.]+)% majority "
        r"with the 0.5B",
        "Best-of-N on MATH-500 (`benchmarks/results/math500-qwen2.5-coder-0.5b/`)",
        ["SR, response tokens", "random@8", "greedy", "majority vote"]),
    "MATH-500, 1.5B, n = 8": (
        r"with the 1.5B ([\d.]+)% \(full-sequence SR ([\d.]+)%\) against ([\d.]+)% random, ([\d.]+)% greedy "
        r"and ([\d.]+)% majority",
        "Best-of-N on MATH-500 with the 1.5B as the generator",
        ["SR, response tokens", "SR, full sequence", "random@8", "greedy", "majority vote"]),
}


@pytest.mark.parametrize("run", list(VERDICT))
def test_the_verdicts_accuracies_are_the_docs(run):
    pattern, marker, rows = VERDICT[run]
    m = re.search(pattern, flat(README))
    assert m, f"the front page's verdict no longer states {run} as {pattern!r}"
    table = table_after(doc("does-it-work.md"), marker)
    front = [float(x) for x in m.groups()]
    docs = [number(row(table, prefix)[0]) for prefix in rows]
    assert front == docs, f"{run}: front page {dict(zip(rows, front))}, docs/does-it-work.md {dict(zip(rows, docs))}"


# The selector table's consensus rows -> the consensus table's bench columns (same five runs, n = 8)
CONSENSUS_ROWS = {
    "mbr, --utility lexical": "mbr-lexical",
    "mbr, --utility hidden-mean": "mbr-hidden-mean",
    "mbr, --utility hidden-mean-centred": "mbr-hidden-mean-centred",
    "mbr, --utility hidden-last": "mbr-hidden-last",
    "mbr, --utility hidden-last-centred": "mbr-hidden-last-centred",
    "MBR, token n-gram F1": "mbr-ngram",
    "auto": "auto",
}


def _selector_table() -> list[tuple[str, list[str]]]:
    return table_after(README, "| `--selector` |")


def test_the_selector_tables_consensus_rows_are_the_docs():
    front = _selector_table()
    consensus = table_after(doc("does-it-work.md"), "| bench column |")
    for prefix, column in CONSENSUS_ROWS.items():
        ours = [number(c) for c in row(front, prefix)[1:6]]  # after "needs": the five runs
        theirs = [number(c) for c in row(consensus, column)[:5]]
        assert ours == theirs, f"{prefix}: front page {ours}, docs/does-it-work.md {column} {theirs}"


# The selector table's MBPP column -> the MBPP-style column of docs/code-selection.md's table
MBPP_ROWS = {
    "majority": "exec",
    "auto": "exec",
    "mbr, --utility lexical": "mbr",
    "mean-logprob": "mean-logprob",
    "random": "random@8",
    "stable-rank": "stable-rank",
    "greedy decoding": "greedy decoding",
}


def test_the_selector_tables_code_column_is_the_code_page():
    front = _selector_table()
    code = table_after(doc("code-selection.md"), "| selector | MBPP style: accuracy % |")
    for ours_name, theirs_name in MBPP_ROWS.items():
        ours = number(row(front, ours_name)[6])  # after "needs" and the five math/QA runs
        theirs = number(row(code, theirs_name)[0])
        assert ours == theirs, f"{ours_name}: front page {ours}, docs/code-selection.md {theirs_name} {theirs}"


# The selector table's n = 8 columns that a docs table reports too: column -> docs table
N8_RUNS = {
    2: "Best-of-N on MATH-500 (`benchmarks/results/math500-qwen2.5-coder-0.5b/`)",
    3: "Best-of-N on GSM8K with the 1.5B as the generator",
    4: "Best-of-N on MATH-500 with the 1.5B as the generator",
}
N8_ROWS = {"majority": "majority vote", "random": "random@8", "stable-rank": "SR, response tokens",
           "greedy decoding": "greedy"}


def test_the_selector_tables_baselines_are_the_docs():
    front = _selector_table()
    for column, marker in N8_RUNS.items():
        table = table_after(doc("does-it-work.md"), marker)
        for ours, theirs in N8_ROWS.items():
            a, b = number(row(front, ours)[column]), number(row(table, theirs)[0])
            assert a == b, f"{ours} in column {column}: front page {a}, docs/does-it-work.md {b}"


def test_the_measured_headlines_are_the_docs():
    front = flat(README)
    measured = flat(doc("measured-numbers.md"))
    for phrase in ("wall time 0.95x (N = 4), 1.03x (N = 16), medians of 5", "max relative difference 9e-7"):
        assert phrase in front and phrase in measured, phrase
    m = re.search(r"([\d.]+)x to ([\d.]+)x its requests/s and ([\d.]+)x to ([\d.]+)x its CPU-seconds per request",
                  front)
    assert m, "the front page no longer states the server's load test as a range"
    load = table_after(doc("serving.md"), "| N | concurrency |")
    # cells after N: concurrency, vLLM req/s, req/s ratio, fill, p50 latency ratio, fill, CPU-s/request ratio, fill
    rps = [number(cells[2]) for _, cells in load]
    cpu = [number(cells[6]) for _, cells in load]
    assert len(rps) == 4 and [float(x) for x in m.groups()] == [min(rps), max(rps), min(cpu), max(cpu)]


def test_the_front_page_stays_a_front_page():
    lines = README.count("\n")
    assert lines <= MAX_FRONT_PAGE_LINES, (
        f"README.md has {lines} lines (at most {MAX_FRONT_PAGE_LINES}): put the new text on its topic's page "
        "in docs/ and link to it")
