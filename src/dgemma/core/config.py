"""Model and generation configuration: parsed from a checkpoint's config.json / generation_config.json.

Owns the numbers that describe the network (ModelConfig) and the sampler defaults (SamplerConfig),
their validation, and the two presets every other module builds on: the real 26B-A4B shapes and
the tiny default. Knows nothing of weights, tokenizers or backends.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError, ConfigError

SLIDING = "sliding_attention"
FULL = "full_attention"
MODEL_TYPE = "diffusion_gemma"
TEXT_MODEL_TYPE = "diffusion_gemma_text"


@dataclass(frozen=True)
class ModelConfig:
    """Text stack of DiffusionGemma (spec §2). Vision fields are not modelled (text-only toolkit)."""

    vocab_size: int = 262144
    hidden_size: int = 2816
    intermediate_size: int = 2112
    moe_intermediate_size: int = 704
    num_hidden_layers: int = 30
    num_attention_heads: int = 16
    num_key_value_heads: int = 8  # sliding layers
    head_dim: int = 256  # sliding layers
    global_head_dim: int = 512  # full layers
    num_global_key_value_heads: int = 2  # full layers (attention_k_eq_v: V = v_norm(k_proj(x)))
    num_experts: int = 128
    top_k_experts: int = 8
    sliding_window: int = 1024
    layer_types: tuple[str, ...] = tuple(([SLIDING] * 5 + [FULL]) * 5)
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float = 30.0
    rope_theta_sliding: float = 10_000.0
    rope_theta_full: float = 1_000_000.0
    partial_rotary_factor_full: float = 0.25
    max_position_embeddings: int = 262144
    hidden_activation: str = "gelu_pytorch_tanh"
    canvas_length: int = 256
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = (1, 106)
    dtype: str = "bfloat16"

    def __post_init__(self):
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}; "
                "they must match (config.json text_config)."
            )
        bad = [t for t in self.layer_types if t not in (SLIDING, FULL)]
        if bad:
            raise ConfigError(f"unknown layer type {bad[0]!r} in layer_types; expected {SLIDING!r} or {FULL!r}.")
        if self.layer_types[-1] != FULL:
            raise ConfigError("the last layer must be 'full_attention' (as in transformers' DiffusionGemma config).")
        for name in ("num_key_value_heads", "num_global_key_value_heads"):
            kvh = getattr(self, name)
            if kvh <= 0 or self.num_attention_heads % kvh:
                raise ConfigError(
                    f"{name}={kvh} must divide num_attention_heads={self.num_attention_heads} (grouped-query attention)."
                )
        if not 0 < self.top_k_experts <= self.num_experts:
            raise ConfigError(f"top_k_experts={self.top_k_experts} must be in 1..num_experts={self.num_experts}.")
        if self.canvas_length <= 0:
            raise ConfigError(f"canvas_length must be >= 1 (got {self.canvas_length}).")
        if self.hidden_activation != "gelu_pytorch_tanh":
            raise ConfigError(
                f"hidden_activation {self.hidden_activation!r} is not supported; DiffusionGemma uses 'gelu_pytorch_tanh'."
            )

    # -- derived -------------------------------------------------------------------------------
    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def layer_head_dim(self, layer: int) -> int:
        return self.head_dim if self.is_sliding(layer) else self.global_head_dim

    def layer_kv_heads(self, layer: int) -> int:
        return self.num_key_value_heads if self.is_sliding(layer) else self.num_global_key_value_heads

    @property
    def sliding_cache_len(self) -> int:
        """Prefix tokens a sliding layer keeps after an encoder pass (spec §6: W - 1)."""
        return self.sliding_window - 1

    @property
    def rotary_dim_full(self) -> int:
        return int(self.global_head_dim * self.partial_rotary_factor_full)

    def param_count(self) -> int:
        """Text parameters (embedding counted once: it is tied to the LM head)."""
        h, n = self.hidden_size, 0
        for i in range(self.num_hidden_layers):
            hd, kvh = self.layer_head_dim(i), self.layer_kv_heads(i)
            q = self.num_attention_heads * hd
            n += h * q * 2 + h * kvh * hd * (2 if self.is_sliding(i) else 1) + 2 * hd
            n += 3 * h * self.intermediate_size
            n += self.num_experts * (h + 1) + h
            n += self.num_experts * 3 * h * self.moe_intermediate_size
            n += 7 * h + 1
        n += self.vocab_size * h + h  # embedding + final norm
        n += h + 3 * h * self.intermediate_size  # self-conditioning
        n += self.num_hidden_layers  # encoder layer scalars (not tied to the decoder ones)
        return n

    def bytes_per_param(self) -> int:
        return {"bfloat16": 2, "float16": 2, "float32": 4}[self.dtype]

    # -- (de)serialisation in the transformers config.json layout --------------------------------
    def to_hf_dict(self) -> dict:
        text = {
            "model_type": TEXT_MODEL_TYPE,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "global_head_dim": self.global_head_dim,
            "num_global_key_value_heads": self.num_global_key_value_heads,
            "num_experts": self.num_experts,
            "top_k_experts": self.top_k_experts,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "rms_norm_eps": self.rms_norm_eps,
            "final_logit_softcapping": self.final_logit_softcapping,
            "rope_parameters": {
                SLIDING: {"rope_type": "default", "rope_theta": self.rope_theta_sliding},
                FULL: {
                    "rope_type": "proportional",
                    "rope_theta": self.rope_theta_full,
                    "partial_rotary_factor": self.partial_rotary_factor_full,
                },
            },
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_activation": self.hidden_activation,
            "use_bidirectional_attention": "vision",
            "attention_bias": False,
            "tie_word_embeddings": True,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids),
        }
        return {
            "architectures": ["DiffusionGemmaForBlockDiffusion"],
            "model_type": MODEL_TYPE,
            "canvas_length": self.canvas_length,
            "tie_word_embeddings": True,
            "dtype": self.dtype,
            "text_config": text,
        }

    @classmethod
    def from_hf_dict(cls, cfg: dict, source: str = "config.json") -> "ModelConfig":
        mt = cfg.get("model_type")
        if mt != MODEL_TYPE:
            raise CheckpointError(
                f"{source}: model_type is {mt!r}, expected {MODEL_TYPE!r} (google/diffusiongemma-26B-A4B-it). "
                "dgemma only loads DiffusionGemma checkpoints."
            )
        text = cfg.get("text_config")
        if not isinstance(text, dict):
            raise CheckpointError(f"{source}: missing 'text_config' object; is this a DiffusionGemma config.json?")

        def need(key):
            if key not in text:
                raise CheckpointError(f"{source}: text_config.{key} is missing.")
            return text[key]

        if text.get("use_bidirectional_attention") == "all":
            raise ConfigError(
                f"{source}: use_bidirectional_attention='all' (bidirectional encoder) is not supported; "
                "DiffusionGemma checkpoints use 'vision'."
            )
        n_layers = need("num_hidden_layers")
        layer_types = text.get("layer_types") or [
            SLIDING if (i + 1) % 6 else FULL for i in range(n_layers)
        ]
        head_dim, kvh = need("head_dim"), need("num_key_value_heads")
        ghd, gkvh = text.get("global_head_dim"), text.get("num_global_key_value_heads")
        per_layer = text.get("per_layer_config") or {}
        for idx, over in per_layer.items():  # the form transformers writes back on save_pretrained
            if layer_types[int(idx)] == FULL:
                ghd = over.get("head_dim", ghd)
                gkvh = over.get("num_key_value_heads", gkvh)
        ghd = ghd if ghd is not None else 512
        gkvh = gkvh if gkvh is not None else kvh
        rope = text.get("rope_parameters") or {}
        rs, rf = rope.get(SLIDING, {}) or {}, rope.get(FULL, {}) or {}
        if rf and rf.get("rope_type", "proportional") != "proportional":
            raise ConfigError(f"{source}: full-attention rope_type {rf.get('rope_type')!r}; expected 'proportional'.")
        eos = text.get("eos_token_id", cfg.get("eos_token_id", [1, 106]))
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        dtype = cfg.get("dtype") or cfg.get("torch_dtype") or text.get("dtype") or "bfloat16"
        try:
            return cls(
                vocab_size=need("vocab_size"),
                hidden_size=need("hidden_size"),
                intermediate_size=need("intermediate_size"),
                moe_intermediate_size=need("moe_intermediate_size"),
                num_hidden_layers=n_layers,
                num_attention_heads=need("num_attention_heads"),
                num_key_value_heads=kvh,
                head_dim=head_dim,
                global_head_dim=ghd,
                num_global_key_value_heads=gkvh,
                num_experts=need("num_experts"),
                top_k_experts=need("top_k_experts"),
                sliding_window=text.get("sliding_window", 1024),
                layer_types=tuple(layer_types),
                rms_norm_eps=text.get("rms_norm_eps", 1e-6),
                final_logit_softcapping=text.get("final_logit_softcapping", 30.0) or 30.0,
                rope_theta_sliding=rs.get("rope_theta", 10_000.0),
                rope_theta_full=rf.get("rope_theta", 1_000_000.0),
                partial_rotary_factor_full=rf.get("partial_rotary_factor", 0.25),
                max_position_embeddings=text.get("max_position_embeddings", 262144),
                hidden_activation=text.get("hidden_activation", "gelu_pytorch_tanh"),
                canvas_length=cfg.get("canvas_length", 256),
                pad_token_id=text.get("pad_token_id", 0) if text.get("pad_token_id") is not None else 0,
                bos_token_id=text.get("bos_token_id", 2),
                eos_token_ids=eos,
                dtype=str(dtype).replace("torch.", ""),
            )
        except TypeError as e:  # wrong value types in the json
            raise CheckpointError(f"{source}: invalid text_config value ({e}).") from None

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


@dataclass(frozen=True)
class SamplerConfig:
    """Canvas sampler settings (spec §2 generation defaults, §9). Validated on construction."""

    max_new_tokens: int = 256
    max_denoising_steps: int = 48
    t_min: float = 0.4
    t_max: float = 0.8
    entropy_bound: float = 0.1
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    adaptive_stopping: bool = True  # False = always run max_denoising_steps (the vLLM anchor setting)
    eos_token_ids: tuple[int, ...] = (1, 106, 50)
    pad_token_id: int = 0
    ignore_eos: bool = False  # benchmarks: never finish a row on EOS

    def __post_init__(self):
        def need_int(name, lo, hi=None, hint=""):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
                rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
                raise ConfigError(f"{name} must be an integer {rng} (got {v!r}).{hint}")

        need_int("max_new_tokens", 1, hint=" Output comes in whole canvases.")
        need_int("max_denoising_steps", 1)
        need_int("stability_threshold", 0)
        for name in ("t_min", "t_max", "entropy_bound", "confidence_threshold"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"{name} must be a finite number (got {v!r}).")
        if self.t_min < 0 or self.t_max <= self.t_min:
            raise ConfigError(f"temperatures need 0 <= t_min < t_max (got t_min={self.t_min}, t_max={self.t_max}).")
        if self.entropy_bound <= 0:
            raise ConfigError(f"entropy_bound must be > 0 (got {self.entropy_bound}).")
        if self.confidence_threshold <= 0:
            raise ConfigError(f"confidence_threshold must be > 0 (got {self.confidence_threshold}).")

    def replace(self, **kw) -> "SamplerConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_generation_config(cls, gen: dict, model: ModelConfig | None = None) -> "SamplerConfig":
        """Defaults of transformers' DiffusionGemmaGenerationConfig, overridden by generation_config.json."""
        kw = {}
        for key in ("max_new_tokens", "max_denoising_steps", "t_min", "t_max", "stability_threshold",
                    "confidence_threshold", "pad_token_id"):
            if gen.get(key) is not None:
                kw[key] = gen[key]
        sc = gen.get("sampler_config")
        if isinstance(sc, dict) and sc.get("entropy_bound") is not None:
            kw["entropy_bound"] = sc["entropy_bound"]
        eos = gen.get("eos_token_id")
        if eos is None and model is not None:
            eos = list(model.eos_token_ids)
        if eos is not None:
            kw["eos_token_ids"] = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        return cls(**kw)

    def to_generation_config(self) -> dict:
        return {
            "max_new_tokens": self.max_new_tokens,
            "max_denoising_steps": self.max_denoising_steps,
            "t_min": self.t_min,
            "t_max": self.t_max,
            "sampler_config": {"entropy_bound": self.entropy_bound, "_cls_name": "EntropyBoundSamplerConfig"},
            "stability_threshold": self.stability_threshold,
            "confidence_threshold": self.confidence_threshold,
            "eos_token_id": list(self.eos_token_ids),
            "pad_token_id": self.pad_token_id,
            "return_dict_in_generate": True,
        }


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found.") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}).") from None


FULL_SIZE = ModelConfig()  # google/diffusiongemma-26B-A4B-it text stack (spec §2)

# Smallest sensible shape: one sliding and one full layer so both code paths run (spec §12.1).
TINY = ModelConfig(
    vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
    num_experts=4, top_k_experts=2, sliding_window=16, layer_types=(SLIDING, FULL), max_position_embeddings=4096,
    canvas_length=32, eos_token_ids=(1, 106), dtype="float32",
)
