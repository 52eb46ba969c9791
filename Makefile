# dgemma: one target per pipeline stage. `make demo` and `make test` set themselves up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
GPU ?= cpu
PRECISION ?= fp8
CKPT ?=
SEED ?= 0
STAMP := $(VENV)/.dgemma-installed

.PHONY: venv demo test test-gpu clean-venv init-tiny generate

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

generate: $(STAMP)
	$(PY) -m dgemma generate $(if $(CKPT),--checkpoint $(CKPT)) --prompt "$(PROMPT)" --seed $(SEED)

# CPU suite; the GPU is hidden like ModelOpt's CPU unit tests.
test: $(STAMP)
	CUDA_VISIBLE_DEVICES= $(PY) -m pytest tests -m "not gpu"

test-gpu: $(STAMP)
	$(PY) -m pytest tests -m gpu

clean-venv:
	rm -rf $(VENV)
