"""Flash attention (dgemma.kernels.attention) under the interpreter on small shapes: against the plain torch reference
(fp64) and against the model's own attention (model.Attention.attend over export.encoder_mask / prefix_mask), both
passes, sliding and full, GQA 1/2/4, head dims with masked tails, rows of different lengths (0 included), window
edges, NaN-poisoned outputs, split-K on/off; and the AOT gate of every production config.

Tolerances (values are O(1): v ~ N(0, 1)): fp32 inputs |err| < 2e-5 against fp64; split-K against no split < 2e-5
(only the summation order differs); bf16 inputs |err| <= 8e-3 + 8e-3 |ref| against fp64 on the same bf16 inputs
(storing bf16 costs up to 2^-8 |o| rounded, 2^-7 |o| under the interpreter, which truncates; on a GPU P is also
rounded to bf16 before P·V, about 2^-9 max|v|). Measured maxima are printed (pytest -s).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from dgemma.model import static_passes as export
from dgemma.core.config import ModelConfig
from dgemma.kernels import aot, attention as A, configs
from dgemma.model.modeling import Attention

W = 8  # sliding window of the small shapes; the cache keeps W-1 = 7 tokens
S = 12  # new tokens (> W, so the causal window also cuts the new keys)
FULL_CAP = 20
CFG = configs.Config(block_m=16, block_n=16, block_k=32, split_k=4)  # hd 24: one masked chunk; hd 40: two
TOL = {torch.float32: (2e-5, 0.0), torch.bfloat16: (8e-3, 8e-3)}  # (atol, rtol)


def _inputs(b, nh, kvh, cap, hd, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *shape: torch.randn(*shape, generator=g).to(dtype).to(device)  # noqa: E731
    return mk(b, nh, S, hd), mk(b, kvh, cap, hd), mk(b, kvh, cap, hd), mk(b, kvh, S, hd), mk(b, kvh, S, hd)


def _poisoned_out(q):
    b, nh, s, hd = q.shape
    return torch.full((b, s, nh, hd), float("nan"), dtype=q.dtype, device=q.device).transpose(1, 2)


def _err(a, b):
    return (a.double().cpu() - b.double().cpu()).abs().max().item()


def _within(out, ref, dtype) -> bool:
    atol, rtol = TOL[dtype]
    out, ref = out.double().cpu(), ref.double().cpu()
    return bool(((out - ref).abs() <= atol + rtol * ref.abs()).all())


# (name, causal, window, nh, kvh, hd, buffer capacity, past lengths per row, dtype); sliding buffers hold W-1 slots,
# except one larger buffer whose slots past W-1 must never be read
CASES = [
    ("denoise/full/G4", False, None, 4, 1, 40, FULL_CAP, [0, 9, FULL_CAP], torch.float32),
    ("denoise/sliding/G2/cap>W-1", False, W, 4, 2, 24, W + 3, [3, W - 1, 19], torch.float32),  # P <, =, > W-1
    ("encode/full/G1", True, None, 2, 2, 40, FULL_CAP, [0, 9, FULL_CAP], torch.float32),
    ("encode/sliding/G2", True, W, 4, 2, 24, W - 1, [0, 3, W - 1, 19], torch.float32),
    ("denoise/full/G4/bf16", False, None, 4, 1, 40, FULL_CAP, [0, 9, FULL_CAP], torch.bfloat16),
    ("encode/sliding/G2/bf16", True, W, 4, 2, 24, W - 1, [0, 3, W - 1, 19], torch.bfloat16),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_reference_with_and_without_split(case, device):
    name, causal, window, nh, kvh, hd, cap, past, dtype = case
    q, kc, vc, kn, vn = _inputs(len(past), nh, kvh, cap, hd, dtype, device)
    lengths = torch.tensor(past, dtype=torch.int64, device=device)
    ref = A.attention_ref(q, kc, vc, kn, vn, lengths, causal, window)
    outs = {}
    for splits in (1, 3):
        out = A.attention(q, kc, vc, kn, vn, lengths, causal, window, out=_poisoned_out(q), splits=splits, config=CFG)
        assert not out.isnan().any(), f"{name}: unwritten output with splits={splits}"
        outs[splits] = out
        err = _err(out, ref)
        rel = ((out.double().cpu() - ref.cpu()).abs() / (ref.cpu().abs() + 1)).max().item()
        print(f"{name} splits={splits}: max |kernel - ref| = {err:.2e}, max |kernel - ref| / (|ref| + 1) = {rel:.2e}")
        assert _within(out, ref, dtype), (name, splits, err)
    split_err = _err(outs[1], outs[3])
    print(f"{name}: max |split 1 - split 3| = {split_err:.2e}")
    assert _within(outs[3], outs[1], dtype)


def test_empty_splits_and_broadcast_length(device, monkeypatch):
    """More splits than key tiles (empty splits write lse = -inf and must not disturb the merge), split-K
    workspaces that start as NaN (every partial the merge reads is written), and past_length of one element
    broadcast to every row (the fast backend's single P)."""
    q, kc, vc, kn, vn = _inputs(2, 4, 2, FULL_CAP, 40, torch.float32, device, seed=1)
    one = torch.tensor([5], dtype=torch.int64, device=device)
    ref = A.attention_ref(q, kc, vc, kn, vn, torch.tensor([5, 5]), True, None)
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
    out = A.attention(q, kc, vc, kn, vn, one, True, None, out=_poisoned_out(q), splits=4, config=CFG)
    monkeypatch.undo()
    err = _err(out, ref)
    print(f"4 splits over <= 2 tiles, broadcast P: max err {err:.2e}")
    assert not out.isnan().any() and _within(out, ref, torch.float32)
    if device == "cuda":  # programs run concurrently only on a GPU: the merge must not depend on their order
        again = A.attention(q, kc, vc, kn, vn, one, True, None, splits=4, config=CFG)
        assert torch.equal(out, again)


def _tiny_cfg() -> ModelConfig:
    return ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                       global_head_dim=40, num_global_key_value_heads=1, num_experts=2, top_k_experts=1,
                       sliding_window=W, layer_types=("sliding_attention", "full_attention"), canvas_length=S,
                       dtype="float32")


@pytest.mark.parametrize("layer", [0, 1], ids=["sliding", "full"])
@pytest.mark.parametrize("causal", [False, True], ids=["denoise", "encode"])
def test_matches_model_attention(layer, causal, device):
    """The kernel against model.Attention.attend over [buffer ⊕ new] with the export masks (what the ONNX graphs
    compute). Sliding layers use one extended buffer [B, kvh, W-1+S, hd] and views of it (FastState's layout);
    q is the transposed view Attention.qkv produces."""
    cfg = _tiny_cfg()
    at = Attention(cfg, layer)
    hd, kvh, nh = at.head_dim, at.kv_heads, cfg.num_attention_heads
    cap = cfg.sliding_cache_len if at.sliding else FULL_CAP
    lengths = torch.tensor([0, 5, 19], dtype=torch.int64)
    b = len(lengths)
    g = torch.Generator().manual_seed(2 + layer)
    q = torch.randn(b, S, nh, hd, generator=g).transpose(1, 2)
    k_all = torch.randn(b, kvh, cap + S, hd, generator=g)
    v_all = torch.randn(b, kvh, cap + S, hd, generator=g)
    if causal:
        mask = export.encoder_mask(lengths, cap, S, cfg.sliding_window if at.sliding else None, cfg.sliding_cache_len)
    else:
        mask = export.prefix_mask(lengths, cap, S, at.sliding, cfg.sliding_cache_len)
    want = at.attend(q, k_all, v_all, mask, causal=False)
    dev = lambda t: t.to(device)  # noqa: E731
    kc, vc, kn, vn = (dev(t) for t in (k_all[:, :, :cap], v_all[:, :, :cap], k_all[:, :, cap:], v_all[:, :, cap:]))
    out = A.attention(dev(q), kc, vc, kn, vn, dev(lengths), causal, cfg.sliding_window if at.sliding else None,
                      splits=2 if layer else 1, config=CFG)
    assert out.transpose(1, 2).is_contiguous()  # [B, S, nh, hd]: o_proj's input without a copy
    err = _err(out, want)
    print(f"model attend {'sliding' if at.sliding else 'full'} {'encode' if causal else 'denoise'}: max err {err:.2e}")
    assert _within(out, want, torch.float32)


def test_launcher_rejects_bad_layouts():
    q = torch.zeros(1, 4, S, 24)
    kv = torch.zeros(1, 2, 7, 24)
    new = torch.zeros(1, 2, S, 24)
    p = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="k_new"):
        A.attention(q, kv, kv, new[:, :, :3], new, p, False, W)
    with pytest.raises(ValueError, match="contiguous in the head dim"):
        A.attention(q, kv, kv, new, torch.zeros(1, 2, 24, S).transpose(-1, -2), p, False, W)
    with pytest.raises(ValueError, match="past_length"):
        A.attention(q, kv, kv, new, new, p.float(), False, W)


def test_production_lookup_and_splits():
    """Each arch family reads its table; B=1 denoise steps get split-K, a long prefill does not."""
    for cc, want_m in ((90, 64), (100, 64), (120, 32), (121, 32)):
        assert configs.lookup("attention_hd512", cc, 256).block_m == want_m
    den = configs.lookup("attention_hd256", 90, 256)
    programs = -(-(2 * 256) // den.block_m) * 1 * 1 * 8  # B=1 sliding layer: G=2, one output slice, 8 KV heads
    assert A.pick_splits(den, programs, 1023 + 256, 132) > 1
    pre = configs.lookup("attention_hd256", 90, 4096)
    assert pre.split_k == 1 and A.pick_splits(pre, 1024, 1023 + 4096, 132) == 1


# -- ahead-of-time gate -----------------------------------------------------------------------------------------------
_MMA_COUNTS = r"""
import json, re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dgemma.kernels import aot, attention as A
out = {}
for s in A.aot_specs():
    k = triton.compile(ASTSource(fn=aot._jit(s.fn), signature=s.signature, constexprs=s.constexprs),
                       target=GPUTarget("cuda", s.cc, 32), options={"num_warps": s.num_warps, "num_stages": s.num_stages})
    out[s.label] = len(re.findall(r"\b(?:wgmma\.mma_async|tcgen05\.mma|mma\.sync)\b", k.asm["ptx"]))
print(json.dumps(out))
"""


def test_aot_every_production_config():
    """Every production config compiles for SM90/100/120 without spills, within shared memory, and the forward
    kernels issue the architecture's MMA (counted as instructions, and only in the attention kernels, not the
    combine). Compiles are cached by triton, so the second pass is cheap."""
    rows = aot.gate("dgemma.kernels.attention")
    print("\n" + aot.table(rows))
    assert {r["sm"] for r in rows} == set(aot.ARCHS)
    for r in rows:
        assert r["problems"] == [], r
        assert r["spills"] == 0 and r["smem"] <= aot.SMEM_LIMIT[r["sm"]]
    fwd = [r for r in rows if r["label"].startswith("attn/")]
    for hd in (256, 512):
        for mode in ("bidir", "causal"):
            assert {r["sm"] for r in fwd if r["label"].startswith(f"attn/hd{hd}/{mode}/")} == set(aot.ARCHS)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), *sys.path])
    r = subprocess.run([sys.executable, "-c", _MMA_COUNTS], capture_output=True, text=True, env=env, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    counts = json.loads(r.stdout.strip().splitlines()[-1])
    print(counts)
    for label, n in counts.items():
        assert (n > 0) == label.startswith("attn/"), (label, n)  # the combine is plain fp32 arithmetic
