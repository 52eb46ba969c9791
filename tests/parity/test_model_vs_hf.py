"""Native model vs transformers 5.23 DiffusionGemmaForBlockDiffusion: encoder KV and denoiser logits."""

import pytest
import torch
from transformers.cache_utils import DynamicCache

from dgemma.model.checkpoint import load_checkpoint


def _hf_encode(hf, cache, ids, start):
    pos = torch.arange(start, start + ids.shape[1]).unsqueeze(0)
    hf.model.encoder(input_ids=ids, past_key_values=cache, position_ids=pos)


def _hf_denoise(hf, cache, canvas, start, sc_logits=None):
    pos = torch.arange(start, start + canvas.shape[1]).unsqueeze(0)
    return hf(decoder_input_ids=canvas, past_key_values=cache, decoder_position_ids=pos,
              self_conditioning_logits=sc_logits).logits


@pytest.mark.parametrize("name", ["spec", "wide"])
@pytest.mark.parametrize("prompt_len", [5, 40])  # shorter and longer than the sliding window
@torch.no_grad()
def test_kv_and_logits_match_fp32(hf_checkpoints, name, prompt_len):
    hf, path = hf_checkpoints[name]
    model = load_checkpoint(path).model
    cfg = model.cfg
    g = torch.Generator().manual_seed(prompt_len)
    ids = torch.randint(3, cfg.vocab_size, (2, prompt_len), generator=g)
    cache = DynamicCache(config=hf.config.get_text_config(decoder=True))
    kv = model.new_cache(2, 512)
    start = 0
    for canvas_i in range(3):  # prefill, then two commits
        _hf_encode(hf, cache, ids, start)
        model.encode(ids, kv)
        start += ids.shape[1]
        for i in range(cfg.num_hidden_layers):
            k, v = kv.prefix(i)
            assert k.shape == cache.layers[i].keys.shape
            torch.testing.assert_close(k, cache.layers[i].keys, rtol=0, atol=1e-6)
            torch.testing.assert_close(v, cache.layers[i].values, rtol=0, atol=1e-6)
        canvas = torch.randint(0, cfg.vocab_size, (2, cfg.canvas_length), generator=g)
        ref1 = _hf_denoise(hf, cache, canvas, start)
        ours1 = model.denoise(canvas, None, kv)
        torch.testing.assert_close(ours1, ref1, rtol=0, atol=1e-5)
        sc = (ref1 / 0.8).to(torch.float32)
        ref2 = _hf_denoise(hf, cache, canvas, start, sc)
        ours2 = model.denoise(canvas, model.soft_embed(sc), kv)
        torch.testing.assert_close(ours2, ref2, rtol=0, atol=1e-5)
        ids = canvas  # commit this canvas next


@torch.no_grad()
def test_bf16_kv_and_logits_identical(hf_checkpoints):
    from transformers import DiffusionGemmaForBlockDiffusion

    _, path = hf_checkpoints["spec"]
    hf16 = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.bfloat16).eval()
    if True:
        model = load_checkpoint(path, dtype="bfloat16").model
        assert model.dtype == torch.bfloat16 and model.encoder_layer_scalars.dtype == torch.bfloat16
        ids = torch.randint(3, 512, (1, 24), generator=torch.Generator().manual_seed(3))
        cache = DynamicCache(config=hf16.config.get_text_config(decoder=True))
        kv = model.new_cache(1, 256)
        _hf_encode(hf16, cache, ids, 0)
        model.encode(ids, kv)
        for i in range(2):
            torch.testing.assert_close(kv.prefix(i)[0], cache.layers[i].keys, rtol=0, atol=0)
        canvas = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(4))
        ref = _hf_denoise(hf16, cache, canvas, 24)
        ours = model.denoise(canvas, None, kv)
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)


@torch.no_grad()
def test_dense_experts_equal_grouped(hf_checkpoints):
    _, path = hf_checkpoints["wide"]
    model = load_checkpoint(path).model
    ids = torch.randint(3, 512, (2, 20), generator=torch.Generator().manual_seed(5))
    kv = model.new_cache(2, 128)
    model.encode(ids, kv)
    canvas = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(6))
    grouped = model.denoise(canvas, None, kv)
    model.set_experts_impl("dense")
    dense = model.denoise(canvas, None, kv)
    model.set_experts_impl("grouped")
    torch.testing.assert_close(dense, grouped, rtol=0, atol=2e-5)
