"""The layers of the dgemma package, enforced over every import (function-level ones included) by walking the AST:
no cycle between modules, no import of a higher layer, stages that do not import each other (bench may use
serving's client, render, server and metrics), and function-level imports only of heavy optional third-party
packages. The checker's own tests plant an upward import, a cycle and a lazy internal import into a copy of the
package and see each fail."""

from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
# package -> layer; a module may import dgemma modules of lower layers and of its own package only
LAYERS = {"core": 0, "model": 1, "kernels": 2, "runtime": 3, "generation": 4, "tiny": 5,
          "quantize": 6, "export": 6, "engines": 6, "serving": 6, "deploy": 6, "bench": 6, "cli": 7}
STAGE_EXCEPTIONS = {("bench", "serving.client"), ("bench", "serving.render"), ("bench", "serving.server"),
                    ("bench", "serving.metrics")}
# third-party packages that may be imported inside functions (heavy, or only in some extras / environments)
LAZY_OK = {"torch",  # its heavy submodules (torch._dynamo, torch.export) only where they are used
           "tensorrt", "tensorrt_rtx", "modelopt", "onnx", "onnxruntime", "onnxscript", "onnx_ir", "tritonclient",
           "triton_python_backend_utils", "triton", "transformers", "matplotlib", "pynvml", "tqdm", "safetensors",
           "tokenizers", "starlette", "uvicorn", "jinja2", "grpc", "yaml", "kubernetes_validate", "jsonschema", "httpx"}


def modules(src: Path) -> dict[str, Path]:
    out = {}
    for f in (src / "dgemma").rglob("*.py"):
        rel = f.relative_to(src).with_suffix("")
        if "triton_repo" in rel.parts:  # templates copied into a rendered repository, not package modules
            continue
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def imports(name: str, path: Path, known: set[str]):
    """(target module, line, inside a function?) for every import of `name`; relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    nested = {id(x) for f in funcs for x in ast.walk(f) if x is not f}
    for node in ast.walk(tree):
        lazy = id(node) in nested
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno, lazy
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:  # `from pkg import module` imports the module, and pkg (its __init__) first
                full = f"{mod}.{a.name}"
                if full in known:
                    yield full, node.lineno, lazy
                yield mod, node.lineno, lazy


def package_of(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "dgemma" and parts[1] in LAYERS else None


def violations(src: Path = SRC) -> list[str]:
    mods = modules(src)
    known = set(mods)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    bad = []
    for m, path in mods.items():
        pkg = package_of(m)
        for target, line, lazy in imports(m, path, known):
            where = f"{path.relative_to(src)}:{line}"
            top = target.split(".")[0]
            if top != "dgemma":
                if lazy and top not in LAZY_OK and top not in sys.stdlib_module_names:
                    bad.append(f"{where}: function-level import of {target} (only optional heavy packages may be lazy)")
                elif lazy and top in sys.stdlib_module_names:
                    bad.append(f"{where}: function-level import of the standard library module {target}")
                continue
            while target not in known and "." in target:
                target = target.rpartition(".")[0]
            if target == "dgemma" or target == m:
                continue
            edges[m].add(target)
            if lazy:
                bad.append(f"{where}: function-level import of {target} (dgemma modules are imported at the top)")
            tpkg = package_of(target)
            if pkg is None or tpkg is None or tpkg == pkg:
                continue
            sub = target.split(".", 1)[1]
            if LAYERS[tpkg] > LAYERS[pkg]:
                bad.append(f"{where}: {m} (layer {LAYERS[pkg]}, {pkg}) imports {target} (layer {LAYERS[tpkg]}, "
                           f"{tpkg}): upward")
            elif LAYERS[tpkg] == LAYERS[pkg] and (pkg, sub) not in STAGE_EXCEPTIONS:
                bad.append(f"{where}: stage {pkg} imports stage {tpkg} ({target}); stages hand over through "
                           "directories and manifests")
    bad += [f"import cycle: {' -> '.join(c)}" for c in cycles(edges)]
    return bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def test_package_is_layered_without_cycles():
    assert violations() == []


def test_every_package_has_a_layer():
    pkgs = {p.name for p in (SRC / "dgemma").iterdir() if (p / "__init__.py").exists()}
    assert pkgs <= set(LAYERS), f"packages without a layer: {pkgs - set(LAYERS)}"


@pytest.fixture
def copy(tmp_path):
    shutil.copytree(SRC / "dgemma", tmp_path / "dgemma", ignore=shutil.ignore_patterns("__pycache__", "assets"))
    return tmp_path


def _append(copy: Path, rel: str, text: str) -> None:
    p = copy / "dgemma" / rel
    p.write_text(p.read_text() + text)


def test_planted_upward_import_fails(copy):
    _append(copy, "core/config.py", "\nfrom ..cli import main  # planted\n")
    assert any("core/config.py" in v and "upward" in v for v in violations(copy))


def test_planted_stage_to_stage_import_fails(copy):
    _append(copy, "export/onnx.py", "\nfrom ..quantize import recipe  # planted\n")
    assert any("stage export imports stage quantize" in v for v in violations(copy))


def test_planted_cycle_fails(copy):
    _append(copy, "model/tokens.py", "\nfrom . import checkpoint  # planted: checkpoint imports tokens\n")
    assert any(v.startswith("import cycle") and "dgemma.model.tokens" in v for v in violations(copy))


def test_planted_lazy_internal_import_fails(copy):
    _append(copy, "runtime/kvbuf.py", "\n\ndef planted():\n    from ..core import layout\n    return layout\n")
    assert any("runtime/kvbuf.py" in v and "function-level import of dgemma.core.layout" in v for v in violations(copy))
