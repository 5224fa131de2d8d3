# Set-up is part of each target: a fresh clone needs only `make quickstart` or `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: quickstart test lint clean

# The virtual environment, rebuilt when the dependencies change.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

## quickstart: FP8 PTQ of the builtin SmolLM2-135M -> TensorRT-LLM + HF checkpoints (CPU, minutes)
quickstart: $(VENV)/.installed
	$(BIN)/optimize run quickstart --resume

## test: lint, then the whole test suite (unit tests on tiny Llamas + end-to-end on SmolLM2)
test: $(VENV)/.installed lint
	$(BIN)/python -m pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check optimizer tests bench
	$(BIN)/ruff format --check optimizer tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache
