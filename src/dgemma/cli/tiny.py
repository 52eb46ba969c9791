"""`dgemma train-tiny | init-tiny | eval`: the tiny models (dgemma.tiny): train the sorting model on CPU, write a
random tiny checkpoint, evaluate held-out accuracy on any backend."""

from __future__ import annotations

import json

from ..core.layout import DEFAULT_CHECKPOINT
from ..runtime.factory import create
from ..tiny import write_tiny
from ..tiny.task import evaluate
from ..tiny.train import train_tiny
from .common import int_arg


def cmd_train_tiny(args) -> int:
    steps = int_arg("--steps", args.steps, 1, None)
    seed = int_arg("--seed", args.seed, 0, 2**63 - 1)
    res = train_tiny(args.out_dir, steps=steps, batch=int_arg("--batch", args.batch, 1, None), seed=seed,
                     time_budget_s=float(args.time_budget) if args.time_budget else None)
    tail = res["losses"][-20:]
    print(f"trained {res['steps']} steps in {res['seconds']:.0f} s; loss {res['losses'][0]:.3f} -> "
          f"{sum(tail) / len(tail):.4f}; wrote {args.out_dir}")
    return 0


def cmd_eval(args) -> int:
    ck = args.checkpoint or DEFAULT_CHECKPOINT
    n = int_arg("--n", args.n, 1, None)
    steps = int_arg("--steps", args.steps, 1, 48)
    backend = None
    if args.backend != "torch" or args.precision != "bf16":
        backend = create(args.backend, args.precision, "cpu", ck, max_context=256).backend
    res = evaluate(ck, task=args.task, n=n, steps=steps, fixed_steps=args.fixed_steps, backend=backend)
    res.update(backend=args.backend, precision=args.precision, checkpoint=str(ck))
    print(json.dumps(res) if args.json else
          f"{res['task']}: accuracy {res['accuracy']:.2%} on {res['n']} held-out, steps/canvas "
          f"{res['mean_steps_per_canvas']:.2f}, tokens/forward {res['tokens_per_forward']:.2f} "
          f"({'fixed' if not res['adaptive'] else 'adaptive'}, max {res['max_denoising_steps']} steps, "
          f"{args.backend}/{args.precision})")
    return 0


def cmd_init_tiny(args) -> int:
    seed = int_arg("--seed", args.seed, 0, 2**63 - 1) or 0
    path = write_tiny(args.out_dir, seed=seed)
    print(f"wrote tiny DiffusionGemma checkpoint to {path}")
    return 0


def add_parser(sub) -> None:
    tt = sub.add_parser("train-tiny", help="train the tiny DiffusionGemma (sorting) on CPU, write a checkpoint")
    tt.add_argument("out_dir")
    tt.add_argument("--steps", default="1300")
    tt.add_argument("--batch", default="64")
    tt.add_argument("--seed", default="0")
    tt.add_argument("--time-budget", help="stop after this many seconds (then the step count is not deterministic)")
    tt.set_defaults(func=cmd_train_tiny)

    ev = sub.add_parser("eval", help="task accuracy, steps per canvas, tokens per forward on a held-out set")
    ev.add_argument("--task", default="sort")
    ev.add_argument("--checkpoint", help="default: the embedded trained tiny model")
    ev.add_argument("--n", default="100")
    ev.add_argument("--steps", help="max denoising steps (default: generation_config)")
    ev.add_argument("--fixed-steps", action="store_true")
    ev.add_argument("--backend", default="torch")
    ev.add_argument("--precision", default="bf16")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_eval)

    t = sub.add_parser("init-tiny", help="write the tiny random DiffusionGemma checkpoint (real layout)")
    t.add_argument("out_dir")
    t.add_argument("--seed", default="0")
    t.set_defaults(func=cmd_init_tiny)
