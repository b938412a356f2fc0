# The two set-up commands: `make demo` and `make test`. Each creates .venv if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint typecheck unit venv clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[server,dev]'
	@touch $(STAMP)

venv: $(STAMP)

BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[server,dev,bench]'
	@touch $(BENCH_STAMP)

# Benchmarks side by side with real peers; writes bench/results.md and bench/results.png.
# Never part of `make test`.
bench: $(BENCH_STAMP)
	bash bench/install.sh
	$(BIN)/python bench/run.py $(BENCH_ARGS)

demo: $(STAMP)
	$(BIN)/python -m tbot_py.demo $(if $(OUT),--out $(OUT),)

lint: $(STAMP)
	$(BIN)/ruff check tbot_py tests
	$(BIN)/ruff format --check tbot_py tests

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest

clean:
	rm -rf $(VENV) tbot-demo-out .pytest_cache .mypy_cache .ruff_cache
