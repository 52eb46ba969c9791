"""The published CRD schemas the ServiceMonitor and the InferenceService are checked against, kept small.

`extract` takes a CRD's YAML (as published in its repository, pinned in SOURCES by tag, commit and sha256), keeps the
served version's openAPIV3Schema, drops descriptions and `status`, keeps only the InferenceService's predictor
fields our manifests use (whole subtrees: every container, volume and autoscaling field below them stays checked),
and closes every object that lists its properties (additionalProperties: false, as `kubectl apply` with strict
field validation rejects unknown fields). A field outside KEEP fails the test: extend KEEP and re-extract.

The schemas are data from those repositories and are not committed here: `find()` reads them from
$DGEMMA_CRD_SCHEMAS, from a `shared/crds/` beside (or above) the checkout, or from build/crds/. Write them with
    python -m tests.stages.deploy.crd_schemas --servicemonitor <crd.yaml> --inferenceservice <crd.yaml> [--out DIR]
(default out: build/crds/); the input files must match the pinned sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[3]
SOURCES = {
    "servicemonitor": {
        "repo": "prometheus-operator/prometheus-operator", "tag": "v0.93.0",
        "commit": "f8fafd475f3d132e239432ae6172de60a6cb6516",
        "path": "example/prometheus-operator-crd-full/monitoring.coreos.com_servicemonitors.yaml",
        "sha256": "a99047972c9dd7679ce2050b9968e8a08773492e671b3e17abd476d42aa78a32",
        "group": "monitoring.coreos.com", "version": "v1", "keep": {},
    },
    "inferenceservice": {
        "repo": "kserve/kserve", "tag": "v0.20.0", "commit": "1fb781055dd1567164358233e1125142ca6ef1fe",
        "path": "config/crd/full/serving.kserve.io_inferenceservices.yaml",
        "sha256": "57c3bf13f77de94678bf2ae3748056ec071ad2b9e88d6a28f44fb4710758fcff",
        "group": "serving.kserve.io", "version": "v1beta1",
        # object path -> the properties kept there (all others dropped, then rejected as unknown)
        "keep": {("spec",): ["predictor"],
                 ("spec", "predictor"): ["minReplicas", "maxReplicas", "nodeSelector", "tolerations",
                                         "terminationGracePeriodSeconds", "initContainers", "volumes", "model",
                                         "autoScaling"]},
    },
}


def _strip(o):
    if isinstance(o, dict):
        return {k: _strip(v) for k, v in o.items() if k != "description"}
    if isinstance(o, list):
        return [_strip(v) for v in o]
    return o


def _close(o):
    """additionalProperties: false on every object schema that lists its properties and allows nothing else."""
    if isinstance(o, dict):
        o = {k: _close(v) for k, v in o.items()}
        if "properties" in o and "additionalProperties" not in o and not o.get("x-kubernetes-preserve-unknown-fields"):
            o["additionalProperties"] = False
        return o
    if isinstance(o, list):
        return [_close(v) for v in o]
    return o


def extract(crd: dict, version: str, keep: dict) -> dict:
    served = [v for v in crd["spec"]["versions"] if v["name"] == version]
    if not served:
        raise ValueError(f"CRD {crd['metadata']['name']} has no version {version!r}")
    schema = _strip(served[0]["schema"]["openAPIV3Schema"])
    schema["properties"].pop("status", None)
    for path, names in keep.items():
        node = schema
        for p in path:
            node = node["properties"][p]
        missing = set(names) - set(node["properties"])
        if missing:
            raise ValueError(f"{'.'.join(path)} has no properties {sorted(missing)}")
        node["properties"] = {k: v for k, v in node["properties"].items() if k in names}
    return _close(schema)


def write(kind: str, crd_yaml: Path, out: Path) -> Path:
    src = SOURCES[kind]
    data = Path(crd_yaml).read_bytes()
    got = hashlib.sha256(data).hexdigest()
    if got != src["sha256"]:
        raise SystemExit(f"{crd_yaml}: sha256 {got}, expected {src['sha256']} ({src['repo']} {src['tag']} "
                         f"{src['path']})")
    schema = extract(yaml.safe_load(data), src["version"], src["keep"])
    schema["$comment"] = (f"{src['repo']}@{src['tag']} ({src['commit']}) {src['path']}: openAPIV3Schema of "
                          f"{src['version']}, pruned by tests/stages/deploy/crd_schemas.py")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{kind}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(schema, indent=1, sort_keys=True))
    tmp.replace(path)
    return path


def find(kind: str) -> Path | None:
    """The extracted schema of `kind`, or None when no location holds it."""
    dirs = [Path(os.environ["DGEMMA_CRD_SCHEMAS"])] if os.environ.get("DGEMMA_CRD_SCHEMAS") else []
    dirs += [p / "shared" / "crds" for p in (ROOT, *ROOT.parents)] + [ROOT / "build" / "crds"]
    for d in dirs:
        if (d / f"{kind}.json").is_file():
            return d / f"{kind}.json"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for kind in SOURCES:
        ap.add_argument(f"--{kind}", type=Path, required=True, help=f"{SOURCES[kind]['path']} at "
                        f"{SOURCES[kind]['repo']}@{SOURCES[kind]['tag']}")
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "crds")
    args = ap.parse_args(argv)
    for kind in SOURCES:
        print(f"wrote {write(kind, getattr(args, kind), args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
