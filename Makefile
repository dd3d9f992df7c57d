# Two commands do all the set-up on a fresh machine:
#   make demo   installs everything, runs `bon-sr generate` on examples/prompts.jsonl and shows each pick
#   make test   installs everything, then runs the whole test suite (real-model tests included)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bon-sr-installed

.PHONY: setup demo test test-fast bench-estimator

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bon-sr generate examples/prompts.jsonl -o out.jsonl --resume
	$(VENV)/bin/bon-sr show out.jsonl

test: $(STAMP)
	$(PY) -m pytest -q -ra

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow"

bench-estimator: $(STAMP)
	$(PY) benchmarks/estimator.py --quick
