"""On a CUDA GPU: the fast backend's whole step as one CUDA graph (the denoiser and the fused head + sampler,
FastBackend.sampler_step) generates what the same kernels generate eagerly, token for token (tests/gpu: marked gpu
by folder, skipped without a GPU; tests/unit/runtime/test_fast_kernels.py checks the step's parts on the CPU)."""

from __future__ import annotations

import copy

import pytest
import torch

from dgemma.core.config import TINY, SamplerConfig
from dgemma.generation.fused import fused_generate
from dgemma.model.modeling import DiffusionGemma
from dgemma.runtime.fast import FastBackend


@pytest.mark.gpu
def test_step_graph_generates_what_the_eager_step_does():
    model = DiffusionGemma.random(TINY, device="cuda", dtype=torch.bfloat16, seed=0)
    graphs = FastBackend(model, 512, kernels="force")
    eager = FastBackend(copy.deepcopy(model), 512, kernels="force", cuda_graphs=False)
    prompt = torch.randint(3, TINY.vocab_size, (2, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    scfg = SamplerConfig(max_new_tokens=3 * TINY.canvas_length, max_denoising_steps=4, ignore_eos=True)
    for seed in (5, 6):  # the second generation replays the graphs captured by the first
        a = fused_generate(graphs, prompt, scfg, seed=seed)
        b = fused_generate(eager, prompt, scfg, seed=seed)
        assert torch.equal(a.sequences, b.sequences) and a.steps_per_canvas == b.steps_per_canvas
    assert graphs.use_graphs and any(k[0] == "step" for k in graphs.new_state(2).graphs)
