"""GPU profiles and precisions, resolved in one place: `resolve(gpu, precision, backend) -> Target`.

Each profile carries what the engines, KV buffers, Triton config and roofline reports need: compute
capability, memory, HBM bandwidth, batch/prompt/context limits, TensorRT flavour. The hardware rules live here, one
set per kind of runtime (`RUNTIMES`): TensorRT engines (FP8 needs SM89+, NVFP4 needs FP4 tensor cores: SM100+, or
SM120/121 with TensorRT-RTX) and the fast backend (FP8 SM89+; NVFP4 as W4A16, 4-bit weights decoded to bf16 in
registers on bf16 tensor cores, SM90+ where its kernels are built). The memory check and the weight footprint too.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .config import FULL_SIZE, ModelConfig
from .errors import ConfigError


class Precision(str, Enum):
    BF16 = "bf16"
    FP8 = "fp8"
    NVFP4 = "nvfp4"

    @property
    def weight_bytes(self) -> float:
        """Bytes per quantized weight element, block scales included (NVFP4: 4 bit + 1 FP8 scale per 16)."""
        return {"bf16": 2.0, "fp8": 1.0, "nvfp4": 0.5 + 1 / 16}[self.value]


MIN_SM = {Precision.BF16: 80, Precision.FP8: 89, Precision.NVFP4: 100}
NVFP4_RTX_SM = (120, 121)  # RTX Blackwell / GB10: NVFP4 through TensorRT-RTX
ENGINE, FAST = "engine", "fast"  # the rule sets: TensorRT / ONNX graphs, and the native fast backend
RUNTIMES = (ENGINE, FAST)
FAST_MIN_SM = {Precision.BF16: 80, Precision.FP8: 89, Precision.NVFP4: 90}  # W4A16: kernels built for SM90/100/120


def runtime_of(backend: str | None) -> str:
    """The rule set a backend kind answers to: `fast` its own, every other (trt, ort, triton, torch, ...) ENGINE."""
    return FAST if backend == FAST else ENGINE


@dataclass(frozen=True)
class GpuProfile:
    name: str  # key used in paths and the Makefile
    label: str
    sm: int  # compute capability x10 (0 = CPU / ONNX Runtime)
    memory_gib: float
    hbm_gbs: float  # datasheet memory bandwidth, GB/s (roofline)
    max_batch: int  # canvases in flight: TRT profile max, Triton max_batch_size
    opt_batch: int
    max_prompt: int  # encoder profile max S
    max_context: int  # prompt + generated tokens the KV buffers hold
    trt: str  # "tensorrt" (full TensorRT, NGC) | "tensorrt_rtx" | "none" (ORT on CPU)
    precisions: tuple[Precision, ...]

    def supports(self, p: Precision, runtime: str = ENGINE) -> bool:
        return _hardware_rule(self, p, runtime) is None and (runtime == FAST or p in self.precisions)


_ALL = (Precision.BF16, Precision.FP8, Precision.NVFP4)
PROFILES: dict[str, GpuProfile] = {
    p.name: p
    for p in (
        GpuProfile("h100", "NVIDIA H100 SXM 80GB", 90, 80, 3350, 4, 1, 8192, 16384, "tensorrt",
                   (Precision.BF16, Precision.FP8)),
        GpuProfile("h200", "NVIDIA H200 141GB", 90, 141, 4800, 8, 1, 16384, 32768, "tensorrt",
                   (Precision.BF16, Precision.FP8)),
        GpuProfile("b200", "NVIDIA B200 180GB", 100, 180, 8000, 8, 1, 16384, 32768, "tensorrt", _ALL),
        GpuProfile("rtx5090", "NVIDIA GeForce RTX 5090 32GB", 120, 32, 1792, 2, 1, 4096, 8192, "tensorrt_rtx", _ALL),
        GpuProfile("dgx-spark", "NVIDIA DGX Spark (GB10, 128GB unified)", 121, 128, 273, 4, 1, 8192, 16384,
                   "tensorrt_rtx", _ALL),
        GpuProfile("cpu", "CPU (ONNX Runtime, tiny model, CI)", 0, 0, 0, 2, 1, 64, 256, "none", _ALL),
    )
}


@dataclass(frozen=True)
class Target:
    gpu: GpuProfile
    precision: Precision

    @property
    def key(self) -> str:
        return f"{self.gpu.name}/{self.precision.value}"


def _hardware_rule(gpu: GpuProfile, p: Precision, runtime: str = ENGINE) -> str | None:
    if gpu.sm == 0:
        return None  # CPU: every precision is emulated (ONNX Runtime, the fast backend's torch paths)
    if runtime == FAST:
        if gpu.sm < FAST_MIN_SM[p]:
            what = "W4A16 experts (bf16 tensor cores)" if p is Precision.NVFP4 else "its kernels"
            return f"precision '{p.value}' on the fast backend needs compute capability >= {FAST_MIN_SM[p] / 10:.1f} " \
                   f"for {what}; GPU profile '{gpu.name}' is {gpu.sm / 10:.1f}"
        return None
    if p is Precision.NVFP4 and gpu.sm < MIN_SM[p] and gpu.sm not in NVFP4_RTX_SM:
        return f"precision 'nvfp4' needs compute capability >= 10.0 (or 12.x with TensorRT-RTX); " \
               f"GPU profile '{gpu.name}' is {gpu.sm / 10:.1f}"
    if gpu.sm < MIN_SM[p]:
        return f"precision '{p.value}' needs compute capability >= {MIN_SM[p] / 10:.1f}; " \
               f"GPU profile '{gpu.name}' is {gpu.sm / 10:.1f}"
    return None


def resolve(gpu: str, precision: str, backend: str | None = None) -> Target:
    """The only place a (gpu, precision) pair is validated, under the rules of `backend`'s runtime (runtime_of):
    `fast` serves nvfp4 on Hopper (W4A16) where TensorRT engines cannot."""
    if gpu not in PROFILES:
        raise ConfigError(f"unknown GPU profile {gpu!r}; valid: {', '.join(PROFILES)} (see `dgemma profiles`).")
    try:
        p = Precision(precision)
    except ValueError:
        raise ConfigError(
            f"unknown precision {precision!r}; valid: {', '.join(x.value for x in Precision)}."
        ) from None
    prof, rt = PROFILES[gpu], runtime_of(backend)
    rule = _hardware_rule(prof, p, rt)
    if rule:
        ok_p = [x.value for x in Precision if prof.supports(x, rt)]
        ok_g = [g.name for g in PROFILES.values() if g.sm and not _hardware_rule(g, p, rt)]
        hint = " (or --backend fast: W4A16 from the NVFP4 checkpoint)" \
            if p is Precision.NVFP4 and rt == ENGINE and prof.supports(p, FAST) else ""
        raise ConfigError(f"{rule}. Use --precision {'/'.join(ok_p)} on {gpu}{hint}, or --gpu {'/'.join(ok_g)} for "
                          f"{p.value}.")
    return Target(prof, p)


# substrings of torch.cuda.get_device_name() / nvidia-smi names -> profile (first match wins)
_DEVICE_NAMES = (("H200", "h200"), ("H100", "h100"), ("B200", "b200"), ("RTX 5090", "rtx5090"), ("GB10", "dgx-spark"))


def for_device(device_name: str) -> str:
    """The profile name of a GPU by its device name (e.g. 'NVIDIA H100 80GB HBM3' -> 'h100')."""
    for key, name in _DEVICE_NAMES:
        if key.lower() in device_name.lower():
            return name
    raise ConfigError(f"no GPU profile matches device {device_name!r}; known: "
                      f"{', '.join(k for k, _ in _DEVICE_NAMES)}. Pass --gpu with one of {', '.join(PROFILES)}.")


@dataclass(frozen=True)
class MemoryPlan:
    weights_gib: float
    kv_gib: float
    workspace_gib: float
    engines: int

    @property
    def total_gib(self) -> float:
        return self.weights_gib * self.engines + self.kv_gib + self.workspace_gib


def memory_plan(target: Target, cfg: ModelConfig = FULL_SIZE, engines: int = 2) -> MemoryPlan:
    """Weights (per engine copy), KV buffers at the profile's max batch/context, and a logits workspace."""
    gib = 1024**3
    linear = cfg.param_count() - cfg.vocab_size * cfg.hidden_size  # embedding/LM head stays 16-bit
    w = linear * target.precision.weight_bytes + cfg.vocab_size * cfg.hidden_size * 2
    kv = 0
    for i in range(cfg.num_hidden_layers):
        per_tok = 2 * cfg.layer_kv_heads(i) * cfg.layer_head_dim(i) * 2
        kv += per_tok * (cfg.sliding_cache_len if cfg.is_sliding(i) else target.gpu.max_context)
    kv *= target.gpu.max_batch
    logits = target.gpu.max_batch * cfg.canvas_length * cfg.vocab_size * 4 * 3  # logits, probs, proc (fp32)
    return MemoryPlan(w / gib, kv / gib, logits / gib, engines)


# Bytes of one stored quantized matrix element, and of its fp32 scales (dgemma.quantize.writer's checkpoint layout):
# fp8 has weight_scale (per tensor / per expert) + input_scale; nvfp4 packs two e2m1 per byte plus one e4m3 block
# scale per 16 elements, and adds weight_scale_2 (fp32 global, per expert for experts) + input_scale.
_ELEM_BYTES = {"bf16": 2.0, "fp8": 1.0, "nvfp4": 0.5 + 1 / 16}
_SCALE_BYTES = {"bf16": 0, "fp8": 4, "nvfp4": 4}


@dataclass(frozen=True)
class WeightFootprint:
    """Weight bytes at load time by part of the model (one copy; no KV, no workspace)."""

    experts: int  # routed experts gate_up_proj + down_proj, all layers
    dense: int  # attention q/k/v/o_proj + the dense MLP gate/up/down_proj, all layers
    embedding: int  # tied embedding = LM head, checkpoint dtype (bf16)
    other: int  # unquantized (quantize.recipe.EXCLUDED): router, norms, self-conditioning, layer scalars (bf16)

    @property
    def total(self) -> int:
        return self.experts + self.dense + self.embedding + self.other


def checkpoint_footprint(cfg: ModelConfig = FULL_SIZE, experts: str = "nvfp4", dense: str = "fp8") -> WeightFootprint:
    """Weight bytes of the quantized checkpoint layout (`make quantize` output; what the fast backend holds after
    loading it is `weight_footprint`, with per-row FP8 scales instead of per-tensor ones): routed experts in `experts`, dense layers in `dense` (each
    of bf16 / fp8 / nvfp4), embedding and every excluded tensor in bf16. Per-tensor scales included: per expert for
    the experts (weight_scale / weight_scale_2) plus one input_scale per projection. With everything bf16 this is
    2 * cfg.param_count()."""
    for p in (experts, dense):
        if p not in _ELEM_BYTES:
            raise ConfigError(f"unknown precision {p!r}; valid: {', '.join(_ELEM_BYTES)}.")
    h, e = cfg.hidden_size, cfg.num_experts

    def mats(p: str, elems: int, n_scales: int, n_inputs: int) -> int:  # n matrices' elements + fp32 scales
        return round(elems * _ELEM_BYTES[p]) + _SCALE_BYTES[p] * (n_scales + n_inputs)

    ex = de = other = 0
    for i in range(cfg.num_hidden_layers):
        hd, kvh = cfg.layer_head_dim(i), cfg.layer_kv_heads(i)
        q = cfg.num_attention_heads * hd
        attn = [h * q, h * kvh * hd] + ([h * kvh * hd] if cfg.is_sliding(i) else []) + [q * h]  # q, k, (v), o
        de += sum(mats(dense, n, 1, 1) for n in attn) + 3 * mats(dense, h * cfg.intermediate_size, 1, 1)
        ex += 2 * mats(experts, e * h * cfg.moe_intermediate_size * (3 / 2), e, 1)  # gate_up [E,2I,H] + down [E,H,I]
        other += 2 * (2 * hd + e * (h + 1) + h + 7 * h + 1)  # q/k norms, router, layer norms + scalar
    other += 2 * (h + h + 3 * h * cfg.intermediate_size + cfg.num_hidden_layers)  # final norm, self-cond., scalars
    return WeightFootprint(ex, de, 2 * cfg.vocab_size * h, other)


def check_memory(target: Target, cfg: ModelConfig = FULL_SIZE, engines: int = 2) -> MemoryPlan:
    """Raise ConfigError, with the numbers and what fits instead, when the plan exceeds the GPU."""
    plan = memory_plan(target, cfg, engines)
    mem = target.gpu.memory_gib
    if mem and plan.total_gib > mem:
        fits = [p.value for p in target.gpu.precisions
                if memory_plan(Target(target.gpu, p), cfg, engines).total_gib <= mem]
        shared = memory_plan(target, cfg, 1).total_gib
        hint = f"precision {'/'.join(fits)} fits" if fits else "no precision fits with two engines"
        raise ConfigError(
            f"{target.key}: {engines} engines x {plan.weights_gib:.1f} GiB weights + {plan.kv_gib:.1f} GiB KV "
            f"(batch {target.gpu.max_batch}, context {target.gpu.max_context}) + {plan.workspace_gib:.1f} GiB logits "
            f"= {plan.total_gib:.1f} GiB > {mem:g} GiB on {target.gpu.label}. {hint}; sharing one weight copy "
            f"between encoder and denoiser needs {shared:.1f} GiB."
        )
    return plan


def weight_footprint(cfg: ModelConfig = FULL_SIZE, experts: str = "nvfp4", dense: str = "fp8",
                     other_bytes: int = 2) -> dict[str, int]:
    """Weight bytes by category as the fast backend stores them: experts (bf16, fp8 = e4m3 + fp32 per-row scales,
    nvfp4 = e2m1 pairs + e4m3 scale per 16 + fp32 global scale per expert and projection), dense projections
    (attention q/k/v/o, dense MLP, self-conditioning; bf16 or fp8), the bf16 tied embedding, and the rest (router,
    norms, scalars) at `other_bytes` per value. runtime.fast.nvfp4.footprint measures the same on a loaded model."""
    def mats(shapes: list[tuple[int, int]], fmt: str, n: int = 1) -> int:
        if fmt == "bf16":
            return sum(2 * r * k for r, k in shapes) * n
        if fmt == "fp8":
            return sum(r * k + 4 * r for r, k in shapes) * n
        if fmt == "nvfp4":
            return sum(r * k // 2 + r * k // 16 + 4 for r, k in shapes) * n
        raise ConfigError(f"unknown weight format {fmt!r}; valid: bf16, fp8, nvfp4.")

    h, i, e, mi = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.moe_intermediate_size
    mlp = [(i, h), (i, h), (h, i)]
    out = {"experts": 0, "dense": mats(mlp, dense), "embedding": 2 * cfg.vocab_size * h, "other": 0}
    other = h + h + cfg.num_hidden_layers  # final norm, self-conditioning pre_norm, encoder layer scalars
    for layer in range(cfg.num_hidden_layers):
        hd, kvh, q = cfg.layer_head_dim(layer), cfg.layer_kv_heads(layer), cfg.num_attention_heads
        attn = [(q * hd, h), (kvh * hd, h)] + ([(kvh * hd, h)] if cfg.is_sliding(layer) else []) + [(h, q * hd)]
        out["dense"] += mats(attn + mlp, dense)
        out["experts"] += mats([(2 * mi, h), (h, mi)], experts, n=e)
        other += e * h + h + e + 7 * h + 2 * hd + 1  # router proj, scale, per-expert scale; norms; q/k norms; scalar
    out["other"] = other * other_bytes
    return out


def describe() -> str:
    rows = [f"{'profile':<10} {'GPU':<40} {'SM':>4} {'mem GiB':>7} {'HBM GB/s':>8} {'batch':>5} "
            f"{'prompt':>6} {'context':>7}  {'TensorRT':<12} {'engines':<16} fast backend"]
    for p in PROFILES.values():
        ok = [x.value for x in Precision if p.supports(x)]
        fast = [x.value for x in Precision if p.supports(x, FAST)]
        rows.append(f"{p.name:<10} {p.label:<40} {p.sm / 10:>4.1f} {p.memory_gib:>7g} {p.hbm_gbs:>8g} "
                    f"{p.max_batch:>5} {p.max_prompt:>6} {p.max_context:>7}  {p.trt:<12} {', '.join(ok):<16} "
                    f"{', '.join(fast)}")
    return "\n".join(rows)
