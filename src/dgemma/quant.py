"""Quantization stage: ModelOpt recipes (fp8, nvfp4) applied to the native DiffusionGemma, calibration, outputs.

Owns the recipes and THE exclusion list (`EXCLUDED`), the quantized routed experts (`_QuantExperts`), the CPU
NVFP4 kernel, the calibration forward loop (both passes, driven by the real sampler) and the atomic writing of
`quantize/<precision>/`. Export layout lives in dgemma.quant_export, quality metrics in dgemma.quant_report.

What is quantized (fake-quant during calibration; real low-precision tensors in the exported checkpoint):
  * every nn.Linear of the layers: attention q/k/v/o_proj and the dense MLP gate/up/down_proj
    (ModelOpt QuantLinear: per-tensor weight + input quantizers for fp8, 16-element blocks for nvfp4);
  * the routed experts (3-D gate_up_proj [E,2I,H], down_proj [E,H,I], run through grouped_mm, which ModelOpt
    cannot see): `_QuantExperts` gives each expert its own weight quantizer and each projection one input
    quantizer shared by all experts, the layout of ModelOpt's own fused-experts wrapper and of its HF export.
What is NOT quantized (see EXCLUDED): the router (router.proj, routing decisions), the tied embedding / LM head,
every RMSNorm, and the self-conditioning MLP (ModelOpt's DiffusionGemma support excludes `*self_conditioning*`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import ArtifactError, ConfigError
from .model import OPS, Experts, grouped_mm
from .artifacts import publish_dir

PRECISIONS = ("fp8", "nvfp4")
ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "quantize"
DEFAULT_CALIB = DEFAULT_OUT / "calib" / "prompts.jsonl"
DEFAULT_HELDOUT = DEFAULT_OUT / "calib" / "heldout.jsonl"
CALIB_STEPS = 8  # fixed denoising steps per canvas during calibration: canvases from noise to clean
NVFP4_GROUP = 16

# THE exclusion list: ModelOpt quantizer-name pattern -> why. Embedding / LM head and norms are no nn.Linear
# (the head is F.linear on the tied embedding), so ModelOpt never attaches quantizers to them; they are listed
# so the checkpoint's `exclude_modules` states it.
EXCLUDED = {
    "*router*": "routing decisions; router.proj is read as a raw weight by Ops.route",
    "*self_conditioning*": "ModelOpt's DiffusionGemma support excludes it by default",
    "*embed_tokens*": "tied embedding = LM head (F.linear on the embedding weight)",
    "*norm*": "RMSNorm weights and the router's scale stay in the checkpoint dtype",
}
EXCLUDE_MODULES = ["lm_head", "model.decoder.embed_tokens", "model.decoder.layers.*.router*",
                   "model.decoder.self_conditioning*", "model.decoder.*norm*"]


def _mtq():
    import modelopt.torch.quantization as mtq  # lazy: heavy, and only this stage needs it

    return mtq


def recipe(precision: str) -> dict:
    """ModelOpt config: FP8_DEFAULT_CFG (per-tensor e4m3 weights+activations) or NVFP4_DEFAULT_CFG + EXCLUDED."""
    mtq = _mtq()
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} cannot be quantized here; valid: {', '.join(PRECISIONS)}.")
    cfg = copy.deepcopy(mtq.FP8_DEFAULT_CFG if precision == "fp8" else mtq.NVFP4_DEFAULT_CFG)
    cfg["quant_cfg"] = list(cfg["quant_cfg"]) + [{"quantizer_name": p, "enable": False} for p in EXCLUDED]
    return cfg


# -- CPU NVFP4 kernel (toolchain.md §2.1), written to match ModelOpt's pure-torch NVFP4QTensor bit for bit --------
_E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_E2M1_BOUNDS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
_CPU_LIB = None


def nvfp4_fake_quant_cpu(x: Tensor, block: int, amax: Tensor) -> Tensor:
    """x [..., K] (K % block == 0) -> e2m1 values in 16-blocks with e4m3 block scales and fp32 global scale
    amax / (6 * 448), dequantized back to x.dtype. Ties round to even, as NVFP4QTensor._cast_fp4 does."""
    return nvfp4_fake_quant_scaled(x, block, amax.float().amax() / (6.0 * 448.0))


def nvfp4_fake_quant_scaled(x: Tensor, block: int, s2: Tensor) -> Tensor:
    """nvfp4_fake_quant_cpu with the fp32 global scale s2 given (the checkpoint's input_scale = amax / (6 * 448))."""
    xf = x.float().reshape(-1, block)
    s = xf.abs().amax(-1, keepdim=True) / (6.0 * s2)
    s = torch.where(s == 0, torch.ones_like(s), s).clamp(2**-9, 448.0).to(torch.float8_e4m3fn).float()
    a = (xf / (s * s2)).abs()
    idx = torch.bucketize(a, _E2M1_BOUNDS)  # value on a bound -> the lower neighbour ...
    idx = idx + (a.unsqueeze(-1) == _E2M1_BOUNDS[[1, 3, 5]]).any(-1)  # ... except 0.75, 1.75, 3.5: up (even)
    q = _E2M1_VALUES[idx.clamp(max=7)] * torch.where(xf < 0, -1.0, 1.0)
    return (q * (s * s2)).reshape(x.shape).to(x.dtype)


def install_cpu_nvfp4_kernel() -> None:
    """Register the CPU kernel for torch.library op tensorrt::dynamic_block_quantize_op (idempotent).

    A registered kernel (not a patched Python global) keeps the op in traced graphs for ONNX export."""
    global _CPU_LIB
    if _CPU_LIB is not None:
        return
    import modelopt.torch.quantization.tensor_quant as tq

    orig = tq._dynamic_block_quantize_impl

    def impl(x, block, amax, nb, eb, snb, seb):
        if not x.is_cuda and amax is not None and (nb, eb, snb, seb) == (4, 2, 8, 4):
            return nvfp4_fake_quant_cpu(x, block, amax)
        return orig(x, block, amax, nb, eb, snb, seb)

    lib = torch.library.Library("tensorrt", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lib.impl("dynamic_block_quantize_op", impl, "CPU")
    _CPU_LIB = lib  # the registration lives as long as the Library object


# -- routed experts ------------------------------------------------------------------------------------------------
def _quant_experts_cls():
    from modelopt.torch.quantization.nn import QuantModule, TensorQuantizer

    class _QuantExperts(QuantModule):
        """Experts with per-expert weight quantizers and one shared input quantizer per projection (names as in
        ModelOpt's _QuantFusedExperts, so its name matching and export conventions apply). Grouped impl only."""

        def _setup(self):
            n = self.num_experts
            self.gate_up_proj_input_quantizer = TensorQuantizer()
            self.gate_up_proj_weight_quantizers = nn.ModuleList(TensorQuantizer() for _ in range(n))
            self.down_proj_input_quantizer = TensorQuantizer()
            self.down_proj_weight_quantizers = nn.ModuleList(TensorQuantizer() for _ in range(n))

        def iter_weights_for_calibration(self):
            for w, qs in ((self.gate_up_proj, self.gate_up_proj_weight_quantizers),
                          (self.down_proj, self.down_proj_weight_quantizers)):
                for e, q in enumerate(qs):
                    yield w[e], q

        def quantized_weights(self) -> tuple[Tensor, Tensor]:
            """Fake-quantized gate_up_proj, down_proj (each expert through its own quantizer)."""
            gu = torch.stack([q(self.gate_up_proj[e]) for e, q in enumerate(self.gate_up_proj_weight_quantizers)])
            dn = torch.stack([q(self.down_proj[e]) for e, q in enumerate(self.down_proj_weight_quantizers)])
            return gu, dn

        def forward(self, x: Tensor, weights: Tensor, idx: Tensor) -> Tensor:
            assert self.impl == "grouped", "quantized experts run the grouped impl (dense is for ONNX export)"
            t, k = idx.shape  # as Experts._grouped, with the quantizers in front of both grouped GEMMs
            expert_ids, perm = torch.sort(idx.reshape(-1))
            xs = self.gate_up_proj_input_quantizer(x[perm // k])
            ws = weights.reshape(-1)[perm]
            hist_in = expert_ids.float() if x.device.type == "cpu" else expert_ids.int()
            counts = torch.histc(hist_in, bins=self.num_experts, min=0, max=self.num_experts - 1)
            offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
            gu_w, dn_w = self.quantized_weights()
            gate, up = grouped_mm(xs, gu_w.transpose(-2, -1), offs).chunk(2, dim=-1)
            h = self.down_proj_input_quantizer(OPS.gelu_mul(gate, up))
            y = grouped_mm(h, dn_w.transpose(-2, -1), offs) * ws.unsqueeze(-1)
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(perm.numel(), device=perm.device)
            return y[inv].view(t, k, -1).sum(dim=1).to(x.dtype)

    return _QuantExperts


def register_experts() -> None:
    """Register _QuantExperts for dgemma.model.Experts before ModelOpt's auto-detection would wrap it in
    _QuantFusedExperts (which intercepts F.linear, never called by grouped_mm: it would calibrate nothing)."""
    from modelopt.torch.quantization.nn import QuantModuleRegistry

    if QuantModuleRegistry.get(Experts) is None:
        QuantModuleRegistry.register({Experts: "dgemma.Experts"})(_quant_experts_cls())


# -- calibration ---------------------------------------------------------------------------------------------------
def load_prompts(path: str | Path) -> list[str]:
    """JSONL with one {"text": ...} per line -> texts. Missing, empty or malformed -> ArtifactError."""
    path = Path(path)
    fix = f" The committed set is {DEFAULT_CALIB.relative_to(ROOT)}; pass --calib FILE (JSONL, one {{\"text\": ...}} a line)."
    if not path.is_file():
        raise ArtifactError(f"calibration file {path} not found.{fix}")
    texts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text = row["text"] if isinstance(row, dict) else None
        except (json.JSONDecodeError, KeyError):
            text = None
        if not isinstance(text, str) or not text:
            raise ArtifactError(f"{path}:{n}: expected a JSON object with a non-empty string 'text'.{fix}")
        texts.append(text)
    if not texts:
        raise ArtifactError(f"calibration file {path} holds no prompts.{fix}")
    return texts


def prompt_batches(tok, texts: list[str], max_batch: int = 16) -> list[Tensor]:
    """Chat-templated ids grouped by length (the sampler takes one prompt length per batch) -> [B,L] int64."""
    by_len: dict[int, list[list[int]]] = {}
    for t in texts:
        ids = tok.encode_chat(t)
        by_len.setdefault(len(ids), []).append(ids)
    out = []
    for _, rows in sorted(by_len.items()):
        out += [torch.tensor(rows[i : i + max_batch]) for i in range(0, len(rows), max_batch)]
    return out


def calib_sampler(sampler, steps: int = CALIB_STEPS):
    return sampler.replace(max_denoising_steps=steps, adaptive_stopping=False)


def forward_loop(batches: list[Tensor], sampler, seed: int = 0, desc: str = "calibrate"):
    """ModelOpt forward_loop: the real sampler over the prompts, so `encode` sees prompts (and committed canvases)
    and `denoise` sees canvases at every step from noise to clean, with self-conditioning as in generation."""
    from tqdm import tqdm

    from .runtime.torch_backend import TorchBackend
    from .sampler import generate

    def loop(model):
        be = TorchBackend(model, max_context=max(b.shape[1] for b in batches) + sampler.max_new_tokens + 32)
        for i, b in enumerate(tqdm(batches, desc=desc, file=sys.stderr, disable=None)):
            generate(be, b.to(be.device), sampler, torch.Generator(device=be.device).manual_seed(seed + i))

    return loop


def quantize_model(model, precision: str, loop) -> nn.Module:
    """In place: ModelOpt quantize + max calibration through `loop(model)`. Returns the model."""
    mtq = _mtq()
    install_cpu_nvfp4_kernel()
    register_experts()
    with torch.no_grad():
        return mtq.quantize(model, recipe(precision), loop)


def quantizer_summary(model) -> dict[str, bool]:
    """Quantizer name -> enabled."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {n: m.is_enabled for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}


# -- the stage -----------------------------------------------------------------------------------------------------
def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def run(precision: str, checkpoint: str | Path | None = None, out: str | Path = DEFAULT_OUT,
        calib: str | Path = DEFAULT_CALIB, heldout: str | Path | None = DEFAULT_HELDOUT, eval_n: int = 100,
        seed: int = 0) -> Path:
    """Quantize, calibrate, export and report into out/<precision>/ atomically (temp dir + rename)."""
    import modelopt
    import modelopt.torch.opt as mto

    from .checkpoint import load_checkpoint
    from .quant_export import write_quantized_checkpoint
    from .quant_report import quality_report
    from .tiny import DEFAULT_CHECKPOINT
    from .tokens import Tokenizer

    recipe(precision)  # validates the name before any work
    ck_path = Path(checkpoint) if checkpoint else DEFAULT_CHECKPOINT
    calib_texts = load_prompts(calib)
    held_texts = load_prompts(heldout) if heldout else []
    ck = load_checkpoint(ck_path)
    if not (ck_path / "tokenizer.json").exists():
        raise ArtifactError(f"{ck_path} has no tokenizer.json; calibration prompts need it.")
    tok = Tokenizer(ck_path)
    ref = load_checkpoint(ck_path).model  # the unquantized reference for the report
    cal = calib_sampler(ck.sampler)
    model = quantize_model(ck.model, precision, forward_loop(prompt_batches(tok, calib_texts), cal, seed))

    out = Path(out)
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
        quality_report(ref, model, precision, ck_path, ck.sampler, sets, tmp, eval_n=eval_n, seed=seed)
        manifest = {
            "stage": "quantize", "precision": precision, "input_checkpoint": str(ck_path),
            "input_checkpoint_sha256": file_hash(ck_path), "calib_file": str(calib),
            "calib_sha256": file_hash(Path(calib)), "calib_prompts": len(calib_texts), "calib_steps": CALIB_STEPS,
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


def cmd_quantize(args) -> int:
    from .cli import _int_arg

    n = _int_arg("--eval-n", args.eval_n, 1, None)
    path = run(args.precision, args.checkpoint, args.out, args.calib, args.heldout or None, eval_n=n)
    q = json.loads((path / "quality.json").read_text())
    print(f"wrote {path}")
    for name, s in q["sets"].items():
        print(f"  {name}: KL {s['kl_mean']:.4g}, top-1 {s['top1_mean']:.4f}, token agreement "
              f"{s['token_agreement']:.4f}, TPF {s['tpf_bf16']:.2f} -> {s['tpf_quant']:.2f}")
    acc = q["task_accuracy"]
    print(f"  sort accuracy: bf16 {acc['bf16']:.2%}, {args.precision} {acc[args.precision]:.2%} (n={acc['n']})")
    return 0


def add_parser(sub) -> None:
    q = sub.add_parser("quantize", help="ModelOpt fp8/nvfp4 quantization + calibration -> quantize/<precision>/")
    q.add_argument("--precision", required=True, choices=PRECISIONS)
    q.add_argument("--checkpoint", help="checkpoint dir (default: the embedded trained tiny model)")
    q.add_argument("--out", default=str(DEFAULT_OUT), help="output root; writes OUT/<precision>/")
    q.add_argument("--calib", default=str(DEFAULT_CALIB), help="calibration prompts (JSONL, {\"text\": ...})")
    q.add_argument("--heldout", default=str(DEFAULT_HELDOUT), help="held-out prompts for the report ('' = none)")
    q.add_argument("--eval-n", default="100", help="sorting examples for task accuracy")
    q.set_defaults(func=cmd_quantize)

