"""The IO contract (graphs.py) and the exported ONNX graphs agree: names, dtypes, dims; manifest contents."""

from __future__ import annotations

import json

import onnx
import pytest

from dgemma.core import contract as graphs
from dgemma.core.config import TINY
from dgemma.core.profiles import PROFILES

_ONNX_DTYPES = {onnx.TensorProto.INT64: "int64", onnx.TensorProto.FLOAT: "float32",
                onnx.TensorProto.BFLOAT16: "bfloat16"}


def _io(vis):
    out = []
    for vi in vis:
        dims = tuple(d.dim_param if d.dim_param else d.dim_value for d in vi.type.tensor_type.shape.dim)
        out.append(graphs.TensorSpec(vi.name, _ONNX_DTYPES[vi.type.tensor_type.elem_type], dims))
    return out


@pytest.mark.parametrize("graph", graphs.GRAPHS)
def test_onnx_io_equals_contract(onnx_dir, graph):
    proto = onnx.load(str(onnx_dir / graph / "model.onnx"), load_external_data=False)
    assert _io(proto.graph.input) == graphs.inputs(graph, TINY, "fp32")
    assert _io(proto.graph.output) == graphs.outputs(graph, TINY, "fp32")


def test_contract_names_and_distinct_dims():
    enc = graphs.encoder_inputs(TINY)
    assert [t.name for t in enc][:5] == ["input_ids", "position_ids", "past_length", "past_key_0", "past_value_0"]
    assert enc[2].dims == ("batch",) and enc[2].dtype == "int64"
    # sliding buffers hold W-1 slots (static), full-layer buffers kv_capacity slots
    assert enc[3].dims == ("batch", 2, TINY.sliding_window - 1, 16) and enc[5].dims == ("batch", 1, "kv_capacity", 32)
    den = graphs.denoiser_inputs(TINY)
    assert [t.name for t in den][:5] == ["canvas_ids", "sc_embeds", "temperature", "position_ids", "past_length"]
    assert [t.dims for t in den[5:]] == [t.dims for t in enc[3:]]
    assert [t.name for t in graphs.denoiser_outputs(TINY)] == ["logits", "next_sc_embeds"]
    assert graphs.denoiser_outputs(TINY)[0].dtype == "float32"
    assert [t.name for t in graphs.encoder_outputs(TINY)][:2] == ["new_key_0", "new_value_0"]
    assert all(t.dims[2] == "seq" for t in graphs.encoder_outputs(TINY))
    assert graphs.contract_hash(TINY, "fp32") != graphs.contract_hash(TINY, "bf16")


@pytest.mark.parametrize("gpu", sorted(PROFILES))
def test_profile_shapes_cover_every_input(gpu):
    prof = PROFILES[gpu]
    for g in graphs.GRAPHS:
        shapes = graphs.profile_shapes(g, TINY, prof)
        assert list(shapes) == [t.name for t in graphs.inputs(g, TINY)]
        for lo, opt, hi in shapes.values():
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi))
    r = graphs.dim_ranges(TINY, prof)
    assert r["kv_capacity"] == (TINY.canvas_length, prof.max_context, prof.max_context)
    assert r["batch"][2] == prof.max_batch and r["seq"][2] >= TINY.canvas_length


def test_manifest(onnx_dir, tiny_dir):
    from dgemma.export.onnx import checkpoint_fingerprint

    m = json.loads((onnx_dir / "manifest.json").read_text())
    assert m["precision"] == "fp32" and m["checkpoint_sha256"] == checkpoint_fingerprint(tiny_dir)
    assert m["io_contract"] == json.loads(json.dumps(graphs.contract(TINY, "fp32")))
    assert {"dgemma_version", "torch_version", "onnx_version"} <= set(m)
    for g in graphs.GRAPHS:
        assert m["graphs"][g]["exporter"] in ("dynamo", "legacy")
    assert not list(onnx_dir.parent.glob(".fp32-*"))  # no temp dir left behind
