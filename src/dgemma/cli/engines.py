"""`dgemma engines` (`make engines`; alias `build`): TensorRT engines from build/onnx/<precision>/ ->
engines/<gpu>/<precision>/."""

from __future__ import annotations

import json
import time

from ..core.errors import ConfigError
from ..engines.build import build_engines


def cmd_engines(args) -> int:
    t0 = time.perf_counter()
    sms = None
    if args.sm:
        try:
            sms = tuple(int(x) for x in args.sm.split(","))
        except ValueError:
            raise ConfigError(f"--sm takes compute capabilities x10, comma separated (e.g. 120,89); got "
                              f"{args.sm!r}.") from None
    out = build_engines(args.gpu, args.precision, args.onnx, args.out, onnx_precision=args.onnx_precision, sms=sms)
    m = json.loads((out / "manifest.json").read_text())
    for g, e in m["engines"].items():
        print(f"{g}: {out / (g + '.plan')} ({e['bytes'] / 1e6:.2f} MB, {e['seconds']:.1f} s)")
    print(f"{m['tensorrt']['flavour']} {m['tensorrt']['version']}, SM {m['compute_capabilities']}; wrote "
          f"{out / 'manifest.json'} in {time.perf_counter() - t0:.1f} s")
    return 0


def add_parser(sub) -> None:
    for name in ("engines", "build"):  # `build`: the old name, kept as an alias for one release
        b = sub.add_parser(name, help="build TensorRT engines from build/onnx/<precision>/ (engines/<gpu>/<precision>/)"
                           + ("" if name == "engines" else "; alias of `engines`"))
        b.add_argument("--gpu", default="cpu", help="GPU profile (cpu: TensorRT-RTX ahead-of-time: SM120 + SM89; "
                       "nvfp4: SM120 only)")
        b.add_argument("--precision", default="bf16")
        b.add_argument("--onnx-precision", help="read build/onnx/<this>/ instead (e.g. fp32 graphs)")
        b.add_argument("--sm", help="force compute capabilities x10, comma separated (e.g. 120,121)")
        b.add_argument("--onnx", help="ONNX root (default: build/onnx in the work directory)")
        b.add_argument("--out", help="engines root (default: engines/ in the work directory)")
        b.set_defaults(func=cmd_engines)
