# Two commands do all the set-up on a fresh machine:
#   make demo   installs everything, runs `bon-sr generate` on examples/prompts.jsonl and shows each pick
#   make test   installs everything, then runs the whole test suite (real-model tests included)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bon-sr-installed

.PHONY: setup demo docs lint test test-fast bench-estimator

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bon-sr generate examples/prompts.jsonl -o out.jsonl --resume
	$(VENV)/bin/bon-sr show out.jsonl

# The docs (README.md and docs/, Sphinx + MyST) with every warning an error: a broken link, a
# missing #anchor or a page in no toctree fails (docs/development.md).
docs: $(STAMP)
	$(VENV)/bin/sphinx-build -E -W --keep-going -n -q -c docs -b html . build/docs

# The architecture (.importlinter's layers), ruff (pyproject.toml: the private-name rule everywhere;
# the tests also get ruff's default rules and no private-member access) and the docs, before any test.
lint: $(STAMP) docs
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check bon_sr benchmarks tests

# --durations=25: the slowest tests at the end, so a slow newcomer is seen (shared engines and
# servers: tests/shared.py). -n 2 --dist loadgroup: two pytest-xdist workers, each shared
# resource's users on one of them (tests/conftest.py; docs/development.md)
test: lint
	$(PY) -m pytest -q -ra --durations=25 -n 2 --dist loadgroup --no-loadscope-reorder

test-fast: lint
	$(PY) -m pytest -q -ra -m "not slow"

bench-estimator: $(STAMP)
	$(PY) benchmarks/estimator.py --quick
