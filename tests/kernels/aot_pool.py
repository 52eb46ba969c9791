"""Runs the dense-kernel modules' AOT gates (aot.gate: a child process compiling every production config) in the
background, so the compiles overlap the interpreted tests instead of following them.

Each test module names its kernel module (`KERNEL_MODULE`) and requests `gates_started` (autouse): the first test to
run starts the gate of every module whose `test_aot_production_configs` is selected, on a two-thread pool; a module's
`aot_rows` fixture waits for its own result. Deselected gates are never started."""

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
