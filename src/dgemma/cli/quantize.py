"""`dgemma quantize` (`make quantize`): ModelOpt FP8 / NVFP4 + calibration -> quantize/<precision>/."""

from __future__ import annotations

import json

from ..core.layout import CALIB_PROMPTS, HELDOUT_PROMPTS
from ..quantize.recipe import DEFAULT_RECIPE, PRECISIONS, RECIPE_NAMES, RECIPES
from ..quantize.stage import run
from .common import CHECKPOINT_HELP, int_arg


def cmd_quantize(args) -> int:
    n = int_arg("--eval-n", args.eval_n, 1, None)
    path = run(args.precision, args.checkpoint, args.out, args.calib, args.heldout or None, eval_n=n,
               recipe_name=args.recipe)
    q = json.loads((path / "quality.json").read_text())
    print(f"wrote {path} (recipe {q['recipe']['name']})")
    acc = q["task_accuracy"]
    print(f"  sort accuracy (n={acc['n']}): bf16 {acc['bf16']:.2%}")
    for label, row in (("fake quant " + q["fake_quant_mode"], q), ("checkpoint " + q["dequantized"]["mode"],
                                                                  q["dequantized"])):
        for name, s in row["sets"].items():
            print(f"  {label} {name}: KL {s['kl_mean']:.4g}, top-1 {s['top1_mean']:.4f}, token agreement "
                  f"{s['token_agreement']:.4f}, TPF {s['tpf_bf16']:.2f} -> {s['tpf_quant']:.2f}")
    print(f"  sort accuracy: fake quant {q['fake_quant_mode']} {acc[args.precision]:.2%}, checkpoint "
          f"{q['dequantized']['mode']} {q['dequantized']['task_accuracy']['accuracy']:.2%}")
    return 0


def add_parser(sub) -> None:
    q = sub.add_parser("quantize", help="ModelOpt fp8/nvfp4 quantization + calibration -> quantize/<precision>/")
    q.add_argument("--precision", required=True, choices=PRECISIONS)
    q.add_argument("--recipe", choices=RECIPE_NAMES,
                   help="; ".join(f"{r.name} ({p}{', default' if DEFAULT_RECIPE[p] == r.name else ''}): {r.summary}"
                                  for p, rs in RECIPES.items() for r in rs.values()).replace("%", "%%"))
    q.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    q.add_argument("--out", help="output root; writes OUT/<precision>/ (default: quantize/ in the work directory)")
    q.add_argument("--calib", default=str(CALIB_PROMPTS), help="calibration prompts (JSONL, {\"text\": ...})")
    q.add_argument("--heldout", default=str(HELDOUT_PROMPTS), help="held-out prompts for the report ('' = none)")
    q.add_argument("--eval-n", default="100", help="sorting examples for task accuracy")
    q.set_defaults(func=cmd_quantize)
