"""`make quantize`: ModelOpt quantization + calibration of a checkpoint -> quantize/<precision>/ in the work
directory, written atomically (temp dir, then rename): the quantized checkpoint, ModelOpt's state, the quality
report and a manifest with the input fingerprints the next stage checks."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from ..core.errors import ArtifactError
from ..core.layout import CALIB_PROMPTS, DEFAULT_CHECKPOINT, HELDOUT_PROMPTS, current
from ..core.manifest import publish_dir, tree_sha256
from ..model.checkpoint import load_checkpoint
from ..model.quantized import load_quantized
from ..model.tokens import Tokenizer
from .calibrate import CALIB_STEPS, calib_sampler, forward_loop, load_prompts, prompt_batches
from .quality import quality_report
from .recipe import (EXCLUDE_MODULES, EXCLUDED, get_recipe, install_cpu_nvfp4_kernel, quantize_model,
                     quantizer_summary, register_experts)
from .writer import write_quantized_checkpoint


def run(precision: str, checkpoint: str | Path | None = None, out: str | Path | None = None,
        calib: str | Path = CALIB_PROMPTS, heldout: str | Path | None = HELDOUT_PROMPTS, eval_n: int = 100,
        seed: int = 0, recipe_name: str | None = None) -> Path:
    """Quantize with a recipe (default: DEFAULT_RECIPE[precision]), calibrate, export and report into
    out/<precision>/ (default: the work directory's quantize/)."""
    import modelopt
    import modelopt.torch.opt as mto

    r = get_recipe(precision, recipe_name)  # validates the names before any work
    ck_path = Path(checkpoint) if checkpoint else DEFAULT_CHECKPOINT
    calib_texts = load_prompts(calib)
    held_texts = load_prompts(heldout) if heldout else []
    ck = load_checkpoint(ck_path)
    if not (ck_path / "tokenizer.json").exists():
        raise ArtifactError(f"{ck_path} has no tokenizer.json; calibration prompts need it.")
    tok = Tokenizer(ck_path)
    ref = load_checkpoint(ck_path).model  # the unquantized reference for the report
    cal = calib_sampler(ck.sampler)
    model = quantize_model(ck.model, precision, forward_loop(prompt_batches(tok, calib_texts), cal, seed), r.name)

    out = Path(out) if out else current().quantize()
    out.mkdir(parents=True, exist_ok=True)
    final = out / precision
    tmp = Path(tempfile.mkdtemp(prefix=f".{precision}.", dir=out))
    try:
        write_quantized_checkpoint(model, precision, tmp, ck, ck_path, EXCLUDE_MODULES, modelopt.__version__)
        torch.save({"modelopt_state": mto.modelopt_state(model),
                    "quantizer_state_dict": {k: v for k, v in model.state_dict().items() if "quantizer" in k}},
                   tmp / "modelopt_state.pth")
        sets = {"calib": prompt_batches(tok, calib_texts)}
        if held_texts:
            sets["heldout"] = prompt_batches(tok, held_texts)
        quality_report(ref, model, precision, ck_path, ck.sampler, sets, tmp, eval_n=eval_n, seed=seed,
                       recipe=r.describe(), dequantized=load_quantized(tmp))
        manifest = {
            "stage": "quantize", "precision": precision, "recipe": r.describe(), "input_checkpoint": str(ck_path),
            "input_checkpoint_sha256": tree_sha256(ck_path), "calib_file": str(calib),
            "calib_sha256": tree_sha256(Path(calib)), "calib_prompts": len(calib_texts), "calib_steps": CALIB_STEPS,
            "heldout_file": str(heldout) if heldout else None, "seed": seed,
            "excluded": EXCLUDED, "versions": {"modelopt": modelopt.__version__, "torch": torch.__version__},
            "quantizers_enabled": sum(quantizer_summary(model).values()),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def fake_quant_model(quant_dir: str | Path, dtype: torch.dtype | None = None):
    """The ModelOpt fake-quant model of a quantize directory (its input checkpoint + the restored quantizer state):
    the arithmetic the quantized graphs reproduce (tests and checks; needs the input checkpoint and modelopt)."""
    import modelopt.torch.opt as mto

    quant_dir = Path(quant_dir)
    m = json.loads((quant_dir / "manifest.json").read_text())
    model = load_checkpoint(m["input_checkpoint"]).model
    if dtype is not None:
        model = model.to(dtype)
    install_cpu_nvfp4_kernel()
    register_experts()
    state = torch.load(quant_dir / "modelopt_state.pth", weights_only=False)
    model = mto.restore_from_modelopt_state(model, state["modelopt_state"])
    res = model.load_state_dict(state["quantizer_state_dict"], strict=False)
    if res.unexpected_keys:
        raise ArtifactError(f"{quant_dir}/modelopt_state.pth: quantizer state {res.unexpected_keys[:3]} matches no "
                            f"quantizer of the restored model. Rebuild with: make quantize "
                            f"PRECISION={m.get('precision')}")
    return model.eval()
