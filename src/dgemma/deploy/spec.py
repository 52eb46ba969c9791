"""What one `dgemma deploy` renders: a validated DeploySpec (GPU profile, precision, replicas, GPUs per pod, image,
node label, options). Every rule that can refuse a deployment lives here and raises ConfigError naming the value,
the limit and the fix; the manifest builders trust the spec.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .. import __version__
from ..core.errors import ConfigError
from ..core.profiles import PROFILES, Target, check_memory, resolve
from . import image, scaling

# GPU Feature Discovery's `nvidia.com/gpu.product` (the NVML device name, spaces as dashes). h100: the device name
# in our measured runs ("NVIDIA H100 80GB HBM3", bench/results/h100); h200/b200: the labels public manifests select
# on (NVIDIA-H200, NVIDIA-B200). Other boards (H100 PCIe, H200 NVL) carry other labels: pass --gpu-product.
GPU_PRODUCT = {"h100": "NVIDIA-H100-80GB-HBM3", "h200": "NVIDIA-H200", "b200": "NVIDIA-B200"}
MAX_GPUS_PER_POD = 8  # an HGX/DGX board; one Triton instance of the dgemma model per GPU
MAX_REPLICAS = 1000
ENGINE_CACHES = ("pvc", "emptydir")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")


@dataclass(frozen=True)
class DeploySpec:
    target: Target
    replicas: int  # Deployment replicas = HPA minReplicas
    max_replicas: int  # HPA maxReplicas
    gpus: int  # GPUs per pod = Triton instances of the dgemma model
    image: str
    gpu_product: str  # nvidia.com/gpu.product the pods are scheduled on
    expose_triton_http: bool = False  # opt-in: Triton's HTTP port on the pod IP and the Service (see manifests)
    engine_cache: str = "pvc"  # pvc: engines persist per GPU model across pods; emptydir: built by every pod
    prometheus_url: str = "http://prometheus-operated.monitoring.svc:9090"  # KServe variant's KEDA trigger
    version: str = __version__

    @property
    def key(self) -> str:
        return f"{self.target.gpu.name}-{self.target.precision.value}"

    @property
    def weights_gib(self) -> float:
        """One engine's weights (GpuProfile memory plan); each pod holds two engines per GPU."""
        return check_memory(self.target).weights_gib

    @property
    def hpa_targets(self) -> tuple[int, int]:
        return scaling.hpa_targets(self.target.gpu.max_batch, self.gpus)

    @property
    def startup_failure_threshold(self) -> int:
        return scaling.startup_failure_threshold(self.weights_gib)

    @property
    def host_memory_gib(self) -> int:
        """Host RAM per pod for Triton: an engine plan passes through host memory while it is deserialized, plus the
        python stub, torch and the tokenizer; two engines per GPU load one after another."""
        return int(round(self.weights_gib * 1.5 + 16 * self.gpus))

    @property
    def build_memory_gib(self) -> int:
        """Host RAM for the engine build: the ONNX graphs' weights plus TensorRT's builder (estimate)."""
        return int(round(self.weights_gib * 3 + 16))


def _count(name: str, value, lo: int, hi: int, why: str) -> int:
    try:
        v = int(str(value).strip(), 10)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number (got {value!r}); {why}.") from None
    if not lo <= v <= hi:
        raise ConfigError(f"{name} must be in {lo}..{hi} (got {v}); {why}.")
    return v


def parse_gpus(value) -> int:
    """`--gpus`: a count ("4") or the device ids a pod sees ("0,1,2,3"). Inside a pod the device plugin numbers the
    GPUs it assigns 0..N-1, so a list must be exactly that."""
    text = str(value).strip()
    why = f"GPUs per pod (one dgemma model instance each); a node board holds at most {MAX_GPUS_PER_POD}"
    if "," not in text:
        return _count("--gpus", text, 1, MAX_GPUS_PER_POD, why)
    try:
        ids = [int(x, 10) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"--gpus takes a count or comma-separated device ids (got {value!r}); e.g. --gpus 4 or "
                          "--gpus 0,1,2,3.") from None
    if ids != list(range(len(ids))):
        raise ConfigError(f"--gpus {text}: inside a pod the {len(ids)} GPU(s) the device plugin assigns are numbered "
                          f"0..{len(ids) - 1}; pass --gpus {len(ids)} "
                          f"(or --gpus {','.join(map(str, range(len(ids))))}).")
    return _count("--gpus", len(ids), 1, MAX_GPUS_PER_POD, why)


def deployable(gpu: str, precision: str) -> Target:
    """The target, or ConfigError when this (gpu, precision) cannot be served by the pinned Triton image."""
    supported = ", ".join(GPU_PRODUCT)
    if gpu in PROFILES and PROFILES[gpu].sm == 0:
        raise ConfigError(f"GPU profile {gpu!r} has no GPU to schedule on (it is the ONNX Runtime CI profile); "
                          f"deploy one of {supported}, or run it locally with `make serve GPU=cpu`.")
    target = resolve(gpu, precision)  # unknown profile or precision, or the hardware rule: names the fix
    if target.gpu.trt != "tensorrt":
        raise ConfigError(f"GPU profile {gpu!r} builds TensorRT-RTX engines (GpuProfile.trt={target.gpu.trt!r}); "
                          "Triton's tensorrt_plan backend loads full-TensorRT plans only (toolchain.md §3), so the "
                          f"service would not run the {precision} engines. Deploy one of {supported}, or serve "
                          f"{gpu} locally with `make serve GPU={gpu} PRECISION={precision}`.")
    if target.precision.value == "nvfp4" and not image.tensorrt_at_least(image.NVFP4_MIN_TENSORRT):
        need = ".".join(map(str, image.NVFP4_MIN_TENSORRT))
        raise ConfigError(f"precision 'nvfp4' on {gpu}: the NVFP4 graphs need TensorRT >= {need} "
                          f"(TRT_FP4DynamicQuantize, toolchain.md §2.5); the pinned image {image.TRITON_IMAGE} has "
                          f"TensorRT {image.TENSORRT_VERSION} (dgemma/deploy/image.py). Use --precision fp8, or "
                          "pin a Triton release with TensorRT 11 there.")
    check_memory(target)  # both engines + KV + logits must fit one GPU: names the numbers and what fits
    return target


def make_spec(gpu: str, precision: str, replicas=1, max_replicas=None, gpus="1", image_name: str | None = None,
              gpu_product: str | None = None, expose_triton_http: bool = False, engine_cache: str = "pvc",
              prometheus_url: str | None = None) -> DeploySpec:
    target = deployable(gpu, precision)
    n = _count("--replicas", replicas, 1, MAX_REPLICAS, "pods serving at all times (the HPA's minReplicas); "
               "at least one, e.g. --replicas 1")
    hi = n * 2 if max_replicas is None else _count("--max-replicas", max_replicas, 1, MAX_REPLICAS,
                                                    "the HPA's ceiling")
    if hi < n:
        raise ConfigError(f"--max-replicas {hi} is below --replicas {n}; the autoscaler's ceiling must be >= its "
                          f"floor: pass --max-replicas {n} or more.")
    img = image_name or image.default_image(__version__)
    if not img or any(c.isspace() for c in img):
        raise ConfigError(f"--image {img!r} is not an image reference; "
                          "e.g. --image registry.example/dgemma-triton:0.1.0")
    product = gpu_product or GPU_PRODUCT[target.gpu.name]
    if not _LABEL_VALUE.match(product):
        raise ConfigError(f"--gpu-product {product!r} is not a Kubernetes label value (<= 63 of A-Z a-z 0-9 . _ -, "
                          "alphanumeric at both ends); copy it from `kubectl get nodes -L nvidia.com/gpu.product`.")
    if engine_cache not in ENGINE_CACHES:
        raise ConfigError(f"--engine-cache {engine_cache!r}; valid: {', '.join(ENGINE_CACHES)} (pvc needs a "
                          "ReadWriteMany storage class, emptydir rebuilds the engines in every new pod).")
    extra = {"prometheus_url": prometheus_url} if prometheus_url else {}
    return DeploySpec(target, n, hi, parse_gpus(gpus), img, product, expose_triton_http, engine_cache, **extra)
