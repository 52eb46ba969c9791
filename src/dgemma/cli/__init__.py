"""Layer 5 of dgemma: the `dgemma` command line, the only place that parses arguments. One module per make target
(quantize, onnx, engines, repo, serve, bench, report, ...), each with `add_parser(sub)` and its `cmd_*`. User
errors (DgemmaError) print one line and exit 2, never a traceback. `--workdir DIR` (or DGEMMA_WORKDIR) roots every
artifact; the default is the current directory. Without a visible CUDA device the CLI sets TRITON_INTERPRET=1 (unless
set) before any subcommand imports triton: there the fused kernels can only run interpreted, and the flag must
precede the import."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from ..core.errors import DgemmaError
from ..core.layout import WORKDIR_ENV

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from . import (bench, client, deploy, engines, generate, onnx, openai, probe, profiles, quantize, report, repo, serve,
               tiny)

TARGETS = (generate, tiny, profiles, quantize, onnx, engines, repo, serve, openai, client, bench, report, probe,
           deploy)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dgemma", description="DiffusionGemma deployment toolkit.")
    p.add_argument("--workdir", help=f"root of every artifact (quantize/, build/, engines/, bench/); default "
                                     f"${WORKDIR_ENV} or the current directory")
    sub = p.add_subparsers(dest="cmd", required=True)
    for target in TARGETS:
        target.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    saved = os.environ.get(WORKDIR_ENV)
    if args.workdir:
        os.environ[WORKDIR_ENV] = os.path.abspath(args.workdir)
    try:
        return args.func(args)
    except DgemmaError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        if args.workdir:  # main() is also called in-process (tests): leave the environment as it was
            if saved is None:
                os.environ.pop(WORKDIR_ENV, None)
            else:
                os.environ[WORKDIR_ENV] = saved


if __name__ == "__main__":
    sys.exit(main())
