"""Runs the dense-kernel modules' AOT gates (aot.gate: a child process compiling every production config) in the
background, so the compiles overlap the interpreted tests instead of following them.

Each test module names its kernel module (`KERNEL_MODULE`); conftest's `gates_started` (autouse): the first kernel test
to run starts the gate of every module whose `test_aot_production_configs` is selected, on a two-thread pool; the
`aot_rows` fixture waits for its module's own result. Deselected gates are never started."""

from concurrent.futures import Future, ThreadPoolExecutor

from dgemma.kernels import aot

_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="aot-gate")
_GATES: dict[str, Future] = {}


def start_selected(session) -> None:
    for item in session.items:
        module = getattr(item.module, "KERNEL_MODULE", None)
        if item.name == "test_aot_production_configs" and module and module not in _GATES:
            _GATES[module] = _POOL.submit(aot.gate, module)


def rows(module: str) -> list[dict]:
    if module not in _GATES:
        _GATES[module] = _POOL.submit(aot.gate, module)
    return _GATES[module].result()


def assert_clean(rows: list[dict]) -> None:
    """The gate's verdict: every architecture compiled, and no config over its shared memory, spilling, or missing
    the MMA instruction it must use."""
    assert {r["sm"] for r in rows} == set(aot.ARCHS)
    for r in rows:
        assert r["problems"] == [] and r["spills"] == 0, r
