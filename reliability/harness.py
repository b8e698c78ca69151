"""What every chaos scenario stands on: moto's S3 server, a local Ray cluster, generated shards, runs of the
real `pretrain train` command, bitwise comparison of checkpoints, and the results table.

Runs are the product's own entry points in subprocesses (`python -m launch.cli train`, with the Ray
launcher against the suite's cluster or with ``--launcher torchrun``), reaching S3 over HTTP, directly
or through :class:`reliability.fault_proxy.FaultProxy`. Nothing is mocked.
"""

from __future__ import annotations

import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.toml"
KINDS_COMPARED = ("master", "ema", "exp_avg", "exp_avg_sq")
STEPS = 12


@dataclass
class Row:
    scenario: str
    injected: str
    expected: str
    outcome: str = ""
    bitwise: str = "n/a"
    """'yes' / 'no' against the clean run, or 'n/a' where the fault changes what is trained."""
    passed: bool = False
    seconds: float = 0.0
    details: dict = field(default_factory=dict)


@dataclass
class RunResult:
    code: int
    output: str
    seconds: float

    def step_of(self, pattern: str) -> int | None:
        match = re.search(pattern, self.output)
        return int(match.group(1)) if match else None


class Run:
    """One `pretrain train` process; its output is collected line by line for triggers."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path, wrapper: list[str] | None = None):
        self.lines: list[str] = []
        self.started = time.monotonic()
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([*(wrapper or []), sys.executable, "-m", "launch.cli", "train", *argv], cwd=ROOT,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.lines.append(line)
            self.log.write(line)
            self.log.flush()

    def wait_for(self, pattern: str, timeout_s: float = 300) -> bool:
        """Block until a line matches `pattern` (regex) or the run ends / the deadline passes."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        seen = 0
        while time.monotonic() < deadline:
            while seen < len(self.lines):
                if regex.search(self.lines[seen]):
                    return True
                seen += 1
            if self.proc.poll() is not None and not self._reader.is_alive():
                return any(regex.search(line) for line in self.lines[seen:])
            time.sleep(0.05)
        return False

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def finish(self, timeout_s: float = 600) -> RunResult:
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            code = self.proc.wait()
            self.lines.append(f"[chaos] killed after the {timeout_s:.0f}s deadline\n")
        self._reader.join(timeout=10)
        self.log.close()
        return RunResult(code, "".join(self.lines), time.monotonic() - self.started)


class Env:
    """The suite's shared world: S3 endpoint, Ray cluster, shard sets, and the base run arguments."""

    def __init__(self, workdir: Path, seed: int, log: Callable[[str], None]):
        self.workdir, self.seed, self.log = workdir, seed, log
        self.s3 = None
        self.ray = None
        self.runs = 0

    # ------------------------------------------------------------------------------------- set-up

    def start(self) -> None:
        from launch.local_ray import start_local_ray
        from launch.local_s3 import start_local_s3
        from pretrain import storage

        self.s3 = start_local_s3(log_path=str(self.workdir / "moto.log"))
        os.environ.update(self.s3.env)
        self.log(f"moto S3 server at {self.s3.endpoint}")
        for bucket in ("s3://chaos-data", "s3://chaos-runs"):
            storage.ensure_bucket(bucket)
        self._make_data()
        started = time.monotonic()
        self.ray = start_local_ray(num_cpus=4)
        self.log(f"Ray cluster at {self.ray.address} ({time.monotonic() - started:.0f}s)")

    def _make_data(self) -> None:
        from data_tools.make_shards import BuildParams, make_shards
        from data_tools.synth import make_dataset

        for name, per_class in (("train", 32), ("train-rebuilt", 28)):
            folder = self.workdir / "data" / name
            make_dataset(str(folder), classes=10, per_class=per_class, size=32, seed=0, workers=1)
            make_shards(str(folder), f"s3://chaos-data/{name}", params=BuildParams(shard_samples=40), workers=1,
                        progress=False, log=lambda _: None)
        self.log("shards: s3://chaos-data/train (320 samples), s3://chaos-data/train-rebuilt (280 samples)")

    def stop(self) -> None:
        if self.ray is not None:
            self.ray.stop()
        if self.s3 is not None:
            self.s3.stop()

    # ------------------------------------------------------------------------------------- runs

    def run_url(self, name: str) -> str:
        return f"s3://chaos-runs/{name}"

    def args(self, run_url: str, *extra: str, endpoint: str = "", train_url: str = "s3://chaos-data/train") -> list[str]:
        sets = [f"run.url={run_url}", f"data.train_url={train_url}", "data.eval_url=", f"schedule.steps={STEPS}",
                "schedule.warmup_steps=2", "checkpoint.every_steps=3", "checkpoint.keep_last=10",
                "logging.every_steps=1", "data.num_workers=0", "launch.num_workers=2", "launch.max_failures=6",
                "lease.heartbeat_s=2", "lease.timeout_s=12", "storage.retry_base_s=0.05", "storage.retry_max_s=1.0",
                "storage.multipart_chunk_mb=5", *extra]
        if endpoint:
            sets.append(f"storage.endpoint_url={endpoint}")
        return ["--config", str(SMOKE), *[x for s in sets for x in ("--set", s)]]

    def start_run(self, args: list[str], launcher: str = "ray", wrapper: list[str] | None = None) -> Run:
        from launch.local_ray import ray_env

        self.runs += 1
        argv = [*args, "--address", self.ray.address] if launcher == "ray" else [*args, "--launcher", "torchrun"]
        env = {**ray_env(), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        return Run(argv, env, self.workdir / f"run-{self.runs:02d}.log", wrapper)

    def train(self, args: list[str], launcher: str = "ray", timeout_s: float = 600) -> RunResult:
        return self.start_run(args, launcher).finish(timeout_s)


# ----------------------------------------------------------------------------------------- checkpoints


def committed(run_url: str) -> list[str]:
    from pretrain.checkpoint import CheckpointManager
    from pretrain.config import CheckpointConfig

    return [d.name for d in CheckpointManager(run_url, CheckpointConfig(), None, 0, 1).committed()]


def manifest(run_url: str, dir_name: str) -> dict:
    from pretrain import storage

    return json.loads(storage.read_bytes(storage.join(run_url, "checkpoints", dir_name, "manifest.json")))


def final_state(run_url: str) -> dict[str, dict[str, torch.Tensor]]:
    """Consolidated master, EMA and Adam moments of the newest committed checkpoint."""
    from safetensors.torch import load as load_safetensors

    from pretrain import state_format, storage
    from pretrain.checkpoint import rank_file

    newest = committed(run_url)[-1]
    m = manifest(run_url, newest)
    saved = state_format.rank_tables(r["fragments"] for r in m["ranks"])
    files = {r: load_safetensors(storage.read_bytes(storage.join(run_url, "checkpoints", newest,
                                                                 rank_file(r, "safetensors")))) for r in saved}
    return {kind: state_format.consolidate(saved, files.__getitem__, kind) for kind in KINDS_COMPARED} | \
        {"_step": {"step": torch.tensor(m["step"])}}


def bitwise_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].keys() == b[k].keys() and all(torch.equal(a[k][n], b[k][n]) for n in a[k]) for k in a)


def copy_checkpoint(src_run: str, dst_run: str, dir_name: str) -> None:
    from pretrain import storage

    src = storage.join(src_run, "checkpoints", dir_name)
    for name in storage.listdir(src):
        storage.write_bytes(storage.join(dst_run, "checkpoints", dir_name, name),
                            storage.read_bytes(storage.join(src, name)))


def snapshot_files(run_url: str) -> dict[str, bytes]:
    """Every checkpoint file's bytes (to prove that nothing committed changed)."""
    from pretrain import storage

    root = storage.join(run_url, "checkpoints")
    return {p: storage.read_bytes(storage.join(root, p)) for p in storage.list_files(root)}


def train_workers() -> list:
    import psutil

    return [p for p in psutil.process_iter(["cmdline"])
            if " ".join(p.info["cmdline"] or []).startswith("ray::RayTrainWorker")]


# ----------------------------------------------------------------------------------------- report


def machine_tag() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1] for line in f if line.startswith("model name"))
        cpu = "amd-epyc" if "EPYC" in model else ("intel-xeon" if "Xeon" in model else cpu)
    except (OSError, StopIteration):
        pass
    return f"cpu-{cpu}-{os.cpu_count()}c".lower().replace(" ", "-")


def write_results(rows: list[Row], seconds: float, seed: int, out_dir: Path, doc: Path) -> Path:
    stamp = time.strftime("%Y-%m-%d")
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / f"{machine_tag()}-{stamp}"
    meta = {"date": stamp, "seed": seed, "seconds": round(seconds, 1), "machine": machine_tag(),
            "python": platform.python_version(), "torch": torch.__version__,
            "passed": sum(r.passed for r in rows), "scenarios": len(rows)}
    base.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))
    table = render_table(rows)
    base.with_suffix(".md").write_text(f"# Chaos suite, {stamp} (seed {seed}, {seconds / 60:.1f} min)\n\n{table}\n")
    text = doc.read_text() if doc.exists() else ""
    begin, end = "<!-- chaos-results:begin -->", "<!-- chaos-results:end -->"
    block = (f"{begin}\nLatest run: {stamp}, seed {seed}, {seconds / 60:.1f} min on {machine_tag()} "
             f"({meta['passed']}/{meta['scenarios']} as documented; "
             f"[{base.name}.json](../reliability/results/{base.name}.json)).\n\n{table}\n{end}")
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text += "\n" + block + "\n"
    doc.write_text(text)
    return base.with_suffix(".json")


def render_table(rows: list[Row]) -> str:
    lines = ["| scenario | injected | expected | outcome | bitwise = clean | time | |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r.scenario, r.injected, r.expected, r.outcome, r.bitwise, f"{r.seconds:.0f}s",
                 "ok" if r.passed else "**FAILED**"]
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)


def new_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="chaos-"))
