"""Start and stop the real tritonserver (Triton 2.51 from the nvidia-pytriton wheel, or `tritonserver` on PATH)
with the environment toolchain.md §3.1/§3.2 needs: the venv's bin first on PATH (the python backend stub derives
sys.prefix from it) and LD_LIBRARY_PATH = nvidia_pytriton.libs + Python's LIBDIR.
Every listener binds 127.0.0.1 unless told otherwise: Triton's HTTP frontend crashes (SIGSEGV) on a deeply
nested JSON body, so its HTTP port is not a public door (README, Security); `dgemma openai` is. `Server` takes
free ports by default (tests); `dgemma serve` takes Triton's usual 8000/8001/8002 and falls back to free ports
for any that is busy, saying which (`pick_ports`). Metrics are on (Prometheus text on
http://127.0.0.1:<metrics_port>/metrics): Triton's per-model counters and the dgemma model's custom metrics."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import ArtifactError, DgemmaError

TRITON_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}  # Triton's defaults, what its users expect
LOOPBACK = "127.0.0.1"


def port_free(port: int, address: str = LOOPBACK) -> bool:
    """Nothing listens on address:port (SO_REUSEADDR: a port in TIME_WAIT counts as free, as for Triton)."""
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


def pick_ports(wanted: dict[str, int], address: str = LOOPBACK) -> tuple[dict[str, int], list[str]]:
    """{name: port} with 0 or a busy port replaced by a free one; -> (ports, a note per busy port)."""
    free = iter(free_ports(len(wanted)))
    out, notes = {}, []
    for name, port in wanted.items():
        if port and port_free(port, address):
            out[name] = port
            continue
        out[name] = next(free)
        if port:
            notes.append(f"{name} port {port} is busy; using {out[name]}")
    return out, notes


def connect_host(address: str) -> str:
    """Where a local client reaches a listener bound to `address` (wildcards: loopback)."""
    if address in ("", "0.0.0.0"):
        return LOOPBACK
    if address == "::":
        return "[::1]"
    return f"[{address}]" if ":" in address else address


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def server_binary() -> Path:
    wheel = Path(sysconfig.get_paths()["purelib"]) / "pytriton" / "tritonserver" / "bin" / "tritonserver"
    if wheel.exists():
        return wheel
    found = shutil.which("tritonserver")
    if found:
        return Path(found)
    raise ArtifactError("tritonserver not found: install the serving extra (pip install -e '.[serve]') "
                        "or put tritonserver on PATH.")


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    libs = [str(Path(sysconfig.get_paths()["purelib"]) / "nvidia_pytriton.libs"), sysconfig.get_config_var("LIBDIR")]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
    return env


@dataclass
class Server:
    root: Path  # a rendered build/triton/<gpu>/<precision>
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    http_address: str = LOOPBACK  # anything else exposes a frontend that a nested JSON body crashes
    grpc_address: str = LOOPBACK
    metrics_address: str = LOOPBACK
    log_path: Path | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def __post_init__(self):
        self.root = Path(self.root)

    @property
    def grpc_url(self) -> str:
        return f"{connect_host(self.grpc_address)}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{connect_host(self.http_address)}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{connect_host(self.metrics_address)}:{self.metrics_port}/metrics"

    def command(self, models: Path, backends: Path) -> list[str]:
        return [str(server_binary()), f"--model-repository={models}", f"--backend-directory={backends}",
                f"--http-address={self.http_address}", f"--grpc-address={self.grpc_address}",
                f"--metrics-address={self.metrics_address}", f"--http-port={self.http_port}",
                f"--grpc-port={self.grpc_port}", f"--metrics-port={self.metrics_port}", "--allow-metrics=true",
                "--model-control-mode=explicit", "--load-model=*", "--exit-on-error=true"]

    def metrics(self) -> str:
        """The metrics endpoint's Prometheus text."""
        with urllib.request.urlopen(self.metrics_url, timeout=5) as r:
            return r.read().decode()

    def start(self, timeout_s: float = 60.0) -> "Server":
        if self.proc is not None and self.proc.poll() is None:
            return self  # already running (e.g. `with Server(r).start() as s`): never orphan a second server
        models, backends = self.root / "models", self.root / "backends"
        if not any((models / m / "config.pbtxt").exists() for m in ("dgemma", "ensemble")):
            raise ArtifactError(f"{models} is not a rendered repository. Render it with: make repo")
        if not all((self.http_port, self.grpc_port, self.metrics_port)):
            self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        self.log_path = self.log_path or self.root / "server.log"
        cmd = self.command(models, backends)
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, env=server_env(), stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DgemmaError(f"tritonserver exited with code {self.proc.returncode} during startup; "
                                  f"last log lines:\n{self.log_tail()}")
            if self.ready():
                return self
            time.sleep(0.25)
        self.stop()
        raise DgemmaError(f"tritonserver not ready after {timeout_s:.0f} s; last log lines:\n{self.log_tail()}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def log_tail(self, n: int = 30) -> str:
        if self.log_path is None:
            return "(no log: the server was not started)"
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM to the server's PID (its stubs exit with it); after timeout_s SIGKILL to its process group."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:  # its own process group (start_new_session): the stubs go with it
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
