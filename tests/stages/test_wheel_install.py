"""dgemma as an inference engineer deploys it: a wheel installed (not editable) into a fresh environment, the
pipeline run from another directory: quantize -> onnx -> engines (GPU=cpu) -> repo -> generate on the tiny model.
Every artifact lands in that directory and nothing is written beside the installed package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(cmd, cwd, env=None, timeout=900):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r.stdout


def _files(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


@pytest.mark.slow
def test_wheel_runs_the_pipeline_from_another_directory(tmp_path):
    pytest.importorskip("modelopt.torch.quantization")
    pytest.importorskip("tensorrt_rtx")
    dist, venv, work, tree = tmp_path / "dist", tmp_path / "venv", tmp_path / "work", tmp_path / "tree"
    work.mkdir()
    # build from a clean copy of the sources: setuptools' build/ scratch would otherwise land in the checkout
    for name in ("pyproject.toml", "README.md"):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
          str(tree)], cwd=tmp_path)
    wheel = next(dist.glob("dgemma-*.whl"))
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    py = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)], cwd=tmp_path)
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=work).strip())
    # the dependencies come from this environment's site-packages as a plain path: its editable dgemma is not
    # activated (.pth files of an added path are not processed), so the wheel is the only dgemma
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = site / "dgemma"
    where = _run([str(py), "-c", "import dgemma; print(dgemma.__file__)"], cwd=work).strip()
    assert Path(where).resolve().parent == installed.resolve()
    before = _files(installed)
    env = {k: v for k, v in os.environ.items() if k != "DGEMMA_WORKDIR"} | {"CUDA_VISIBLE_DEVICES": ""}
    dg = [str(venv / "bin" / "dgemma")]
    _run(dg + ["quantize", "--precision", "fp8", "--eval-n", "2", "--heldout", ""], cwd=work, env=env)
    _run(dg + ["onnx", "--precision", "fp8"], cwd=work, env=env)
    _run(dg + ["engines", "--gpu", "cpu", "--precision", "fp8"], cwd=work, env=env)
    _run(dg + ["repo", "--gpu", "cpu", "--precision", "bf16", "--config-only"], cwd=work, env=env)
    out = _run(dg + ["generate", "--backend", "ort", "--precision", "fp8", "--prompt", "sort: 5 2 8 1 9 0 3 3 7 4",
                     "--json"], cwd=work, env=env)
    assert '"text"' in out
    for d in ("quantize/fp8", "build/onnx/fp8", "engines/cpu/fp8"):
        assert (work / d / "manifest.json").is_file(), f"{d} missing in the work directory"
    assert (work / "build/triton/cpu/bf16/models/dgemma/config.pbtxt").is_file()
    assert _files(installed) == before, f"written beside the package: {_files(installed) - before}"
    assert not (site / "quantize").exists() and not (site / "build").exists() and not (site / "engines").exists()
