# IEI — everything runs from .venv, created from pyproject.toml on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help setup run test lint format clean bench

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

setup: $(STAMP) ## create .venv with the service, Triton and the test tools

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "IEI needs Python 3.11 or newer"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[serve,dev]'
	@touch $(STAMP)

run: setup ## serve IMAGE_EMBEDDING_MODEL with Triton + the HTTP frontend on IEI_BIND
	$(BIN)/iei serve

test: lint ## lint, then the whole test suite (starts the real stack with tiny models)
	$(BIN)/pytest

lint: setup ## ruff (lint + format check) and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: setup ## measure the model's limit and the served stack; writes docs/benchmarks.md
	$(BIN)/python -m pip install --quiet -e '.[serve,bench]'
	$(BIN)/python -m bench $(BENCH_ARGS)

format: setup ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean: ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .hypothesis
