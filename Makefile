# labctl: the two commands of a fresh machine are `make serve` and `make test`.
# Everything they need is installed by the targets below (into .venv, and system
# packages through scripts/ when the machine lacks them).

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
BENCH_STAMP = $(VENV)/.installed-bench

.PHONY: serve test check lint bench system-deps clean

serve: $(STAMP)
	$(BIN)/labctl serve

test: $(STAMP) system-deps
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -p no:cacheprovider $(PYTEST_ARGS)

check: $(STAMP)
	$(BIN)/labctl check config/demo.yaml

lint: $(STAMP)
	$(BIN)/ruff check ioc server drivers clients tests bench
	$(BIN)/lint-imports

bench: $(BENCH_STAMP) system-deps
	$(BIN)/python -m bench $(BENCH_ARGS)

# Python packages: exact pins from requirements.lock, then labctl itself (editable).
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

# The benchmarks' baselines and profiler, on top of the above (not needed by the tests).
$(BENCH_STAMP): $(STAMP) requirements-bench.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-bench.lock
	touch $@

# What the tests need beyond Python packages (TimescaleDB, Qt's system libraries,
# node-opcua). Each script is idempotent and quick when everything is present.
system-deps:
	bash scripts/install-test-deps.sh

clean:
	rm -rf $(VENV) var .pytest_cache
