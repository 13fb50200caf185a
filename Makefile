# IEI — everything runs from .venv, created from pyproject.toml on first use.
# .venv needs CPython 3.11 or 3.12: numpy<2, pinned for the Triton wheel (nvidia-pytriton), has no
# wheel for 3.13 and newer. The first of python3, python3.12, python3.11 that is one (the
# machine's own python3 first: the one its users and wheels expect), unless PYTHON=... names it.
PYTHON_VERSION = $(if $(1),$(shell $(1) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null))
SUPPORTED_PYTHON = $(filter 3.11 3.12,$(call PYTHON_VERSION,$(1)))
PYTHON ?= $(firstword $(foreach p,python3 python3.12 python3.11,$(if $(call SUPPORTED_PYTHON,$(p)),$(p))))
NO_PYTHON = IEI needs Python 3.11 or 3.12, and $(or $(PYTHON),python3) is \
	$(or $(call PYTHON_VERSION,$(or $(PYTHON),python3)),not found) (numpy<2, pinned for the Triton \
	wheel, has no wheel for 3.13+): install Python 3.12 (e.g. `uv python install 3.12`) and run \
	make again, or name one: make PYTHON=/path/to/python3.12
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help setup run test lint audit fuzz load bench bench-gpu gpu-bundle format clean browser

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

setup: $(STAMP) ## create .venv with the service, Triton, Ray Data and the test tools

$(STAMP): pyproject.toml
	$(if $(call SUPPORTED_PYTHON,$(PYTHON)),,$(error $(NO_PYTHON)))
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[serve,engines,dev,tools,ray]'
	@touch $(STAMP)

run: setup ## serve IMAGE_EMBEDDING_MODEL with Triton + the HTTP frontend on IEI_BIND
	$(BIN)/iei serve

test: lint browser ## lint, then the whole test suite (starts the real stack with tiny models)
	$(BIN)/pytest

# Debian's Chromium for the demo page's test, only where it is missing and apt-get can run (root).
# Failing here is not fatal: that one test then skips and says why.
browser: ## install Debian's chromium for the demo page's browser test, if missing
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } \
			|| echo "could not install chromium: the demo page's browser test will skip"; \
	fi

lint: setup audit ## ruff (lint, security rules, format check), mypy and the dependency audit
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Known vulnerabilities in the installed packages fail the build. A machine that cannot reach
# the vulnerability service says so and goes on: there is nothing it could check.
audit: setup ## pip-audit of the installed dependencies
	@out=$$($(BIN)/pip-audit --progress-spinner off --local --skip-editable 2>&1); rc=$$?; \
	echo "$$out" | grep -v "could not be audited" | head -40; \
	if [ $$rc -ne 0 ] && echo "$$out" | grep -qE "ConnectionError|Max retries|Name or service not known"; then \
		echo "audit: vulnerability service unreachable, nothing was checked"; exit 0; fi; \
	exit $$rc

fuzz: setup ## a longer property-based run against the real stack (IEI_FUZZ_EXAMPLES, default 2000)
	IEI_FUZZ_EXAMPLES=$${IEI_FUZZ_EXAMPLES:-2000} $(BIN)/pytest tests/integration/test_fuzz.py -p no:cacheprovider

load: setup ## a bounded load test on loopback (LOAD_CLIENTS, LOAD_SECONDS), figures for docs/reliability.md
	$(BIN)/python -m tests.load --clients $${LOAD_CLIENTS:-16} --seconds $${LOAD_SECONDS:-120}

bench: setup ## measure the model's limit, the served stack and Ray jobs; writes docs/benchmarks.md, docs/bulk.md
	$(BIN)/python -m pip install --quiet -e '.[serve,engines,bench,ray]'
	$(BIN)/python -m bench $(BENCH_ARGS)
	$(BIN)/python -m bench.ray

# The GPU path in one run of at most 8 minutes, setup included (the CPU where there is no GPU);
# rows and report under docs/, or $OUT/docs where the environment sets OUT. With gpu-bundle/
# (`make gpu-bundle`, made where the package index answers): offline, with the host's own Python
# 3.12 and CUDA torch, the bundle installed into .gpu-env/ after fail-fast checks. Otherwise in
# its own environment: torch built for the CUDA that the host's NVIDIA driver runs (R580 and
# newer: CUDA 13, the `serve` and `gpu` extras; R525 to R570: CUDA 12, `serve-cu12`).
# docs/gpu.md says more.
, := ,  # a comma inside $(if ...)
GPU_DRIVER = $(shell nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1 | cut -d. -f1)
bench-gpu: ## measure the GPU path (split layout, GPU JPEG decoding); writes docs/ ($OUT/docs if OUT is set)
ifneq ($(wildcard gpu-bundle/MANIFEST.json),)
	$(PYTHON) -m bench.gpu_bundle run $(BENCH_ARGS)
else ifeq ($(GPU_DRIVER),)
	$(MAKE) setup
	$(BIN)/python -m pip install --quiet -e '.[serve,bench]'
	$(BIN)/python -m bench.gpu $(BENCH_ARGS)
else
	@test -x .venv-gpu/bin/python || $(PYTHON) -m venv .venv-gpu
	.venv-gpu/bin/python -m pip install --quiet --upgrade pip
	.venv-gpu/bin/python -m pip install --quiet -e \
		".[$(if $(shell [ $(GPU_DRIVER) -ge 580 ] && echo y),serve$(,)gpu,serve-cu12)$(,)bench]"
	.venv-gpu/bin/python -m bench.gpu $(BENCH_ARGS)
endif

# Any Python with pip does (the wheels are fetched for 3.12 whatever runs pip): .venv's if made.
gpu-bundle: ## stage gpu-bundle/: the wheels and trimmed Triton an offline GPU host lacks (<= 50 MiB)
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) -m bench.gpu_bundle stage

format: setup ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean: ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .hypothesis
