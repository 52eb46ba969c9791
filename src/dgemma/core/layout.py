"""Where every artifact lives: paths from the work directory, never from the package's location.

The work directory is `--workdir`, else the environment variable DGEMMA_WORKDIR, else the current directory, so a
wheel installed into a container writes quantize/, build/, engines/ and bench/ where the user runs it. Inputs that
ship with dgemma (the tiny checkpoint, the Triton templates, the benchmark scenarios, the calibration prompts) are
package data and are found next to the package. No other module joins artifact paths.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # the installed dgemma package
DEFAULT_CHECKPOINT = PACKAGE / "tiny" / "assets" / "tiny-sort"  # the embedded trained tiny model
TRITON_TEMPLATES = PACKAGE / "serving" / "triton_repo"
SCENARIOS = PACKAGE / "bench" / "scenarios"
CALIB_PROMPTS = PACKAGE / "quantize" / "calib" / "prompts.jsonl"
HELDOUT_PROMPTS = PACKAGE / "quantize" / "calib" / "heldout.jsonl"
WORKDIR_ENV = "DGEMMA_WORKDIR"


@dataclass(frozen=True)
class Layout:
    """Artifact paths under one work directory (`root`)."""

    root: Path

    @classmethod
    def of(cls, workdir: str | Path | None = None) -> "Layout":
        """The layout of `workdir`, else $DGEMMA_WORKDIR, else the current directory."""
        return cls(Path(workdir or os.environ.get(WORKDIR_ENV) or os.getcwd()).resolve())

    # stage outputs, in pipeline order
    def quantize(self, precision: str | None = None) -> Path:
        d = self.root / "quantize"
        return d / precision if precision else d

    def onnx(self, precision: str | None = None) -> Path:
        d = self.root / "build" / "onnx"
        return d / precision if precision else d

    def engines(self, gpu: str | None = None, precision: str | None = None) -> Path:
        d = self.root / "engines"
        return d / gpu / precision if gpu and precision else d

    def triton(self, gpu: str, precision: str) -> Path:
        return self.root / "build" / "triton" / gpu / precision

    def deploy(self, gpu: str, precision: str) -> Path:
        return self.root / "build" / "deploy" / gpu / precision

    @property
    def serve_ready_file(self) -> Path:
        """Where a running `dgemma serve` writes its addresses (`dgemma client` / `dgemma openai` read it)."""
        return self.root / "build" / "serve.json"

    @property
    def results(self) -> Path:
        return self.root / "bench" / "results"

    @property
    def reports(self) -> Path:
        return self.root / "bench" / "reports"

    @property
    def checkpoints(self) -> Path:
        return self.root / "build" / "checkpoints"

    @property
    def tools(self) -> Path:
        return self.root / "build" / "tools"


def current() -> Layout:
    """The layout of this process (`--workdir` sets DGEMMA_WORKDIR before any stage runs)."""
    return Layout.of()
