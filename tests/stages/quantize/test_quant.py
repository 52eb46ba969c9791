"""Quantization stage on the committed trained tiny model (CPU): ModelOpt fp8/nvfp4 through both passes, the
exclusions, the CPU NVFP4 kernel against ModelOpt's pure-torch reference, outputs, errors and atomicity."""

import json

import pytest
import torch

pytest.importorskip("modelopt.torch.quantization")

from dgemma.quantize import calibrate, recipe, stage  # noqa: E402
from dgemma.model.checkpoint import load_checkpoint  # noqa: E402
from dgemma.cli import main  # noqa: E402
from dgemma.core.errors import ArtifactError, ConfigError  # noqa: E402
from dgemma.model.lowp import nvfp4_fake_quant  # noqa: E402
from dgemma.model.quantized import load_quantized  # noqa: E402
from dgemma.tiny import DEFAULT_CHECKPOINT  # noqa: E402
from dgemma.model.tokens import Tokenizer  # noqa: E402


ALL_RECIPES = [(p, r) for p in recipe.PRECISIONS for r in recipe.RECIPES[p]]


def _small_quantized(precision, recipe_name=None):
    ck = load_checkpoint(DEFAULT_CHECKPOINT)
    batches = calibrate.prompt_batches(Tokenizer(DEFAULT_CHECKPOINT), ["sort: 3 1 4 1 5 9 2 6 5 3"])
    loop = calibrate.forward_loop(batches, calibrate.calib_sampler(ck.sampler, 2))
    model = recipe.quantize_model(ck.model, precision, loop, recipe_name)
    return model, batches


def test_nvfp4_cpu_kernel_bit_equal_to_modelopt_reference():
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    recipe.install_cpu_nvfp4_kernel()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 128, generator=g) * torch.logspace(-3, 1, 128)
    x[0, :16] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.75, -1.75, -3.5, 0, 0, 0, 0, 0])
    x[1, :16] = 0.0  # an all-zero block
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        amax = xd.float().abs().amax()
        qt, s, s2 = NVFP4QTensor.quantize(xd.float(), 16, weights_scaling_factor_2=amax / (6 * 448))
        want = qt.dequantize(torch.float32, scale=s, double_scale=s2, block_sizes={-1: 16}).to(dtype)
        got = nvfp4_fake_quant(xd, 16, amax)
        assert torch.equal(got, want), (got - want).abs().max()
        op = torch.ops.tensorrt.dynamic_block_quantize_op(xd, 16, amax, 4, 2, 8, 4)  # what TensorQuantizer calls
        assert torch.equal(op, want)


@pytest.mark.parametrize("precision,recipe_name", ALL_RECIPES)
def test_quantize_both_passes_and_exclusions(precision, recipe_name):
    model, batches = _small_quantized(precision, recipe_name)
    enabled = recipe.quantizer_summary(model)
    on = {n for n, e in enabled.items() if e}
    for pattern in ("router", "self_conditioning", "embed_tokens", "norm"):
        assert not [n for n in on if pattern in n], pattern
    for name in ("layers.0.self_attn.q_proj.weight_quantizer", "layers.1.experts.down_proj_weight_quantizers.7"):
        assert name in on
    # input quantizers: applied (W8A8, W4A4) or, for weight-only recipes, calibrated (input_scale) but disabled
    for name in ("layers.2.mlp.down_proj.input_quantizer", "layers.1.experts.gate_up_proj_input_quantizer"):
        assert (name in on) == recipe.get_recipe(precision, recipe_name).activations, name
    ex = model.layers[0].experts
    qs = ex.gate_up_proj_weight_quantizers
    static = qs[0].amax.numel() > 1  # per-block amax (MSE recipes): the per-expert global amax is the weight max
    amaxes = torch.stack([(q.global_amax if static else q.amax).reshape(()).float() for q in qs])
    assert torch.equal(amaxes, ex.gate_up_proj.detach().float().abs().amax(dim=(1, 2)))
    assert float(ex.down_proj_input_quantizer.amax) > 0  # calibrated by tokens routed through grouped_mm
    assert float(model.layers[2].self_attn.k_proj.input_quantizer.amax) > 0
    # excluded weights are untouched; quantized ones are not
    ref = load_checkpoint(DEFAULT_CHECKPOINT).model
    assert torch.equal(model.layers[0].router.proj.weight, ref.layers[0].router.proj.weight)
    assert torch.equal(model.embed_tokens.weight, ref.embed_tokens.weight)
    cache_r, cache_q = ref.new_cache(1, 128), model.new_cache(1, 128)
    with torch.no_grad():
        ref.encode(batches[0], cache_r)
        model.encode(batches[0], cache_q)
        canvas = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(0))
        a, b = ref.denoise(canvas, None, cache_r), model.denoise(canvas, None, cache_q)
    assert not torch.equal(a, b) and (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.5


def test_outputs_and_quality(outputs):
    q = {p: json.loads((d / "quality.json").read_text()) for p, d in outputs.items()}
    for p, d in outputs.items():
        for f in ("modelopt_state.pth", "model.safetensors", "hf_quant_config.json", "config.json",
                  "quality.json", "quality.md", "manifest.json", "tokenizer.json"):
            assert (d / f).is_file(), f
        m = json.loads((d / "manifest.json").read_text())
        assert m["precision"] == p and len(m["input_checkpoint_sha256"]) == 64 and m["versions"]["modelopt"]
        hq = json.loads((d / "hf_quant_config.json").read_text())
        assert hq["producer"]["name"] == "modelopt"
        assert hq["quantization"]["quant_algo"] == p.upper() and "lm_head" in hq["quantization"]["exclude_modules"]
        for s in q[p]["sets"].values():
            assert 0 <= s["kl_mean"] < 1 and 0 <= s["token_agreement"] <= 1 and s["tpf_quant"] > 0
            assert len(s["kl_per_step"]) == q[p]["logit_steps"]
        acc = q[p]["task_accuracy"]
        assert 0 <= acc["bf16"] <= 1 and 0 <= acc[p] <= 1
    assert set(q["nvfp4"]["sets"]) == {"calib", "heldout"}
    assert json.loads((outputs["nvfp4"] / "hf_quant_config.json").read_text())["quantization"]["group_size"] == 16
    f8, f4 = q["fp8"]["sets"]["heldout"]["top1_mean"], q["nvfp4"]["sets"]["heldout"]["top1_mean"]
    assert f8 > f4 or (f8 > 0.5 and f4 > 0.5)
    assert q["fp8"]["sets"]["heldout"]["kl_mean"] < q["nvfp4"]["sets"]["heldout"]["kl_mean"]
    for p, d in outputs.items():  # the recipe and the dequantized-checkpoint (weight-only) row
        r = recipe.get_recipe(p)
        assert json.loads((d / "manifest.json").read_text())["recipe"]["name"] == q[p]["recipe"]["name"] == r.name
        bits = 8 if p == "fp8" else 4
        assert q[p]["fake_quant_mode"] == f"W{bits}A{bits if r.activations else 16}"
        deq = q[p]["dequantized"]
        assert deq["mode"] == f"W{bits}A16" and set(deq["sets"]) == set(q[p]["sets"])
        assert 0 <= deq["task_accuracy"]["accuracy"] <= 1 and deq["task_accuracy"]["steps_per_canvas"] >= 1
        md = (d / "quality.md").read_text()
        assert f"| checkpoint W{bits}A16 | heldout |" in md and f"Recipe `{r.name}`" in md
        if not r.activations:  # weight-only: the fake-quant model IS the dequantized checkpoint
            for name, s in q[p]["sets"].items():
                assert s["kl_mean"] == pytest.approx(deq["sets"][name]["kl_mean"], rel=0.05, abs=1e-6), name
                assert s["top1_mean"] == pytest.approx(deq["sets"][name]["top1_mean"], abs=2e-3), name


def test_w4a16_checkpoint_within_two_points_of_bf16(outputs):
    """The issue's bound: the default nvfp4 checkpoint served W4A16 (weights dequantized from the checkpoint,
    activations in the model dtype) within 2 points of bf16 sort accuracy on the 100 held-out prompts. The weights
    of the default recipe do not depend on the calibration prompts (weight amax / weight MSE), so this fixture's
    checkpoint is the one `dgemma quantize --precision nvfp4` writes."""
    from dgemma.runtime.torch_backend import TorchBackend
    from dgemma.tiny.task import evaluate

    bf16 = evaluate(DEFAULT_CHECKPOINT, n=100)
    w4a16 = evaluate(DEFAULT_CHECKPOINT, n=100, backend=TorchBackend(load_quantized(outputs["nvfp4"]), 256))
    assert w4a16["accuracy"] >= bf16["accuracy"] - 0.02 - 1e-9, (bf16, w4a16)


def test_recipe_names_and_errors(tmp_path, capsys):
    for p in recipe.PRECISIONS:
        assert recipe.get_recipe(p).name == recipe.DEFAULT_RECIPE[p] and recipe.get_recipe(p).precision == p
        assert recipe.recipe(p)["quant_cfg"][-len(recipe.EXCLUDED):] == \
            [{"quantizer_name": k, "enable": False} for k in recipe.EXCLUDED]
    assert recipe.recipe("nvfp4", "w4a4")["algorithm"] == "max"
    with pytest.raises(ConfigError, match="recipe 'w4a16' is not a fp8 recipe; valid for --precision fp8: w8a8"):
        recipe.get_recipe("fp8", "w4a16")
    rc = main(["quantize", "--precision", "fp8", "--recipe", "w4a16", "--out", str(tmp_path)])
    assert rc == 2 and "valid for --precision fp8: w8a8" in capsys.readouterr().err
    assert not (tmp_path / "fp8").exists()


def test_nvfp4_static_cpu_kernel_and_checkpoint_layout():
    """The CPU path of ModelOpt's static NVFP4 fake quant (per-block amax, as the MSE scale sweep calibrates it):
    with the block maxima it is the dynamic kernel bit for bit; with any other block amax the checkpoint layout
    (e4m3 block scales + fp32 global scale) stores exactly what the fake quant computes."""
    from dgemma.model.quantized import dequantize
    from dgemma.quantize import writer

    from modelopt.torch.quantization.tensor_quant import static_blockwise_fp4_fake_quant

    recipe.install_cpu_nvfp4_kernel()
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 128, generator=g) * torch.logspace(-3, 1, 128)).to(torch.bfloat16)
    x[1, :16] = 0.0
    blocks, gmax = x.float().reshape(-1, 16).abs().amax(-1), x.float().abs().amax()
    assert torch.equal(recipe.nvfp4_static_fake_quant_cpu(x, blocks, gmax), nvfp4_fake_quant(x, 16, gmax))
    for seed in range(6):  # global amaxes where 1 / (448 / (g / 6)) != g / (6 * 448) in fp32 included
        xs = (x.float() * torch.rand((), generator=torch.Generator().manual_seed(seed)) * 3).to(torch.bfloat16)
        bs, gs = xs.float().reshape(-1, 16).abs().amax(-1), xs.float().abs().amax()
        for f in (1.0, 0.8, 0.3, 1.5):
            want = recipe.nvfp4_static_fake_quant_cpu(xs, bs * f, gs, out_dtype=torch.float32)
            assert torch.equal(static_blockwise_fp4_fake_quant(xs.float(), bs * f, gs), want)  # the patched op
            q, s, s2 = writer._nvfp4(xs, bs * f, gs)
            assert q.dtype == torch.uint8 and q.shape == (64, 64) and s.dtype == torch.float8_e4m3fn
            assert s.shape == (64, 8) and float(s2) == pytest.approx(float(gs) / (6 * 448), rel=1e-6)
            assert torch.equal(dequantize("nvfp4", q, s, s2, torch.float32), want), (seed, f)


def test_exported_checkpoint_layout_and_dequantized_load(outputs):
    from safetensors.torch import load_file

    ref = load_checkpoint(DEFAULT_CHECKPOINT).model
    for p, d in outputs.items():
        t = load_file(str(d / "model.safetensors"))
        w = t["model.decoder.layers.0.self_attn.q_proj.weight"]
        gu = t["model.decoder.layers.0.experts.gate_up_proj"]
        if p == "fp8":
            assert w.dtype == gu.dtype == torch.float8_e4m3fn
            assert t["model.decoder.layers.0.experts.gate_up_proj_weight_scale"].shape == (8,)
        else:
            assert w.dtype == gu.dtype == torch.uint8 and gu.shape == (8, 128, 64)
            assert t["model.decoder.layers.0.experts.gate_up_proj_weight_scale"].dtype == torch.float8_e4m3fn
        assert t["model.decoder.layers.0.router.proj.weight"].dtype == torch.bfloat16
        assert "model.decoder.layers.0.self_attn.q_proj.input_scale" in t
        m = load_quantized(d)
        assert torch.equal(m.layers[0].router.proj.weight, ref.layers[0].router.proj.weight)
        rel = (m.layers[0].experts.gate_up_proj.float() - ref.layers[0].experts.gate_up_proj.float()).norm() / \
            ref.layers[0].experts.gate_up_proj.float().norm()
        assert 0 < rel < (0.05 if p == "fp8" else 0.2)


def test_calibration_file_errors(tmp_path, capsys):
    with pytest.raises(ArtifactError, match="not found"):
        calibrate.load_prompts(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ArtifactError, match="holds no prompts"):
        calibrate.load_prompts(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"prompt": 1}\n')
    with pytest.raises(ArtifactError, match="bad.jsonl:2"):
        calibrate.load_prompts(tmp_path / "bad.jsonl")
    rc = main(["quantize", "--precision", "fp8", "--calib", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path)])
    assert rc == 2 and "calibration file" in capsys.readouterr().err
    assert not (tmp_path / "fp8").exists()


def test_failure_mid_way_leaves_no_output(tmp_path, prompt_files, monkeypatch):
    import dgemma.quantize.stage

    def boom(*a, **k):
        raise RuntimeError("report failed")

    monkeypatch.setattr(dgemma.quantize.stage, "quality_report", boom)
    with pytest.raises(RuntimeError, match="report failed"):
        stage.run("fp8", out=tmp_path, calib=prompt_files[0], heldout=None, eval_n=2)
    assert list(tmp_path.iterdir()) == []
