"""Ahead-of-time compilation of Triton kernels for a GPU architecture, without a GPU: the CI gate of every
production launch config.

A kernel module lists its production configs as `aot_specs() -> list[AotSpec]` (kernel, signature, constexprs,
compute capability, warps, stages). `gate(module)` compiles each with `triton.compile` for
`GPUTarget("cuda", cc, 32)` and reads back what the hardware would get: shared memory (the compiler's metadata),
registers per thread and spilled bytes (`ptxas -v`, the ptxas bundled in the triton wheel), and whether the PTX uses
the architecture's tensor-core instruction (wgmma on SM90, tcgen05 on SM100, mma on SM120). Under the interpreter
(`TRITON_INTERPRET=1`, the CPU tests) triton's own library functions are interpreted objects that cannot be
compiled, so the gate then runs in a child process without that flag: `python -m dgemma.kernels.aot MODULE`.

Alignment, the one way every kernel module uses: at run time the JIT specialises each pointer argument whose address
is a multiple of 16 bytes, and each integer argument that is a multiple of 16, with `tt.divisibility = 16`; that is
what lets it vectorise loads and stores and pipeline them with cp.async. A compile from a signature alone knows none
of it, so `compile_spec` states it (`spec_attrs`): every pointer argument (production buffers are torch allocations
and 16-byte multiples into them) and the integer arguments a spec names in `divisible` (production strides and
lengths that are multiples of 16). Kernels therefore carry no alignment hints or flags of their own (no
tl.multiple_of behind launcher checks, no ALIGNED constexpr): the gate compiles the variant an aligned production call
gets from the JIT, and an unaligned call gets the JIT's unaligned variant, correct and slower. TMA tensor descriptors
(fp8_gemm, qkv, residual_norm) carry their 16-byte alignment in their type and need nothing.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .numerics import interpreting

# shared memory a block may use (opt-in maximum), bytes: H100/H200 and B200 227 KiB, RTX 5090 / GB10 99 KiB
SMEM_LIMIT = {90: 232448, 100: 232448, 120: 101376, 121: 101376}
ARCH_NAME = {90: "sm_90a", 100: "sm_100a", 120: "sm_120a", 121: "sm_121a"}
# the tensor-core instruction per architecture, as it appears in PTX (a bare "mma" would also match file paths)
MMA_INSTRUCTION = {90: r"\bwgmma\.", 100: r"\btcgen05\.mma", 120: r"\bmma\.sync", 121: r"\bmma\.sync"}
ARCHS = (90, 100, 120)  # what CI compiles every production config for


@dataclass(frozen=True)
class AotSpec:
    """One production launch config of one kernel for one architecture."""

    label: str  # e.g. "moe_gate_up/fp8/rows<=32"
    fn: object  # the @triton.jit kernel
    signature: dict[str, str]  # argument -> Triton type ("*fp8e4nv", "*bf16", "i32", "fp32", "constexpr")
    constexprs: dict[str, object] = field(default_factory=dict)
    cc: int = 90
    num_warps: int = 4
    num_stages: int = 3
    tensor_cores: bool = False  # the kernel must use the architecture's MMA instruction
    divisible: tuple[str, ...] = ()  # integer arguments that are multiples of 16 in production (the JIT's "D")


def spec_attrs(spec: AotSpec) -> dict:
    """The JIT's specialisation of an aligned production call: tt.divisibility 16 on every pointer argument and on
    the integer arguments named in `divisible` (module docstring)."""
    for n in spec.divisible:
        if not spec.signature[n].startswith("i"):
            raise ValueError(f"{spec.label}: divisible names {n!r}, a {spec.signature[n]} argument")
    return {(i,): [["tt.divisibility", 16]] for i, n in enumerate(_jit(spec.fn).arg_names)
            if spec.signature.get(n, "").startswith("*") or n in spec.divisible}


def _jit(fn):
    """A compilable JITFunction for `fn` (interpreted kernels keep their Python function in `.fn`)."""
    from triton.runtime.jit import JITFunction

    return fn if isinstance(fn, JITFunction) else JITFunction(fn.fn)


@functools.lru_cache(maxsize=None)
def _ptxas(cc: int) -> Path:
    import triton

    d = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return d / ("ptxas" if cc < 100 else "ptxas-blackwell")


def ptxas_stats(ptx: str, cc: int) -> tuple[int, int]:
    """(registers per thread, spill store bytes) of the PTX's kernel, from `ptxas -v`."""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        r = subprocess.run([str(_ptxas(cc)), "-v", f"--gpu-name={ARCH_NAME[cc]}", str(src), "-o",
                            str(Path(d) / "k.cubin")], capture_output=True, text=True, timeout=300)
    if r.returncode:
        raise RuntimeError(f"ptxas failed for {ARCH_NAME[cc]}: {r.stderr.strip()[:500]}")
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spill = re.search(r"(\d+) bytes spill stores", r.stderr)
    return int(regs.group(1)) if regs else 0, int(spill.group(1)) if spill else 0


def compile_spec(spec: AotSpec) -> dict:
    """Compile one spec (in this process; needs TRITON_INTERPRET unset) -> its row, with `problems`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=_jit(spec.fn), signature=spec.signature, constexprs=spec.constexprs, attrs=spec_attrs(spec))
    k = triton.compile(src, target=GPUTarget("cuda", spec.cc, 32),
                       options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    ptx = k.asm["ptx"]
    regs, spills = ptxas_stats(ptx, spec.cc)
    smem = int(k.metadata.shared)
    tc = re.search(MMA_INSTRUCTION[spec.cc], ptx) is not None
    problems = []
    if smem > SMEM_LIMIT[spec.cc]:
        problems.append(f"shared memory {smem} B > {SMEM_LIMIT[spec.cc]} B on SM{spec.cc}")
    if spills:
        problems.append(f"{spills} B of register spills")
    if spec.tensor_cores and not tc:
        problems.append(f"no tensor-core instruction ({MMA_INSTRUCTION[spec.cc]}) in the SM{spec.cc} PTX")
    return {"label": spec.label, "kernel": k.metadata.name, "sm": spec.cc, "warps": spec.num_warps,
            "stages": spec.num_stages, "smem": smem, "regs": regs, "spills": spills, "tensor_cores": tc,
            "problems": problems}


def _compile_module(module: str) -> list[dict]:
    mod = importlib.import_module(module)
    return [compile_spec(s) for s in mod.aot_specs()]


def gate(module: str) -> list[dict]:
    """Rows of every production config of a kernel module (`module.aot_specs()`), compiled for its architecture."""
    if not interpreting():
        return _compile_module(module)
    env = dict(os.environ, TRITON_INTERPRET="0")  # "0", not unset: the test session and the CLI set it without a GPU
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), *sys.path])
    r = subprocess.run([sys.executable, "-m", "dgemma.kernels.aot", module], capture_output=True, text=True,
                       env=env, timeout=1800)
    if r.returncode:
        raise RuntimeError(f"AOT compile of {module} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    """The AOT figures as a markdown table (closing notes, docs)."""
    out = ["| config | SM | warps | stages | smem B | regs | spills | tensor cores |",
           "|---|---|---|---|---|---|---|---|"]
    out += [f"| {r['label']} | {r['sm']} | {r['warps']} | {r['stages']} | {r['smem']} | {r['regs']} | {r['spills']} | "
            f"{'yes' if r['tensor_cores'] else 'no'} |" for r in rows]
    return "\n".join(out)


if __name__ == "__main__":
    rows = _compile_module(sys.argv[1])
    if "--table" in sys.argv:
        print(table(rows), file=sys.stderr)
    print(json.dumps(rows))
