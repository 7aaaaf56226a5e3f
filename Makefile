# labctl: the two commands of a fresh machine are `make serve` and `make test`.
# Everything they need is installed by the targets below (into .venv, and system
# packages through scripts/ when the machine lacks them).

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
PIP     = $(BIN)/python -m pip install --quiet --disable-pip-version-check
STAMP       = $(VENV)/.installed
TEST_STAMP  = $(VENV)/.installed-test
BENCH_STAMP = $(VENV)/.installed-bench
UV_VERSION  = 0.13.9

.PHONY: serve test check lint bench lock wheel system-deps clean

serve: $(STAMP)
	$(BIN)/labctl serve

# Two pytest-xdist workers (TEST_WORKERS=0 runs in one process): the suite mostly waits on
# servers, clients and databases, so two share two cores well.
TEST_WORKERS ?= 2
test: $(TEST_STAMP) system-deps
	$(BIN)/python scripts/lint_imports.py
	$(BIN)/python -m pytest -p no:cacheprovider -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

check: $(STAMP)
	$(BIN)/labctl check

lint: $(TEST_STAMP)
	$(BIN)/ruff check labctl ioc server drivers clients tests bench scripts
	$(BIN)/python scripts/lint_imports.py

bench: $(BENCH_STAMP) system-deps
	$(BIN)/python -m bench $(BENCH_ARGS)

# Python packages: exact pins with hashes from the lock files, then labctl itself
# (editable). requirements.lock is what the server needs (no extras);
# requirements-test.lock adds every extra and the test tools; requirements-bench.lock
# the benchmarks' baselines and profiler.
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --require-hashes -r requirements.lock
	$(PIP) --no-deps -e .
	touch $@

$(TEST_STAMP): $(STAMP) requirements-test.lock
	$(PIP) --require-hashes -r requirements-test.lock
	touch $@

$(BENCH_STAMP): $(TEST_STAMP) requirements-bench.lock
	$(PIP) --require-hashes -r requirements-bench.lock
	touch $@

# Refresh the three lock files from pyproject.toml and requirements-bench.in (uv keeps
# the versions already pinned unless asked: UPGRADE=--upgrade takes the newest allowed).
# The test and bench locks are constrained by the ones below them, so the server runs in
# tests with exactly the versions it is installed with.
LOCK = $(BIN)/uv pip compile --quiet --universal --python-version 3.11 --generate-hashes --no-header $(UPGRADE)
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) uv==$(UV_VERSION)
	$(LOCK) pyproject.toml -o requirements.lock
	$(LOCK) pyproject.toml --extra test -c requirements.lock -o requirements-test.lock
	$(LOCK) requirements-bench.in -c requirements-test.lock -o requirements-bench.lock

# The sdist and wheel, into dist/.
wheel: $(TEST_STAMP)
	$(BIN)/python -m build --outdir dist .

# What the tests need beyond Python packages (TimescaleDB, Qt's system libraries,
# node-opcua). Each script is idempotent and quick when everything is present.
system-deps:
	bash scripts/install-test-deps.sh

clean:
	rm -rf $(VENV) var dist build .pytest_cache
