"""The container image every pod of `dgemma deploy` runs: the NGC Triton release, the TensorRT it ships, and the
Dockerfile that adds dgemma to it. The one place the Triton tag and the TensorRT version are paired.

Engines are not portable across TensorRT versions: the engine-build init container (TensorRT's Python builder,
pip-installed here) and Triton's tensorrt_plan backend (the image's libnvinfer) must be the same TensorRT, or Triton
refuses the plans. Sources of the pairing (read 2026-12 with the search tool):
- docs.nvidia.com/deeplearning/triton-inference-server/release-notes/rel-25-03.html: release 25.03 is based on
  CUDA 12.8.1.012, compute capability 7.5 and later including Blackwell (SM100, SM120).
- triton-inference-server/server docs/introduction/compatibility.md: the 25.03 Triton containers ship TensorRT
  10.9.0.34 on CUDA 12.8.1.012. That table lists the trtllm-python-py3 flavour; that the -py3 flavour of the
  same month (same CUDA) carries the same TensorRT is our inference, so the engine-build init container checks
  the libnvinfer Triton loads and the builder's version against TENSORRT_VERSION before it builds anything.
- build.py DEFAULT_TRITON_VERSION_MAP in the same repository: Triton 2.56.0 is container 25.03.
"""

from __future__ import annotations

TRITON_RELEASE = "25.03"  # NGC month; bump TRITON_RELEASE, TRITON_SERVER and TENSORRT_VERSION together
TRITON_SERVER = "2.56.0"
TENSORRT_VERSION = "10.9.0.34"
CUDA_VERSION = "12.8.1.012"
TRITON_IMAGE = f"nvcr.io/nvidia/tritonserver:{TRITON_RELEASE}-py3"
# TensorRT's own wheels (pypi.nvidia.com) for the builder; the CUDA 12 build matches CUDA_VERSION's major
TENSORRT_WHEEL = f"tensorrt-cu12=={TENSORRT_VERSION}"
# the gRPC client of the openai sidecar and the OpenAI server itself (dgemma.serving.openai_api): the same pins as
# the serve extra (pyproject.toml; a test keeps them in step), without the extra's own tritonserver and test clients
TRITONCLIENT = "tritonclient[grpc,http]==2.73.0"
OPENAI_SERVER = ("starlette==1.10.0", "uvicorn==0.54.0", "jinja2==3.1.6")
# dgemma's source tree inside the image (the Triton python stub imports dgemma from its src/: serving.render writes
# that path into every model.py) and the work directory (DGEMMA_WORKDIR: engines/ and build/ resolve under it,
# core.layout), where the pods mount the engine cache
DGEMMA_ROOT = "/opt/dgemma"
WORKDIR = DGEMMA_ROOT
VENV = "/opt/venv"
# NVFP4 graphs use trt::TRT_FP4DynamicQuantize, which needs TensorRT >= 11.0 (toolchain.md §2.5, ModelOpt's
# examples/torch_onnx README); no Triton release in the compatibility table ships TensorRT 11 yet
NVFP4_MIN_TENSORRT = (11, 0)


def default_image(version: str) -> str:
    """The tag `make deploy` writes when IMAGE= is not given: push it to your registry and pass IMAGE=<that>."""
    return f"dgemma-triton:{version}-triton{TRITON_RELEASE}"


def tensorrt_at_least(version: tuple[int, int]) -> bool:
    return tuple(int(x) for x in TENSORRT_VERSION.split(".")[:2]) >= version


def dockerfile(version: str) -> str:
    """Build from the dgemma repository root: docker build -f <this file> -t <registry>/<image> ."""
    return f"""\
# Rendered by `dgemma deploy` (dgemma {version}); the pairing below lives in src/dgemma/deploy/image.py.
# Triton {TRITON_SERVER} (NGC {TRITON_RELEASE}, CUDA {CUDA_VERSION}) serves the engines with its tensorrt_plan
# backend, whose libnvinfer is TensorRT {TENSORRT_VERSION}; the Python builder installed below must be the same
# version.
FROM {TRITON_IMAGE}
# curl: the exec probes query Triton's loopback-only HTTP port (the NGC image has it; installed anyway so the
# probes do not depend on the base image's contents). python3-venv: PEP 668 keeps pip out of the system Python.
RUN apt-get update && apt-get install -y --no-install-recommends curl python3-venv && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv {VENV}
# the Triton python stub takes its sys.prefix from the first python3 on PATH (toolchain.md §3.2)
ENV PATH={VENV}/bin:/opt/tritonserver/bin:$PATH
RUN pip install --no-cache-dir --extra-index-url https://pypi.nvidia.com "{TENSORRT_WHEEL}" \\
    "{TRITONCLIENT}" {" ".join(f'"{p}"' for p in OPENAI_SERVER)}
COPY pyproject.toml README.md {DGEMMA_ROOT}/
COPY src {DGEMMA_ROOT}/src
# the Triton templates and the tiny model are package data under src/; artifacts go to the work directory
RUN pip install --no-cache-dir -e {DGEMMA_ROOT}
ENV DGEMMA_WORKDIR={WORKDIR}
WORKDIR {WORKDIR}
"""
