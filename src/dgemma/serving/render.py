"""Render triton_repo/ (committed templates) into build/triton/<gpu>/<precision>/.

Layout of the output: `models/` (the Triton model repository: config.pbtxt from each config.pbtxt.tmpl via
string.Template.substitute, model.py copied) and `backends/python/` (the python backend + the stub for this
interpreter, copied from the nvidia-pytriton wheel, toolchain.md §3.1). Values come from the GpuProfile and the
checkpoint; IO blocks of the ensemble and preprocess are generated from dgemma.serving.canvas_loop.INPUTS.
The stub finds the venv through PATH (server.py puts the venv's bin first, toolchain.md §3.2).
"""

from __future__ import annotations

import shutil
import string
import sys
import sysconfig
from pathlib import Path

from .. import __version__
from ..errors import ArtifactError
from .canvas_loop import INPUTS

ROOT = Path(__file__).resolve().parents[3]
TEMPLATES = ROOT / "triton_repo"
BUILD = ROOT / "build" / "triton"
MODELS = ("preprocess", "canvas_loop", "postprocess", "dgemma")


def wheel_dir() -> Path:
    """pytriton's bundled Triton (bin/, backends/, python_backend_stubs/) in this environment."""
    d = Path(sysconfig.get_paths()["purelib"]) / "pytriton" / "tritonserver"
    if not (d / "bin" / "tritonserver").exists():
        raise ArtifactError(f"{d}/bin/tritonserver not found: install the serving extra "
                            "(pip install -e '.[serve]', i.e. nvidia-pytriton==0.7.0).")
    return d


def _io_blocks() -> dict[str, str]:
    inputs, maps = [], []
    for name, (dtype, optional) in INPUTS.items():
        opt = " optional: true" if optional else ""
        inputs.append(f'  {{ name: "{name}" data_type: {dtype} dims: [ 1 ]{opt} }}')
        maps.append(f'      {{ key: "{name}" value: "{name}" }}')
    return {"inputs": ",\n".join(inputs), "input_map": "    input_map [\n" + ",\n".join(maps) + " ]"}


def _parameters(values: dict[str, object]) -> str:
    rows = [f'  {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in values.items()]
    return "parameters [\n" + ",\n".join(rows) + "\n]"


def render(gpu: str = "cpu", precision: str = "bf16", checkpoint: str | Path | None = None,
           out: str | Path | None = None, backend: str = "torch", threads: int | None = None,
           canvas_loop_instances: int = 1, templates: Path = TEMPLATES, backends: bool = True) -> Path:
    """Write the model repository and backend directory; returns the output root (…/<gpu>/<precision>)."""
    from ..checkpoint import load_config
    from ..profiles import resolve
    from ..tiny import ensure_tiny

    target = resolve(gpu, precision)
    ck = Path(checkpoint).resolve() if checkpoint else ensure_tiny()
    if not (ck / "config.json").exists():
        raise ArtifactError(f"{ck}/config.json not found: --checkpoint must be a DiffusionGemma checkpoint dir.")
    mcfg, scfg = load_config(ck)
    root = Path(out) if out else BUILD / target.gpu.name / target.precision.value
    params = {
        "dgemma_version": __version__, "target": target.key, "checkpoint": ck,
        "max_prompt": target.gpu.max_prompt, "max_context": target.gpu.max_context,
        "canvas_length": mcfg.canvas_length, "max_denoising_steps": scfg.max_denoising_steps,
        "default_max_tokens": scfg.max_new_tokens, "default_entropy_bound": scfg.entropy_bound,
        "backend": backend, "onnx_dir": ROOT / "build" / "onnx" / target.precision.value,
        "threads": threads or "",
    }
    values = {"target": target.key, "parameters": _parameters(params),
              "canvas_loop_instances": canvas_loop_instances, **_io_blocks()}
    models = root / "models"
    if models.exists():
        shutil.rmtree(models)
    for name in MODELS:
        src = templates / name
        tmpl = (src / "config.pbtxt.tmpl").read_text()
        text = string.Template(tmpl).substitute(values)  # a missing key raises KeyError
        assert "${" not in text, f"{src}/config.pbtxt.tmpl: unrendered placeholder left"
        (models / name / "1").mkdir(parents=True)
        (models / name / "config.pbtxt").write_text(text)
        if (src / "1" / "model.py").exists():
            shutil.copy2(src / "1" / "model.py", models / name / "1" / "model.py")
    if not backends:
        return root
    wd = wheel_dir()
    bk = root / "backends" / "python"
    bk.mkdir(parents=True, exist_ok=True)
    for f in (wd / "backends" / "python").iterdir():
        if f.is_file():
            shutil.copy2(f, bk / f.name)
    stub = wd / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / \
        "triton_python_backend_stub"
    if not stub.exists():
        raise ArtifactError(f"{stub} not found: nvidia-pytriton 0.7.0 ships stubs for Python 3.8..3.13 only.")
    shutil.copy2(stub, bk / stub.name)
    return root


def cmd_repo(args) -> int:
    root = render(args.gpu, args.precision, args.checkpoint, args.out, backend=args.backend)
    print(f"wrote {root}/models ({', '.join(MODELS)}) and {root}/backends/python")
    return 0


def add_parsers(sub) -> None:
    r = sub.add_parser("repo", help="render triton_repo/ into build/triton/<gpu>/<precision>/")
    r.add_argument("--gpu", default="cpu")
    r.add_argument("--precision", default="bf16")
    r.add_argument("--checkpoint", help="checkpoint dir (default: the embedded trained tiny model)")
    r.add_argument("--backend", default="torch", choices=["torch", "ort"],
                   help="canvas_loop's in-process backend (ort reads build/onnx/<precision>)")
    r.add_argument("--out", help="output root (default build/triton/<gpu>/<precision>)")
    r.set_defaults(func=cmd_repo)
