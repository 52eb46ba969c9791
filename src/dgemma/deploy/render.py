"""`dgemma deploy` (`make deploy`): write one GPU profile's Kubernetes manifests into build/deploy/<gpu>/<precision>/
in the work directory (core.layout), atomically (a temp directory beside it, renamed into place: an error leaves
the previous tree or nothing).

Layout: base/ (GPU-neutral, kustomize), overlays/<gpu>-<precision>/ (JSON patches), rendered.yaml (the overlay
applied: what `kubectl apply -k` creates), image/Dockerfile, monitoring/ (prometheus-adapter rules), kserve/
(the InferenceService variant), README.md. Objects are Python dicts (manifests.py) dumped with PyYAML: the same
objects the tests validate, no template language to escape through.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
import textwrap
from pathlib import Path

from ..core.errors import ConfigError
from ..core.layout import current
from ..core.manifest import publish_dir
from . import image, manifests, overlay
from .spec import DeploySpec


def _yaml():
    try:
        import yaml  # the deploy extra; imported when rendering, not when the CLI starts
    except ImportError:
        raise ConfigError("dgemma deploy writes YAML with PyYAML: install the deploy extra "
                          "(pip install -e '.[deploy]').") from None
    return yaml


@functools.cache
def _dumper():
    yaml = _yaml()

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data) -> bool:  # shared sub-objects are written out in full, never as &id/*id
            return True

    def text(dumper, value: str):  # scripts and embedded YAML as literal blocks, not escaped one-liners
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    Dumper.add_representer(str, text)
    return Dumper


def dump(obj, comment: str = "") -> str:
    lines = [w for line in comment.splitlines() for w in textwrap.wrap(line, 116) or [""]]
    head = "".join(f"# {line}".rstrip() + "\n" for line in lines)
    return head + _yaml().dump(obj, Dumper=_dumper(), sort_keys=False, width=120)


def files(spec: DeploySpec) -> dict[str, str]:
    """relative path -> text of every file `deploy` writes for `spec`."""
    t = spec.target
    hdr = f"Rendered by `dgemma deploy` (dgemma {spec.version}, src/dgemma/deploy); edit the source, not this file."
    base = manifests.base(spec)
    patches = overlay.ops(spec, base)
    out = {f"base/{name}": dump(obj, hdr) for name, obj in base.items()}
    out["base/service.yaml"] = dump(base["service.yaml"], hdr + "\nTriton's HTTP port 8000 is not listed: "
                                    "tritonserver binds it to 127.0.0.1 (probes exec curl inside the pod).\n"
                                    "Opt in with `dgemma deploy --expose-triton-http`; risk: " + manifests.HTTP_RISK)
    out["base/kustomization.yaml"] = dump({"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                                           "resources": list(base)}, hdr + "\nGPU-neutral: apply an overlay.")
    kust = overlay.kustomization(patches)
    note = (f"\n{t.key} on {spec.gpu_product}: {spec.replicas} replica(s) (HPA up to {spec.max_replicas}), "
            f"{spec.gpus} GPU(s) per pod.")
    if spec.expose_triton_http:
        note += f"\nTriton's HTTP port 8000 is EXPOSED (--expose-triton-http). Risk: {manifests.HTTP_RISK}"
    out[f"overlays/{spec.key}/kustomization.yaml"] = dump(kust, hdr + note)
    built = overlay.build(base, patches)
    out["rendered.yaml"] = "---\n".join(dump(obj, hdr + f"\n{name}: `kustomize build overlays/{spec.key}`" + note)
                                        for name, obj in built.items())
    out["monitoring/prometheus-adapter-rules.yaml"] = dump(manifests.adapter_rules(spec), hdr + (
        "\nprometheus-adapter rules for the HPA's two pods metrics (dgemma_requests_queued, dgemma_requests_active):"
        "\nmerge `rules` into your adapter's config (its ConfigMap, or the Helm chart's rules.custom) in the "
        "adapter's\nnamespace. The gauges are summed over a pod's Triton instances (one per GPU)."))
    out["kserve/inferenceservice.yaml"] = dump(manifests.inference_service(spec), hdr + (
        "\nKServe variant (KServe's Triton runtime, RawDeployment, KEDA on the queue gauge): apply with "
        "base/pvc-*.yaml\ninstead of the overlay, never both. gRPC only: Triton's HTTP stays on 127.0.0.1."))
    out["image/Dockerfile"] = image.dockerfile(spec.version)
    out["README.md"] = readme(spec)
    return out


def readme(spec: DeploySpec) -> str:
    t, k, p = spec.target, spec.key, spec.target.precision.value
    ports = manifests.PORTS
    exposed = " (EXPOSED by --expose-triton-http)" if spec.expose_triton_http else ""
    return f"""# dgemma on Kubernetes: {t.key}

Rendered by `dgemma deploy` (dgemma {spec.version}): {spec.replicas} replica(s), HPA up to {spec.max_replicas},
{spec.gpus} GPU(s) per pod on nodes labelled `nvidia.com/gpu.product={spec.gpu_product}`. Image `{spec.image}`,
built from `image/Dockerfile` on {image.TRITON_IMAGE} (Triton {image.TRITON_SERVER}, TensorRT {image.TENSORRT_VERSION}).

1. Build and push the image from the dgemma repository root:
   `docker build -f build/deploy/{t.gpu.name}/{p}/image/Dockerfile -t {spec.image} .`
   (push it to your registry; re-render with `--image <registry>/<name>:<tag>` if it is not `{spec.image}`).
2. Fill the `dgemma-artifacts` volume (base/pvc-artifacts.yaml, mounted read-only at {manifests.ARTIFACTS}):
   `checkpoint/` (the Hugging Face checkpoint: config.json, generation_config.json, tokenizer.json, weights) and
   `onnx/{p}/` (`make quantize PRECISION={p}` then `make onnx PRECISION={p}`, i.e. build/onnx/{p}/). The graphs
   are portable; the engines are not and are built in the pods.
3. `kubectl apply -k overlays/{k}` (or `kubectl apply -f rendered.yaml`: the same objects).
   First start on a GPU model: the `engines` init container runs `dgemma engines` (TensorRT, on that node's GPU) and
   stores the engines in the `dgemma-engines` cache; later pods reuse them when their manifest matches this
   TensorRT and these ONNX graphs.
4. Autoscaling needs Prometheus (the ServiceMonitor) and prometheus-adapter with `monitoring/` rules.

Ports: gRPC {ports['grpc']}, metrics {ports['metrics']}, OpenAI-compatible {ports['openai']}.
Triton's HTTP {ports['http']} listens on 127.0.0.1 only{exposed}.
Capacity planning: docs/scaling.md.
"""


def write(spec: DeploySpec, out: str | Path | None = None) -> Path:
    """Write every file of `files(spec)` under out (default build/deploy/<gpu>/<precision> in the work directory),
    atomically."""
    root = Path(out) if out else current().deploy(spec.target.gpu.name, spec.target.precision.value)
    root.parent.mkdir(parents=True, exist_ok=True)
    texts = files(spec)  # everything is rendered before the first byte is written
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        for rel, text in texts.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(text)
        publish_dir(tmp, root)  # the previous tree is swapped out, then removed
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root

