"""Capacity planning for `dgemma deploy`: how many replicas of which GPU serve a load of 1024-in / 1024-out requests
at a latency, the autoscaler's per-pod targets, and how long a new replica takes to serve. Pure functions over
per-replica figures; the tables of docs/scaling.md are generated from here (tests compare them).

Every figure says where it comes from: `measured` (bench/results/h100/fp8, the in-process `fast` backend at batch 1,
16 fixed steps), `derived` (measured runs combined under a stated assumption), `same-SMs` (H200 taken as H100: a
projection), `plan` (projected from kernels.md's ranked plan), or `roofline` (the memory floor per step: a
ceiling, never reached).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CANVAS = 256
OUT_TOKENS = 1024  # the anchor workload: 1024 prompt tokens, 1024 generated (4 canvases), 16 fixed steps
CANVASES = OUT_TOKENS // CANVAS
STEPS = 16
MEASURED_SOURCE = "bench/results/h100/fp8/20261123T085634Z-60f640b-{anchor,concurrency}-fast.json"

# measured, H100 80GB HBM3, fp8, `fast` backend (the report's runs, bench/reports/h100-fp8.md)
H100_ANCHOR_E2E_S = 2.516  # anchor: one 1024/1024 request at batch 1, prefill included
H100_COMMIT_MS = 28.14  # concurrency run, batch 1: one commit (re-encoding a 256-token canvas)
# concurrency run (1024 in / 512 out, 2 canvases): batch -> (requests/s, step p50 ms)
H100_CONCURRENCY = {1: (0.7815, 34.10), 2: (0.8634, 44.14), 4: (1.1640, 70.64)}
ROOFLINE_GB_PER_STEP = 28.24  # bytes a batch-1 fp8 step must move (bench JSON `roofline.total_gb`)
HBM_GBS = {"h100": 3350, "h200": 4800, "b200": 8000}  # GpuProfile.hbm_gbs
# kernels.md "Projection": items 1-5 bring an fp8 step to 11-12 ms on H100 and 8.5-9 ms on H200; commit ~9 ms,
# prefill ~15 ms (item 7). Midpoints below; batch 1 only (the plan gives no batched figure).
PROJECTED_STEP_MS = {"h100": 11.5, "h200": 8.75}
PROJECTED_COMMIT_MS, PROJECTED_PREFILL_MS = 9.0, 15.0


@dataclass(frozen=True)
class ReplicaFigures:
    """One GPU (one Triton model instance) serving `batch` requests at once."""

    gpu: str
    precision: str
    batch: int
    latency_s: float  # one 1024/1024 request, first byte in to last canvas out, at this batch
    basis: str  # measured | derived | same-SMs | plan | roofline
    note: str

    @property
    def requests_s(self) -> float:
        return self.batch / self.latency_s


def derived_latency_s(batch: int) -> float:
    """A 1024/1024 request at `batch` on H100 fp8 from the measured 512-token concurrency run: two more canvases at
    the measured step time of that batch; a commit at batch b assumed to cost b x the measured batch-1 commit."""
    rps, step_ms = H100_CONCURRENCY[batch]
    extra = (CANVASES - 2) * (STEPS * step_ms + batch * H100_COMMIT_MS) / 1000
    return batch / rps + extra


def request_latency_s(step_ms: float, commit_ms: float, prefill_ms: float) -> float:
    return (prefill_ms + CANVASES * (STEPS * step_ms + commit_ms)) / 1000


def figures() -> list[ReplicaFigures]:
    rows = [ReplicaFigures("h100", "fp8", 1, H100_ANCHOR_E2E_S, "measured", "anchor scenario, batch 1")]
    rows += [ReplicaFigures("h100", "fp8", b, derived_latency_s(b), "derived",
                            f"concurrency run at batch {b} + 2 canvases") for b in (2, 4)]
    # H200 = GH100 with more, faster HBM: today's step is 4x its memory floor on H100 (compute and launch bound),
    # so the same SMs give about the same step; H100's figures stand in until an H200 run exists
    rows += [ReplicaFigures("h200", "fp8", r.batch, r.latency_s, "same-SMs", "= H100 (same SMs; not bandwidth "
                            "bound today)") for r in rows[:3]]
    for gpu, step in PROJECTED_STEP_MS.items():
        rows.append(ReplicaFigures(gpu, "fp8", 1, request_latency_s(step, PROJECTED_COMMIT_MS, PROJECTED_PREFILL_MS),
                                   "plan", f"kernels.md plan items 1-5: {step:g} ms/step"))
    for gpu, gbs in HBM_GBS.items():
        floor_ms = ROOFLINE_GB_PER_STEP / gbs * 1000
        rows.append(ReplicaFigures(gpu, "fp8", 1, request_latency_s(floor_ms, 0, 0), "roofline",
                                   f"{floor_ms:.2f} ms/step memory floor, nothing else"))
    return rows


def replicas_for(load_rps: float, fig: ReplicaFigures, utilization: float = 0.7) -> int:
    """GPUs (replicas of one GPU each) for `load_rps`, each run at `utilization` of its full-batch throughput: the
    headroom that keeps queueing short under bursty (Poisson-like) arrivals."""
    if load_rps <= 0 or not 0 < utilization <= 1:
        raise ValueError(f"load must be > 0 and utilization in (0, 1] (got {load_rps}, {utilization})")
    return math.ceil(load_rps / (fig.requests_s * utilization))


def best_for_latency(rows: list[ReplicaFigures], latency_s: float) -> ReplicaFigures | None:
    """The highest-throughput row whose request latency fits `latency_s` (None: nothing fits)."""
    fits = [r for r in rows if r.latency_s <= latency_s]
    return max(fits, key=lambda r: r.requests_s) if fits else None


# -- the autoscaler and the startup budget -----------------------------------------------------------------------
def hpa_targets(max_batch: int, gpus: int) -> tuple[int, int]:
    """Per-pod averages the HPA holds: (queued requests, active requests). A pod has max_batch slots per GPU. Half a
    batch waiting adds about half a request's time of queueing; three quarters of the slots busy leaves room for a
    burst while a new replica starts (minutes, `scale_up_seconds`)."""
    slots = max_batch * gpus
    return max(1, slots // 2), max(1, math.ceil(0.75 * slots))


GIB = 1024**3 / 1e9  # GB per GiB
READ_GBS = 0.5  # assumed read rate of a network RWX volume (engines, checkpoint); local NVMe is ~5x faster
SERVER_FIXED_S = 120  # CUDA contexts, Triton + python stub start, tokenizer, first request warm-up (estimate)
PROBE_PERIOD_S = 10


def load_seconds(weights_gib: float, engines: int = 2, read_gbs: float = READ_GBS) -> float:
    """Time from container start to ready: every engine's weights read from the volume, plus fixed start costs."""
    return engines * weights_gib * GIB / read_gbs + SERVER_FIXED_S


def startup_failure_threshold(weights_gib: float, engines: int = 2, margin: float = 2.0) -> int:
    """startupProbe failureThreshold (period PROBE_PERIOD_S): `margin` x the estimated load, at least 5 minutes."""
    return max(30, math.ceil(margin * load_seconds(weights_gib, engines) / PROBE_PERIOD_S))


# scale-up, beyond the load itself (seconds; estimates, see docs/scaling.md)
DETECT_S = {"scrape": 15, "adapter and HPA sync": 30, "scale-up stabilisation window": 60}
POD_START_S = {"schedule on a free GPU node": 5, "image pull (~15 GB at 250 MB/s; 0 when cached)": 60,
               "engine check (cache hit)": 15}
ENGINE_BUILD_S = 30 * 60  # unmeasured: a TensorRT build of two 26B graphs; say 30 min until `make engines` times it


def scale_up_seconds(weights_gib: float, image_cached: bool = False, engines_cached: bool = True) -> dict[str, float]:
    """From the queue crossing its target to the new replica taking traffic, step by step."""
    steps = dict(DETECT_S)
    for k, v in POD_START_S.items():
        steps[k] = 0 if (image_cached and k.startswith("image")) else v
    if not engines_cached:
        steps["engine build (cold cache, unmeasured)"] = ENGINE_BUILD_S
    steps["engines + server load"] = load_seconds(weights_gib)
    steps["total"] = sum(steps.values())
    return steps


# -- the tables of docs/scaling.md -------------------------------------------------------------------------------
def figures_table() -> str:
    rows = ["| GPU | precision | batch | request latency s | requests/s per GPU | basis | note |",
            "|---|---|---|---|---|---|---|"]
    for r in figures():
        rows.append(f"| {r.gpu} | {r.precision} | {r.batch} | {r.latency_s:.2f} | {r.requests_s:.3f} | {r.basis} "
                    f"| {r.note} |")
    return "\n".join(rows)


POOLS = {"H100 today (measured/derived)": ("h100", ("measured", "derived")),
         "H100 after the kernels plan": ("h100", ("plan",)), "H200 after the kernels plan": ("h200", ("plan",))}


def plan_table(loads: tuple[float, ...] = (1, 10, 50), latencies: tuple[float, ...] = (3.0, 6.0),
               utilization: float = 0.7) -> str:
    """GPUs (and the batch each runs) for each load and latency target; H200 today = H100 today (same-SMs)."""
    rs = figures()
    rows = ["| load req/s | latency target s | " + " | ".join(f"{k}: batch, GPUs" for k in POOLS) + " |",
            "|---|---|" + "---|" * len(POOLS)]
    for lat in latencies:
        for load in loads:
            cells = []
            for gpu, bases in POOLS.values():
                best = best_for_latency([r for r in rs if r.gpu == gpu and r.basis in bases], lat)
                cells.append(f"{best.batch}, {replicas_for(load, best, utilization)}" if best else "none fits")
            rows.append(f"| {load:g} | {lat:g} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def scale_up_table(weights_gib: float) -> str:
    warm, cold = scale_up_seconds(weights_gib, image_cached=True), scale_up_seconds(weights_gib, engines_cached=False)
    rows = ["| step | warm node (image and engines cached) s | new node, engine cache empty s |", "|---|---|---|"]
    for k in cold:
        rows.append(f"| {k} | {warm.get(k, 0):.0f} | {cold[k]:.0f} |")
    return "\n".join(rows)
