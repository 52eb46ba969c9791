"""Environment capture and GPU telemetry (pynvml), degrading to a stated reason where no GPU exists."""

from __future__ import annotations

import os
import platform
import subprocess
import threading
import time
from pathlib import Path

import torch

from .. import __version__

SOURCE = Path(__file__).resolve().parent  # git metadata of an editable checkout; a wheel reports "unknown"


def git_commit() -> str:
    if os.environ.get("DGEMMA_GIT_COMMIT"):  # set where the tree travels without .git (GPU machine)
        return os.environ["DGEMMA_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=SOURCE, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device) -> dict:
    env = {"dgemma": __version__, "git_commit": git_commit(), "python": platform.python_version(),
           "torch": torch.__version__, "host": platform.machine(), "device": str(device)}
    for mod in ("tensorrt", "tensorrt_rtx", "onnxruntime", "modelopt", "triton", "tritonclient"):
        try:
            m = __import__(mod)
            env[mod] = getattr(m, "__version__", "present")
        except Exception:  # noqa: BLE001 - optional, absent or broken installs are both "not there"
            continue
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu_name=p.name, compute_capability=f"{p.major}.{p.minor}", gpu_memory_gib=p.total_memory / 1024**3,
                   sm_count=p.multi_processor_count, cuda=torch.version.cuda)
        try:
            import pynvml

            pynvml.nvmlInit()
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception as e:  # noqa: BLE001 - pynvml missing or NVML unavailable
            env["driver"] = f"unknown ({type(e).__name__})"
    return env


class Telemetry:
    """Samples utilisation, SM clock, power and memory every `interval` s on a thread while active."""

    def __init__(self, device: torch.device, interval: float = 0.1):
        self.samples: list[dict] = []
        self.reason = None
        self.interval = interval
        self._stop = threading.Event()
        self._thread = None
        self._handle = None
        if device.type != "cuda":
            self.reason = "no GPU on this machine (CPU run): telemetry not collected"
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        except Exception as e:  # noqa: BLE001
            self.reason = f"NVML unavailable ({type(e).__name__}: {e})"

    def _loop(self):
        n, h = self._nvml, self._handle
        while not self._stop.is_set():
            try:
                u = n.nvmlDeviceGetUtilizationRates(h)
                self.samples.append({"t": time.time(), "gpu_util": u.gpu, "mem_util": u.memory,
                                     "sm_clock_mhz": n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM),
                                     "power_w": n.nvmlDeviceGetPowerUsage(h) / 1000,
                                     "mem_used_gib": n.nvmlDeviceGetMemoryInfo(h).used / 1024**3})
            except Exception as e:  # noqa: BLE001
                self.reason = f"NVML sampling failed ({e})"
                return
            self._stop.wait(self.interval)

    def __enter__(self):
        if self._handle is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join()

    def summary(self) -> dict:
        if not self.samples:
            return {"available": False, "reason": self.reason or "no samples"}
        out = {"available": True, "samples": len(self.samples)}
        for k in ("gpu_util", "mem_util", "sm_clock_mhz", "power_w", "mem_used_gib"):
            xs = [s[k] for s in self.samples]
            out[k] = {"mean": sum(xs) / len(xs), "max": max(xs)}
        return out
