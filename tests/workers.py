"""Runs the training worker the way users do on one node: torchrun with N gloo processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from launch.torchrun import rank0_exit_code
from pretrain.worker import EXIT_FILE_ENV

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.toml"


@dataclass
class WorkerRun:
    returncode: int
    output: str

    @property
    def summary(self) -> dict:
        lines = [line for line in self.output.splitlines() if line.startswith("SUMMARY ")]
        assert lines, f"no summary in output:\n{self.output[-4000:]}"
        return json.loads(lines[-1][len("SUMMARY "):])

    def steps_logged(self) -> dict[int, float]:
        """step -> loss from the rank-0 console lines."""
        out = {}
        for line in self.output.splitlines():
            if line.startswith("step "):
                parts = line.split()
                out[int(parts[1].split("/")[0])] = float(parts[parts.index("loss") + 1])
        return out


def torchrun_command(nproc: int, overrides: list[str], config: Path = SMOKE,
                     module: str = "pretrain.worker") -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", module, "--config", str(config)]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def worker_env(exit_file: str = "") -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", EXIT_FILE_ENV: exit_file}


def run_workers(nproc: int, overrides: list[str], timeout: float = 600, config: Path = SMOKE,
                module: str = "pretrain.worker") -> WorkerRun:
    """torchrun as `pretrain train --launcher torchrun` runs it: the exit code is rank 0's own."""
    with tempfile.TemporaryDirectory() as tmp:
        exit_file = os.path.join(tmp, "exit")
        proc = subprocess.run(torchrun_command(nproc, overrides, config, module), env=worker_env(exit_file),
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
        return WorkerRun(rank0_exit_code(exit_file, proc.returncode), proc.stdout)


def start_workers(nproc: int, overrides: list[str], config: Path = SMOKE) -> subprocess.Popen:
    return subprocess.Popen(torchrun_command(nproc, overrides, config), env=worker_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
