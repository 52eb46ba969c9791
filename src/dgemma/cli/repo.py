"""`dgemma repo` (`make repo`): render the Triton model repository -> build/triton/<gpu>/<precision>/."""

from __future__ import annotations

from ..serving.loop import BACKENDS
from ..serving.render import CPU_BACKEND, ENGINES, parse_gpus, render
from .common import CHECKPOINT_HELP


def cmd_repo(args) -> int:
    root = render(args.gpu, args.precision, args.checkpoint, args.out, backend=args.backend, engine=args.engine,
                  max_batch=args.max_batch, backends=not args.config_only, ensemble=args.ensemble,
                  gpus=parse_gpus(args.gpus) if args.gpus else None)
    names = sorted(p.name for p in (root / "models").iterdir())
    print(f"wrote {root}/models ({', '.join(names)})" + ("" if args.config_only else f" and {root}/backends"))
    return 0


def add_render_args(p) -> None:
    """Flags shared by `dgemma repo` and `dgemma serve`."""
    p.add_argument("--gpu", default="cpu")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--backend", choices=BACKENDS,
                   help=f"how the canvas loop computes: ort/torch in-process, bls through the encoder/denoiser models "
                        f"(default: {CPU_BACKEND} on GPU=cpu, bls over TensorRT engines, else torch)")
    p.add_argument("--engine", default="auto", choices=ENGINES,
                   help="what computes the encoder/denoiser models (auto: tensorrt_plan where Triton has the "
                        "tensorrt backend, onnxruntime on GPU=cpu, else torch)")
    p.add_argument("--max-batch", type=int, help="canvases in flight (default GpuProfile.max_batch)")
    p.add_argument("--gpus", help="one dgemma model instance per GPU: a count (4 = GPUs 0..3) or device ids (0,2); "
                                  "default one CPU instance")
    p.add_argument("--ensemble", action="store_true",
                   help="tensorrtllm_backend's layout instead of the decoupled `dgemma` model: a model `ensemble` "
                        "(preprocess -> canvas_loop -> postprocess) with the same inputs and outputs; a cancelled "
                        "stream's row then runs to its end (Triton 2.51 does not cancel ensemble steps)")


def add_parser(sub) -> None:
    r = sub.add_parser("repo", help="render the Triton model repository into build/triton/<gpu>/<precision>/")
    add_render_args(r)
    r.add_argument("--out", help="output root (default build/triton/<gpu>/<precision> in the work directory)")
    r.add_argument("--config-only", action="store_true", help="models/ only: no backend copy, no artifact checks")
    r.set_defaults(func=cmd_repo)
