# Sluice's commands. `make run` and `make test` work on a fresh machine: they install what they need
# (uv, the locked Python deps, the Kafka jars from Maven Central) before doing anything else.

PYTHON ?= python3
UV_VERSION := 0.9.9
UV := $(PYTHON) -m uv
export UV_PYTHON_DOWNLOADS := never
export UV_PYTHON := $(PYTHON)

.PHONY: run test bench install kafka-jars lint format typecheck unit integration clean

install: .venv/.installed

.venv/.installed: pyproject.toml uv.lock
	@$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"
	$(UV) sync --frozen
	@touch $@

kafka-jars: install
	$(UV) run --frozen sluice kafka fetch

## Run Sluice for real: a local Kafka broker, a worker and the API, until Ctrl-C.
run: install kafka-jars
	$(UV) run --frozen sluice run

## Everything CI checks: lint, types, unit and integration tests against the real broker.
test: install kafka-jars lint typecheck
	$(UV) run --frozen pytest

## Benchmark on a local real broker (bench/, see docs/performance.md); results go to results/ (git-ignored).
## Options pass through: make bench BENCH_ARGS="--events 2000 --skip-api"
bench: install kafka-jars
	$(UV) run --frozen sluice bench $(BENCH_ARGS)

lint: install
	$(UV) run --frozen ruff check .
	$(UV) run --frozen ruff format --check .

format: install
	$(UV) run --frozen ruff format .
	$(UV) run --frozen ruff check --fix .

typecheck: install
	$(UV) run --frozen mypy

unit: install
	$(UV) run --frozen pytest tests/unit

integration: install kafka-jars
	$(UV) run --frozen pytest tests/integration

clean:
	rm -rf .sluice .pytest_cache .mypy_cache .ruff_cache
