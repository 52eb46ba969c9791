"""`dgemma deploy`: the tree it writes, the kustomize base/overlay split, the HTTP lockdown, and every refusal."""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest
import yaml

from dgemma.cli import build_parser, main
from dgemma.deploy import image, manifests, overlay, render, scaling
from dgemma.deploy.spec import make_spec

from .conftest import ROOT, load_docs

H100_FILES = {
    "README.md", "rendered.yaml", "image/Dockerfile", "monitoring/prometheus-adapter-rules.yaml",
    "kserve/inferenceservice.yaml", "overlays/h100-fp8/kustomization.yaml", "base/kustomization.yaml",
    "base/configmap-target.yaml", "base/pvc-artifacts.yaml", "base/pvc-engines.yaml", "base/deployment.yaml",
    "base/service.yaml", "base/pdb.yaml", "base/hpa.yaml", "base/servicemonitor.yaml"}


def _files(root):
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _pod(objs):
    dep = next(o for o in objs if o["kind"] == "Deployment")
    return dep, dep["spec"]["template"]["spec"]


def _ctr(pod, name, key="containers"):
    return next(c for c in pod[key] if c["name"] == name)


def test_make_deploy_writes_the_tree(tmp_path, capsys):
    out = tmp_path / "h100" / "fp8"
    assert main(["deploy", "--gpu", "h100", "--precision", "fp8", "--replicas", "2", "--out", str(out)]) == 0
    assert _files(out) == H100_FILES
    printed = capsys.readouterr().out
    assert f"kubectl apply -k {out}/overlays/h100-fp8" in printed and "TensorRT 10.9.0.34" in printed
    base = yaml.safe_load((out / "base/kustomization.yaml").read_text())
    assert sorted(base["resources"]) == sorted(f.split("/")[1] for f in H100_FILES if f.startswith("base/")
                                               and not f.endswith("kustomization.yaml"))
    for f in H100_FILES - {"README.md", "image/Dockerfile"}:
        assert load_docs(out / f), f
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dir left behind


def test_base_is_gpu_neutral_and_overlay_carries_the_profile(trees):
    """Same options -> byte-identical base whatever the profile; the profile's values only in the overlay."""
    a = make_spec("h100", "fp8", 2)
    b = make_spec("h200", "bf16", 5, gpus="4", image_name=a.image)
    fa, fb = render.files(a), render.files(b)
    base_a = {k: v for k, v in fa.items() if k.startswith("base/")}
    assert base_a == {k: v for k, v in fb.items() if k.startswith("base/")}
    base_text = "".join(v for k, v in fa.items() if k.startswith("base/"))
    for value in ("NVIDIA-H100", "h100", "fp8"):
        assert value not in base_text
    assert "NVIDIA-H100-80GB-HBM3" in fa["overlays/h100-fp8/kustomization.yaml"]


@pytest.mark.parametrize("name", ["h100-fp8", "h200-bf16", "b200-fp8"])
def test_rendered_yaml_is_the_overlay_applied_to_the_base(trees, name):
    """What kustomize reads (the YAML files) applied with RFC 6902 gives rendered.yaml, object for object."""
    spec, root = trees[name]
    kust = yaml.safe_load((root / f"overlays/{spec.key}/kustomization.yaml").read_text())
    assert kust["resources"] == ["../../base"]
    base = {f: load_docs(root / "base" / f)[0] for f in yaml.safe_load((root / "base/kustomization.yaml").read_text())
            ["resources"]}
    by_target = {(o["kind"], o["metadata"]["name"]): f for f, o in base.items()}
    patches = {}
    for p in kust["patches"]:
        t = p["target"]
        f = by_target[(t["kind"], t["name"])]
        assert base[f]["apiVersion"] == (f"{t['group']}/{t['version']}" if t.get("group") else t["version"])
        patches[f] = yaml.safe_load(p["patch"])
    assert list(overlay.build(base, patches).values()) == load_docs(root / "rendered.yaml")


def test_overlay_values_h200_four_gpus(trees):
    spec, root = trees["h200-bf16"]
    objs = load_docs(root / "rendered.yaml")
    dep, pod = _pod(objs)
    assert dep["spec"]["replicas"] == 3 and pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    triton, engines = _ctr(pod, "triton"), _ctr(pod, "engines", "initContainers")
    for c in (triton, engines):
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 4 == c["resources"]["requests"]["nvidia.com/gpu"]
    assert triton["resources"]["limits"]["memory"] == f"{spec.host_memory_gib}Gi"
    cm = next(o for o in objs if o["kind"] == "ConfigMap")
    assert cm["data"] == {"DGEMMA_GPU": "h200", "DGEMMA_PRECISION": "bf16", "DGEMMA_GPUS": "4"}
    hpa = next(o for o in objs if o["kind"] == "HorizontalPodAutoscaler")["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 10)
    # h200: max_batch 8 per GPU x 4 GPUs = 32 slots -> 16 queued, 24 active per pod on average
    assert [m["pods"]["target"]["averageValue"] for m in hpa["metrics"]] == ["16", "24"]
    assert [m["pods"]["metric"]["name"] for m in hpa["metrics"]] == ["dgemma_requests_queued", "dgemma_requests_active"]
    assert "--gpus \"$DGEMMA_GPUS\"" in _ctr(pod, "repo", "initContainers")["command"][2]


def test_triton_http_stays_in_the_pod_by_default(trees):
    spec, root = trees["h100-fp8"]
    objs = load_docs(root / "rendered.yaml")
    _, pod = _pod(objs)
    triton = _ctr(pod, "triton")
    assert "--http-address=127.0.0.1" in triton["args"] and "--grpc-address=0.0.0.0" in triton["args"]
    assert {p["containerPort"] for c in pod["containers"] for p in c.get("ports", [])} == {8001, 8002, 9000}
    svc = next(o for o in objs if o["kind"] == "Service")
    assert [(p["name"], p["port"]) for p in svc["spec"]["ports"]] == [("grpc", 8001), ("metrics", 8002),
                                                                       ("openai", 9000)]
    for probe, path in (("startupProbe", "ready"), ("livenessProbe", "live"), ("readinessProbe", "ready")):
        cmd = triton[probe]["exec"]["command"]
        assert cmd[0] == "curl" and cmd[-1] == f"http://127.0.0.1:8000/v2/health/{path}"
    start = triton["startupProbe"]
    assert start["periodSeconds"] * start["failureThreshold"] >= 2 * scaling.load_seconds(spec.weights_gib)
    assert "Opt in with `dgemma deploy --expose-triton-http`; risk: tritonserver 2.51's HTTP frontend crashes" in \
        " ".join(line.lstrip("# ") for line in (root / "base/service.yaml").read_text().splitlines())


def test_triton_http_opt_in_exposes_it_with_the_risk_next_to_it(trees):
    spec, root = trees["h200-bf16"]
    objs = load_docs(root / "rendered.yaml")
    _, pod = _pod(objs)
    assert "--http-address=0.0.0.0" in _ctr(pod, "triton")["args"]
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in _ctr(pod, "triton")["ports"]
    svc = next(o for o in objs if o["kind"] == "Service")
    assert ("http", 8000) in [(p["name"], p["port"]) for p in svc["spec"]["ports"]]
    assert svc["metadata"]["annotations"]["dgemma.dev/triton-http-risk"] == manifests.HTTP_RISK
    text = (root / f"overlays/{spec.key}/kustomization.yaml").read_text()
    assert "Triton's HTTP port 8000 is EXPOSED (--expose-triton-http). Risk: tritonserver 2.51's" in \
        " ".join(line.lstrip("# ") for line in text.splitlines())


def test_emptydir_engine_cache_and_gpu_list(trees):
    spec, root = trees["b200-fp8"]
    assert spec.gpus == 2 and "base/pvc-engines.yaml" not in {str(p.relative_to(root)) for p in root.rglob("*")}
    _, pod = _pod(load_docs(root / "rendered.yaml"))
    assert next(v for v in pod["volumes"] if v["name"] == "engines") == {"name": "engines",
                                                                         "emptyDir": {"sizeLimit": "128Gi"}}


def test_kserve_variant_uses_the_triton_runtime_and_the_same_pod(trees):
    spec, root = trees["h100-fp8"]
    isvc = load_docs(root / "kserve/inferenceservice.yaml")[0]
    pred = isvc["spec"]["predictor"]
    assert pred["model"]["runtime"] == "kserve-tritonserver" and pred["model"]["modelFormat"] == {"name": "triton"}
    assert pred["model"]["args"] == manifests.TRITON_ARGS and pred["model"]["ports"][0]["name"] == "h2c"
    assert [c["name"] for c in pred["initContainers"]] == ["engines", "repo"]
    env = {e["name"]: e["value"] for e in pred["initContainers"][0]["env"]}
    assert env == {"DGEMMA_GPU": "h100", "DGEMMA_PRECISION": "fp8", "DGEMMA_GPUS": "1",
                   "DGEMMA_TENSORRT": image.TENSORRT_VERSION}
    assert (pred["minReplicas"], pred["maxReplicas"]) == (2, 4)
    assert "dgemma_requests_queued" in pred["autoScaling"]["metrics"][0]["external"]["metric"]["query"]


def test_image_and_tensorrt_pairing_from_one_place(trees):
    spec, root = trees["h100-fp8"]
    docker = (root / "image/Dockerfile").read_text()
    assert f"FROM {image.TRITON_IMAGE}\n" in docker and f'"tensorrt-cu12=={image.TENSORRT_VERSION}"' in docker
    assert image.TRITON_IMAGE == f"nvcr.io/nvidia/tritonserver:{image.TRITON_RELEASE}-py3"
    _, pod = _pod(load_docs(root / "rendered.yaml"))
    assert all(c["image"] == spec.image for c in pod["containers"] + pod["initContainers"])
    env = _ctr(pod, "engines", "initContainers")["env"]
    assert {"name": "DGEMMA_TENSORRT", "value": image.TENSORRT_VERSION} in env
    # the pairing literals appear only in image.py
    src = ROOT / "src" / "dgemma" / "deploy"
    for f in src.glob("*.py"):
        if f.name != "image.py":
            assert image.TENSORRT_VERSION not in f.read_text() and image.TRITON_RELEASE not in f.read_text(), f


def test_init_scripts_are_valid_shell_and_python():
    for script in (manifests.ENGINES_SCRIPT, manifests.REPO_SCRIPT):
        r = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    docs = re.findall(r"<<'PY'\n(.*?)\nPY\n", manifests.ENGINES_SCRIPT, re.S)
    assert len(docs) == 2
    for code in docs:
        compile(code, "engines-init", "exec")
        for line in code.splitlines():  # what the heredocs import from dgemma exists under these names
            if line.startswith("from dgemma"):
                exec(line, {})


def _commands(script: str, env: dict) -> list[list[str]]:
    """The `dgemma ...` command lines of an init script, its variables replaced by `env`."""
    for k, v in env.items():
        script = script.replace(f'"${k}"', v)
    lines = script.replace("\\\n", " ").splitlines()
    return [shlex.split(line.removeprefix("else "))[1:] for line in lines
            if line.removeprefix("else ").startswith("dgemma ")]


def test_pod_commands_parse_with_this_cli(trees):
    """Every dgemma command a pod runs (init scripts, the openai sidecar) is one this CLI accepts."""
    env = {"DGEMMA_GPU": "h200", "DGEMMA_PRECISION": "bf16", "DGEMMA_GPUS": "4"}
    cmds = _commands(manifests.ENGINES_SCRIPT, env) + _commands(manifests.REPO_SCRIPT, env)
    assert [c[0] for c in cmds] == ["engines", "repo"]
    _spec, root = trees["h200-bf16"]
    _, pod = _pod(load_docs(root / "rendered.yaml"))
    openai = _ctr(pod, "openai")["command"]
    assert openai[0] == "dgemma"
    parser = build_parser()
    for argv in cmds + [openai[1:]]:
        parser.parse_args(argv)  # SystemExit on an unknown command or flag


def test_openai_sidecar_reads_the_served_checkpoint(trees):
    """The sidecar names the checkpoint the repo init container renders the model with (else `dgemma openai` falls
    back to the embedded tiny model's tokenizer) and mounts it; it waits for Triton beyond Triton's startup budget,
    and its own startup probe lets it wait (liveness alone would restart it while Triton loads)."""
    spec, root = trees["h100-fp8"]
    _, pod = _pod(load_docs(root / "rendered.yaml"))
    cmd = _ctr(pod, "openai")["command"]
    assert cmd[cmd.index("--checkpoint") + 1] == manifests.CHECKPOINT
    assert f"--checkpoint {manifests.CHECKPOINT}" in manifests.REPO_SCRIPT
    assert {"name": "artifacts", "mountPath": manifests.ARTIFACTS, "readOnly": True} in \
        _ctr(pod, "openai")["volumeMounts"]
    start = _ctr(pod, "triton")["startupProbe"]
    wait = float(cmd[cmd.index("--wait") + 1])
    assert wait > start["periodSeconds"] * start["failureThreshold"]
    own = _ctr(pod, "openai")["startupProbe"]
    assert own["tcpSocket"]["port"] == 9000 and own["periodSeconds"] * own["failureThreshold"] > wait


def test_image_pins_follow_the_serve_extra():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert image.TRITONCLIENT in extras["serve"] and set(image.OPENAI_SERVER) <= set(extras["serve"])
    assert "dgemma[deploy]" in extras["test"]  # `make test` installs what these tests import


def test_default_out_is_the_work_directory(tmp_path, capsys):
    assert main(["--workdir", str(tmp_path), "deploy", "--gpu", "h100", "--precision", "fp8"]) == 0
    assert (tmp_path / "build" / "deploy" / "h100" / "fp8" / "rendered.yaml").is_file()
    assert f"wrote {tmp_path}/build/deploy/h100/fp8:" in capsys.readouterr().out


@pytest.mark.parametrize("argv,msg", [
    (["--gpu", "tpu"], "unknown GPU profile 'tpu'; valid: h100, h200, b200, rtx5090, dgx-spark, cpu"),
    (["--gpu", "cpu"], "GPU profile 'cpu' has no GPU to schedule on"),
    (["--gpu", "rtx5090", "--precision", "nvfp4"], "GPU profile 'rtx5090' builds TensorRT-RTX engines"),
    (["--gpu", "h100", "--precision", "nvfp4"], "precision 'nvfp4' needs compute capability >= 10.0 (or 12.x with "
                                                "TensorRT-RTX); GPU profile 'h100' is 9.0. Use --precision bf16/fp8"),
    (["--gpu", "h100", "--precision", "bf16"], "> 80 GiB on NVIDIA H100 SXM 80GB. precision fp8 fits"),
    (["--gpu", "b200", "--precision", "nvfp4"], "the NVFP4 graphs need TensorRT >= 11.0"),
    (["--gpu", "h100", "--precision", "int4"], "unknown precision 'int4'; valid: bf16, fp8, nvfp4"),
    (["--gpu", "h100", "--replicas", "0"], "--replicas must be in 1..1000 (got 0); pods serving at all times"),
    (["--gpu", "h100", "--replicas", "-2"], "--replicas must be in 1..1000 (got -2)"),
    (["--gpu", "h100", "--replicas", "two"], "--replicas must be a whole number (got 'two')"),
    (["--gpu", "h100", "--replicas", "3", "--max-replicas", "2"], "--max-replicas 2 is below --replicas 3"),
    (["--gpu", "h100", "--gpus", "0"], "--gpus must be in 1..8 (got 0); GPUs per pod"),
    (["--gpu", "h100", "--gpus", "9"], "--gpus must be in 1..8 (got 9)"),
    (["--gpu", "h100", "--gpus", "1,2"], "--gpus 1,2: inside a pod the 2 GPU(s) the device plugin assigns are "
                                         "numbered 0..1; pass --gpus 2"),
    (["--gpu", "h100", "--gpus", "a,b"], "--gpus takes a count or comma-separated device ids (got 'a,b')"),
    (["--gpu", "h100", "--gpu-product", "NVIDIA H100"], "--gpu-product 'NVIDIA H100' is not a Kubernetes label value"),
    (["--gpu", "h100", "--image", "my image"], "--image 'my image' is not an image reference"),
    (["--gpu", "h100", "--engine-cache", "s3"], "--engine-cache 's3'; valid: pvc, emptydir"),
])
def test_refusals_name_value_limit_and_fix_and_write_nothing(tmp_path, capsys, argv, msg):
    out = tmp_path / "deploy"
    assert main(["deploy", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and err.startswith("error: ConfigError: ")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_failed_write_keeps_the_previous_tree(tmp_path, monkeypatch):
    spec = make_spec("h100", "fp8", 2)
    root = render.write(spec, tmp_path / "fp8")
    before = {p: p.read_text() for p in root.rglob("*") if p.is_file()}
    good = render.files(spec)
    monkeypatch.setattr(render, "files", lambda s: {**good, "zz/\0bad.yaml": "x"})  # fails midway through
    with pytest.raises(ValueError):
        render.write(spec, root)
    assert {p: p.read_text() for p in root.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["fp8"]  # temp dir removed
