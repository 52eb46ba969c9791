"""The per-GPU-profile overlay: RFC 6902 JSON patches over the base (what `kustomize build overlays/<gpu>-<precision>`
applies), and `apply_patch`, the same operations in Python, so the rendered.yaml we validate is exactly what
kustomize produces without kustomize. Only `add` and `replace` on paths that exist in the base are used.
"""

from __future__ import annotations

import copy

from . import manifests as m
from .spec import DeploySpec

# kustomize patch targets (group, version, kind, name) of each base file the overlay touches
TARGETS = {"configmap-target.yaml": ("", "v1", "ConfigMap", m.TARGET_CONFIG),
           "deployment.yaml": ("apps", "v1", "Deployment", m.NAME),
           "service.yaml": ("", "v1", "Service", m.NAME),
           "hpa.yaml": ("autoscaling", "v2", "HorizontalPodAutoscaler", m.NAME)}


def _esc(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")  # RFC 6901


def _index(items: list, name: str) -> int:
    return next(i for i, x in enumerate(items) if x.get("name") == name)


def ops(spec: DeploySpec, base: dict[str, dict]) -> dict[str, list[dict]]:
    """base file -> its JSON patch for this spec (the GPU profile's values and the opt-ins)."""
    t = spec.target
    pod = base["deployment.yaml"]["spec"]["template"]["spec"]
    tri = _index(pod["containers"], "triton")
    eng = _index(pod["initContainers"], "engines")
    ctr, init = f"/spec/template/spec/containers/{tri}", f"/spec/template/spec/initContainers/{eng}"
    queued, active = spec.hpa_targets
    dep = [
        {"op": "replace", "path": "/spec/replicas", "value": spec.replicas},
        {"op": "add", "path": f"/spec/template/metadata/labels/{_esc('dgemma.dev/target')}", "value": spec.key},
        {"op": "add", "path": "/spec/template/spec/nodeSelector",
         "value": {"nvidia.com/gpu.product": spec.gpu_product}},
        {"op": "replace", "path": f"{ctr}/startupProbe/failureThreshold", "value": spec.startup_failure_threshold},
    ]
    for path, gib in ((ctr, spec.host_memory_gib), (init, spec.build_memory_gib)):
        for kind in ("requests", "limits"):
            dep.append({"op": "replace", "path": f"{path}/resources/{kind}/memory", "value": f"{gib}Gi"})
            dep.append({"op": "replace", "path": f"{path}/resources/{kind}/{_esc(m.GPU)}", "value": spec.gpus})
    out = {
        "configmap-target.yaml": [{"op": "replace", "path": f"/data/{k}", "value": v} for k, v in
                                  (("DGEMMA_GPU", t.gpu.name), ("DGEMMA_PRECISION", t.precision.value),
                                   ("DGEMMA_GPUS", str(spec.gpus)))],
        "deployment.yaml": dep,
        "hpa.yaml": [{"op": "replace", "path": "/spec/minReplicas", "value": spec.replicas},
                     {"op": "replace", "path": "/spec/maxReplicas", "value": spec.max_replicas},
                     {"op": "replace", "path": "/spec/metrics/0/pods/target/averageValue", "value": str(queued)},
                     {"op": "replace", "path": "/spec/metrics/1/pods/target/averageValue", "value": str(active)}],
    }
    if spec.expose_triton_http:
        arg = pod["containers"][tri]["args"].index("--http-address=127.0.0.1")
        dep += [{"op": "replace", "path": f"{ctr}/args/{arg}", "value": "--http-address=0.0.0.0"},
                {"op": "add", "path": f"{ctr}/ports/-",
                 "value": {"name": "http", "containerPort": m.PORTS["http"], "protocol": "TCP"}}]
        out["service.yaml"] = [
            {"op": "add", "path": "/spec/ports/-",
             "value": {"name": "http", "port": m.PORTS["http"], "targetPort": "http", "protocol": "TCP"}},
            {"op": "add", "path": "/metadata/annotations", "value": {"dgemma.dev/triton-http-risk": m.HTTP_RISK}}]
    return out


def _walk(doc, path: str):
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]
    parent = doc
    for p in parts[:-1]:
        parent = parent[int(p)] if isinstance(parent, list) else parent[p]
    return parent, parts[-1]


def apply_patch(doc: dict, patch: list[dict]) -> dict:
    """RFC 6902 `add` and `replace` (the operations `ops` emits) on a copy of `doc`. Like kustomize, a `replace`
    of a missing member or an `add` under a missing parent is an error (KeyError/IndexError), never a silent no-op."""
    doc = copy.deepcopy(doc)
    for op in patch:
        if op["op"] not in ("add", "replace"):
            raise ValueError(f"unsupported JSON patch op {op['op']!r}")
        parent, key = _walk(doc, op["path"])
        value = copy.deepcopy(op["value"])
        if isinstance(parent, list) and op["op"] == "add":
            idx = len(parent) if key == "-" else int(key)
            if not 0 <= idx <= len(parent):
                raise IndexError(f"{op['path']}: index {idx} outside 0..{len(parent)}")
            parent.insert(idx, value)
        elif isinstance(parent, list):
            idx = int(key)
            if not 0 <= idx < len(parent):
                raise IndexError(f"{op['path']}: no element {idx} to replace")
            parent[idx] = value
        else:
            if op["op"] == "replace" and key not in parent:
                raise KeyError(f"{op['path']}: no member {key!r} to replace")
            parent[key] = value
    return doc


def build(base: dict[str, dict], patches: dict[str, list[dict]]) -> dict[str, dict]:
    """What `kustomize build` of the overlay yields: every base object with its patch applied."""
    return {name: apply_patch(obj, patches.get(name, [])) for name, obj in base.items()}


def kustomization(patches: dict[str, list[dict]]) -> dict:
    """The overlay's kustomization.yaml: the base plus one inline JSON6902 patch per touched object."""
    import yaml

    items = []
    for name, patch in patches.items():
        group, version, kind, obj = TARGETS[name]
        target = {**({"group": group} if group else {}), "version": version, "kind": kind, "name": obj}
        items.append({"target": target, "patch": yaml.safe_dump(patch, sort_keys=False)})
    return {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": ["../../base"],
            "patches": items}
