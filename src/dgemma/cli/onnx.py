"""`dgemma onnx` (`make onnx`; alias `export`): the encoder and denoiser ONNX graphs -> build/onnx/<precision>/."""

from __future__ import annotations

import time
from pathlib import Path

from ..core import contract
from ..core.errors import ConfigError
from ..core.layout import DEFAULT_CHECKPOINT
from ..core.manifest import MANIFEST, QUANTIZED, read_onnx_manifest
from ..export.onnx import export_onnx
from ..export.quantized import export_quantized
from ..model.checkpoint import load_model
from .common import CHECKPOINT_HELP


def cmd_onnx(args) -> int:
    if args.precision not in contract.PRECISION_DTYPES:
        raise ConfigError(f"unknown --precision {args.precision!r}; valid: {', '.join(contract.PRECISION_DTYPES)}.")
    t0 = time.perf_counter()
    if args.precision in QUANTIZED:  # from the `dgemma quantize` output; --checkpoint only checks its source
        if args.exporter == "legacy":
            raise ConfigError("quantized graphs need the dynamo exporter (custom Q/DQ translations); drop "
                              "--exporter legacy.")
        out = export_quantized(args.precision, args.quantized, args.out, checkpoint=args.checkpoint)
    else:
        ck = Path(args.checkpoint) if args.checkpoint else DEFAULT_CHECKPOINT
        out = export_onnx(load_model(ck, "cpu").model, args.precision, args.out, checkpoint=ck,
                          exporter=args.exporter)
    m = read_onnx_manifest(out)
    for g in contract.GRAPHS:
        size = sum(m["graphs"][g]["files"].values())
        print(f"{g}: {out / g / 'model.onnx'} ({size / 1e6:.2f} MB, {m['graphs'][g]['exporter']}, "
              f"{m['graphs'][g]['seconds']:.1f} s)")
    print(f"wrote {out / MANIFEST} in {time.perf_counter() - t0:.1f} s")
    return 0


def add_parser(sub) -> None:
    for name in ("onnx", "export"):  # `export`: the old name, kept as an alias for one release
        e = sub.add_parser(name, help="export the encoder and denoiser graphs to ONNX (build/onnx/<precision>/)"
                           + ("" if name == "onnx" else "; alias of `onnx`"))
        e.add_argument("--precision", default="bf16", help="bf16 | fp32 (CPU / ONNX Runtime reference) | fp8 | "
                       "nvfp4 (Q/DQ graphs from a `dgemma quantize` output)")
        e.add_argument("--checkpoint", help=CHECKPOINT_HELP + "; fp8/nvfp4: checked against the quantized model's "
                       "source")
        e.add_argument("--quantized", help="fp8/nvfp4: the `dgemma quantize` output (default: quantize/<precision>/)")
        e.add_argument("--out", help="output root (default: build/onnx in the work directory)")
        e.add_argument("--exporter", default="auto", choices=["auto", "dynamo", "legacy"])
        e.set_defaults(func=cmd_onnx)
