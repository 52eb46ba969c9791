"""Stage outputs on disk: atomic publication, manifests, fingerprints and the staleness checks between stages.

A stage writes into a temp dir beside its target and publishes it whole (`publish_dir`), so an interrupted stage
never leaves a half-written directory; single files go through `write_text_atomic`. Each stage records a
manifest.json; the next stage reads it here (an error names the file and the make command that rebuilds it) and
refuses inputs that changed since (`check_quantize_source`, `check_engines`). Fingerprints stream files in chunks,
so hashing a 26B checkpoint never holds a shard in memory. Stages talk only through these directories and
manifests; none imports another to read its output.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ArtifactError, ConfigError

MANIFEST = "manifest.json"
CHUNK = 1 << 20
QUANT_ALGO = {"fp8": "FP8", "nvfp4": "NVFP4"}  # hf_quant_config.json quant_algo per quantized precision
QUANTIZED = tuple(QUANT_ALGO)


# -- writing ------------------------------------------------------------------------------------------------------
def publish_dir(tmp: Path, final: Path) -> Path:
    """Move the completely written `tmp` to `final`; an existing `final` is swapped out first, then removed."""
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    return final


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to a temp file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, obj, indent: int = 1) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=indent, default=str))


# -- reading ------------------------------------------------------------------------------------------------------
def read_manifest(stage_dir: str | Path, what: str, make: str) -> dict:
    """`stage_dir`/manifest.json as a dict; missing or corrupt -> ArtifactError naming the file, what the
    directory should hold (`what`) and the command that rebuilds it (`make`)."""
    path = Path(stage_dir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path} not found: no {what} in {stage_dir}. Build them with `{make}`.") from None
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); rebuild with `{make}`.") from None


def read_onnx_manifest(onnx_dir: str | Path) -> dict:
    return read_manifest(onnx_dir, "exported ONNX graphs", f"make onnx PRECISION={Path(onnx_dir).name}")


def read_engine_manifest(engine_dir: str | Path) -> dict:
    p = Path(engine_dir)
    return read_manifest(p, "TensorRT engines", f"make engines GPU={p.parent.name} PRECISION={p.name}")


# -- fingerprints (streamed) ----------------------------------------------------------------------------------------
def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_sha256(path: str | Path) -> str:
    """sha256 over every file of a directory (relative names and bytes, sorted), or of one file (name and bytes);
    read in 1 MiB chunks."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(CHUNK), b""):
                h.update(chunk)
    return h.hexdigest()


def checkpoint_fingerprint(path: str | Path) -> str:
    """sha256 of config.json bytes + every *.safetensors name and size (cheap: no weight bytes are read)."""
    path = Path(path)
    h = hashlib.sha256()
    try:
        h.update((path / "config.json").read_bytes())
    except FileNotFoundError:
        raise ArtifactError(f"{path}/config.json not found; --checkpoint must be a DiffusionGemma checkpoint "
                            "directory (write the tiny one with: dgemma init-tiny DIR).") from None
    for f in sorted(path.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}\n".encode())
    return h.hexdigest()


# -- onnx ------------------------------------------------------------------------------------------------------------
def verify_onnx_files(onnx_dir: str | Path, manifest: dict) -> None:
    """Each graph's files exist with the recorded sizes and model.onnx has the recorded sha256."""
    onnx_dir = Path(onnx_dir)
    fix = f"Rebuild with `make onnx PRECISION={manifest.get('precision', onnx_dir.name)}`."
    for g, info in manifest["graphs"].items():
        for name, size in info["files"].items():
            f = onnx_dir / g / name
            if not f.exists() or f.stat().st_size != size:
                got = f.stat().st_size if f.exists() else "missing"
                raise ArtifactError(f"{f}: size {got}, manifest says {size} bytes (corrupt or partial export). {fix}")
        got = file_sha256(onnx_dir / g / "model.onnx")
        if got != info["sha256"]:
            raise ArtifactError(f"{onnx_dir / g / 'model.onnx'}: sha256 {got[:12]}..., manifest says "
                                f"{info['sha256'][:12]}... (modified or corrupt). {fix}")


# -- quantize --------------------------------------------------------------------------------------------------------
def _quantize_fix(precision: str) -> str:
    return f"make quantize PRECISION={precision}"


def quantize_fingerprint(quant_dir: str | Path) -> str:
    """sha256 of quantize/<p>/manifest.json + config.json + the safetensors names and sizes (no weight bytes read):
    changes whenever `dgemma quantize` rewrites the directory with different inputs or settings."""
    quant_dir = Path(quant_dir)
    h = hashlib.sha256((quant_dir / MANIFEST).read_bytes())
    h.update(checkpoint_fingerprint(quant_dir).encode())
    return h.hexdigest()


def read_quantize_dir(quant_dir: str | Path, precision: str, checkpoint: str | Path | None = None) -> dict:
    """The quantize manifest after checking the directory is a complete `dgemma quantize` output for `precision`
    (and, with `checkpoint`, that it was made from that checkpoint's current bytes)."""
    quant_dir = Path(quant_dir)
    fix = _quantize_fix(precision)
    if precision not in QUANTIZED:
        raise ConfigError(f"precision {precision!r} is not a quantized precision; valid: {', '.join(QUANTIZED)}.")
    if not quant_dir.is_dir():
        raise ArtifactError(f"quantized model {quant_dir} not found: --precision {precision} exports from a "
                            f"`dgemma quantize` output. Make it with: {fix} (or pass --quantized DIR).")
    for f in (MANIFEST, "hf_quant_config.json", "config.json", "model.safetensors"):
        if not (quant_dir / f).is_file():
            raise ArtifactError(f"{quant_dir}/{f} not found (incomplete quantize output). Rebuild with: {fix}")
    try:
        m = json.loads((quant_dir / MANIFEST).read_text())
        algo = json.loads((quant_dir / "hf_quant_config.json").read_text())["quantization"]["quant_algo"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ArtifactError(f"{quant_dir}: unreadable quantize manifest or hf_quant_config.json ({e}). "
                            f"Rebuild with: {fix}") from None
    if m.get("stage") != "quantize" or m.get("precision") != precision or algo != QUANT_ALGO[precision]:
        raise ArtifactError(f"{quant_dir} holds a {m.get('precision')!r} ({algo}) quantization, not {precision!r}. "
                            f"Pass the {precision} directory with --quantized, or rebuild with: {fix}")
    if checkpoint is not None:
        ck = Path(checkpoint)
        got = tree_sha256(ck) if ck.exists() else "missing"
        if got != m.get("input_checkpoint_sha256"):
            raise ArtifactError(f"{quant_dir} was quantized from {m.get('input_checkpoint')} (sha256 "
                                f"{str(m.get('input_checkpoint_sha256'))[:12]}...), but --checkpoint {ck} has sha256 "
                                f"{got[:12]}... (stale quantized model). Rebuild with: {fix} CKPT={ck}")
    return m


def check_quantize_source(onnx_dir: str | Path, manifest: dict) -> None:
    """Refuse graphs whose quantize directory changed after export (re-quantized: stale ONNX). A quantize directory
    that no longer exists is not an error: the graphs carry every weight and scale themselves."""
    q = manifest.get("quantize")
    if not q:
        return
    src = Path(q["dir"])
    if not (src / MANIFEST).is_file():
        return
    got = quantize_fingerprint(src)
    if got != q["fingerprint"]:
        p = manifest.get("precision")
        raise ArtifactError(f"{onnx_dir}: exported from {src} (fingerprint {q['fingerprint'][:12]}...), which is now "
                            f"{got[:12]}... (re-quantized after export: stale ONNX). Rebuild with `make onnx "
                            f"PRECISION={p}` (dgemma onnx --precision {p} --quantized {src}).")


# -- engines ---------------------------------------------------------------------------------------------------------
def check_engines(engine_dir: str | Path) -> dict:
    """The engine manifest, after checking it still matches the ONNX it was built from (else: make engines). The
    ONNX directory is the one recorded at build time; engines shipped without it (another machine, a container)
    are not stale: they carry every weight themselves."""
    engine_dir = Path(engine_dir)
    m = read_engine_manifest(engine_dir)
    if not m.get("onnx_dir") or not (Path(m["onnx_dir"]) / MANIFEST).is_file():
        return m
    onnx_manifest = Path(m["onnx_dir"]) / MANIFEST
    got = file_sha256(onnx_manifest)
    if got != m["onnx_manifest_sha256"]:
        raise ArtifactError(f"{engine_dir}: built from ONNX manifest {m['onnx_manifest_sha256'][:12]}..., but "
                            f"{onnx_manifest} is now {got[:12]}... (stale engines). Rebuild with `make engines "
                            f"GPU={m['gpu_profile']['name']} PRECISION={m['precision']}`.")
    return m
