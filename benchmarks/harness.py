"""What every benchmark shares: result rows with goals, A/B alternation, machine facts, a shared S3.

A *row* is one figure of the results table. Its headline is a **ratio** of two sides measured in the
same process and the same run, alternating A B A B ... after warm-up; the median of the per-pair
ratios is reported with their min and max. Absolute numbers (ms, img/s, bytes) are kept as context.
A few rows carry a plain value instead (MB/s, img/s, cores per GPU) and say so in their goal; rows
that cannot run on this machine say ``not measured (...)`` and are never filled with an estimate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# ----------------------------------------------------------------------------------------- goals


@dataclass(frozen=True)
class Goal:
    """A target next to a figure. ``op``: '<=', '>=', '~' (target ± tol) or '' (context, no goal)."""

    op: str
    target: float = 0.0
    tol: float = 0.0
    note: str = ""

    def text(self) -> str:
        if self.op == "<=":
            s = f"≤ {self.target:.2f}"
        elif self.op == ">=":
            s = f"≥ {self.target:g}" if self.target >= 1 or self.target == 0 else f"≥ {self.target:.0%}"
        elif self.op == "~":
            s = f"{self.target:.2f} ± {self.tol:.2f}"
        else:
            s = "context"
        return f"{s} {self.note}".strip()

    def met(self, value: float | None) -> bool | None:
        if value is None or not self.op:
            return None
        if self.op == "<=":
            return value <= self.target
        if self.op == ">=":
            return value >= self.target
        return abs(value - self.target) <= self.tol + 1e-12


CONTEXT = Goal("")

MEASURED = "measured"
PROJECTION = "projection"
ANCHOR = "anchor"
NOT_RUN = "not run"
NO_GPU = "not measured (no GPU)"


@dataclass
class Row:
    """One line of the results table."""

    id: str
    bench: str
    what: str
    goal: Goal
    kind: str = "ratio"
    """'ratio' (A ÷ B) or 'value' (a plain figure with a unit)."""
    status: str = NOT_RUN
    """'measured', 'projection', 'anchor', or 'not measured (why)' / 'not run (why)'."""
    ratio: float | None = None
    ratio_min: float | None = None
    ratio_max: float | None = None
    reps: int = 0
    value: float | None = None
    unit: str = ""
    sides: str = ""
    """What A and B are, e.g. 'ours ÷ timm'."""
    context: str = ""
    """Absolute figures behind the ratio, for orientation only."""
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def headline(self) -> float | None:
        return self.ratio if self.kind == "ratio" else self.value

    @property
    def met(self) -> bool | None:
        if not self.filled:
            return None
        return self.goal.met(self.headline)

    @property
    def filled(self) -> bool:
        return self.headline is not None and self.status in (MEASURED, PROJECTION, ANCHOR)

    def set_pairs(self, stats: PairStats) -> None:
        self.ratio, self.ratio_min, self.ratio_max = stats.ratio, stats.ratio_min, stats.ratio_max
        self.reps = stats.reps
        self.status = MEASURED

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["goal"] = {"text": self.goal.text(), "op": self.goal.op, "target": self.goal.target,
                       "tol": self.goal.tol}
        out["met"] = self.met
        return out


# ----------------------------------------------------------------------------------------- timing


@dataclass
class PairStats:
    """Per-pair ratios a_i / b_i of alternated runs and the absolute times behind them."""

    a_s: list[float]
    b_s: list[float]

    @property
    def ratios(self) -> list[float]:
        return [a / b for a, b in zip(self.a_s, self.b_s)]

    @property
    def reps(self) -> int:
        return len(self.a_s)

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def ratio_min(self) -> float:
        return min(self.ratios)

    @property
    def ratio_max(self) -> float:
        return max(self.ratios)

    @property
    def a_median(self) -> float:
        return statistics.median(self.a_s)

    @property
    def b_median(self) -> float:
        return statistics.median(self.b_s)

    def to_json(self) -> dict[str, Any]:
        return {"a_s": self.a_s, "b_s": self.b_s, "ratios": self.ratios}


def alternate(a: Callable[[], Any], b: Callable[[], Any], reps: int, warmup: int = 1,
              timer: Callable[[Callable[[], Any]], float] | None = None,
              log: Callable[[str], None] | None = None, group: int = 1) -> PairStats:
    """Run A B A B ... (`warmup` untimed pairs first); returns the timed pairs.

    `timer(fn)` returns the seconds one call took (default: wall time of ``fn()``); benchmarks whose
    figure is not a wall time of the whole call (a stall inside a save, a rate) pass their own.
    With ``group > 1`` a pair is the sums over `group` interleaved calls (A B A B ... `group` times):
    short calls interleaved finely see the same machine state, so a load burst on a shared host hits
    both sides of a pair instead of one.
    """
    timer = timer or wall_s
    for _ in range(warmup * group):
        timer(a)
        timer(b)
    a_s, b_s = [], []
    for i in range(reps):
        ta = tb = 0.0
        for _ in range(group):
            gc.collect()
            ta += timer(a)
            gc.collect()
            tb += timer(b)
        a_s.append(ta)
        b_s.append(tb)
        if log:
            log(f"    pair {i + 1}/{reps}: A {a_s[-1] * 1e3:.1f} ms, B {b_s[-1] * 1e3:.1f} ms, "
                f"A/B {a_s[-1] / b_s[-1]:.3f}")
    return PairStats(a_s, b_s)


def wall_s(fn: Callable[[], Any]) -> float:
    """Seconds one call of `fn` takes (wall clock)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class CpuClock:
    """A timer for :func:`alternate` returning the CPU seconds this process (all its threads, user +
    system) spent in a call. A process waiting for a core accrues none, so on a shared host a load burst
    does not land on one side of a pair as it does in wall time. Wall seconds are kept per side too."""

    def __init__(self) -> None:
        self.wall: dict[Callable, list[float]] = {}

    def __call__(self, fn: Callable[[], Any]) -> float:
        cpu, wall = time.process_time(), time.perf_counter()
        fn()
        self.wall.setdefault(fn, []).append(time.perf_counter() - wall)
        return time.process_time() - cpu

    def wall_pairs(self, a: Callable, b: Callable, reps: int, group: int = 1) -> PairStats:
        """The wall seconds of the last `reps` pairs that :func:`alternate` timed with this clock."""
        def sums(fn: Callable) -> list[float]:
            calls = self.wall[fn][-reps * group:]
            return [sum(calls[i * group:(i + 1) * group]) for i in range(reps)]

        return PairStats(sums(a), sums(b))


def fmt_s(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


# ----------------------------------------------------------------------------------------- context


@dataclass
class Context:
    """What a benchmark run knows: mode, threads, a scratch dir, a lazily started S3 endpoint."""

    quick: bool
    threads: int
    workdir: str
    log: Callable[[str], None] = print
    shared: dict[str, Any] = field(default_factory=dict)
    """Figures one benchmark hands to a later one in the same run (e.g. the data rate)."""
    reps: int = 0
    """``--reps``: timed pairs for the benchmarks that take it (0 = their default)."""
    _s3: Any = None

    def pairs(self, quick: int, full: int) -> int:
        """Timed pairs: ``--reps`` if given (a smoke test; results need >= 5), else the mode's default."""
        return self.reps or (quick if self.quick else full)

    @property
    def has_cuda(self) -> bool:
        import torch

        return torch.cuda.is_available()

    def s3(self):
        """A moto S3 server on loopback (started once per run; the AWS env vars point at it).

        If ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` is already set, that endpoint is used instead.
        """
        if self._s3 is None:
            if os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"):
                self._s3 = "external"
            else:
                from launch.local_s3 import start_local_s3

                server = start_local_s3(log_path=os.path.join(self.workdir, "moto.log"))
                os.environ.update(server.env)
                self._s3 = server
        return self._s3

    def s3_endpoint(self) -> str:
        self.s3()
        return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""

    def close(self) -> None:
        if self._s3 is not None and self._s3 != "external":
            self._s3.stop()
            for key in self._s3.env:
                os.environ.pop(key, None)
        self._s3 = None


def make_context(quick: bool, threads: int | None = None, log: Callable[[str], None] = print,
                 reps: int = 0) -> Context:
    import torch

    threads = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    return Context(quick=quick, threads=threads, workdir=tempfile.mkdtemp(prefix="bench-"), log=log, reps=reps)


# ----------------------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int) -> dict[str, Any]:
    import torch

    versions: dict[str, str] = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("deepspeed", "timm", "ray", "torchvision", "moto", "s3fs", "numpy", "PIL"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is just not listed
            versions[mod] = "not installed"
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "count": torch.cuda.device_count(),
               "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda,
               "cudnn": torch.backends.cudnn.version()}
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line
                    break
    except OSError:
        pass
    isa = [x for x in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f" {x}" in flags]
    return {
        "cpu_model": cpu_model(),
        "cpu_cores_available": len(os.sched_getaffinity(0)),
        "cpu_isa": isa,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": threads,
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS", ""),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "gpu": gpu,
        "platform": platform.platform(),
        "versions": versions,
    }


def machine_slug(info: dict[str, Any]) -> str:
    """Short, filesystem-safe machine name for result files, e.g. ``cpu-amd-epyc-2c``."""
    import re

    if info.get("gpu"):
        name = f"{info['gpu']['count']}x-{info['gpu']['name']}"
    else:
        name = f"cpu-{info['cpu_model']}-{info['cpu_cores_available']}c"
    name = re.sub(r"\(r\)|\(tm\)|cpu @.*|processor", "", name.lower())
    name = re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return re.sub(r"-+", "-", name)[:60]


# ----------------------------------------------------------------------------------------- ranks


def launch_ranks(ctx: Context, n: int, module: str, args: list[str], name: str, timeout_s: float = 600.0) -> str:
    """Run ``python -m <module> --worker DIR <args>`` as `n` ranks of one gloo group (the environment
    torchrun sets, one thread each, no GPU); returns DIR, where each rank leaves its results.

    A rank that fails ends the others at once (they would wait in a collective until the timeout).
    """
    from pretrain.engine.distributed import free_port

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out_dir = os.path.join(ctx.workdir, name)
    os.makedirs(out_dir, exist_ok=True)
    port = str(free_port())
    cmd = [sys.executable, "-m", module, "--worker", out_dir, *args]
    procs: list[subprocess.Popen] = []
    deadline = time.monotonic() + timeout_s
    with contextlib.ExitStack() as logs:
        try:
            for rank in range(n):
                env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(n), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                       "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
                log = logs.enter_context(open(os.path.join(out_dir, f"rank{rank}.log"), "w"))
                procs.append(subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT))
            while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{module} workers ({n} ranks) still running after {timeout_s:.0f}s")
                time.sleep(0.2)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    failed = sorted((rank for rank, proc in enumerate(procs) if proc.returncode != 0),
                    key=lambda rank: procs[rank].returncode < 0)  # the one that failed before those killed
    if failed:
        with open(os.path.join(out_dir, f"rank{failed[0]}.log")) as f:
            tail = f.read()[-2000:]
        raise RuntimeError(f"{module} worker rank {failed[0]} of {n} exited {procs[failed[0]].returncode}:\n{tail}")
    return out_dir
