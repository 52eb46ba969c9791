"""Offline validation of what `dgemma deploy` renders: core objects against the Kubernetes OpenAPI schemas that
kubernetes-validate bundles (strict: unknown fields fail), the ServiceMonitor and InferenceService against their
published CRD schemas (crd_schemas.py), and the prometheus-adapter rules against the HPA they serve."""

from __future__ import annotations

import json

import jsonschema
import kubernetes_validate
import pytest
import yaml

from dgemma.deploy import manifests
from dgemma.serving.metrics import METRICS

from . import crd_schemas
from .conftest import SPECS, load_docs

K8S_VERSIONS = ("1.31", "1.37")  # our stated minimum, and the newest kubernetes-validate 1.37.0 bundles
CRDS = {"ServiceMonitor": "servicemonitor", "InferenceService": "inferenceservice"}


def _objects(root):
    """Every object the tree can apply: the overlay built (rendered.yaml), the neutral base, and the snippets."""
    objs = load_docs(root / "rendered.yaml")
    for f in sorted((root / "base").glob("*.yaml")):
        if f.name != "kustomization.yaml":
            objs += load_docs(f)
    return objs + load_docs(root / "monitoring/prometheus-adapter-rules.yaml") + \
        load_docs(root / "kserve/inferenceservice.yaml")


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", list(SPECS))
def test_core_objects_pass_kubernetes_schemas(trees, name, version):
    _spec, root = trees[name]
    kinds = set()
    for obj in _objects(root):
        if obj["kind"] in CRDS:
            continue
        assert kubernetes_validate.validate(obj, version, strict=True) == version
        kinds.add(obj["kind"])
    assert kinds == {"ConfigMap", "PersistentVolumeClaim", "Deployment", "Service", "PodDisruptionBudget",
                     "HorizontalPodAutoscaler"}


def test_strict_validation_catches_a_typo(trees):
    """The check above can fail: a misspelt field in the Deployment is rejected."""
    _spec, root = trees["h100-fp8"]
    dep = next(o for o in load_docs(root / "rendered.yaml") if o["kind"] == "Deployment")
    dep["spec"]["template"]["spec"]["containers"][0]["startupProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="startupProbes"):
        kubernetes_validate.validate(dep, "1.31", strict=True)


def _crd_validator(kind: str):
    path = crd_schemas.find(kind)
    if path is None:
        src = crd_schemas.SOURCES[kind]
        pytest.skip(f"{kind} CRD schema not present ({src['repo']}@{src['tag']} {src['path']}); write it with "
                    "`python -m tests.stages.deploy.crd_schemas ...` (see that module)")
    return jsonschema.Draft7Validator(json.loads(path.read_text()))


@pytest.mark.parametrize("name", list(SPECS))
def test_crd_objects_pass_their_published_schemas(trees, name):
    _spec, root = trees[name]
    found = set()
    for obj in _objects(root):
        kind = CRDS.get(obj["kind"])
        if kind:
            src = crd_schemas.SOURCES[kind]
            assert obj["apiVersion"] == f"{src['group']}/{src['version']}"
            errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                      for e in _crd_validator(kind).iter_errors(obj)]
            assert not errors, f"{obj['kind']} against {src['repo']}@{src['tag']}: {errors}"
            found.add(obj["kind"])
    assert found == set(CRDS)


@pytest.mark.parametrize("kind,path,field", [
    ("servicemonitor", ("spec", "endpoints", 0), "scrapeTimout"),
    ("inferenceservice", ("spec", "predictor"), "workerSpec"),  # published, but not kept: fails until KEEP has it
    ("inferenceservice", ("spec", "predictor", "model"), "imagePulPolicy"),
])
def test_crd_schemas_reject_unknown_fields(trees, kind, path, field):
    _spec, root = trees["h100-fp8"]
    obj = next(o for o in _objects(root) if CRDS.get(o["kind"]) == kind)
    node = obj
    for p in path:
        node = node[p]
    node[field] = {}
    assert any(field in e.message for e in _crd_validator(kind).iter_errors(obj))


def test_extract_prunes_and_closes_a_crd_schema():
    """crd_schemas.extract on a small CRD of the published shape (runs without the real schemas)."""
    crd = {"metadata": {"name": "things.example.io"}, "spec": {"versions": [
        {"name": "v1", "schema": {"openAPIV3Schema": {"type": "object", "description": "d", "properties": {
            "metadata": {"type": "object"},
            "spec": {"type": "object", "properties": {
                "a": {"type": "integer", "description": "x"}, "b": {"type": "string"},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {}}}},
            "status": {"type": "object"}}}}}]}}
    s = crd_schemas.extract(crd, "v1", {("spec",): ["a", "free"]})
    assert "status" not in s["properties"] and "description" not in json.dumps(s)
    assert set(s["properties"]["spec"]["properties"]) == {"a", "free"}
    assert s["additionalProperties"] is False and s["properties"]["spec"]["additionalProperties"] is False
    assert "additionalProperties" not in s["properties"]["spec"]["properties"]["free"]
    v = jsonschema.Draft7Validator(s)
    assert v.is_valid({"spec": {"a": 1, "free": {"anything": 1}}}) and not v.is_valid({"spec": {"b": "x"}})
    with pytest.raises(ValueError, match=r"spec has no properties \['c'\]"):
        crd_schemas.extract(crd, "v1", {("spec",): ["c"]})
    with pytest.raises(ValueError, match="has no version 'v2'"):
        crd_schemas.extract(crd, "v2", {})


def test_adapter_rules_serve_the_hpa_metrics(trees):
    assert METRICS[manifests.QUEUED][0] == METRICS[manifests.ACTIVE][0] == "gauge"  # what the dgemma model reports
    _spec, root = trees["h100-fp8"]
    cm = load_docs(root / "monitoring/prometheus-adapter-rules.yaml")[0]
    rules = yaml.safe_load(cm["data"]["config.yaml"])["rules"]
    served = {r["name"]["as"] for r in rules}
    hpa = next(o for o in load_docs(root / "rendered.yaml") if o["kind"] == "HorizontalPodAutoscaler")
    assert {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]} == served == {manifests.QUEUED,
                                                                                        manifests.ACTIVE}
    for r in rules:
        assert r["seriesQuery"].startswith(r["name"]["as"] + "{") and "<<.GroupBy>>" in r["metricsQuery"]
        assert set(r["resources"]["overrides"]) == {"namespace", "pod"}
    sm = next(o for o in load_docs(root / "rendered.yaml") if o["kind"] == "ServiceMonitor")
    svc = next(o for o in load_docs(root / "rendered.yaml") if o["kind"] == "Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}
