"""Stage manifests: fingerprints stream their files (bounded memory), atomic writes leave nothing half-written,
and the staleness checks name the file and the make command."""

from __future__ import annotations

import hashlib
import json
import tracemalloc

import pytest

from dgemma.core.errors import ArtifactError
from dgemma.core.manifest import check_engines, file_sha256, tree_sha256, write_text_atomic


def test_hashing_a_large_file_streams_it(tmp_path):
    big = tmp_path / "ck" / "model-00001-of-00001.safetensors"
    big.parent.mkdir()
    size = 64 << 20
    with open(big, "wb") as f:  # 64 MiB, written in pieces so the test itself never holds it
        for i in range(64):
            f.write(bytes([i]) * (1 << 20))
    tracemalloc.start()
    try:
        got = file_sha256(big)
        tree = tree_sha256(big.parent)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"hashing a {size >> 20} MiB file peaked at {peak >> 20} MiB of Python memory"
    want = hashlib.sha256(b"".join(bytes([i]) * (1 << 20) for i in range(64))).hexdigest()
    assert got == want and len(tree) == 64 and tree != got  # the tree hash covers the relative name too


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "r.json"
    write_text_atomic(p, "old")

    def boom(*a):
        raise OSError("disk full")

    monkeypatch.setattr("dgemma.core.manifest.os.replace", boom)
    with pytest.raises(OSError):
        write_text_atomic(p, "new")
    assert p.read_text() == "old" and [x.name for x in tmp_path.iterdir()] == ["r.json"]


def test_stale_engines_name_the_make_command(tmp_path):
    onnx = tmp_path / "build" / "onnx" / "fp32"
    onnx.mkdir(parents=True)
    (onnx / "manifest.json").write_text("{}")
    eng = tmp_path / "engines" / "cpu" / "bf16"
    eng.mkdir(parents=True)
    m = {"onnx_dir": str(onnx), "onnx_manifest_sha256": file_sha256(onnx / "manifest.json"),
         "gpu_profile": {"name": "cpu"}, "precision": "bf16"}
    (eng / "manifest.json").write_text(json.dumps(m))
    assert check_engines(eng)["precision"] == "bf16"
    (onnx / "manifest.json").write_text('{"changed": 1}')
    with pytest.raises(ArtifactError, match=r"stale engines\). Rebuild with `make engines GPU=cpu PRECISION=bf16`"):
        check_engines(eng)
    (onnx / "manifest.json").unlink()  # engines shipped without their ONNX (another machine) are not stale
    assert check_engines(eng)["precision"] == "bf16"
    with pytest.raises(ArtifactError, match=r"make engines GPU=cpu PRECISION=fp8"):
        check_engines(tmp_path / "engines" / "cpu" / "fp8")
