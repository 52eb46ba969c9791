# dgemma: one target per pipeline stage. `make demo` and `make test` set themselves up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
GPU ?= cpu
PRECISION ?= bf16
CKPT ?=
SEED ?= 0
STAMP := $(VENV)/.dgemma-installed

SCENARIO ?= anchor,adaptive
BACKEND ?= torch
BENCH_ARGS ?=

.PHONY: venv demo test test-gpu clean-venv init-tiny generate profiles bench report

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

venv: $(STAMP)

init-tiny: $(STAMP)
	$(PY) -m dgemma init-tiny build/checkpoints/tiny

# The main job end to end on the embedded tiny default.
demo: $(STAMP)
	@echo "== dgemma demo: tiny DiffusionGemma on CPU =="
	$(PY) -m dgemma init-tiny build/checkpoints/tiny
	$(PY) -m dgemma generate --prompt "Why is the sky blue?" --seed $(SEED) --stream
	$(PY) -m dgemma generate --prompt "Why is the sky blue?" --seed $(SEED) --json

profiles: $(STAMP)
	$(PY) -m dgemma profiles

# Benchmarks: one JSON per scenario under bench/results/<gpu>/<precision>/. GPU profiles default to
# --checkpoint synthetic (full-size shapes, random weights); GPU=cpu runs the reduced form on the tiny model.
bench: $(STAMP)
	$(PY) -m dgemma bench --gpu $(GPU) --precision $(PRECISION) --scenario $(SCENARIO) --backend $(BACKEND) \
		$(if $(CKPT),--checkpoint $(CKPT)) $(BENCH_ARGS)

# `make report GPU=h100 PRECISION=fp8` -> bench/reports/h100-fp8.md + plots; without GPU: all results in one table.
report: $(STAMP)
	$(PY) -m dgemma report $(if $(filter-out cpu,$(GPU)),--gpu $(GPU) --precision $(PRECISION))

generate: $(STAMP)
	$(PY) -m dgemma generate $(if $(CKPT),--checkpoint $(CKPT)) --prompt "$(PROMPT)" --seed $(SEED)

# CPU suite; the GPU is hidden like ModelOpt's CPU unit tests.
test: $(STAMP)
	CUDA_VISIBLE_DEVICES= $(PY) -m pytest tests -m "not gpu"

test-gpu: $(STAMP)
	$(PY) -m pytest tests -m gpu

clean-venv:
	rm -rf $(VENV)
