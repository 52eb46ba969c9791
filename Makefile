# dgemma: one target per pipeline stage. `make demo` and `make test` set themselves up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
GPU ?= cpu
PRECISION ?= bf16
CKPT ?=
QUANTIZED ?=
SEED ?= 0
STAMP := $(VENV)/.dgemma-installed

SCENARIO ?= anchor,adaptive
BACKEND ?= torch
URL ?=
OPENAI_PORT ?= 9000
BENCH_ARGS ?=
LOADTEST_ARGS ?=
REPLICAS ?= 1
GPUS ?= 1
IMAGE ?=
DEPLOY_ARGS ?=

.PHONY: venv demo test test-gpu clean-venv init-tiny train-tiny eval generate profiles bench report quantize onnx \
	engines repo serve openai loadtest perf-tools probe deploy

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

venv: $(STAMP)

init-tiny: $(STAMP)
	$(PY) -m dgemma init-tiny build/checkpoints/tiny

# The main job end to end on the embedded tiny default (a DiffusionGemma trained to sort digits).
demo: $(STAMP)
	@echo "== dgemma demo: the embedded tiny DiffusionGemma (trained to sort digits) on CPU =="
	$(PY) -m dgemma generate --prompt "sort: 3 1 4 1 5 9 2 6 5 3" --seed $(SEED) --stream
	$(PY) -m dgemma generate --prompt "sort: 8 0 7 2 2 9 4 1 6 3" --seed $(SEED) --json
	@echo "== infill: fixed tokens stay fixed, only the holes (_) are denoised =="
	$(PY) -m dgemma generate --prompt "sort: 8 0 7 2 2 9 4 1 6 3" --infill "0 1 _ _ _ _ _ _ _ _ _ _ _ _ _ _ 8 9" --seed $(SEED)
	@echo "== held-out accuracy, adaptive stopping vs fixed 16 steps =="
	$(PY) -m dgemma eval --n 100
	$(PY) -m dgemma eval --n 100 --steps 16 --fixed-steps
	@echo "== pipeline on the tiny model: quantize fp8 -> onnx -> engines (GPU=cpu) -> generate through ONNX Runtime =="
	time $(PY) -m dgemma quantize --precision fp8 --eval-n 20 --heldout "" --out build/demo-quantize
	time $(PY) -m dgemma onnx --precision fp8 --quantized build/demo-quantize/fp8
	time $(PY) -m dgemma engines --gpu cpu --precision fp8
	time $(PY) -m dgemma generate --backend ort --precision fp8 --prompt "sort: 5 2 8 1 9 0 3 3 7 4" --seed $(SEED)
	@echo "== fp32 graphs: the ONNX Runtime reference the Triton loop below runs =="
	time $(PY) -m dgemma onnx --precision fp32
	@echo "== Triton: tritonserver on 127.0.0.1 (GPU=cpu, tiny model, ONNX graphs above), prompts over gRPC =="
	@rm -f build/demo-serve.json; mkdir -p build; \
	$(PY) -m dgemma serve --gpu cpu --precision bf16 --ready-file build/demo-serve.json > build/demo-serve.out 2>&1 & \
	pid=$$!; trap 'kill $$pid 2>/dev/null; wait $$pid 2>/dev/null; echo "== server stopped (pid $$pid)"' EXIT; \
	for i in $$(seq 360); do [ -s build/demo-serve.json ] && break; \
	  kill -0 $$pid 2>/dev/null || { cat build/demo-serve.out; exit 1; }; sleep 0.5; done; \
	[ -s build/demo-serve.json ] || { echo "server not ready after 180 s"; cat build/demo-serve.out; exit 1; }; \
	cat build/demo-serve.out; \
	url=$$($(PY) -c "import json; print(json.load(open('build/demo-serve.json'))['grpc'])"); \
	metrics=$$($(PY) -c "import json; print(json.load(open('build/demo-serve.json'))['metrics'])"); \
	$(PY) -m dgemma client --url $$url --health && \
	$(PY) -m dgemma client --url $$url --prompt "sort: 3 1 4 1 5 9 2 6 5 3" --seed $(SEED) --stream --drafts --max-tokens 64 && \
	$(PY) -m dgemma client --url $$url --prompt "sort: 8 0 7 2 2 9 4 1 6 3" --seed $(SEED) --json && \
	$(PY) -m dgemma client --url $$url --prompt "sort: 5 2 8 1 9 0 3 3 7 4" --seed $(SEED) && \
	$(PY) -m dgemma client --url $$url --stats && \
	$(PY) -c "import sys, urllib.request; print('\n'.join(l for l in urllib.request.urlopen(sys.argv[1]).read().decode().splitlines() if l.startswith('dgemma_') and '_bucket' not in l))" $$metrics
	@echo "== benchmark summary (reduced CPU form) =="
	$(PY) -m dgemma bench --gpu cpu --scenario anchor,adaptive --out build/demo-bench 2>/dev/null

# Retrain the embedded default (deterministic for a seed; ~12 minutes on 2 cores).
train-tiny: $(STAMP)
	$(PY) -m dgemma train-tiny build/checkpoints/tiny-sort --seed $(SEED)

eval: $(STAMP)
	$(PY) -m dgemma eval $(if $(CKPT),--checkpoint $(CKPT)) --n 100

# `make quantize PRECISION=fp8|nvfp4 [CKPT=dir]` -> quantize/<precision>/ (checkpoint, scales, quality report)
quantize: $(STAMP)
	$(PY) -m dgemma quantize --precision $(PRECISION) $(if $(CKPT),--checkpoint $(CKPT))

profiles: $(STAMP)
	$(PY) -m dgemma profiles

# Benchmarks: one JSON per scenario under bench/results/<gpu>/<precision>/. BACKEND=torch|fast|ort|trt|triton;
# in-process GPU profiles default to --checkpoint synthetic (full-size shapes, random weights); GPU=cpu runs the
# reduced form on the tiny model. BACKEND=triton renders the repository and starts tritonserver (or URL=host:port).
# docs/benchmarking.md: metric definitions, the Triton concurrency sweep, perf_analyzer and genai-perf.
bench: $(STAMP)
	$(PY) -m dgemma bench --gpu $(GPU) --precision $(PRECISION) --scenario $(SCENARIO) --backend $(BACKEND) \
		$(if $(CKPT),--checkpoint $(CKPT)) $(if $(URL),--url $(URL)) $(BENCH_ARGS)

# perf_analyzer 2.60 (manylinux_2_38 wheel; through Debian trixie's loader on an older glibc) and genai-perf
# (own venv) -> build/tools/bin/; tests/stages/serving/test_perf_tools.py runs them when present.
perf-tools: $(STAMP)
	bash bench/perf/install-tools.sh $(PYTHON)

# `make report GPU=h100 PRECISION=fp8` -> bench/reports/h100-fp8.md + plots (GPU=cpu: the CPU report); without GPU
# on the command line: every result in one table (bench/reports/all.md). Same as `dgemma report [--gpu --precision]`.
report: $(STAMP)
	$(PY) -m dgemma report $(if $(filter command line environment,$(origin GPU)),--gpu $(GPU) --precision $(PRECISION))

generate: $(STAMP)
	$(PY) -m dgemma generate $(if $(CKPT),--checkpoint $(CKPT)) --prompt "$(PROMPT)" --seed $(SEED)

# ONNX graphs (encoder, denoiser) -> build/onnx/$(PRECISION)/; PRECISION=fp32 gives graphs ONNX Runtime CPU runs.
# PRECISION=fp8|nvfp4: Q/DQ graphs from `make quantize PRECISION=...` (quantize/$(PRECISION)/, or QUANTIZED=dir);
# fp8 graphs run in ONNX Runtime too, nvfp4 graphs only in TensorRT-RTX (SM120).
onnx: $(STAMP)
	$(PY) -m dgemma onnx --precision $(PRECISION) $(if $(CKPT),--checkpoint $(CKPT)) \
		$(if $(QUANTIZED),--quantized $(QUANTIZED))

# TensorRT engines -> engines/$(GPU)/$(PRECISION)/; GPU=cpu builds ahead of time with TensorRT-RTX (SM120 + SM89;
# nvfp4: SM120 only, Ada has no FP4).
engines: $(STAMP)
	$(PY) -m dgemma engines --gpu $(GPU) --precision $(PRECISION)

# Triton model repository -> build/triton/$(GPU)/$(PRECISION)/{models,backends}; `serve` renders it and runs
# tritonserver on 127.0.0.1 (Triton's ports 8000/8001/8002, free ones for any that is busy; printed; Ctrl-C stops
# it). GPU=cpu needs the fp32 ONNX graphs (make onnx PRECISION=fp32). Talk to it with `dgemma client`;
# `make openai` puts the OpenAI-compatible HTTP API in front of it; `make loadtest` measures it.
repo: $(STAMP)
	$(PY) -m dgemma repo --gpu $(GPU) --precision $(PRECISION) $(if $(CKPT),--checkpoint $(CKPT))

serve: $(STAMP)
	$(PY) -m dgemma serve --gpu $(GPU) --precision $(PRECISION) $(if $(CKPT),--checkpoint $(CKPT))

# OpenAI-compatible API on http://127.0.0.1:$(OPENAI_PORT)/v1 in front of a running `make serve` (URL=host:port of
# its gRPC endpoint; default 127.0.0.1:8001, else the one it wrote to build/serve.json). DGEMMA_API_KEY=... to
# require a key.
openai: $(STAMP)
	$(PY) -m dgemma openai --port $(OPENAI_PORT) $(if $(URL),--url $(URL)) $(if $(CKPT),--checkpoint $(CKPT))

# Serving under load (was `dgemma loadtest`): the Triton concurrency sweep of `dgemma bench`, with the loop's step time
# and the graph models' batch sizes per level from the server's metrics.
loadtest: $(STAMP)
	$(PY) -m dgemma bench --gpu cpu --backend triton --scenario concurrency $(LOADTEST_ARGS)

# Kubernetes manifests -> build/deploy/$(GPU)/$(PRECISION)/: kustomize base + overlays/$(GPU)-$(PRECISION),
# rendered.yaml, image/Dockerfile (NGC Triton + dgemma), monitoring/ (prometheus-adapter rules), kserve/
# (InferenceService variant). GPUS=<n> GPUs per pod (one dgemma instance each); IMAGE=<registry>/<name>:<tag>;
# DEPLOY_ARGS="--expose-triton-http ...".
deploy: $(STAMP)
	$(PY) -m dgemma deploy --gpu $(GPU) --precision $(PRECISION) --replicas $(REPLICAS) --gpus $(GPUS) \
		$(if $(IMAGE),--image $(IMAGE)) $(DEPLOY_ARGS)

# GPU probe of the fast path (full size on CUDA, FP8 unless PRECISION is given; `make probe GPU=cpu`: the tiny CPU form)
probe: $(STAMP)
	$(PY) -m dgemma probe $(if $(filter cpu,$(GPU)),--device cpu --tiny,--precision $(if $(filter command line environment,$(origin PRECISION)),$(PRECISION),fp8))

# CPU suite; the GPU is hidden like ModelOpt's CPU unit tests.
test: $(STAMP)
	CUDA_VISIBLE_DEVICES= $(PY) -m pytest tests -m "not gpu"

test-gpu: $(STAMP)
	$(PY) -m pytest tests -m gpu

clean-venv:
	rm -rf $(VENV)
