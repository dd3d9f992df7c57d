"""Faults and bad input, measured (``python -m benchmarks.faults --help``): kill -9 and --resume
(``kill``), fuzzed prompt files (``fuzz``), a full disk (``disk``), SIGTERM / Ctrl-C during vLLM
sampling (``kill``), ``bon-sr serve`` under abuse (``serve``); ``proc`` holds the process helpers
they share and ``launcher`` the traced ``bon-sr`` entry point.

Imports nothing itself, so ``python -m benchmarks.faults.launcher`` starts its trace at once.
"""
