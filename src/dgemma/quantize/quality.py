"""Quality of a quantized model against the unquantized one: quality.json + quality.md.

Per prompt set: denoiser logit KL(bf16 || quant) and top-1 agreement at every step of a fixed-step canvas,
both models fed the SAME inputs (the bf16 trajectory, teacher-forced); then the real sampler run separately on
each model with the same seed: tokens per forward and token agreement. Task accuracy on the sorting task through
dgemma.tiny.task.evaluate. Knows nothing of ModelOpt.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..generation.sampler import generate
from ..runtime.torch_backend import TorchBackend
from ..tiny.task import evaluate


class _Tee:
    """Backend running the reference and the quantized model on identical inputs; returns the reference's
    outputs (so the trajectory is the reference's) and records per-step KL / top-1 of the quantized logits."""

    def __init__(self, ref, quant, max_context: int):
        self.ref, self.q = TorchBackend(ref, max_context), TorchBackend(quant, max_context)
        self.vocab_size, self.canvas_length = self.ref.vocab_size, self.ref.canvas_length
        self.device, self.max_context = self.ref.device, self.ref.max_context
        self.step, self.kl, self.top1 = 0, {}, {}

    def new_state(self, batch: int):
        return self.ref.new_state(batch), self.q.new_state(batch)

    def length(self, state) -> int:
        return state[0].length

    def encode(self, state, ids: Tensor) -> None:
        self.ref.encode(state[0], ids)
        self.q.encode(state[1], ids)
        self.step = 0

    def denoise(self, state, canvas, soft, t):
        raw, nxt = self.ref.denoise(state[0], canvas, soft, t)
        qraw, _ = self.q.denoise(state[1], canvas, soft, t)
        self.step += 1
        lp, lq = F.log_softmax(raw, -1), F.log_softmax(qraw, -1)
        kl = (lp.exp() * (lp - lq)).sum(-1).flatten()
        agree = (raw.argmax(-1) == qraw.argmax(-1)).float().flatten()
        self.kl.setdefault(self.step, []).append(kl)
        self.top1.setdefault(self.step, []).append(agree)
        return raw, nxt


def logit_agreement(ref, quant, batches: list[Tensor], sampler, seed: int) -> dict:
    """Per-step and mean KL(ref || quant) and top-1 agreement over all canvas positions."""
    tee = _Tee(ref, quant, max(b.shape[1] for b in batches) + sampler.max_new_tokens + 32)
    for i, b in enumerate(batches):
        generate(tee, b, sampler, torch.Generator().manual_seed(seed + i))
    kl = {s: float(torch.cat(v).mean()) for s, v in sorted(tee.kl.items())}
    top1 = {s: float(torch.cat(v).mean()) for s, v in sorted(tee.top1.items())}
    n = sum(x.numel() for v in tee.kl.values() for x in v)
    return {"kl_per_step": kl, "top1_per_step": top1, "kl_mean": float(torch.cat(sum(tee.kl.values(), [])).mean()),
            "top1_mean": float(torch.cat(sum(tee.top1.values(), [])).mean()), "positions": n}


def sampler_agreement(ref, quant, batches: list[Tensor], sampler, seed: int) -> dict:
    """Same seed, separate runs: tokens per forward of each, fraction of equal generated tokens."""
    ctx = max(b.shape[1] for b in batches) + sampler.max_new_tokens + 32
    tpf = {"bf16": [], "quant": []}
    equal = total = 0
    for i, b in enumerate(batches):
        outs = {}
        for name, m in (("bf16", ref), ("quant", quant)):
            res = generate(TorchBackend(m, ctx), b, sampler, torch.Generator().manual_seed(seed + i))
            outs[name] = res.new_tokens
            tpf[name] += res.tokens_per_forward.tolist()
        a, q = outs["bf16"], outs["quant"]
        w = min(a.shape[1], q.shape[1])
        equal += int((a[:, :w] == q[:, :w]).sum())
        total += a.shape[0] * max(a.shape[1], q.shape[1])  # a canvas one run did not make counts as disagreement
    return {"tpf_bf16": sum(tpf["bf16"]) / len(tpf["bf16"]), "tpf_quant": sum(tpf["quant"]) / len(tpf["quant"]),
            "token_agreement": equal / total}


WEIGHT_BITS = {"fp8": 8, "nvfp4": 4}


def _agreement(ref, model, sets: dict[str, list[Tensor]], sampler, fixed, seed: int) -> dict:
    return {name: {"prompts": sum(b.shape[0] for b in batches), **logit_agreement(ref, model, batches, fixed, seed),
                   **sampler_agreement(ref, model, batches, sampler, seed)} for name, batches in sets.items()}


def quality_report(ref, quant, precision: str, ck_path: Path, sampler, sets: dict[str, list[Tensor]], out: Path,
                   eval_n: int = 100, seed: int = 0, steps: int = 8, recipe: dict | None = None,
                   dequantized=None) -> dict:
    """Write out/quality.json and out/quality.md; returns the record.

    Two quantized models against the reference: `quant`, ModelOpt's fake-quant model (`sets`, `task_accuracy`;
    W4A4 / W8A8, or W4A16 for a weight-only recipe), and `dequantized`, the written checkpoint with its weights
    dequantized and activations in the model dtype (dgemma.model.quantized.load_quantized): the W4A16 / W8A16 path
    of a weight-only-dequantizing backend (section `dequantized`)."""
    bits = WEIGHT_BITS[precision]
    act = recipe is None or recipe.get("activations_quantized", True)
    fixed = sampler.replace(max_denoising_steps=steps, adaptive_stopping=False)
    rec = {"precision": precision, "recipe": recipe, "fake_quant_mode": f"W{bits}A{bits if act else 16}",
           "reference": "checkpoint dtype (bf16)", "seed": seed, "logit_steps": steps,
           "sets": _agreement(ref, quant, sets, sampler, fixed, seed)}
    acc = {"n": eval_n}
    for name, m in (("bf16", ref), (precision, quant)):
        r = evaluate(ck_path, n=eval_n, backend=TorchBackend(m, max_context=256))
        acc[name] = r["accuracy"]
        acc[f"{name}_tokens_per_forward"] = r["tokens_per_forward"]
        acc[f"{name}_steps_per_canvas"] = r["mean_steps_per_canvas"]
    rec["task_accuracy"] = acc
    if dequantized is not None:
        r = evaluate(ck_path, n=eval_n, backend=TorchBackend(dequantized, max_context=256))
        rec["dequantized"] = {
            "mode": f"W{bits}A16",
            "model": "checkpoint weights dequantized (dgemma.model.quantized.load_quantized), activations "
                     "unquantized in the model dtype",
            "sets": _agreement(ref, dequantized, sets, sampler, fixed, seed),
            "task_accuracy": {"n": eval_n, "accuracy": r["accuracy"], "tokens_per_forward": r["tokens_per_forward"],
                              "steps_per_canvas": r["mean_steps_per_canvas"]}}
    (out / "quality.json").write_text(json.dumps(rec, indent=2) + "\n")
    (out / "quality.md").write_text(markdown(rec))
    return rec


def markdown(rec: dict) -> str:
    p, a = rec["precision"], rec["task_accuracy"]
    fq = f"fake quant {rec.get('fake_quant_mode', '')}".strip()
    rows = [(fq, rec)] + ([(f"checkpoint {rec['dequantized']['mode']}", rec["dequantized"])]
                          if "dequantized" in rec else [])
    r = rec.get("recipe") or {}
    lines = [f"# Quantization quality: {p} vs bf16", ""]
    if r:
        alg = r["algorithm"]
        if isinstance(alg, dict):  # {"method": "mse", "fp8_scale_sweep": True} -> mse (fp8_scale_sweep=True)
            opts = ", ".join(f"{k}={v}" for k, v in alg.items() if k != "method")
            alg = f"{alg.get('method')}" + (f" ({opts})" if opts else "")
        lines += [f"Recipe `{r['name']}` (ModelOpt `{r['modelopt_cfg']}`, algorithm `{alg}`): {r['summary']}.", ""]
    lines += [f"Denoiser logits over {rec['logit_steps']} fixed steps per canvas, both models fed the bf16 trajectory; "
              "sampler metrics from separate adaptive runs with the same seed. Models: "
              f"`{fq}` is ModelOpt's fake-quant model as calibrated"
              + (f"; `{rows[1][0]}` is the written checkpoint, weights dequantized, activations unquantized (the "
                 "path of a backend that dequantizes weights in registers)." if len(rows) > 1 else "."), "",
              "| model | set | prompts | KL(bf16‖q) mean | top-1 mean | token agreement | TPF bf16 | TPF q |",
              "|---|---|---|---|---|---|---|---|"]
    for label, row in rows:
        for name, s in row["sets"].items():
            lines.append(f"| {label} | {name} | {s['prompts']} | {s['kl_mean']:.4g} | {s['top1_mean']:.4f} | "
                         f"{s['token_agreement']:.4f} | {s['tpf_bf16']:.2f} | {s['tpf_quant']:.2f} |")
    lines += ["", "Per step (step: KL / top-1):", ""]
    for label, row in rows:
        for name, s in row["sets"].items():
            per = ", ".join(f"{k}: {s['kl_per_step'][k]:.3g} / {s['top1_per_step'][k]:.3f}" for k in s["kl_per_step"])
            lines.append(f"- {label}, {name}: {per}")
    lines += ["", f"Sorting task (dgemma.tiny.task.evaluate, n={a['n']} held-out prompts, adaptive sampler):", "",
              "| model | accuracy | tokens per forward | steps per canvas |", "|---|---|---|---|",
              f"| bf16 | {a['bf16']:.2%} | {a['bf16_tokens_per_forward']:.2f} | {a['bf16_steps_per_canvas']:.2f} |",
              f"| {fq} | {a[p]:.2%} | {a[f'{p}_tokens_per_forward']:.2f} | {a[f'{p}_steps_per_canvas']:.2f} |"]
    if "dequantized" in rec:
        d = rec["dequantized"]["task_accuracy"]
        lines.append(f"| {rows[1][0]} | {d['accuracy']:.2%} | {d['tokens_per_forward']:.2f} | "
                     f"{d['steps_per_canvas']:.2f} |")
    return "\n".join(lines + [""])
