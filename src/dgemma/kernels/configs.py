"""Launch configs of the fused kernels, keyed by kernel, GPU architecture and batch bucket.

`Config` holds the tile sizes and the Triton launch options. `lookup(kernel, cc, rows)` returns the entry for the
architecture (compute capability x10: 90 Hopper, 100 Blackwell datacenter, 120/121 RTX Blackwell / GB10, which
share a table; 0 = CPU tensors under the interpreter, which read a kernel's family-0 entry when it registers one,
else Hopper's) and the smallest bucket that holds `rows` (tokens per expert, canvas rows, ...). Entries measured
on a GPU carry the GPU and the Triton version they were tuned with (`tuned`), so a stale table is visible; entries
without it are defaults chosen to fit each architecture's shared memory (`aot.SMEM_LIMIT`) and checked by the AOT
gate in CI.
"""

from __future__ import annotations

from dataclasses import dataclass

TRITON_VERSION = "3.6.0"  # the version the tables were written for (pinned in pyproject.toml)


@dataclass(frozen=True)
class Config:
    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    group_m: int = 1
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    tuned: str = ""  # "<gpu name> / triton <version>" where measured; "" = default

    def constexprs(self) -> dict[str, int]:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k}


def tile(m: int, n: int, k: int, warps: int, stages: int) -> Config:
    """A GEMM's tile and launch options in one line (the MoE kernels' tables)."""
    return Config(block_m=m, block_n=n, block_k=k, num_warps=warps, num_stages=stages)


# kernel -> arch family -> [(max rows of the bucket, config)], ascending; arch family: 90, 100, 120
TABLES: dict[str, dict[int, list[tuple[int, Config]]]] = {}


def family(cc: int) -> int:
    """The table an architecture reads: 90 (Hopper), 100 (Blackwell datacenter), 120 (RTX Blackwell, GB10), 0 (the
    interpreter: CPU tensors)."""
    if cc == 0:
        return 0
    if cc >= 120:
        return 120
    if cc >= 100:
        return 100
    return 90


def register(kernel: str, table: dict[int, list[tuple[int, Config]]]) -> None:
    """Called by each kernel module at import: its configs per architecture family and bucket."""
    for fam, rows in table.items():
        assert fam in (0, 90, 100, 120), fam
        assert [r for r, _ in rows] == sorted(r for r, _ in rows), f"{kernel}/{fam}: buckets must ascend"
    TABLES[kernel] = table


def lookup(kernel: str, cc: int, rows: int) -> Config:
    """The config for `rows` on compute capability `cc` (the last bucket serves anything larger)."""
    table = TABLES[kernel]
    buckets = table.get(family(cc)) or table[90]
    for limit, cfg in buckets:
        if rows <= limit:
            return cfg
    return buckets[-1][1]


def production(kernel: str) -> list[tuple[int, int, Config]]:
    """Every (arch family, bucket, config) of a kernel on a GPU: what the AOT gate compiles."""
    return [(fam, limit, cfg) for fam, rows in TABLES[kernel].items() if fam for limit, cfg in rows]

