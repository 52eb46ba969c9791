"""`make repo`: render the Triton templates (package data: dgemma/serving/triton_repo/) into
build/triton/<gpu>/<precision>/ in the work directory.

Layout of the output: `models/` (the Triton model repository: config.pbtxt from each config.pbtxt.tmpl via
string.Template.substitute, model.py copied under a two-line header that puts this dgemma's source directory first
on sys.path) and `backends/python/` (the python backend + the stub for this interpreter, copied from the
nvidia-pytriton wheel, toolchain.md §3.1). Values come from the GpuProfile and the checkpoint; IO blocks come from
dgemma.core.contract (MODEL_INPUTS/MODEL_OUTPUTS for the `dgemma` model, the graphs for encoder and denoiser).

Models: `dgemma` (decoupled python: validate + tokenize, the canvas loop, detokenize) and the graphs `encoder` and
`denoiser` (template graph_python: ONNX Runtime on CPU or torch; graph_tensorrt: `platform: "tensorrt_plan"` over
engines/<gpu>/<precision>/<graph>.plan where the Triton build has the tensorrt backend). The canvas loop runs the
sampler in-process (`backend` ort | torch) or through BLS calls to `encoder`/`denoiser` (`backend` bls).
The stub finds the venv through PATH (server.py puts the venv's bin first, toolchain.md §3.2); PYTHONPATH is
ignored by the stub, hence the sys.path header.
"""

from __future__ import annotations

import shutil
import string
import sys
import sysconfig
from pathlib import Path

from .. import __version__
from ..core import contract
from ..core.contract import CANVAS_LOOP_OUTPUTS, ENSEMBLE, ENSEMBLE_STEPS, MODEL_INPUTS, MODEL_OUTPUTS, OUTPUT_IDS, io_block
from ..core.errors import ArtifactError, ConfigError
from ..core.layout import DEFAULT_CHECKPOINT, PACKAGE, TRITON_TEMPLATES, current
from ..core.manifest import check_engines
from ..core.profiles import resolve
from ..model.checkpoint import load_config
from .graph_models import check_graph_artifacts
from .loop import BACKENDS

SRC = PACKAGE.parent  # the directory the stub must import dgemma from
MODELS = (contract.MODEL, contract.ENCODER, contract.DENOISER)  # every model a default repository can hold
ENSEMBLE_MODELS = (*ENSEMBLE_STEPS, ENSEMBLE)  # the --ensemble rendering instead of `dgemma`
ENGINES = ("auto", "onnxruntime", "torch", "tensorrt")  # what computes the encoder/denoiser models
GRAPH_TEMPLATE = {"onnxruntime": "graph_python", "torch": "graph_python", "tensorrt": "graph_tensorrt"}
TEMPLATE_DIRS = ("dgemma", "graph_python", "graph_tensorrt", *ENSEMBLE_MODELS)  # under triton_repo/
MODEL_PY_FROM = {"canvas_loop": "dgemma"}  # the canvas_loop step runs the dgemma model's model.py
CPU_BACKEND = "ort"  # the canvas loop's default on GPU=cpu: measured faster than bls on the tiny model (README, serving)
QUEUE_DELAY_US = 0  # dynamic batcher: batch only what is already queued (measured best on the tiny model)
MODEL_PY_HEADER = ("# rendered by `dgemma repo`: import dgemma from the source tree that rendered this repository\n"
                   "import sys; sys.path.insert(0, {src!r})  # noqa: E401,E702\n")


def wheel_dir() -> Path:
    """pytriton's bundled Triton (bin/, backends/, python_backend_stubs/) in this environment."""
    d = Path(sysconfig.get_paths()["purelib"]) / "pytriton" / "tritonserver"
    if not (d / "bin" / "tritonserver").exists():
        raise ArtifactError(f"{d}/bin/tritonserver not found: install the serving extra "
                            "(pip install -e '.[serve]', i.e. nvidia-pytriton==0.7.0).")
    return d


def triton_backend_dirs() -> dict[str, Path]:
    """Backends the Triton build in reach has ({name: dir}): the wheel's (python only), then an NGC-style
    /opt/tritonserver/backends (tensorrt, onnxruntime, ...)."""
    found: dict[str, Path] = {}
    roots = [Path("/opt/tritonserver/backends")]
    try:
        roots.insert(0, wheel_dir() / "backends")
    except ArtifactError:
        pass
    for root in roots:
        if root.is_dir():
            for d in sorted(root.iterdir()):
                if d.is_dir():
                    found.setdefault(d.name, d)
    return found


def pick_engine(engine: str, gpu) -> str:
    """`auto`: tensorrt_plan where the profile uses full TensorRT and the Triton build has its backend; ONNX
    Runtime on the CPU profile; otherwise the torch python variant (e.g. TensorRT-RTX GPUs, no Triton backend)."""
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r} for the encoder/denoiser models; valid: {', '.join(ENGINES)}.")
    if engine != "auto":
        return engine
    if gpu.trt == "tensorrt" and "tensorrt" in triton_backend_dirs():
        return "tensorrt"
    return "onnxruntime" if gpu.sm == 0 else "torch"


def graph_models_rendered(backend: str, engine: str) -> bool:
    """encoder/denoiser models are part of the repository when the loop calls them (bls) or they are ONNX Runtime
    CPU models (small, and keep BLS one flag away); never as a second copy of the weights next to an in-process
    torch/ORT loop on a GPU."""
    return backend == "bls" or engine == "onnxruntime"


def _inputs_block() -> str:
    return ",\n".join(f'  {{ name: "{name}" data_type: {dtype} dims: [ {dims} ]{" optional: true" if optional else ""} }}'
                      for name, (dtype, optional, dims) in MODEL_INPUTS.items())


def _outputs_block(outputs: dict) -> str:
    return ",\n".join(f'  {{ name: "{name}" data_type: {dtype} dims: [ {", ".join(map(str, dims))} ] }}'
                      for name, (dtype, dims) in outputs.items())


def _io_blocks() -> dict[str, str]:
    return {"inputs": _inputs_block(), "outputs": _outputs_block(MODEL_OUTPUTS)}


def _ensemble_values(common: dict, params: dict, group: str) -> dict[str, dict]:
    """Template values of the --ensemble models: each step's IO and the ensemble's tensor maps."""
    pre = "\n".join(f'      input_map {{ key: "{n}" value: "{n}" }}' for n in MODEL_INPUTS)
    loop = "\n".join(f'      output_map {{ key: "{n}" value: "{"_" + n if n == OUTPUT_IDS else n}" }}'
                     for n in CANVAS_LOOP_OUTPUTS)
    return {"preprocess": {**common, "inputs": _inputs_block(), "parameters": _parameters(params)},
            "canvas_loop": {**common, "outputs": _outputs_block(CANVAS_LOOP_OUTPUTS), "instance_group": group,
                            "parameters": _parameters({**params, "step": "canvas_loop"})},
            "postprocess": {**common, "parameters": _parameters(params)},
            ENSEMBLE: {**common, **_io_blocks(), "preprocess_map": pre, "canvas_loop_map": loop}}


def parse_gpus(value: str) -> tuple[int, ...]:
    """`--gpus`: a count ("4" -> GPUs 0..3) or a comma-separated list of device ids ("0,2")."""
    text = str(value).strip()
    try:
        ids = [int(x, 10) for x in text.split(",")] if "," in text else list(range(int(text, 10)))
    except ValueError:
        raise ConfigError(f"--gpus takes a GPU count or comma-separated device ids (got {value!r}); "
                          "e.g. --gpus 4 or --gpus 0,1,2,3.") from None
    if not ids:
        raise ConfigError(f"--gpus {value!r} names no GPU; a count must be >= 1 (e.g. --gpus 1).")
    return tuple(ids)


def instance_group(gpus: tuple[int, ...] | None, gpu) -> str:
    """The dgemma model's instance group: one CPU instance (default), or one instance per listed GPU (each builds
    its backend on `cuda:<model_instance_device_id>`, serving.loop.load_engine)."""
    if gpus is None:
        return "{ kind: KIND_CPU count: 1 }"
    if gpu.sm == 0:
        raise ConfigError(f"--gpus {','.join(map(str, gpus))}: GPU profile {gpu.name!r} has no GPUs (it runs on the "
                          "CPU through ONNX Runtime); drop --gpus or pick a GPU profile.")
    if min(gpus) < 0 or len(set(gpus)) != len(gpus):
        raise ConfigError(f"--gpus {','.join(map(str, gpus))}: device ids must be distinct and >= 0; "
                          "e.g. --gpus 0,1 (or a count: --gpus 2).")
    return f"{{ kind: KIND_GPU count: 1 gpus: [ {', '.join(map(str, gpus))} ] }}"


def _parameters(values: dict[str, object]) -> str:
    rows = [f'  {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in values.items()]
    return "parameters [\n" + ",\n".join(rows) + "\n]"


def install_backends(root: Path, tensorrt: bool = False) -> None:
    """root/backends/: the python backend and the stub for this interpreter from the nvidia-pytriton wheel, and
    (tensorrt) a link to the Triton build's tensorrt backend."""
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
    if tensorrt:
        trt = triton_backend_dirs().get("tensorrt")
        if trt is None:
            raise ArtifactError("engine 'tensorrt' needs Triton's tensorrt backend (an NGC tritonserver build); "
                                "this one has only " + ", ".join(triton_backend_dirs()) + ". Use --engine torch.")
        link = root / "backends" / "tensorrt"
        if not link.exists():
            link.symlink_to(trt)


def render(gpu: str = "cpu", precision: str = "bf16", checkpoint: str | Path | None = None,
           out: str | Path | None = None, backend: str | None = None, threads: int | None = 1,
           templates: Path = TRITON_TEMPLATES, backends: bool = True,
           engine: str = "auto", onnx_precision: str | None = None, max_batch: int | None = None,
           queue_delay_us: int = QUEUE_DELAY_US, prefill_chunk: int | None = None, ensemble: bool = False,
           gpus: tuple[int, ...] | None = None) -> Path:
    """Write the model repository and backend directory; returns the output root (…/<gpu>/<precision>).

    backend: how the canvas loop computes (ort | torch in-process, bls through the encoder/denoiser models; default
    CPU_BACKEND on GPU=cpu, bls where the graph models are TensorRT engines, else torch in-process).
    engine: what computes the encoder/denoiser models (auto, onnxruntime, torch, tensorrt). They are rendered when
    the loop uses them (bls) or when they are cheap ONNX Runtime CPU models; otherwise they would only hold a
    second copy of the weights next to the in-process backend (`graph_models_rendered`).
    onnx_precision: which build/onnx/<p>/ the ONNX Runtime models read (default fp32 on the CPU profile, which
    ORT's CPU provider runs, else the target precision). max_batch: override GpuProfile.max_batch (requests in
    flight = rows of the dgemma model's scheduler = the graphs' max_batch_size). ensemble: render tensorrtllm_backend's
    layout instead of the `dgemma` model (ENSEMBLE_MODELS: preprocess -> canvas_loop -> postprocess, the model
    `ensemble` with the dgemma model's inputs and outputs; see its config for the cancellation limit). gpus: device
    ids for the dgemma (or canvas_loop) model, one instance per GPU (each builds its backend on `cuda:<id>`); default
    one CPU instance."""
    target = resolve(gpu, precision)
    group = instance_group(gpus, target.gpu)  # refuses bad --gpus before anything is written
    engine = pick_engine(engine, target.gpu)
    backend = backend or (CPU_BACKEND if target.gpu.sm == 0 else "bls" if engine == "tensorrt" else "torch")
    if backend not in BACKENDS:
        raise ConfigError(f"unknown canvas loop backend {backend!r}; valid: {', '.join(BACKENDS)}.")
    with_graphs = graph_models_rendered(backend, engine)
    rendered = (*(ENSEMBLE_MODELS if ensemble else ("dgemma",)), *(contract.GRAPHS if with_graphs else ()))
    ck = Path(checkpoint).resolve() if checkpoint else DEFAULT_CHECKPOINT
    if not (ck / "config.json").exists():
        raise ArtifactError(f"{ck}/config.json not found: --checkpoint must be a DiffusionGemma checkpoint dir.")
    mcfg, scfg = load_config(ck)
    onnx_precision = onnx_precision or ("fp32" if target.gpu.sm == 0 else target.precision.value)
    graph_precision = {"onnxruntime": onnx_precision, "torch": target.precision.value,
                       "tensorrt": target.precision.value}[engine]
    batch = max_batch or target.gpu.max_batch
    if batch < 1:
        raise ConfigError(f"max_batch must be >= 1 (got {batch}).")
    chunk = 2 * mcfg.canvas_length if prefill_chunk is None else prefill_chunk  # prompt tokens per encoder pass
    if chunk < 1:
        raise ConfigError(f"prefill_chunk must be >= 1 token (got {chunk}).")
    layout = current()
    onnx_dir = layout.onnx(onnx_precision)
    engine_dir = layout.engines(target.gpu.name, target.precision.value)
    root = Path(out) if out else layout.triton(target.gpu.name, target.precision.value)
    params = {
        "dgemma_version": __version__, "dgemma_src": SRC, "target": target.key, "checkpoint": ck,
        "max_prompt": target.gpu.max_prompt, "max_context": target.gpu.max_context,
        "canvas_length": mcfg.canvas_length, "max_denoising_steps": scfg.max_denoising_steps,
        "default_max_tokens": scfg.max_new_tokens, "default_entropy_bound": scfg.entropy_bound,
        "default_t_min": scfg.t_min, "default_t_max": scfg.t_max,
        "backend": backend, "onnx_dir": onnx_dir, "threads": threads or "", "max_batch": batch,
        "max_queued": 8 * batch, "engine": engine, "graph_precision": graph_precision,
        "prefill_chunk": chunk,
    }
    common = {"target": target.key, "max_batch": batch, "queue_delay_us": queue_delay_us}
    values = {"dgemma": {**common, "parameters": _parameters(params), **_io_blocks(), "instance_group": group},
              **_ensemble_values(common, params, group)}
    for g in contract.GRAPHS:
        gp = {**params, "graph": g, "runtime": engine}
        values[g] = {**common, "name": g, "graph": g, "runtime": engine, "parameters": _parameters(gp),
                     "inputs": io_block(contract.inputs(g, mcfg, graph_precision)),
                     "outputs": io_block(contract.outputs(g, mcfg, graph_precision)),
                     "instance_kind": "KIND_CPU" if target.gpu.sm == 0 or engine == "onnxruntime" else "KIND_GPU"}
    if engine == "tensorrt" and with_graphs and backends:
        check_engines(engine_dir)  # refuses missing or stale engines (their ONNX changed since the build)
    models = root / "models"
    if models.exists():
        shutil.rmtree(models)
    for name in rendered:
        src = templates / (GRAPH_TEMPLATE[engine] if name in contract.GRAPHS else name)
        tmpl = (src / "config.pbtxt.tmpl").read_text()
        text = string.Template(tmpl).substitute(values[name])  # a missing key raises KeyError
        assert "${" not in text, f"{src}/config.pbtxt.tmpl: unrendered placeholder left"
        (models / name / "1").mkdir(parents=True)
        (models / name / "config.pbtxt").write_text(text)
        code = templates / MODEL_PY_FROM.get(name, src.name) / "1" / "model.py"
        if code.exists():
            (models / name / "1" / "model.py").write_text(MODEL_PY_HEADER.format(src=str(SRC)) + code.read_text())
        if name in contract.GRAPHS and engine == "tensorrt":
            (models / name / "1" / "model.plan").symlink_to(engine_dir / f"{name}.plan")
    if not backends:
        return root
    if backend == "ort" or (engine == "onnxruntime" and with_graphs):
        check_graph_artifacts(onnx_dir)
    install_backends(root, tensorrt=engine == "tensorrt" and with_graphs)
    return root
