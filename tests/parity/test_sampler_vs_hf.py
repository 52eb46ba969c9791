"""dgemma.sampler.generate on the native model == transformers' generate, token for token (same seed)."""

import pytest
import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    DiffusionGemmaGenerationConfig,
    EntropyBoundSamplerConfig,
)

from dgemma.model.checkpoint import load_checkpoint
from dgemma.core.config import SamplerConfig
from dgemma.runtime.torch_backend import TorchBackend
from dgemma.generation.sampler import generate

CASES = [  # (config, seed, batch, prompt_len, max_new_tokens, eos, confidence, stability)
    ("spec", 0, 1, 10, 64, [1], 0.005, 1),
    ("spec", 1, 1, 10, 64, [1], 0.005, 1),
    ("spec", 2, 2, 40, 96, [1], 0.005, 1),  # prompt longer than the window, 3 canvases
    ("spec", 3, 3, 20, 64, list(range(1, 60)), 0.005, 1),  # EOS inside a canvas, rows finish at once
    ("spec", 4, 2, 12, 64, [1], 50.0, 0),  # stability off: early stop after one step
    ("wide", 5, 3, 9, 40, [7, 8, 9, 10], 0.005, 1),  # other shape, max_new_tokens not a multiple of C
    ("wide", 6, 2, 30, 32, [1], 0.005, 2),
]


def _hf_generate(hf, prompt, seed, mnt, eos, conf, k):
    gc = DiffusionGemmaGenerationConfig(
        max_new_tokens=mnt, max_denoising_steps=48, sampler_config=EntropyBoundSamplerConfig(entropy_bound=0.1),
        t_min=0.4, t_max=0.8, stability_threshold=k, confidence_threshold=conf, eos_token_id=eos, pad_token_id=0)
    torch.manual_seed(seed)
    return hf.generate(prompt, generation_config=gc)


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-seed{c[1]}-b{c[2]}" for c in CASES])
def test_generate_token_for_token(hf_checkpoints, case):
    name, seed, b, plen, mnt, eos, conf, k = case
    hf, path = hf_checkpoints[name]
    backend = TorchBackend(load_checkpoint(path).model, max_context=512)
    prompt = torch.randint(3, 512, (b, plen), generator=torch.Generator().manual_seed(100 + seed))
    ref = _hf_generate(hf, prompt, seed, mnt, eos, conf, k)
    cfg = SamplerConfig(max_new_tokens=mnt, confidence_threshold=conf, stability_threshold=k,
                        eos_token_ids=tuple(eos))
    # --seed S semantics: a fresh generator seeded with S == torch.manual_seed(S) on CPU
    ours = generate(backend, prompt, cfg, torch.Generator().manual_seed(seed))
    assert torch.equal(ours.sequences, ref.sequences)
    torch.testing.assert_close(ours.tokens_per_forward, ref.tokens_per_forward.float(), rtol=0, atol=0)


class _Scripted:
    """Deterministic logits that converge per row at different steps: rows become one-hot-confident after
    `stop_at[r]` calls of the current canvas. Shared by transformers (patched forward) and our backend."""

    def __init__(self, vocab, canvas, stop_at):
        self.vocab, self.canvas, self.stop_at, self.calls = vocab, canvas, stop_at, 0
        g = torch.Generator().manual_seed(7)
        self.noise = torch.randn(64, len(stop_at), canvas, vocab, generator=g)
        self.target = torch.randint(3, vocab, (len(stop_at), canvas), generator=g)

    def logits(self, first_step: bool) -> torch.Tensor:
        self.calls = 1 if first_step else self.calls + 1
        out = self.noise[self.calls % 64].clone()
        for r, stop in enumerate(self.stop_at):
            if self.calls >= stop:
                out[r] = torch.full((self.canvas, self.vocab), -30.0).scatter(1, self.target[r, :, None], 30.0)
        return out


class _ScriptedBackend(TorchBackend):
    def __init__(self, model, script):
        super().__init__(model, max_context=512)
        self.script = script

    def denoise(self, state, canvas, soft, temperature):
        raw = self.script.logits(soft is None)
        return raw, self.model.soft_embed(raw / temperature)


def test_rows_stopping_at_different_steps_match(hf_checkpoints):
    """Freeze of stopped rows (spec §9.5), checked against transformers' loop with identical scripted logits."""
    from types import SimpleNamespace

    hf, path = hf_checkpoints["spec"]
    stop_at = [3, 9, 20]
    ref_script, our_script = _Scripted(512, 32, stop_at), _Scripted(512, 32, stop_at)
    real_forward = hf.forward
    hf.forward = lambda **kw: SimpleNamespace(logits=ref_script.logits(kw["self_conditioning_logits"] is None))
    try:
        prompt = torch.randint(3, 512, (3, 12), generator=torch.Generator().manual_seed(11))
        ref = _hf_generate(hf, prompt, 5, 64, [1], 0.005, 1)
    finally:
        hf.forward = real_forward
    backend = _ScriptedBackend(load_checkpoint(path).model, our_script)
    res = generate(backend, prompt, SamplerConfig(max_new_tokens=64, eos_token_ids=(1,)),
                   torch.Generator().manual_seed(5))
    assert torch.equal(res.sequences, ref.sequences)
    torch.testing.assert_close(res.tokens_per_forward, ref.tokens_per_forward.float(), rtol=0, atol=0)
    # each row stops one step after it turns confident (stability needs two equal argmax canvases)
    assert res.forward_passes.tolist() == [2 * (s + 1) for s in stop_at]
    assert res.steps_per_canvas == [21, 21]


def test_trained_checkpoint_real_adaptive_stopping_matches_transformers():
    """The committed trained model converges for real: rows stop at different steps; transformers agrees."""
    import random

    from pathlib import Path

    from transformers import DiffusionGemmaForBlockDiffusion

    from dgemma.tiny import DEFAULT_CHECKPOINT
    from dgemma.model.tokens import Tokenizer
    from dgemma.tiny.task import SortTask, encode_batch

    import json

    # transformers reads our checkpoint as is; only a (tiny) vision config is added so it does not build the
    # default 16-layer vision tower, whose weights the text-only checkpoint does not carry
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp())
    cfg = json.loads((DEFAULT_CHECKPOINT / "config.json").read_text())
    cfg["vision_config"] = dict(model_type="gemma4_vision", hidden_size=32, intermediate_size=64,
                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=16)
    (d / "config.json").write_text(json.dumps(cfg))
    shutil.copy(DEFAULT_CHECKPOINT / "model.safetensors", d / "model.safetensors")
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(d, dtype=torch.bfloat16).eval()
    ck = load_checkpoint(DEFAULT_CHECKPOINT)
    tok = Tokenizer(DEFAULT_CHECKPOINT)
    pairs = [SortTask().example(random.Random(100 + s)) for s in range(3)]
    prompt, _ = encode_batch(tok, ck.config, pairs)
    for seed in (0, 1):
        ref = _hf_generate(hf, prompt, seed, 64, [1, 106, 50], 0.005, 1)
        ours = generate(TorchBackend(ck.model, max_context=256), prompt, ck.sampler.replace(max_new_tokens=64),
                        torch.Generator().manual_seed(seed))
        assert torch.equal(ours.sequences, ref.sequences)
        torch.testing.assert_close(ours.tokens_per_forward, ref.tokens_per_forward.float(), rtol=0, atol=0)
        assert max(ours.steps_per_canvas) < 48
