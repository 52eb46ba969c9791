"""The fast backend on an NVFP4 checkpoint (W4A16 experts, FP8 dense projections): the factory loads the quantize
directory, the weight footprint measured at load equals core.profiles.weight_footprint, and its denoise steps and
generations match the dequantized-weights torch model (model.quantized.load_quantized + TorchBackend); the kernel
path (kernels.moe_w4a16 and the fused dense pass, interpreted) against its torch path. The checkpoint is the embedded
tiny-sort model written with model.lowp's NVFP4 encoder (nvfp4_ckpt), which the first test checks against the fake
quantisation the quantize stage calibrates with.

Tolerances (measured): the fast path re-quantises the decoded dense weights to e4m3 per row and quantises their
activations per token, the reference keeps both in bf16: first-step logits rel-L2 <= 6e-2 (3.2e-2), top-1 >= 0.95
(1.0); both generate the same tokens for >= 95% of positions (measured: 6 of 6 prompts token-equal) and sort every
prompt correctly. The error this FP8 layer adds is smaller than NVFP4's own: against the unquantised bf16 model
the reference is at 3.4e-2, the fast path at 4.3e-2. kernels="force" vs "off" on the NVFP4 model: rel-L2 <= 5e-2
(1.5e-2; MoE h rounded to bf16 from fp32 GELU*up vs from bf16 gate/up, and the FP8 dense paths' e4m3 flips, as in
test_fast_kernels), top-1 >= 0.95 (1.0).
"""

import random

import pytest
import torch

from dgemma.core.errors import ArtifactError
from dgemma.core.layout import DEFAULT_CHECKPOINT, Layout
from dgemma.core.profiles import weight_footprint
from dgemma.generation.sampler import generate
from dgemma.model.lowp import E2M1_MAX, E4M3_MAX, nvfp4_decode, nvfp4_encode, nvfp4_fake_quant_scaled
from dgemma.model.quantized import load_quantized
from dgemma.model.tokens import chat_prompt
from dgemma.runtime.factory import create
from dgemma.runtime.fast import Nvfp4Experts
from dgemma.runtime.torch_backend import TorchBackend
from dgemma.tiny.task import get_task

from .nvfp4_ckpt import write_nvfp4_checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/unit/conftest.py


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_nvfp4_encoder_is_the_fake_quantisation_stored():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 40, 96, generator=g) * torch.tensor([0.1, 1.0, 30.0])[:, None, None]
    w[0, 0, :16] = 0.0  # an all-zero block
    s2 = w.abs().amax(dim=(1, 2)) / (E2M1_MAX * E4M3_MAX)
    packed, scale = nvfp4_encode(w, s2)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 40, 48) and scale.shape == (3, 40, 6)
    want = torch.stack([nvfp4_fake_quant_scaled(w[e], 16, s2[e]) for e in range(3)])
    assert torch.equal(nvfp4_decode(packed, scale, s2, torch.float32), want)


@pytest.fixture(scope="module")
def quant_dir(tmp_path_factory):
    return write_nvfp4_checkpoint(DEFAULT_CHECKPOINT, tmp_path_factory.mktemp("quantize") / "nvfp4")


def test_factory_refuses_a_missing_quantize_directory(tmp_path):
    with pytest.raises(ArtifactError, match=r"quantize/nvfp4 does not exist.*make quantize PRECISION=nvfp4"):
        create("fast", "nvfp4", layout=Layout(tmp_path), device="cpu")
    with pytest.raises(ArtifactError, match="no NVFP4 checkpoint.*make quantize PRECISION=nvfp4"):
        create("fast", "nvfp4", checkpoint=DEFAULT_CHECKPOINT, device="cpu")


def test_w4a16_backend_matches_the_dequantized_model(quant_dir):
    eng = create("fast", "nvfp4", checkpoint=quant_dir, device="cpu", kernels="off")
    fb, cfg, tok = eng.backend, eng.config, eng.tokenizer
    assert all(isinstance(layer.experts, Nvfp4Experts) for layer in fb.model.layers)
    assert fb.footprint == weight_footprint(cfg, experts="nvfp4", dense="fp8", other_bytes=2)
    assert eng.info["weights"] == fb.footprint and eng.info["quantize_dir"] == str(quant_dir)
    ref = TorchBackend(load_quantized(quant_dir), 256)

    task, rng = get_task("sort"), random.Random(0)
    prompts = [task.example(rng)[0] for _ in range(4)]
    ids = [torch.tensor([tok.encode(chat_prompt(p))]) for p in prompts]
    g = torch.Generator().manual_seed(0)
    cv = torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length), generator=g)
    t = torch.tensor(0.7)
    st, sf = ref.new_state(1), fb.new_state(1)
    ref.encode(st, ids[0])
    fb.encode(sf, ids[0])  # 51 tokens: one static 32-token chunk + the eager tail
    r_ref, _ = ref.denoise(st, cv, None, t)
    r_ref = r_ref.clone()
    r_fast, _ = fb.denoise(sf, cv, None, t)
    r_fast = r_fast.clone()  # a view of the backend's logits buffer: generate below overwrites it
    assert rel(r_fast, r_ref) <= 6e-2 and (r_fast.argmax(-1) == r_ref.argmax(-1)).float().mean() >= 0.95

    agree, n = 0, 0
    for p, x in zip(prompts, ids):
        a = generate(ref, x, eng.sampler, torch.Generator().manual_seed(1))
        b = generate(fb, x, eng.sampler, torch.Generator().manual_seed(1))
        agree, n = agree + int((a.new_tokens == b.new_tokens).sum()), n + a.new_tokens.numel()
        for out in (a, b):
            assert task.check(p, tok.decode(out.new_tokens[0].tolist()).split("<")[0]), (p, out.new_tokens)
    assert agree / n >= 0.95

    # the kernel path (w4a16_moe + the fused dense pass) against this torch path
    fk = create("fast", "nvfp4", checkpoint=quant_dir, device="cpu", kernels="force").backend
    assert fk.kernels.summary()["dense"] == "on"
    sk = fk.new_state(1)
    fk.encode(sk, ids[0])
    r_k, _ = fk.denoise(sk, cv, None, t)
    assert rel(r_k, r_fast) <= 5e-2 and (r_k.argmax(-1) == r_fast.argmax(-1)).float().mean() >= 0.95
