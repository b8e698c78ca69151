"""A throwaway Ray cluster on loopback (`ray start --head`), for the chaos suite and the tests.

Every process of the cluster runs under its own ``--temp-dir``, so :meth:`LocalRay.stop` ends exactly
the processes this cluster started (their command lines name that directory) and never another
Ray on the machine, as ``ray stop`` would. Token authentication is off (``RAY_AUTH_MODE=disabled``):
the only clients are this machine's own subprocesses.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from pretrain.engine.distributed import free_port

RAY = str(Path(sys.executable).parent / "ray")


def ray_env() -> dict[str, str]:
    """The environment for the cluster and its clients: this venv's `python`, no token auth."""
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


@dataclass
class LocalRay:
    address: str
    dashboard: str
    temp_dir: str

    def processes(self) -> list:
        import psutil

        found = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if any(self.temp_dir in part for part in proc.info["cmdline"] or []):
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found

    def stop(self) -> None:
        import psutil

        procs = self.processes()
        for proc in procs:
            try:
                proc.send_signal(signal.SIGKILL)  # raylet and GCS ignore SIGTERM while busy
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_local_ray(num_cpus: int = 4, timeout_s: float = 180.0) -> LocalRay:
    temp_dir = os.path.join(tempfile.gettempdir(), f"rayc-{uuid.uuid4().hex[:6]}")  # sockets: keep it short
    port, dashboard = free_port(), free_port()
    env = ray_env()
    cmd = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", f"--dashboard-port={dashboard}",
           "--dashboard-host=127.0.0.1", f"--ray-client-server-port={free_port()}", f"--num-cpus={num_cpus}",
           f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    started = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    cluster = LocalRay(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}", temp_dir)
    if proc.returncode != 0:
        cluster.stop()
        raise RuntimeError(f"ray start failed after {time.monotonic() - started:.0f}s: {proc.stderr[-2000:]}")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # for clients started from this process
    return cluster
