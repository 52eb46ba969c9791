"""Hardware reports from benchmark results: markdown + PNG plots per GPU and precision, and one
comparison table across every result present. Our numbers stand beside the published anchors
(anchors.md §1.2, same definitions) and beside the roofline of the same run.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from ..core.errors import ArtifactError
from ..core.manifest import write_text_atomic

# Published figures with their conditions (anchors.md §1.2/§1.3). gen = generation tok/s, prefill excluded.
ANCHORS = {
    ("h100", "fp8"): [("vLLM blog (2026-06)", 1008, "gen tok/s, batch 1, fixed 16 steps, 1024/1024 random"),
                      ("vLLM AR Gemma 4 26B-A4B, no MTP", 197, "same setting, autoregressive")],
    ("h200", "fp8"): [("vLLM blog (2026-06)", 1288, "gen tok/s, batch 1, fixed 16 steps, 1024/1024 random"),
                      ("vLLM AR Gemma 4 26B-A4B, no MTP", 213, "same setting, autoregressive")],
    ("rtx5090", "nvfp4"): [("Google/NVIDIA blogs", 700, "'700+ tok/s', precision and steps not stated")],
    ("dgx-spark", "nvfp4"): [("NVIDIA blogs", 150, "'~150 tok/s', precision and steps not stated")],
}


def anchors_for(gpu: str, precision: str) -> list[tuple[str, float, str]]:
    """Anchors for this GPU; those published at another precision are labelled with it."""
    exact = ANCHORS.get((gpu, precision))
    if exact:
        return exact
    return [(f"{name} [{p}]", v, cond) for (g, p), rows in ANCHORS.items() if g == gpu for name, v, cond in rows]


def load_results(results_dir: Path, gpu: str | None = None, precision: str | None = None) -> list[dict]:
    out = []
    for f in sorted(Path(results_dir).glob("*/*/*.json")):
        g, p = f.parent.parent.name, f.parent.name
        if (gpu and g != gpu) or (precision and p != precision):
            continue
        try:
            rec = json.loads(f.read_text())
        except json.JSONDecodeError:
            continue
        rec["_file"] = str(f.relative_to(results_dir))
        out.append(rec)
    return out


def _fmt(x, nd=1):
    """A figure for a table; None and NaN (nothing measured, or no floor on the CPU profile) print as –."""
    if x is None or (isinstance(x, float) and x != x):
        return "–"
    return f"{x:,.{nd}f}" if isinstance(x, (int, float)) else str(x)


def params(n: int) -> str:
    """A parameter count in the unit that fits it: 1.23 M for the tiny model, 25.82 B for the real one."""
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n:,}"


def _ratio(a, b):
    return a / b if a is not None and b and b == b else None


def _concurrency_table(r: dict) -> list[str]:
    if "concurrency" not in r["concurrency"][0]:  # in-process batch sweep
        return ["", "| batch | gen tok/s | requests/s | step p50 ms |", "|---|---|---|---|"] + [
            f"| {c['batch']} | {_fmt(c['tok_s'])} | {_fmt(c['requests_s'], 3)} | {_fmt(c['step_ms_p50'], 2)} |"
            for c in r["concurrency"]]
    rows = ["", f"Through Triton gRPC ({r['backend']}, closed loop, each level sends level x "
                f"{r['scenario'].get('rounds', '?')} requests):", "",
            "| concurrency | requests | requests/s | tok/s | latency p50 / p99 ms | TTFC p50 / p99 ms | rows per step "
            "| answers |",
            "|---|---|---|---|---|---|---|---|"]
    for c in r["concurrency"]:
        ok = "all correct" if c["all_correct"] else f"**{len(c['problems'])}+ wrong**"
        rows.append(f"| {c['concurrency']} | {c['requests']} | {_fmt(c['requests_s'], 2)} | {_fmt(c['tok_s'])} | "
                    f"{_fmt(c['latency_ms_p50'])} / {_fmt(c['latency_ms_p99'])} | {_fmt(c['ttfc_ms_p50'])} / "
                    f"{_fmt(c['ttfc_ms_p99'])} | {_fmt(c.get('mean_rows_per_step'), 2)} | {ok} |")
    return rows


def _plots(recs: list[dict], stem: str, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    conc = [r for r in recs if r.get("concurrency")]
    if conc:  # in-process entries sweep the batch, Triton entries the concurrent gRPC requests
        served = [r for r in conc if "concurrency" in r["concurrency"][0]]
        fig, axes = plt.subplots(1, 2 if served else 1, figsize=(9.5 if served else 5, 3.2), squeeze=False)
        ax = axes[0][0]
        for r in conc:
            level = [c.get("concurrency", c.get("batch")) for c in r["concurrency"]]
            mode = "concurrent requests" if "concurrency" in r["concurrency"][0] else "batch"
            ax.plot(level, [c["tok_s"] for c in r["concurrency"]], "o-", label=f"{r['backend']} ({mode})")
        ax.set_xlabel("concurrency (gRPC requests in flight, or batch)"), ax.set_ylabel("tok/s"), ax.set_ylim(bottom=0)
        ax.legend(fontsize=7), ax.set_title("throughput vs concurrency")
        if served:
            ax = axes[0][1]
            for r in served:
                level = [c["concurrency"] for c in r["concurrency"]]
                ax.plot(level, [c["latency_ms_p50"] for c in r["concurrency"]], "o-", label=f"{r['backend']} p50")
                ax.plot(level, [c["latency_ms_p99"] for c in r["concurrency"]], "s--", label=f"{r['backend']} p99")
            ax.set_xlabel("concurrent gRPC requests"), ax.set_ylabel("request latency (ms)"), ax.set_ylim(bottom=0)
            ax.legend(fontsize=7), ax.set_title("latency vs concurrency")
        levels = sorted({c.get("concurrency", c.get("batch")) for r in conc for c in r["concurrency"]})
        for ax in axes[0]:
            ax.set_xscale("log", base=2), ax.set_xticks(levels, [str(x) for x in levels]), ax.minorticks_off()
        fig.tight_layout()
        written.append(_save(fig, out_dir / f"{stem}-concurrency.png"))
    lat = [(f"{r['scenario']['name']}/{r['backend']}", r["runs"][-1]["step_latencies_ms"]) for r in recs
           if r.get("runs") and r["runs"][-1].get("step_latencies_ms")]  # not observable through Triton
    if lat:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for name, xs in lat:
            ax.hist(xs, bins=30, alpha=0.6, label=name)
        ax.set_xlabel("denoising step latency (ms)"), ax.set_ylabel("steps"), ax.legend(fontsize=7)
        ax.set_title("step latency distribution"), fig.tight_layout()
        written.append(_save(fig, out_dir / f"{stem}-step-latency.png"))
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for i, r in enumerate(r for r in recs if r.get("runs")):
            spc = r["runs"][-1]["steps_per_canvas"]
            ax.bar([x + 0.8 * i / max(1, len(lat)) for x in range(len(spc))], spc, width=0.8 / max(1, len(lat)),
                   label=f"{r['scenario']['name']}/{r['backend']}")
        ax.set_xlabel("canvas"), ax.set_ylabel("denoising steps"), ax.legend(fontsize=7)
        ax.set_title("steps per canvas"), fig.tight_layout()
        written.append(_save(fig, out_dir / f"{stem}-steps-per-canvas.png"))
    anchor_runs = [r for r in recs if r["scenario"]["name"] == "anchor" and r["metrics"].get("generation_tok_s")]
    if anchor_runs:
        r = max(anchor_runs, key=lambda x: x["metrics"]["generation_tok_s"])
        key = (r["gpu_profile"]["name"], r["precision"])
        bars = [(f"dgemma {r['backend']}", r["metrics"]["generation_tok_s"]),
                ("roofline ceiling", r["roofline"]["ceiling_tok_s_at_16_steps"])]
        bars += [(name, v) for name, v, _ in anchors_for(*key)]
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        ax.barh([b[0] for b in bars], [b[1] for b in bars], color=["C0", "C7"] + ["C1"] * (len(bars) - 2))
        ax.set_xlabel("generation tok/s (batch 1, 16 steps)"), ax.set_title(f"{key[0]} {key[1]}: ours vs anchors")
        fig.tight_layout()
        written.append(_save(fig, out_dir / f"{stem}-vs-anchors.png"))
    return written


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def gpu_report(gpu: str, precision: str, results_dir: Path, out_dir: Path) -> Path:
    recs = load_results(results_dir, gpu, precision)
    if not recs:
        raise ArtifactError(f"no results under {results_dir}/{gpu}/{precision}/. Run: make bench GPU={gpu} "
                            f"PRECISION={precision}")
    stem = f"{gpu}-{precision}"
    env = recs[-1]["environment"]
    lines = [f"# dgemma benchmark report: {gpu} / {precision}", ""]
    device = env.get("gpu_name", "CPU (no GPU)")
    lines += [f"Device: **{device}**" + (f" (compute capability {env['compute_capability']}, driver "
                                          f"{env.get('driver')}, CUDA {env.get('cuda')})" if "gpu_name" in env else ""),
              f"torch {env['torch']}, dgemma {env['dgemma']} @ {env['git_commit']}; checkpoint: "
              f"{recs[-1]['checkpoint']} ({params(recs[-1]['model']['param_count'])} text params, canvas "
              f"{recs[-1]['model']['canvas_length']}).", ""]
    if recs[-1]["checkpoint"] == "synthetic":
        lines += ["Full-size shapes with random weights: step cost is that of the real model, but random weights never "
                  "converge, so `adaptive` measures the 48-step worst case (tokens per forward 256/48).", ""]
    lines += ["| scenario | backend | gen tok/s | e2e tok/s | step p50 / p99 ms | denoise p50 ms | commit ms | "
              "prefill ms | TTFC ms | steps/canvas | TPF | floor ms | step / floor | x AR |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        m, rf = r["metrics"], r["roofline"]
        lines.append(
            f"| {r['scenario']['name']} | {r['backend']} | {_fmt(m['generation_tok_s'])} | {_fmt(m['e2e_tok_s'])} | "
            f"{_fmt(m['step_ms_p50'], 2)} / {_fmt(m['step_ms_p99'], 2)} | {_fmt(m['denoise_ms_p50'], 2)} | "
            f"{_fmt(m.get('commit_ms_mean'), 2)} | {_fmt(m['prefill_ms'])} | {_fmt(m['time_to_first_canvas_ms'])} | "
            f"{_fmt(m['mean_steps_per_canvas'])} | {_fmt(m['tokens_per_forward'], 2)} | {_fmt(rf['step_floor_ms'], 2)} | "
            f"{_fmt(_ratio(m['step_ms_p50'], rf['step_floor_ms']), 2)} | "
            f"{_fmt(m.get('diffusion_over_ar'), 2)} |")
    anchors = anchors_for(gpu, precision)
    if anchors:
        lines += ["", "Published anchors for this GPU (anchors.md §1.2):", ""]
        lines += [f"- {name}: **{v:,} tok/s** ({cond})" for name, v, cond in anchors]
    roof = recs[-1]["roofline"]
    if roof["hbm_gbs"]:
        lines += ["", f"Roofline (per denoising step, batch 1): {roof['total_gb']:.2f} GB moved at {roof['hbm_gbs']:g} "
                  f"GB/s = **{roof['step_floor_ms']:.2f} ms** floor, {roof['ceiling_tok_s_at_16_steps']:,.0f} tok/s "
                  "ceiling at 16 steps. Bytes: " + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in roof["bytes"].items())
                  + "."]
    else:
        lines += ["", f"Roofline: the {gpu} profile has no memory bandwidth, so there is no floor (–); a step moves "
                  f"{roof['total_gb'] * 1e3:,.1f} MB."]
    for r in recs:
        if r.get("ar_baseline", {}).get("available"):
            a = r["ar_baseline"]
            lines.append(f"\nAR baseline ({r['backend']}): {a['tok_s']:.1f} tok/s ({a['ms_per_token']:.2f} ms/token, "
                         "greedy, one token per encoder pass, same backend and precision).")
        if r.get("concurrency"):
            lines += _concurrency_table(r)
        if r.get("triton_overhead", {}).get("available"):
            o = r["triton_overhead"]
            lines.append(f"\nTriton overhead ({r['scenario']['name']}, {o['requests']} requests, same prompts and seeds "
                         f"in-process, one at a time): **x{o['ratio_per_request']:.2f} per request** "
                         f"({_fmt(o['e2e_ms_triton_p50'])} vs {_fmt(o['e2e_ms_in_process_p50'])} ms, "
                         f"{_fmt(o['overhead_ms_per_request'])} ms), {_fmt(o['overhead_ms_per_step'], 2)} ms per "
                         f"denoising step" + (f", x{o['ratio_per_step']:.2f} inter-canvas time per step"
                                              if o.get("ratio_per_step") else "") + ".")
        if r.get("long_context"):
            lines += ["", "| prompt tokens | prefill ms | step p50 ms | gen tok/s |", "|---|---|---|---|"]
            lines += [f"| {c['prompt_tokens']} | {_fmt(c['prefill_ms'])} | {_fmt(c['step_ms_p50'], 2)} | "
                      f"{_fmt(c['generation_tok_s'])} |" for c in r["long_context"]]
    if any(r["backend"] == "triton" for r in recs):
        lines += ["", "Triton rows are measured by a gRPC client (streaming, one response per committed canvas): "
                  "per-step, denoise, commit and prefill times are not observable there (–); gen tok/s is the "
                  "inter-canvas rate (canvas length / mean time between canvases)."]
    tel = recs[-1]["telemetry"]
    lines += ["", "GPU telemetry: " + (
        f"{tel['samples']} samples, util mean {tel['gpu_util']['mean']:.0f}%, SM clock mean "
        f"{tel['sm_clock_mhz']['mean']:.0f} MHz, power mean {tel['power_w']['mean']:.0f} W (max "
        f"{tel['power_w']['max']:.0f}), memory used max {tel['mem_used_gib']['max']:.1f} GiB."
        if tel.get("available") else f"not collected: {tel.get('reason')}.")]
    plots = _plots(recs, stem, out_dir)
    lines += [""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "Results: " + ", ".join(f"`bench/results/{r['_file']}`" for r in recs)]
    path = out_dir / f"{stem}.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def comparison_report(results_dir: Path, out_dir: Path) -> Path:
    recs = load_results(results_dir)
    lines = ["# dgemma: all results", "", "| GPU | precision | scenario | backend | device | gen tok/s | step p50 ms | "
             "floor ms | steps/canvas | anchor tok/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        g, p = r["gpu_profile"]["name"], r["precision"]
        anchor = ANCHORS.get((g, p), [(None, None, None)])[0][1]
        m = r["metrics"]
        lines.append(f"| {g} | {p} | {r['scenario']['name']} | {r['backend']} | "
                     f"{r['environment'].get('gpu_name', 'CPU')} | {_fmt(m['generation_tok_s'])} | "
                     f"{_fmt(m['step_ms_p50'], 2)} | {_fmt(r['roofline']['step_floor_ms'], 2)} | "
                     f"{_fmt(m['mean_steps_per_canvas'])} | {_fmt(anchor, 0)} |")
    if not recs:
        lines.append("| – | – | – | – | no results yet: run `make bench` | | | | | |")
    path = out_dir / "all.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def summary_line(recs: list[dict]) -> str:
    m = [r["metrics"]["generation_tok_s"] for r in recs]
    return f"{len(recs)} results, median gen {statistics.median(m):,.1f} tok/s" if m else "no results"
