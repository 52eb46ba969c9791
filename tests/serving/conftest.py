"""A real tritonserver (Triton 2.51 from the nvidia-pytriton wheel) for the session: the repository rendered for
GPU=cpu with the embedded tiny model, loopback free ports, readiness within 60 s, stopped by PID at the end."""

from __future__ import annotations

import pytest

from dgemma.errors import DgemmaError


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/serving/" in str(item.fspath):
            item.add_marker(pytest.mark.triton)


@pytest.fixture(scope="session")
def triton(tmp_path_factory):
    pytest.importorskip("tritonclient.grpc", reason="install the serving extra: pip install -e '.[serve]'")
    from dgemma.serving.render import render
    from dgemma.serving.server import Server

    root = render("cpu", "bf16", out=tmp_path_factory.mktemp("triton") / "cpu" / "bf16", threads=1)
    srv = Server(root)
    try:
        srv.start(timeout_s=60)
    except DgemmaError as e:
        pytest.fail(f"tritonserver did not start: {e}")
    yield srv
    srv.stop()
    assert srv.proc.poll() is not None, f"tritonserver pid {srv.proc.pid} still running"
