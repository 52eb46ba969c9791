"""Rendered deploy trees shared by the deploy tests (rendering is pure Python: milliseconds per tree)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dgemma.deploy.render import write
from dgemma.deploy.spec import make_spec

ROOT = Path(__file__).resolve().parents[3]  # the repository: docs/, bench/results/, src/

# the report's example, a multi-GPU bf16 pod with Triton's HTTP opted in, and the emptyDir engine cache
SPECS = {"h100-fp8": dict(gpu="h100", precision="fp8", replicas=2),
         "h200-bf16": dict(gpu="h200", precision="bf16", replicas=3, gpus="4", max_replicas=10,
                           expose_triton_http=True),
         "b200-fp8": dict(gpu="b200", precision="fp8", replicas=1, gpus="0,1", engine_cache="emptydir")}


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="session")
def trees(tmp_path_factory) -> dict[str, tuple]:
    """name -> (spec, rendered root)."""
    out = {}
    for name, kw in SPECS.items():
        spec = make_spec(**kw)
        out[name] = (spec, write(spec, tmp_path_factory.mktemp(name) / "out"))
    return out
