"""A real tritonserver (Triton 2.51 from the nvidia-pytriton wheel) for the session: the repository rendered for
GPU=cpu with the embedded tiny model, loopback free ports, readiness within 60 s, stopped by PID at the end.

The encoder/denoiser models (and `dgemma generate --backend ort`, the reference) read build/onnx/fp32/: exported
here once when missing or stale (~40 s on 2 cores), kept between runs like `make onnx` output."""

from __future__ import annotations

import pytest

from dgemma.core.errors import DgemmaError


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/serving/" in str(item.fspath):
            item.add_marker(pytest.mark.triton)


def ensure_onnx_fp32():
    """build/onnx/fp32 for the embedded tiny model, re-exported when the manifest does not match it."""
    from dgemma.cli import main
    from dgemma.core import contract as graphs
    from dgemma.core.layout import current
    from dgemma.core.manifest import checkpoint_fingerprint, read_onnx_manifest
    from dgemma.model.checkpoint import load_config
    from dgemma.tiny import ensure_tiny

    ck, out = ensure_tiny(), current().onnx("fp32")
    try:
        m = read_onnx_manifest(out)
        fresh = (m.get("checkpoint_sha256") == checkpoint_fingerprint(ck)
                 and m.get("contract_sha256") == graphs.contract_hash(load_config(ck)[0], "fp32"))
    except DgemmaError:
        fresh = False
    if not fresh:
        assert main(["onnx", "--precision", "fp32", "--checkpoint", str(ck)]) == 0
    return out


@pytest.fixture(scope="session")
def onnx_fp32():
    return ensure_onnx_fp32()


def start_server(root):
    from dgemma.serving.server import Server

    srv = Server(root)
    try:
        srv.start(timeout_s=90)
    except DgemmaError as e:
        pytest.fail(f"tritonserver did not start: {e}")
    return srv


@pytest.fixture(scope="session")
def triton(tmp_path_factory, onnx_fp32):
    """The default rendering (the canvas loop's default backend for GPU=cpu)."""
    pytest.importorskip("tritonclient.grpc", reason="install the serving extra: pip install -e '.[serve]'")
    from dgemma.serving.render import render

    srv = start_server(render("cpu", "bf16", out=tmp_path_factory.mktemp("triton") / "cpu" / "bf16", threads=1))
    yield srv
    srv.stop()
    assert srv.proc.poll() is not None, f"tritonserver pid {srv.proc.pid} still running"


@pytest.fixture(scope="session")
def triton_bls(tmp_path_factory, onnx_fp32):
    """The canvas loop over BLS to the encoder/denoiser models, 8 slots and a 2 ms batching window, so concurrent
    requests really share denoiser batches (the default rendering batches only what is already queued)."""
    pytest.importorskip("tritonclient.grpc", reason="install the serving extra: pip install -e '.[serve]'")
    from dgemma.serving.render import render

    root = render("cpu", "bf16", backend="bls", max_batch=8, queue_delay_us=2000, threads=1,
                  out=tmp_path_factory.mktemp("triton_bls") / "cpu" / "bf16")
    srv = start_server(root)
    yield srv
    srv.stop()
    assert srv.proc.poll() is not None, f"tritonserver pid {srv.proc.pid} still running"


@pytest.fixture(params=["default", "bls"])
def server(request):
    """Each test using it runs against both renderings (in-process ORT default, and BLS)."""
    return request.getfixturevalue("triton" if request.param == "default" else "triton_bls")
