"""Checkpoint directories in the real google/diffusiongemma-26B-A4B-it layout: load, validate, write.

Layout: config.json, generation_config.json, model.safetensors or sharded model-*.safetensors with
model.safetensors.index.json; text weights under `model.decoder.*` (shared by both passes) plus
`model.encoder.language_model.layers.{i}.layer_scalar`. Vision tensors are skipped. Weights are
streamed tensor by tensor into a meta-initialised model, so peak RAM is one copy of the weights.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.config import FULL_SIZE, ModelConfig, SamplerConfig, read_json
from ..core.errors import CheckpointError
from ..core.layout import DEFAULT_CHECKPOINT
from ..core.manifest import publish_dir
from .modeling import DiffusionGemma, rope_inv_freq, torch_dtype
from .tokens import Tokenizer

log = logging.getLogger(__name__)

DECODER = "model.decoder."
ENCODER_SCALAR = "model.encoder.language_model.layers.{}.layer_scalar"
IGNORED_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.", "model.vision_tower.",
                    "model.embed_vision.")
TIED_ALIASES = ("lm_head.weight",)  # tied to embed_tokens; some conversions store it
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


SYNTHETIC = "synthetic"  # --checkpoint synthetic: the full-size shapes with random weights, built on the device


@dataclass
class Checkpoint:
    model: DiffusionGemma
    config: ModelConfig
    sampler: SamplerConfig
    path: Path | None
    ignored: list[str]
    tokenizer: object = None  # dgemma.model.tokens.Tokenizer when the directory ships tokenizer.json


def checkpoint_dir(checkpoint: str | Path | None) -> Path | None:
    """The directory a --checkpoint value names: the embedded tiny model by default, None for `synthetic`."""
    if checkpoint == SYNTHETIC:
        return None
    return Path(checkpoint) if checkpoint else DEFAULT_CHECKPOINT


def load_model(checkpoint: str | Path | None = None, device: str | torch.device = "cpu",
               dtype: str | torch.dtype | None = None) -> Checkpoint:
    """A --checkpoint value -> model, configs and tokenizer: a directory in the real layout, the embedded tiny
    model (None), or `synthetic` (FULL_SIZE shapes, random weights, no tokenizer; bf16 unless `dtype`)."""
    path = checkpoint_dir(checkpoint)
    if path is None:
        model = DiffusionGemma.random(FULL_SIZE, device=device, dtype=dtype or "bfloat16")
        return Checkpoint(model, FULL_SIZE, SamplerConfig(), None, [])
    ck = load_checkpoint(path, device=device, dtype=dtype)
    if (path / "tokenizer.json").exists():
        ck.tokenizer = Tokenizer(path)
    return ck


def load_config_of(checkpoint: str | Path | None) -> tuple[ModelConfig, SamplerConfig]:
    """Configs of a --checkpoint value without loading weights (synthetic: FULL_SIZE and the defaults)."""
    path = checkpoint_dir(checkpoint)
    return (FULL_SIZE, SamplerConfig()) if path is None else load_config(path)


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape, from a meta-device model (names = ours with the decoder prefix)."""
    with torch.device("meta"):
        m = DiffusionGemma(cfg)
    out = {}
    for name, t in list(m.named_parameters()) + list(m.named_buffers()):
        if name.startswith("inv_freq"):
            continue
        if name == "encoder_layer_scalars":
            for i in range(cfg.num_hidden_layers):
                out[ENCODER_SCALAR.format(i)] = (1,)
            continue
        out[DECODER + name] = tuple(t.shape)
    return out


def _checkpoint_name(ours: str) -> str:
    return DECODER + ours


def weight_files(path: Path) -> dict[str, Path]:
    """Map tensor name -> safetensors file, from the index (sharded) or the single file."""
    from safetensors import safe_open

    if (path / INDEX).exists():
        index = read_json(path / INDEX)
        wm = index.get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise CheckpointError(f"{path / INDEX}: 'weight_map' is missing or empty.")
        files = {}
        for name, fname in wm.items():
            f = path / fname
            if not f.exists():
                raise CheckpointError(f"{path / INDEX} names shard {fname} for tensor {name}, but {f} does not exist.")
            files[name] = f
        return files
    single = path / SINGLE
    if not single.exists():
        raise CheckpointError(
            f"{path}: no {SINGLE} and no {INDEX}. A DiffusionGemma checkpoint directory holds config.json, "
            "generation_config.json and its safetensors weights. Write the tiny one with: dgemma init-tiny DIR"
        )
    try:
        with safe_open(str(single), "pt") as f:
            return {k: single for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError / OSError
        raise CheckpointError(f"{single} is not a readable safetensors file ({e}).") from None


def load_config(path: Path) -> tuple[ModelConfig, SamplerConfig]:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint directory {path} does not exist. Pass --checkpoint DIR, or write the tiny default with: "
            "dgemma init-tiny DIR"
        )
    cfg = ModelConfig.from_hf_dict(read_json(path / "config.json"), source=str(path / "config.json"))
    gen_path = path / "generation_config.json"
    gen = read_json(gen_path) if gen_path.exists() else {}
    return cfg, SamplerConfig.from_generation_config(gen, cfg)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    dtype: str | torch.dtype | None = None) -> Checkpoint:
    """Load a checkpoint directory into a native model. Raises CheckpointError naming tensor, shape and file."""
    from safetensors import safe_open

    path = Path(path)
    cfg, sampler = load_config(path)
    want_dtype = torch_dtype(dtype or cfg.dtype)
    expected = expected_tensors(cfg)
    files = weight_files(path)

    ignored = sorted(n for n in files if n.startswith(IGNORED_PREFIXES))
    extra = sorted(n for n in files if n not in expected and n not in ignored and n not in TIED_ALIASES)
    if extra:
        raise CheckpointError(
            f"{files[extra[0]]}: unexpected tensor {extra[0]} ({len(extra)} unexpected in total); "
            f"the config ({cfg.num_hidden_layers} layers, {cfg.num_experts} experts) does not describe it. "
            "Is config.json from the same checkpoint?"
        )
    missing = [n for n in expected if n not in files]
    if missing:
        where = path / (INDEX if (path / INDEX).exists() else SINGLE)
        raise CheckpointError(f"{where}: tensor {missing[0]} is missing ({len(missing)} missing in total).")
    if ignored:
        log.info("ignoring %d vision tensors (dgemma serves the text model)", len(ignored))

    with torch.device("meta"):
        model = DiffusionGemma(cfg)
    params = dict(model.named_parameters())
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    enc_scalars = torch.ones(cfg.num_hidden_layers)
    for f, names in by_file.items():
        try:
            handle = safe_open(str(f), "pt", device="cpu")
        except Exception as e:
            raise CheckpointError(f"{f} is not a readable safetensors file ({e}).") from None
        with handle:
            for name in names:
                shape = tuple(handle.get_slice(name).get_shape())
                if shape != expected[name]:
                    raise CheckpointError(
                        f"{f}: tensor {name} has shape {list(shape)}, expected {list(expected[name])} "
                        "from config.json. The weights and the config do not belong together."
                    )
                t = handle.get_tensor(name)
                if name.startswith("model.encoder."):
                    enc_scalars[int(name.split(".")[4])] = t.float().reshape(())
                    continue
                ours = name[len(DECODER):]
                _assign(model, params, ours, t, want_dtype, device)
    model.register_buffer("encoder_layer_scalars", enc_scalars.to(device=device, dtype=want_dtype))
    model.register_buffer("inv_freq_sliding", rope_inv_freq(cfg, True).to(device), persistent=False)
    model.register_buffer("inv_freq_full", rope_inv_freq(cfg, False).to(device), persistent=False)
    return Checkpoint(model.eval(), cfg, sampler, path, ignored)


def _assign(model, params, name: str, t: torch.Tensor, dtype, device) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    t = t.to(device=device, dtype=dtype)
    if name in params:
        setattr(mod, attr, torch.nn.Parameter(t, requires_grad=False))
    else:
        mod.register_buffer(attr, t)


def state_dict_for_checkpoint(model: DiffusionGemma) -> dict[str, torch.Tensor]:
    """Our tensors under the checkpoint names (the inverse of load_checkpoint's rename)."""
    out = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith("inv_freq"):
            continue
        if name == "encoder_layer_scalars":
            for i in range(model.cfg.num_hidden_layers):
                out[ENCODER_SCALAR.format(i)] = t[i : i + 1].detach().clone().contiguous()
            continue
        out[_checkpoint_name(name)] = t.detach().contiguous()
    return out


def save_checkpoint(model: DiffusionGemma, out_dir: str | Path, sampler: SamplerConfig,
                    extra_files: dict[str, bytes] | None = None, shard_bytes: int | None = None) -> Path:
    """Write config, generation config and safetensors (optionally sharded with an index) atomically."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        cfg = model.cfg.replace(dtype=str(model.dtype).replace("torch.", ""))
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(sampler.to_generation_config(), indent=2) + "\n")
        tensors = state_dict_for_checkpoint(model)
        meta = {"format": "pt"}
        if shard_bytes is None:
            save_file(tensors, str(tmp / SINGLE), metadata=meta)
        else:
            shards, cur, size = [], {}, 0
            for name, t in tensors.items():
                nb = t.numel() * t.element_size()
                if cur and size + nb > shard_bytes:
                    shards.append(cur)
                    cur, size = {}, 0
                cur[name] = t
                size += nb
            shards.append(cur)
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata=meta)
                weight_map.update({n: fname for n in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2) + "\n")
        for fname, data in (extra_files or {}).items():
            (tmp / fname).write_bytes(data)
        publish_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
