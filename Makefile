# Everything runs from a virtual environment in .venv, made on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SRC := producer worker kernels gateway tests benchmarks

.PHONY: install demo test test-fast lint format mypy bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Strict editable mode: a link tree under build/ that mypy and editors resolve as lorafleet.*.
install: $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[worker,gateway,dev]" --config-settings editable_mode=strict

demo: $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[worker]" --config-settings editable_mode=strict
	$(BIN)/lorafleet demo

# -P: the current directory stays off sys.path. Here it is the checkout, whose kernels/ folder would
# stand in for Hugging Face's `kernels` package, which transformers imports when it is installed.
test: install
	$(BIN)/python -P -m pytest

test-fast: install
	$(BIN)/python -P -m pytest -m "not slow"

lint: install
	$(BIN)/ruff check $(SRC)
	$(BIN)/ruff format --check $(SRC)
	$(BIN)/mypy -p lorafleet.producer -p lorafleet.worker -p lorafleet.kernels -p lorafleet.gateway

format: install
	$(BIN)/ruff check --fix $(SRC)
	$(BIN)/ruff format $(SRC)

bench: install
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf build $(VENV) *.egg-info .mypy_cache .ruff_cache .pytest_cache
