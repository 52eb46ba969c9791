"""Kubernetes objects of a dgemma service, as plain dicts: the GPU-neutral base (ConfigMap, PVCs, Deployment with
its init containers, Service, PodDisruptionBudget, HPA, ServiceMonitor), the KServe InferenceService variant and
the prometheus-adapter rules. Knows nothing of files or kustomize (overlay.py patches the base per GPU profile).

A pod: init `engines` (check the TensorRT pairing; reuse engines/<gpu>/<precision> from the cache when its manifest
matches this TensorRT and the ONNX graphs, else `dgemma engines` on this node's GPU), init `repo` (`dgemma repo`
renders the model repository in the pod, so every absolute path in it is the pod's own), then `triton` and the
`openai` sidecar (`dgemma openai`, with the checkpoint's tokenizer and chat template). Triton's HTTP port stays on
127.0.0.1 (tritonserver 2.51's HTTP frontend crashes on a ~200 KB deeply nested JSON body): probes exec curl inside
the container; the Service exposes gRPC, metrics and OpenAI.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import image, scaling
from .spec import DeploySpec

NAME = "dgemma"
TARGET_CONFIG = "dgemma-target"  # ConfigMap: DGEMMA_GPU / DGEMMA_PRECISION / DGEMMA_GPUS, set by the overlay
SELECTOR = {"app.kubernetes.io/name": NAME, "app.kubernetes.io/component": "triton"}
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002, "openai": 9000}
GPU = "nvidia.com/gpu"
# gauges the dgemma model reports (serving.metrics.METRICS; a test keeps the names in step)
QUEUED, ACTIVE = "dgemma_requests_queued", "dgemma_requests_active"
HTTP_RISK = ("tritonserver 2.51's HTTP frontend crashes (SIGSEGV) on a ~200 KB deeply nested JSON body: anyone who "
             "reaches port 8000 can take the pod down. Expose it only behind a proxy that limits body size and depth.")

# engines/ under the image's work directory (DGEMMA_WORKDIR, core.layout): where `dgemma engines` writes and
# `dgemma repo` links the plans from
ARTIFACTS, ENGINES, REPO = "/artifacts", f"{image.WORKDIR}/engines", "/srv/triton-repo"
CHECKPOINT, ONNX = f"{ARTIFACTS}/checkpoint", f"{ARTIFACTS}/onnx"

# init container `engines`: bash -ec. The python heredocs run dgemma's own checks inside the image.
ENGINES_SCRIPT = f"""\
: "${{DGEMMA_GPU:?unset: apply an overlay (kubectl apply -k overlays/<gpu>-<precision>), not the base}}"
: "${{DGEMMA_PRECISION:?unset: apply an overlay}}"
python3 - <<'PY'
import ctypes, os, sys
want = tuple(int(x) for x in os.environ["DGEMMA_TENSORRT"].split(".")[:3])
try:
    v = ctypes.CDLL("libnvinfer.so.10").getInferLibVersion()  # the TensorRT Triton's tensorrt_plan backend loads
except OSError as e:
    sys.exit(f"libnvinfer.so.10 not found ({{e}}): this image has no TensorRT 10 for Triton's tensorrt backend")
base = 10000 if v >= 100000 else 1000  # TensorRT 10 encodes M*10000+m*100+p, older M*1000+m*100+p
have = (v // base, v % base // 100, v % 100)
import tensorrt  # the builder `dgemma engines` uses
if have != want or tuple(int(x) for x in tensorrt.__version__.split(".")[:3]) != want:
    sys.exit(f"TensorRT mismatch: Triton loads libnvinfer {{have}}, the builder is tensorrt {{tensorrt.__version__}}, "
             f"the manifests pair {image.TRITON_IMAGE} with {{os.environ['DGEMMA_TENSORRT']}}: rebuild the image "
             "from image/Dockerfile (src/dgemma/deploy/image.py holds the pairing)")
PY
if python3 - <<'PY'
import os, sys, tensorrt
from dgemma.core.errors import DgemmaError
from dgemma.core.layout import current
from dgemma.core.manifest import check_engines
gpu, precision = os.environ["DGEMMA_GPU"], os.environ["DGEMMA_PRECISION"]
try:  # the cache entry must match the ONNX graphs it was built from (their manifest) and this TensorRT
    m = check_engines(current().engines(gpu, precision))
except DgemmaError as e:
    sys.exit(f"building engines: {{e}}")
if m.get("onnx_dir") != f"{ONNX}/{{precision}}":
    sys.exit(f"building engines: the cached ones were built from {{m.get('onnx_dir')}}, not {ONNX}/{{precision}}")
if m["tensorrt"] != {{"flavour": "tensorrt", "version": tensorrt.__version__}}:
    sys.exit(f"building engines: the cached ones are {{m['tensorrt']}}, this image has {{tensorrt.__version__}}")
PY
then echo "engines up to date for $DGEMMA_GPU/$DGEMMA_PRECISION"
else dgemma engines --gpu "$DGEMMA_GPU" --precision "$DGEMMA_PRECISION" --onnx {ONNX}
fi
"""
REPO_SCRIPT = f"""\
: "${{DGEMMA_GPU:?unset: apply an overlay (kubectl apply -k overlays/<gpu>-<precision>), not the base}}"
dgemma repo --gpu "$DGEMMA_GPU" --precision "$DGEMMA_PRECISION" --checkpoint {CHECKPOINT} --engine tensorrt \\
  --backend bls --gpus "$DGEMMA_GPUS" --config-only --out {REPO}
"""
# flags as serving.server.Server.start passes them, with fixed ports and gRPC/metrics on the pod IP
TRITON_ARGS = [f"--model-repository={REPO}/models", "--backend-directory=/opt/tritonserver/backends",
               "--http-address=127.0.0.1", f"--http-port={PORTS['http']}", "--grpc-address=0.0.0.0",
               f"--grpc-port={PORTS['grpc']}", "--metrics-address=0.0.0.0", f"--metrics-port={PORTS['metrics']}",
               "--allow-metrics=true", "--model-control-mode=explicit", "--load-model=*", "--exit-on-error=true"]
# how long the openai sidecar waits for Triton's dgemma model at start (it starts with Triton, which opens its ports
# only once every model has loaded): beyond any startup budget, so a slow load does not crash-loop the sidecar; its
# startup probe allows as long (its port opens only after the wait), then liveness and readiness take over
OPENAI_WAIT_S = 3600


def labels(spec: DeploySpec) -> dict:
    return {**SELECTOR, "app.kubernetes.io/part-of": NAME, "app.kubernetes.io/version": spec.version,
            "app.kubernetes.io/managed-by": "dgemma-deploy"}


def meta(spec: DeploySpec, name: str = NAME, **extra) -> dict:
    return {"name": name, "labels": labels(spec), **extra}


def health(path: str, period: int, failures: int, timeout: int = 4) -> dict:
    """An exec probe on Triton's loopback-only HTTP endpoint (curl: see image.dockerfile)."""
    url = f"http://127.0.0.1:{PORTS['http']}/v2/health/{path}"
    return {"exec": {"command": ["curl", "-fsS", "-o", "/dev/null", "--max-time", str(timeout), url]},
            "periodSeconds": period, "timeoutSeconds": timeout + 1, "failureThreshold": failures}


def resources(cpu: str, memory_gib: int, gpus: int = 0) -> dict:
    req = {"cpu": cpu, "memory": f"{memory_gib}Gi"}
    lim = {"memory": f"{memory_gib}Gi"}
    if gpus:
        req[GPU] = lim[GPU] = gpus
    return {"requests": req, "limits": lim}


@dataclass(frozen=True)
class Sizing:
    """The target-dependent numbers of a pod: the base holds NEUTRAL ones, the overlay replaces them."""

    gpus: int
    host_gib: int
    build_gib: int
    startup_failures: int

    @classmethod
    def of(cls, spec: DeploySpec) -> "Sizing":
        return cls(spec.gpus, spec.host_memory_gib, spec.build_memory_gib, spec.startup_failure_threshold)


NEUTRAL = Sizing(gpus=1, host_gib=64, build_gib=96, startup_failures=90)


def containers(spec: DeploySpec, env: dict, size: Sizing) -> tuple[list, list]:
    """(init containers, containers) of a serving pod; `env` holds envFrom/env for the target's values."""
    common = {"image": spec.image, "imagePullPolicy": "IfNotPresent"}
    art = {"name": "artifacts", "mountPath": ARTIFACTS, "readOnly": True}
    init = [
        {"name": "engines", **common, "command": ["bash", "-ec", ENGINES_SCRIPT], **env,
         "resources": resources("8", size.build_gib, size.gpus),
         "volumeMounts": [art, {"name": "engines", "mountPath": ENGINES}]},
        {"name": "repo", **common, "command": ["bash", "-ec", REPO_SCRIPT], **env,
         "resources": resources("1", 2), "volumeMounts": [art, {"name": "repo", "mountPath": REPO}]},
    ]
    triton = {
        "name": "triton", **common, "command": ["tritonserver"], "args": list(TRITON_ARGS), **env,
        "ports": [{"name": p, "containerPort": PORTS[p], "protocol": "TCP"} for p in ("grpc", "metrics")],
        "resources": resources("8", size.host_gib, size.gpus),
        # Triton opens its endpoints only after --load-model=* has loaded every model: the startup probe covers
        # the load of both 26B engines (scaling.startup_failure_threshold); liveness and readiness start after it
        "startupProbe": health("ready", scaling.PROBE_PERIOD_S, size.startup_failures),
        "livenessProbe": health("live", 15, 4),
        "readinessProbe": health("ready", 5, 3),
        "volumeMounts": [art, {"name": "engines", "mountPath": ENGINES, "readOnly": True},
                         {"name": "repo", "mountPath": REPO, "readOnly": True},
                         {"name": "shm", "mountPath": "/dev/shm"}],
    }
    openai = {  # OpenAI-compatible server in front of Triton's gRPC (`dgemma openai`); the checkpoint's tokenizer
        # and chat template, named explicitly: without it the server would fall back to the embedded tiny model's
        "name": "openai", **common,
        "command": ["dgemma", "openai", "--url", f"127.0.0.1:{PORTS['grpc']}", "--host", "0.0.0.0",
                    "--port", str(PORTS["openai"]), "--checkpoint", CHECKPOINT, "--wait", str(OPENAI_WAIT_S)],
        "ports": [{"name": "openai", "containerPort": PORTS["openai"], "protocol": "TCP"}],
        "resources": resources("1", 2), "volumeMounts": [art],
        "startupProbe": {"tcpSocket": {"port": PORTS["openai"]}, "periodSeconds": scaling.PROBE_PERIOD_S,
                         "failureThreshold": OPENAI_WAIT_S // scaling.PROBE_PERIOD_S + 1},
        "readinessProbe": {"tcpSocket": {"port": PORTS["openai"]}, "periodSeconds": 5},
        "livenessProbe": {"tcpSocket": {"port": PORTS["openai"]}, "periodSeconds": 15, "failureThreshold": 4},
    }
    return init, [triton, openai]


def volumes(spec: DeploySpec) -> list:
    engines = ({"persistentVolumeClaim": {"claimName": "dgemma-engines"}} if spec.engine_cache == "pvc"
               else {"emptyDir": {"sizeLimit": "128Gi"}})
    return [{"name": "artifacts", "persistentVolumeClaim": {"claimName": "dgemma-artifacts", "readOnly": True}},
            {"name": "engines", **engines},
            {"name": "repo", "emptyDir": {"sizeLimit": "1Gi"}},
            # the python backend moves CPU tensors through /dev/shm; the container default (64 MiB) is too small
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}]


TOLERATIONS = [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}]  # GPU nodes are commonly tainted


def base(spec: DeploySpec) -> dict[str, dict]:
    """file name -> object: the GPU-neutral base (replicas 1, one GPU, no node selector, empty target)."""
    env = {"envFrom": [{"configMapRef": {"name": TARGET_CONFIG}}],
           "env": [{"name": "DGEMMA_TENSORRT", "value": image.TENSORRT_VERSION}]}
    init, ctrs = containers(spec, env, NEUTRAL)
    pod = {
        "metadata": {"labels": labels(spec), "annotations": {
            "dgemma.dev/triton-image": image.TRITON_IMAGE, "dgemma.dev/tensorrt": image.TENSORRT_VERSION}},
        "spec": {"terminationGracePeriodSeconds": 60, "tolerations": TOLERATIONS, "initContainers": init,
                 "containers": ctrs, "volumes": volumes(spec),
                 "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                                "whenUnsatisfiable": "ScheduleAnyway",
                                                "labelSelector": {"matchLabels": SELECTOR}}]},
    }
    out = {
        "configmap-target.yaml": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(spec, TARGET_CONFIG),
                                  "data": {"DGEMMA_GPU": "", "DGEMMA_PRECISION": "", "DGEMMA_GPUS": "1"}},
        "pvc-artifacts.yaml": pvc(spec, "dgemma-artifacts", "256Gi"),
    }
    if spec.engine_cache == "pvc":
        out["pvc-engines.yaml"] = pvc(spec, "dgemma-engines", "256Gi")
    out["deployment.yaml"] = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(spec),
        "spec": {"replicas": 1, "revisionHistoryLimit": 3, "selector": {"matchLabels": SELECTOR},
                 # a new pod takes minutes to load: keep every old pod serving until it is ready
                 "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                 "template": pod}}
    out["service.yaml"] = {
        "apiVersion": "v1", "kind": "Service", "metadata": meta(spec),
        "spec": {"type": "ClusterIP", "selector": SELECTOR, "ports": [
            {"name": p, "port": PORTS[p], "targetPort": p, "protocol": "TCP",
             **({"appProtocol": "grpc"} if p == "grpc" else {})} for p in ("grpc", "metrics", "openai")]}}
    out["pdb.yaml"] = {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": meta(spec),
                       "spec": {"maxUnavailable": 1, "selector": {"matchLabels": SELECTOR}}}
    out["hpa.yaml"] = hpa(spec)
    out["servicemonitor.yaml"] = {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": meta(spec),
        "spec": {"selector": {"matchLabels": SELECTOR},
                 "endpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s", "scrapeTimeout": "10s"}]}}
    return out


def pvc(spec: DeploySpec, name: str, size: str) -> dict:
    # ReadWriteMany: every pod reads the checkpoint/ONNX and shares the engine cache, whatever node it lands on
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta(spec, name),
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": size}}}}


def hpa(spec: DeploySpec) -> dict:
    def pods(metric: str, value: int) -> dict:
        return {"type": "Pods", "pods": {"metric": {"name": metric},
                                         "target": {"type": "AverageValue", "averageValue": str(value)}}}

    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": meta(spec),
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": NAME},
                     "minReplicas": 1, "maxReplicas": 1,
                     # queued requests drive scale-up; busy slots hold capacity (HPA takes the larger answer)
                     "metrics": [pods(QUEUED, 1), pods(ACTIVE, 1)],
                     "behavior": {
                         "scaleUp": {"stabilizationWindowSeconds": 60, "selectPolicy": "Max",
                                     "policies": [{"type": "Pods", "value": 2, "periodSeconds": 60}]},
                         # a removed replica costs minutes to bring back: shed one at a time, after 15 quiet minutes
                         "scaleDown": {"stabilizationWindowSeconds": 900,
                                       "policies": [{"type": "Pods", "value": 1, "periodSeconds": 300}]}}}}


def adapter_rules(spec: DeploySpec) -> dict:
    """prometheus-adapter rules serving the two gauges as custom pods metrics (summed over a pod's instances)."""
    import yaml

    rules = [{"seriesQuery": f'{m}{{namespace!="",pod!=""}}',
              "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
              "name": {"matches": f"^{m}$", "as": m},
              "metricsQuery": "sum(max_over_time(<<.Series>>{<<.LabelMatchers>>}[1m])) by (<<.GroupBy>>)"}
             for m in (QUEUED, ACTIVE)]
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(spec, "dgemma-prometheus-adapter-rules"),
            "data": {"config.yaml": yaml.safe_dump({"rules": rules}, sort_keys=False)}}


def inference_service(spec: DeploySpec) -> dict:
    """KServe variant: the same pod (init containers, Triton, probes, volumes) as an InferenceService on KServe's
    Triton runtime in RawDeployment mode, scaled by KEDA on the queue gauge. gRPC only (port h2c)."""
    t = spec.target
    env = {"env": [{"name": "DGEMMA_GPU", "value": t.gpu.name},
                   {"name": "DGEMMA_PRECISION", "value": t.precision.value},
                   {"name": "DGEMMA_GPUS", "value": str(spec.gpus)},
                   {"name": "DGEMMA_TENSORRT", "value": image.TENSORRT_VERSION}]}
    init, (triton, _openai) = containers(spec, env, Sizing.of(spec))
    model = {k: v for k, v in triton.items() if k != "name"}
    model.update(modelFormat={"name": "triton"}, runtime="kserve-tritonserver", protocolVersion="grpc-v2",
                 ports=[{"name": "h2c", "containerPort": PORTS["grpc"], "protocol": "TCP"}])
    queued, _active = spec.hpa_targets
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": meta(spec, annotations={"serving.kserve.io/deploymentMode": "RawDeployment",
                                                "serving.kserve.io/autoscalerClass": "keda"}),
            "spec": {"predictor": {
                "minReplicas": spec.replicas, "maxReplicas": spec.max_replicas,
                "nodeSelector": {"nvidia.com/gpu.product": spec.gpu_product}, "tolerations": TOLERATIONS,
                "terminationGracePeriodSeconds": 60, "initContainers": init, "volumes": volumes(spec),
                "model": model,
                "autoScaling": {"metrics": [{"type": "External", "external": {
                    "metric": {"backend": "prometheus", "serverAddress": spec.prometheus_url,
                               "query": f'sum({QUEUED}{{pod=~"{NAME}-predictor-.*"}})'},
                    "target": {"type": "AverageValue", "averageValue": str(queued)}}}]}}}}
