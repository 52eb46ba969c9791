"""One Triton instance of the `dgemma` model per GPU (`dgemma repo --gpus`, what each deployed pod renders): the
rendered instance_group, the refusals, the instance's device reaching the backend (model.py -> load_engine ->
the factory) and the instance label on its metrics."""

from __future__ import annotations

import json
import re
import sys
import types

import pytest
import torch

from dgemma import __version__
from dgemma.cli import main
from dgemma.core.errors import ConfigError
from dgemma.core.layout import DEFAULT_CHECKPOINT, TRITON_TEMPLATES
from dgemma.runtime import factory
from dgemma.serving import loop
from dgemma.serving.render import parse_gpus, render


def _group(root) -> str:
    text = (root / "models" / "dgemma" / "config.pbtxt").read_text()
    return next(line for line in text.splitlines() if line.startswith("instance_group"))


def test_instance_group_default_cpu_and_one_per_gpu(tmp_path):
    assert _group(render("cpu", "bf16", out=tmp_path / "cpu", backends=False)) == \
        "instance_group [ { kind: KIND_CPU count: 1 } ]"
    assert _group(render("h100", "fp8", out=tmp_path / "h", backends=False, engine="tensorrt")) == \
        "instance_group [ { kind: KIND_CPU count: 1 } ]"  # unchanged without gpus
    root = render("h100", "fp8", out=tmp_path / "g", backends=False, engine="tensorrt", gpus=(0, 1, 2, 3))
    assert _group(root) == "instance_group [ { kind: KIND_GPU count: 1 gpus: [ 0, 1, 2, 3 ] } ]"
    assert "max_batch_size: 1\n" in (root / "models" / "dgemma" / "config.pbtxt").read_text()  # still one at a time


def test_repo_cli_gpus(tmp_path, capsys):
    assert main(["repo", "--gpu", "h200", "--precision", "fp8", "--engine", "tensorrt", "--config-only",
                 "--gpus", "2", "--out", str(tmp_path)]) == 0
    assert _group(tmp_path) == "instance_group [ { kind: KIND_GPU count: 1 gpus: [ 0, 1 ] } ]"
    assert main(["repo", "--gpu", "h200", "--precision", "fp8", "--config-only", "--gpus", "0,x",
                 "--out", str(tmp_path)]) == 2
    assert "--gpus takes a GPU count or comma-separated device ids (got '0,x')" in capsys.readouterr().err


@pytest.mark.parametrize("value,want", [("4", (0, 1, 2, 3)), ("1", (0,)), ("0,2", (0, 2)), (" 3,1 ", (3, 1))])
def test_parse_gpus(value, want):
    assert parse_gpus(value) == want


@pytest.mark.parametrize("value,msg", [("0", "names no GPU; a count must be >= 1"),
                                       ("two", "takes a GPU count or comma-separated device ids (got 'two')"),
                                       ("0,,1", "(got '0,,1')")])
def test_parse_gpus_refusals(value, msg):
    with pytest.raises(ConfigError, match=re.escape(msg)):
        parse_gpus(value)


@pytest.mark.parametrize("gpu,gpus,msg", [
    ("cpu", (0,), "GPU profile 'cpu' has no GPUs (it runs on the CPU through ONNX Runtime); drop --gpus"),
    ("h100", (0, 0), "--gpus 0,0: device ids must be distinct and >= 0"),
    ("h100", (-1,), "--gpus -1: device ids must be distinct and >= 0"),
])
def test_render_refuses_bad_gpus(tmp_path, gpu, gpus, msg):
    with pytest.raises(ConfigError, match=re.escape(msg)):
        render(gpu, "fp8", out=tmp_path, backends=False, gpus=gpus)
    assert not (tmp_path / "models").exists()


PARAMS = {"target": "cpu/bf16", "max_prompt": "64", "max_context": "256", "canvas_length": "32",
          "max_denoising_steps": "48", "default_max_tokens": "32", "default_entropy_bound": "0.1",
          "default_t_min": "0.4", "default_t_max": "0.8", "checkpoint": str(DEFAULT_CHECKPOINT)}


@pytest.mark.parametrize("params,device_id,cuda,want", [
    ({"backend": "torch"}, 3, True, "cuda:3"),  # a KIND_GPU instance: its own device
    ({"backend": "torch"}, None, True, "cuda"),  # KIND_CPU instance on a GPU box: the default device
    ({"backend": "torch"}, 3, False, "cpu"),
    ({"backend": "bls", "graph_precision": "fp8", "engine": "tensorrt"}, 1, True, "cuda:1"),
    ({"backend": "bls", "graph_precision": "fp32", "engine": "onnxruntime"}, 1, True, "cpu"),  # graphs on the CPU
])
def test_load_engine_builds_on_the_instance_gpu(monkeypatch, params, device_id, cuda, want):
    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(loop, "create", lambda *a, **kw: seen.append(kw["device"]))
    loop.load_engine({**PARAMS, **params}, device_id=device_id)
    assert seen == [want]


def test_bls_engine_reads_the_config_without_loading_weights(monkeypatch):
    """One 26B copy per GPU instance in host RAM would not fit: only torch/fast load the weights."""
    monkeypatch.setattr(factory, "load_model", lambda *a, **k: pytest.fail("bls must not load weights"))
    eng = factory.create("bls", "fp32", "cpu", DEFAULT_CHECKPOINT, device="cpu", pb_utils=object(), batched=True)
    assert eng.sampler.max_denoising_steps == 48 and eng.tokenizer is not None


def test_model_py_passes_the_instance_device_and_labels_metrics(monkeypatch):
    """model.py under a stand-in pb_utils with the real engine and scheduler: a KIND_GPU instance asks for
    model_instance_device_id, a KIND_CPU one for none, and each labels its metrics with its instance name (two
    instances' gauges must stay two series)."""
    calls, metrics = [], []

    class Family:
        HISTOGRAM, COUNTER, GAUGE = "h", "c", "g"

        def __init__(self, name, description, kind):
            self.name = name

        def Metric(self, labels, buckets=None):  # noqa: N802 (pb_utils' name)
            metrics.append((self.name, labels))
            return types.SimpleNamespace(set=lambda v: None, observe=lambda v: None, increment=lambda v: None)

    pb = types.ModuleType("triton_python_backend_utils")
    pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL, pb.MetricFamily = 1, Family
    pb.Logger = types.SimpleNamespace(log_info=lambda s: None, log_error=lambda s: None)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    real = loop.load_engine

    def spy(params, pb_utils=None, device_id=None):
        calls.append(device_id)
        return real(params, pb_utils, device_id)

    monkeypatch.setattr(loop, "load_engine", spy)  # model.py imports the name when it is executed below
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the engine on the CPU whatever the box
    mod = types.ModuleType("dgemma_model_under_test")
    exec(compile((TRITON_TEMPLATES / "dgemma" / "1" / "model.py").read_text(), "model.py", "exec"), mod.__dict__)
    cfg = {"name": "dgemma", "parameters": {k: {"string_value": v} for k, v in
                                            {**PARAMS, "backend": "torch", "dgemma_version": __version__,
                                             "max_batch": "2", "max_queued": "16", "prefill_chunk": "64"}.items()}}
    for kind, dev, name in (("GPU", "2", "dgemma_0_2"), ("CPU", "0", "dgemma_0")):
        m = mod.TritonPythonModel()
        m.initialize({"model_config": json.dumps(cfg), "model_instance_kind": kind, "model_instance_device_id": dev,
                      "model_instance_name": name})
        m.recorder.occupancy(m.scheduler.active, m.scheduler.queued)
        m.finalize()
    assert calls == [2, None]
    assert ("dgemma_requests_queued", {"model": "dgemma", "instance": "dgemma_0_2"}) in metrics
    assert ("dgemma_requests_queued", {"model": "dgemma", "instance": "dgemma_0"}) in metrics
