"""Checkpoint layout: loading (single file, sharded, dtypes), writing, and every bad-input error."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dgemma.model.checkpoint import expected_tensors, load_checkpoint, save_checkpoint
from dgemma.core.config import FULL_SIZE, TINY, ModelConfig, SamplerConfig
from dgemma.core.errors import CheckpointError
from dgemma.model.modeling import DiffusionGemma
from dgemma.model.tokens import Tokenizer


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_full_size_tensor_names_and_shapes_follow_the_real_layout():
    exp = expected_tensors(FULL_SIZE)
    p = "model.decoder.layers."
    assert exp[p + "0.self_attn.q_proj.weight"] == (4096, 2816)
    assert exp[p + "0.self_attn.v_proj.weight"] == (2048, 2816)
    assert exp[p + "5.self_attn.q_proj.weight"] == (8192, 2816)
    assert exp[p + "5.self_attn.k_proj.weight"] == (1024, 2816)
    assert p + "5.self_attn.v_proj.weight" not in exp  # full layers: V from k_proj
    assert exp[p + "5.self_attn.k_norm.weight"] == (512,)
    assert exp[p + "3.experts.gate_up_proj"] == (128, 1408, 2816)
    assert exp[p + "3.experts.down_proj"] == (128, 2816, 704)
    assert exp[p + "3.router.per_expert_scale"] == (128,)
    assert exp[p + "29.layer_scalar"] == (1,)
    assert exp["model.encoder.language_model.layers.29.layer_scalar"] == (1,)
    assert exp["model.decoder.embed_tokens.weight"] == (262144, 2816)
    assert exp["model.decoder.self_conditioning.down_proj.weight"] == (2816, 2112)
    # 25.2 B text parameters (spec §2: 0.738 + 22.838 + 1.657 + 0.018)
    assert abs(FULL_SIZE.param_count() / 1e9 - 25.25) < 0.02
    assert sum(torch.Size(s).numel() for s in exp.values()) == FULL_SIZE.param_count()


def test_transformers_checkpoint_loads_and_vision_is_ignored(hf_checkpoints):
    _, path = hf_checkpoints["spec"]
    ck = load_checkpoint(path)
    assert ck.ignored and all("vision" in n for n in ck.ignored)
    assert ck.model.encoder_layer_scalars.tolist() == pytest.approx([1.1, 1.05])
    assert [l.layer_scalar.item() for l in ck.model.layers] == pytest.approx([0.9, 0.95])
    assert ck.config.global_head_dim == 32 and ck.config.num_global_key_value_heads == 1


def test_sharded_equals_single_and_dtypes(tmp_path, tiny_dir):
    single = load_checkpoint(tiny_dir).model
    out = save_checkpoint(single, tmp_path / "sharded", SamplerConfig(), shard_bytes=200_000)
    assert len(list(out.glob("model-*.safetensors"))) > 2 and (out / "model.safetensors.index.json").exists()
    sharded = load_checkpoint(out).model
    for (n, a), (_, b) in zip(single.state_dict().items(), sharded.state_dict().items()):
        assert torch.equal(a, b), n
    for dt in ("bfloat16", "float16"):
        m = load_checkpoint(out, dtype=dt).model
        assert m.dtype == getattr(torch, dt)
        assert all(p.dtype == getattr(torch, dt) for p in m.parameters())


def test_tiny_checkpoint_has_tokenizer_and_generation_config(tiny_dir):
    tok = Tokenizer(tiny_dir)
    text = "Sky: blue ✓\nok"
    assert tok.decode(tok.encode(text)) == text
    ids = tok.encode_chat("hi")
    assert ids[:2] == [2, 105] and ids[-1] == 101 and 106 in ids and 107 in ids
    gen = json.loads((tiny_dir / "generation_config.json").read_text())
    assert gen["max_denoising_steps"] == 48 and gen["eos_token_id"] == [1, 106, 50]


def test_missing_dir_and_files(tmp_path, tiny_dir):
    with pytest.raises(CheckpointError, match="does not exist.*init-tiny"):
        load_checkpoint(tmp_path / "nope")
    d = _copy(tiny_dir, tmp_path / "noweights")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors and no model.safetensors.index.json"):
        load_checkpoint(d)
    d = _copy(tiny_dir, tmp_path / "noconfig")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_checkpoint(d)


def test_wrong_model_type(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path / "llama")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type is 'llama', expected 'diffusion_gemma'"):
        load_checkpoint(d)


def _rewrite(d, fn):
    t = load_file(str(d / "model.safetensors"))
    fn(t)
    save_file(t, str(d / "model.safetensors"))


def test_missing_extra_and_misshaped_tensors(tmp_path, tiny_dir):
    name = "model.decoder.layers.1.self_attn.q_proj.weight"
    d = _copy(tiny_dir, tmp_path / "missing")
    _rewrite(d, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"model.safetensors: tensor {name} is missing"):
        load_checkpoint(d)
    d = _copy(tiny_dir, tmp_path / "extra")
    _rewrite(d, lambda t: t.__setitem__("model.decoder.layers.7.mlp.up_proj.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="unexpected tensor model.decoder.layers.7.mlp.up_proj.weight"):
        load_checkpoint(d)
    d = _copy(tiny_dir, tmp_path / "shape")
    _rewrite(d, lambda t: t.__setitem__(name, torch.zeros(64, 64)))
    with pytest.raises(CheckpointError, match=r"tensor .*q_proj.weight has shape \[64, 64\], expected \[128, 64\]"):
        load_checkpoint(d)


def test_corrupt_files(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path / "corrupt")
    (d / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(d)
    d = _copy(tiny_dir, tmp_path / "badjson")
    (d / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(d)
    d = _copy(tiny_dir, tmp_path / "badindex")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-9.safetensors"}}))
    with pytest.raises(CheckpointError, match="names shard model-9.safetensors for tensor a"):
        load_checkpoint(d)


def test_save_is_atomic(tmp_path, monkeypatch):
    model = DiffusionGemma.random(TINY, dtype=torch.float32)
    import safetensors.torch as st

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError):
        save_checkpoint(model, tmp_path / "out", SamplerConfig())
    assert list(tmp_path.iterdir()) == []  # no half-written directory left


def test_config_validation():
    with pytest.raises(Exception, match="last layer must be 'full_attention'"):
        ModelConfig(num_hidden_layers=1, layer_types=("sliding_attention",))
    with pytest.raises(Exception, match="num_global_key_value_heads=3 must divide num_attention_heads=16"):
        ModelConfig(num_global_key_value_heads=3)


_PEAK_SCRIPT = r"""
import sys, threading, time, torch
from dgemma.model.checkpoint import load_checkpoint

def anon_kb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

peak, stop = [anon_kb()], threading.Event()
def poll():
    while not stop.is_set():
        peak.append(anon_kb()); time.sleep(0.002)
base = anon_kb()
t = threading.Thread(target=poll); t.start()
ck = load_checkpoint(sys.argv[1], dtype=sys.argv[2])
stop.set(); t.join()
print((max(peak) - base) * 1024)
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loading_holds_one_copy_of_the_weights(tmp_path, dtype):
    """Peak anonymous memory while loading = one copy in the target dtype + at most one tensor being converted."""
    import subprocess
    import sys

    cfg = TINY.replace(vocab_size=16384, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=256,
                       num_experts=16, top_k_experts=2, num_attention_heads=8, num_key_value_heads=4, head_dim=128,
                       global_head_dim=256)
    model = DiffusionGemma.random(cfg, dtype=torch.float32)
    out = save_checkpoint(model, tmp_path / "mid", SamplerConfig())
    size = (out / "model.safetensors").stat().st_size
    largest = max(p.numel() * 4 for p in model.parameters())  # fp32 file: one tensor read before conversion
    del model
    r = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(out), dtype], capture_output=True, text=True,
                       check=True)
    peak = int(r.stdout.strip().splitlines()[-1])
    want = size if dtype == "float32" else size / 2 + largest
    assert size > 150e6 and peak < 1.1 * want, (peak / 1e6, want / 1e6)
