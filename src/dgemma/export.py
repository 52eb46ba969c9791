"""Export of the native model's two passes to ONNX: `encoder` and `denoiser` graphs + manifest.json.

Owns the export wrappers (fixed-capacity K/V buffers + past_length in, new K/V out; masks built inside), the
torch.onnx.export call (dynamo first, legacy TorchScript exporter as fallback), external data for models over
2 GB, onnx.checker, and the atomic output layout build/onnx/<precision>/{encoder,denoiser}/model.onnx +
manifest.json. Names and dims come from dgemma.graphs. Knows nothing of sampling, ONNX Runtime or TensorRT.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import graphs
from .errors import ArtifactError, ConfigError
from .model import DiffusionGemma, _repeat_kv
from .runtime.graph_backend import DTYPES
from .artifacts import publish_dir
from .artifacts import read_manifest as read_artifact_manifest

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "build" / "onnx"
MANIFEST = "manifest.json"
TWO_GB = 2**31 - 1
OPSET = 18


# -- wrappers ---------------------------------------------------------------------------------------------------
def _attend(attn, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """SDPA, scale 1.0, GQA by repeat_kv (the legacy exporter cannot convert enable_gqa)."""
    if attn.groups > 1:
        k, v = _repeat_kv(k, attn.groups), _repeat_kv(v, attn.groups)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)


def encoder_mask(past_length: Tensor, cap: int, s: int, window: int | None, keep: int) -> Tensor:
    """Encoder mask [B,1,S,cap+S] (True = attend) over keys = KV buffer slots (cap) followed by the S new tokens.

    Full layers: slot k holds position k, valid iff k < P_b. Sliding layers (window W, keep = W-1): slot k holds
    position P_b - L_b + k with L_b = min(P_b, keep); query j (position P_b + j) sees it iff k < L_b and
    k > L_b + j - W. New key k' is seen iff k' <= j (and k' > j - W when sliding).
    """
    dev = past_length.device
    j = torch.arange(s, device=dev)[:, None]  # [S,1]
    k = torch.arange(cap, device=dev)[None, :]  # [1,cap]
    kn = torch.arange(s, device=dev)[None, :]  # [1,S]
    lengths = past_length.reshape(-1, 1, 1, 1)
    new = kn <= j
    if window is None:
        old = k < lengths  # [B,1,1,cap]
        old = old.expand(-1, 1, s, -1)
    else:
        lengths = lengths.clamp(max=keep)
        old = (k < lengths) & (k > lengths + j - window)  # [B,1,S,cap]
        new = new & (kn > j - window)
    return torch.cat([old, new[None, None].expand(old.shape[0], 1, s, s)], dim=-1)


def prefix_mask(past_length: Tensor, cap: int, c: int, sliding: bool, keep: int) -> Tensor:
    """Denoiser mask [B,1,1,cap+C]: the valid buffer slots (P_b full, min(P_b, W-1) sliding) and every canvas
    key; every canvas query sees the same keys (spec §14 risk 2)."""
    lengths = past_length.reshape(-1, 1, 1, 1)
    if sliding:
        lengths = lengths.clamp(max=keep)
    old = torch.arange(cap, device=past_length.device)[None, None, None, :] < lengths
    return torch.cat([old, torch.ones_like(old[..., :1]).expand(-1, 1, 1, c)], dim=-1)


class EncoderGraph(nn.Module):
    """(input_ids, position_ids, past_length, past_key_0, past_value_0, ...) -> (new_key_0, new_value_0, ...).

    Same arithmetic as DiffusionGemma.encode over fixed-capacity buffers (contract v2): the new tokens attend
    to the valid buffer slots and causally to each other; only their K/V leave the graph (the runtime appends
    them, dgemma.runtime.kvbuf). The last layer only computes its K/V (generation never reads the encoder's
    hidden states).
    """

    def __init__(self, model: DiffusionGemma):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, position_ids: Tensor, past_length: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        m, cfg = self.model, self.model.cfg
        s = input_ids.shape[1]
        rope = m.rope(position_ids, m.dtype)
        x = m.embed(input_ids)
        news: list[Tensor] = []
        masks: dict[bool, Tensor] = {}
        last = len(m.layers) - 1
        for i, layer in enumerate(m.layers):
            at = layer.self_attn
            cos, sin = rope[at.sliding]
            h = layer.input_layernorm(x)
            if i == last:
                k, v = at.kv(h, cos, sin)
            else:
                q, k, v = at.qkv(h, cos, sin)
            news += [k, v]
            if i == last:
                break
            pk, pv = past[2 * i], past[2 * i + 1]
            if at.sliding not in masks:  # one mask per layer kind (all layers of a kind share the capacity)
                masks[at.sliding] = encoder_mask(past_length, pk.shape[-2], s,
                                                 cfg.sliding_window if at.sliding else None, cfg.sliding_cache_len)
            a = _attend(at, q, torch.cat([pk, k], dim=-2), torch.cat([pv, v], dim=-2), masks[at.sliding])
            r = x + layer.post_attention_layernorm(at.out(a))
            x = layer.ffn(r, m.encoder_layer_scalars[i : i + 1].to(r.dtype))
        return tuple(news)


class DenoiserGraph(nn.Module):
    """(canvas_ids, sc_embeds, temperature, position_ids, past_length, past...) -> (logits fp32, next_sc_embeds).

    Bidirectional over the canvas; every canvas query sees the same prefix keys: the valid slots of each
    layer's buffer (all P for full layers, the last min(P, W-1) for sliding layers) and the whole canvas.
    next_sc_embeds = soft_embed(logits / temperature) (spec §10, "better for production").
    """

    def __init__(self, model: DiffusionGemma):
        super().__init__()
        self.model = model

    def forward(self, canvas_ids: Tensor, sc_embeds: Tensor, temperature: Tensor, position_ids: Tensor,
                past_length: Tensor, *past: Tensor) -> tuple[Tensor, Tensor]:
        m, cfg = self.model, self.model.cfg
        c = canvas_ids.shape[1]
        rope = m.rope(position_ids, m.dtype)
        e = m.embed(canvas_ids)
        x = m.self_conditioning(e, sc_embeds.to(e.dtype))
        masks: dict[bool, Tensor] = {}
        for i, layer in enumerate(m.layers):
            at = layer.self_attn
            cos, sin = rope[at.sliding]
            q, k, v = at.qkv(layer.input_layernorm(x), cos, sin)
            pk, pv = past[2 * i], past[2 * i + 1]
            if at.sliding not in masks:
                masks[at.sliding] = prefix_mask(past_length, pk.shape[-2], c, at.sliding, cfg.sliding_cache_len)
            a = _attend(at, q, torch.cat([pk, k], dim=-2), torch.cat([pv, v], dim=-2), masks[at.sliding])
            r = x + layer.post_attention_layernorm(at.out(a))
            x = layer.ffn(r, layer.layer_scalar.to(r.dtype))
        logits = m.logits(x)
        return logits, m.soft_embed(logits / temperature.reshape(-1, 1, 1))


# -- example inputs ---------------------------------------------------------------------------------------------
# distinct example sizes so no two symbolic dims are unified (and none is 0/1, which exporters specialise)
_EXAMPLE = {graphs.BATCH: 2, graphs.SEQ: 3, graphs.KV_CAPACITY: 11}
_EXAMPLE_LENGTHS = (7, 5)  # past_length per example row (<= kv_capacity)


def example_inputs(graph: str, cfg, precision: str) -> tuple[Tensor, ...]:
    out = []
    lengths = torch.tensor(_EXAMPLE_LENGTHS)
    for t in graphs.inputs(graph, cfg, precision):
        shape = [d if isinstance(d, int) else _EXAMPLE[d] for d in t.dims]
        if t.name in ("input_ids", "canvas_ids"):
            out.append(torch.randint(0, cfg.vocab_size, shape))
        elif t.name == "position_ids":
            out.append(lengths[:, None] + torch.arange(shape[1])[None, :])
        elif t.name == graphs.PAST_LENGTH:
            out.append(lengths.clone())
        elif t.name == "temperature":
            out.append(torch.full(shape, 0.7))
        else:
            out.append(0.1 * torch.randn(shape).to(DTYPES[t.dtype]))
    return tuple(out)


def _dynamic_shapes(graph: str, cfg, precision: str):
    from torch.export import Dim

    dims = {graphs.BATCH: Dim(graphs.BATCH, min=1, max=4096), graphs.SEQ: Dim(graphs.SEQ, min=1, max=1 << 20),
            graphs.KV_CAPACITY: Dim(graphs.KV_CAPACITY, min=2, max=1 << 20)}
    specs = graphs.inputs(graph, cfg, precision)
    per = [{k: dims[d] for k, d in enumerate(t.dims) if isinstance(d, str)} for t in specs]
    n_fixed = 3 if graph == graphs.ENCODER else 5
    return (*per[:n_fixed], tuple(per[n_fixed:]))


def _dynamic_axes(graph: str, cfg, precision: str) -> dict:
    specs = graphs.inputs(graph, cfg, precision) + graphs.outputs(graph, cfg, precision)
    return {t.name: {k: d for k, d in enumerate(t.dims) if isinstance(d, str)} for t in specs}


def _name_dims(proto, graph: str, cfg, precision: str) -> None:
    """Set every graph input/output dim to the contract's name or size (exporters invent output dim names)."""
    specs = {t.name: t for t in graphs.inputs(graph, cfg, precision) + graphs.outputs(graph, cfg, precision)}
    for vi in list(proto.graph.input) + list(proto.graph.output):
        t = specs[vi.name]
        shape = vi.type.tensor_type.shape
        while len(shape.dim) < len(t.dims):
            shape.dim.add()
        for d, want in zip(shape.dim, t.dims):
            if isinstance(want, int):
                d.dim_value = want
            else:
                d.dim_param = want


def export_graph(model: DiffusionGemma, graph: str, out_path: Path, precision: str,
                 exporter: str = "auto", opset: int = OPSET, translations: dict | None = None) -> dict:
    """Export one graph to out_path (model.onnx [+ model.onnx.data]); returns {exporter, seconds}.

    translations: custom_translation_table for the dynamo exporter (quantized models, dgemma.export_quant)."""
    import onnx

    cfg = model.cfg
    wrapper = (graphs.ENCODER == graph and EncoderGraph or DenoiserGraph)(model).eval()
    args = example_inputs(graph, cfg, precision)
    in_names = [t.name for t in graphs.inputs(graph, cfg, precision)]
    out_names = [t.name for t in graphs.outputs(graph, cfg, precision)]
    t0, used, errors = time.perf_counter(), None, []
    tmp = out_path.with_suffix(".raw.onnx")
    for kind in (["dynamo", "legacy"] if exporter == "auto" else [exporter]):
        try:
            # the exporters' deprecation/axis-renaming warnings (and "torchvision is not installed") say nothing
            # actionable to a user of this CLI
            logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", (UserWarning, FutureWarning, DeprecationWarning))
                if kind == "dynamo":
                    prog = torch.onnx.export(wrapper, args, dynamo=True, input_names=in_names,
                                             output_names=out_names, opset_version=opset, optimize=True,
                                             custom_translation_table=translations,
                                             dynamic_shapes=_dynamic_shapes(graph, cfg, precision), verbose=False)
                    proto = prog.model_proto
                else:
                    torch.onnx.export(wrapper, args, str(tmp), dynamo=False, input_names=in_names,
                                      output_names=out_names, opset_version=OPSET,
                                      dynamic_axes=_dynamic_axes(graph, cfg, precision))
                    proto = onnx.load(str(tmp))
            used = kind
            break
        except Exception as e:  # noqa: BLE001 - try the next exporter, report all failures if none works
            errors.append(f"{kind}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if used is None:
        raise ArtifactError(f"torch.onnx.export failed for the {graph} graph ({'; '.join(errors)}).")
    for f in tmp.parent.glob(tmp.name + "*"):
        f.unlink()
    _name_dims(proto, graph, cfg, precision)
    large = proto.ByteSize() > TWO_GB or sum(p.numel() * p.element_size() for p in model.parameters()) > TWO_GB
    if large:
        onnx.save_model(proto, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=out_path.name + ".data", size_threshold=1024)
        onnx.checker.check_model(str(out_path))
    else:
        onnx.save_model(proto, str(out_path))
        onnx.checker.check_model(proto)
    return {"exporter": used, "seconds": round(time.perf_counter() - t0, 3), "external_data": large,
            "fallback_reasons": errors}


# -- manifest ---------------------------------------------------------------------------------------------------
def checkpoint_fingerprint(path: str | Path) -> str:
    """sha256 of config.json bytes + every *.safetensors name and size (cheap: no weight bytes are read)."""
    path = Path(path)
    h = hashlib.sha256()
    try:
        h.update((path / "config.json").read_bytes())
    except FileNotFoundError:
        raise ArtifactError(f"{path}/config.json not found; --checkpoint must be a DiffusionGemma checkpoint "
                            "directory (write the tiny one with: dgemma init-tiny DIR).") from None
    for f in sorted(path.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}\n".encode())
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_onnx(model: DiffusionGemma, precision: str, out_root: str | Path = DEFAULT_OUT,
                checkpoint: str | Path | None = None, exporter: str = "auto", quantized=None) -> Path:
    """Both graphs + manifest.json into out_root/<precision>/, written atomically (temp dir, then rename).

    quantized: a dgemma.export_quant.QuantizedExport for fp8/nvfp4 (the model is then its export model, already in
    the graph dtype: .to() would upcast the stored low-precision weights)."""
    import onnx

    import dgemma

    dtype = graphs.kv_dtype(precision)
    if (precision in ("fp8", "nvfp4")) != (quantized is not None):
        raise ConfigError(f"export precision {precision!r} needs a ModelOpt-quantized model: run `dgemma export "
                          f"--precision {precision}` (reads quantize/{precision}/, made by `make quantize "
                          f"PRECISION={precision}`)." if quantized is None else
                          f"a quantized export needs --precision fp8 or nvfp4, not {precision!r}.")
    opset, translations = (quantized.opset, quantized.translations) if quantized else (OPSET, None)
    model = (model if quantized else model.to(DTYPES[dtype])).eval()
    model.set_experts_impl("dense")  # grouped uses F.grouped_mm, which has no ONNX op
    out_root = Path(out_root)
    final = out_root / precision
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{precision}-", dir=out_root))
    try:
        info = {}
        for g in graphs.GRAPHS:
            (tmp / g).mkdir()
            info[g] = export_graph(model, g, tmp / g / "model.onnx", precision, exporter, opset, translations)
            files = sorted((tmp / g).iterdir())
            info[g]["files"] = {f.name: f.stat().st_size for f in files}
            info[g]["sha256"] = file_sha256(tmp / g / "model.onnx")
        manifest = {
            "schema": 1, "stage": "onnx", "precision": precision, "dtype": dtype,
            "checkpoint": str(checkpoint) if checkpoint else None,
            "checkpoint_sha256": checkpoint_fingerprint(checkpoint) if checkpoint else None,
            "model_config": model.cfg.to_hf_dict() | {"canvas_length": model.cfg.canvas_length},
            "dgemma_version": dgemma.__version__, "torch_version": torch.__version__,
            "onnx_version": onnx.__version__, "opset": opset, "experts_impl": "dense",
            "contract_sha256": graphs.contract_hash(model.cfg, precision),
            "io_contract": graphs.contract(model.cfg, precision), "graphs": info,
            **(quantized.manifest if quantized else {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        model.set_experts_impl("grouped")
    return final


def read_manifest(onnx_dir: str | Path) -> dict:
    return read_artifact_manifest(onnx_dir, "exported ONNX graphs", "make onnx PRECISION=<precision>")


def verify_files(onnx_dir: str | Path, manifest: dict) -> None:
    """Each graph's files exist with the recorded sizes and model.onnx has the recorded sha256."""
    onnx_dir = Path(onnx_dir)
    for g, info in manifest["graphs"].items():
        for name, size in info["files"].items():
            f = onnx_dir / g / name
            if not f.exists() or f.stat().st_size != size:
                got = f.stat().st_size if f.exists() else "missing"
                raise ArtifactError(f"{f}: size {got}, manifest says {size} bytes (corrupt or partial export). "
                                    "Rebuild with `make onnx`.")
        got = file_sha256(onnx_dir / g / "model.onnx")
        if got != info["sha256"]:
            raise ArtifactError(f"{onnx_dir / g / 'model.onnx'}: sha256 {got[:12]}..., manifest says "
                                f"{info['sha256'][:12]}... (modified or corrupt). Rebuild with `make onnx`.")


# -- CLI --------------------------------------------------------------------------------------------------------
def cli_export(args) -> int:
    from .cli import load_model

    if args.precision not in graphs.PRECISION_DTYPES:
        raise ConfigError(f"unknown --precision {args.precision!r}; valid: {', '.join(graphs.PRECISION_DTYPES)}.")
    from .export_quant import QUANTIZED, export_quantized
    from .tiny import ensure_tiny

    t0 = time.perf_counter()
    if args.precision in QUANTIZED:  # from the `dgemma quantize` output; --checkpoint only checks its source
        if args.exporter == "legacy":
            raise ConfigError("quantized graphs need the dynamo exporter (custom Q/DQ translations); drop "
                              "--exporter legacy.")
        out = export_quantized(args.precision, args.quantized, args.out, checkpoint=args.checkpoint)
    else:
        ck = Path(args.checkpoint) if args.checkpoint else ensure_tiny()
        model, _cfg, _s, _tok = load_model(str(ck), "cpu", None)
        out = export_onnx(model, args.precision, args.out, checkpoint=ck, exporter=args.exporter)
    m = read_manifest(out)
    for g in graphs.GRAPHS:
        size = sum(m["graphs"][g]["files"].values())
        print(f"{g}: {out / g / 'model.onnx'} ({size / 1e6:.2f} MB, {m['graphs'][g]['exporter']}, "
              f"{m['graphs'][g]['seconds']:.1f} s)")
    print(f"wrote {out / MANIFEST} in {time.perf_counter() - t0:.1f} s")
    return 0


def add_parsers(sub) -> None:
    e = sub.add_parser("export", help="export the encoder and denoiser graphs to ONNX (build/onnx/<precision>/)")
    e.add_argument("--precision", default="bf16", help="bf16 | fp32 (CPU / ONNX Runtime reference) | fp8 | nvfp4 "
                   "(Q/DQ graphs from a `dgemma quantize` output)")
    e.add_argument("--checkpoint", help="checkpoint dir (default: the embedded trained tiny model); fp8/nvfp4: "
                   "checked against the quantized model's source")
    e.add_argument("--quantized", help="fp8/nvfp4: the `dgemma quantize` output (default: quantize/<precision>/)")
    e.add_argument("--out", default=str(DEFAULT_OUT))
    e.add_argument("--exporter", default="auto", choices=["auto", "dynamo", "legacy"])
    e.set_defaults(func=cli_export)
