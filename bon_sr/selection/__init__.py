"""Selection: one prompt's scored candidates -> the pick.

    answers.py    final answers pulled out of candidate texts (numeric, math, choice, regex, ...)
    consensus.py  similarities between candidates and their MBR utilities
    selectors.py  plain selector functions and their registry (stable-rank, majority, mbr, auto, ...)
    decide.py     one prompt's decision: answers, vote shares, utilities, then the selector

This package knows nothing about models, sampling or how scores were computed: it reads
``Candidate.scores`` and texts.
"""
