"""Model: our ConvNeXt train step ÷ timm's ConvNeXt train step (same variant, batch, dtype, weights).

One step = forward + cross-entropy + backward + AdamW step + zero_grad. Both sides get:

* the same weights (our state dict is loaded into timm's model; keys and shapes are identical),
* channels_last parameters and inputs, the same input batch and labels, ``train()`` mode,
* the same optimizer: ``torch.optim.AdamW`` with our parameter groups (no decay on 1-D params) and
  ``foreach=True`` on CPU (what ``pretrain.optim.build_optimizer`` builds there), ``fused=True`` on CUDA,
* bf16 as ``torch.autocast(device, torch.bfloat16)`` over fp32 weights (timm's ``--amp-dtype
  bfloat16`` path); the optimizer and the master weights stay fp32. On a CPU without native bf16
  (AVX2-only) our side gets the trainer's emulation (``pretrain.engine.cpu_bf16``); elsewhere both
  sides run the same stock kernels.

Sides alternate ours, timm, ours, timm ... in one process; each figure is the median of the per-pair
ratios after warm-up, of CPU seconds on CPU (``CpuClock``: a load burst on a shared host does not land
on one side) and of synchronized wall time on CUDA. ``python -m benchmarks.model_step --profile convnext_tiny 64 16 fp32`` prints a
torch.profiler op table of both sides (used for docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks.harness import NO_GPU, Context, CpuClock, Goal, PairStats, Row, alternate, fmt_s

NAME = "model_step"
GOAL = Goal("<=", 0.90)


@dataclass(frozen=True)
class Case:
    model: str
    size: int
    batch: int
    dtype: str  # "fp32" | "bf16"
    device: str = "cpu"
    compile: bool = False

    @property
    def id(self) -> str:
        mode = "-compile" if self.compile else ""
        return f"model/{self.device}/{self.model.removeprefix('convnext_')}-{self.size}px-b{self.batch}-{self.dtype}{mode}"

    @property
    def what(self) -> str:
        dtype = "bf16 autocast" if self.dtype == "bf16" else "fp32"
        mode = ", torch.compile" if self.compile else (", eager" if self.device == "cuda" else "")
        return (f"train step {self.model} {self.size}px batch {self.batch} {dtype}, channels_last{mode} "
                f"({'GPU' if self.device == 'cuda' else 'CPU'})")


CPU_FULL = [
    Case("convnext_atto", 64, 32, "fp32"), Case("convnext_atto", 224, 16, "fp32"),
    Case("convnext_nano", 128, 16, "fp32"), Case("convnext_tiny", 64, 16, "fp32"),
    Case("convnext_tiny", 224, 8, "fp32"),
    Case("convnext_atto", 64, 16, "bf16"), Case("convnext_nano", 64, 16, "bf16"),
    Case("convnext_tiny", 64, 8, "bf16"),
]
CPU_QUICK = [Case("convnext_atto", 64, 32, "fp32"), Case("convnext_tiny", 64, 16, "fp32"),
             Case("convnext_atto", 64, 16, "bf16")]
GPU = [Case(m, 224, b, "bf16", "cuda", c) for m, b in (("convnext_tiny", 128), ("convnext_xlarge", 32))
       for c in (False, True)]


def cases(quick: bool) -> list[Case]:
    return (CPU_QUICK if quick else CPU_FULL) + GPU


def plan(ctx: Context) -> list[Row]:
    rows = []
    for case in cases(ctx.quick):
        row = Row(case.id, NAME, case.what, GOAL, sides="ours ÷ timm")
        if case.device == "cuda" and not ctx.has_cuda:
            row.status = NO_GPU
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------- building


def build_pair(name: str, device: str = "cpu", seed: int = 0):
    """(ours, timm's) with identical weights, channels_last, in train mode, on `device`."""
    import timm

    from pretrain.models import create_model

    torch.manual_seed(seed)
    ours = create_model(name)
    with torch.device("meta"):  # skip timm's init; assign=True adopts copies of our tensors
        theirs = timm.create_model(name, pretrained=False)
    theirs.load_state_dict({k: v.clone() for k, v in ours.state_dict().items()}, strict=True, assign=True)
    out = []
    for m in (ours, theirs):
        out.append(m.to(device).to(memory_format=torch.channels_last).train())
    return out[0], out[1]


def make_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: str,
              compile_model: bool = False) -> Callable[[], None]:
    """A closure running one full training step (forward, loss, backward, AdamW, zero_grad)."""
    from pretrain.optim import param_groups

    device = x.device.type
    on_cuda = device == "cuda"
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                            **({"fused": True} if on_cuda else {"foreach": True}))
    fwd = torch.compile(model) if compile_model else model
    amp = (torch.autocast(device, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext())

    def step() -> None:
        with amp:
            loss = F.cross_entropy(fwd(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def inputs(case: Case, num_classes: int = 1000):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(case.batch, 3, case.size, case.size, generator=g)
    y = torch.randint(0, num_classes, (case.batch,), generator=g)
    return (x.to(case.device).contiguous(memory_format=torch.channels_last), y.to(case.device))


def _timer(device: str):
    """CPU: CPU seconds of the process (robust to other load on a shared host); CUDA: synchronized wall time."""
    if device != "cuda":
        return CpuClock()
    import time

    def timer(fn):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start

    return timer


def measure_case(case: Case, reps: int, warmup: int, log=print) -> tuple[PairStats, PairStats]:
    """(the figure's pairs, wall-clock pairs); on CUDA both are the synchronized wall time."""
    from pretrain.engine import cpu_bf16

    ours, theirs = build_pair(case.model, case.device)
    if cpu_bf16.needed(case.dtype, torch.device(case.device)):
        cpu_bf16.apply(ours)  # as the trainer does on a CPU without native bf16
    x, y = inputs(case)
    a = make_step(ours, x, y, case.dtype, case.compile)
    b = make_step(theirs, x, y, case.dtype, case.compile)
    timer = _timer(case.device)
    stats = alternate(a, b, reps=reps, warmup=warmup, timer=timer, log=log)
    wall = timer.wall_pairs(a, b, reps) if isinstance(timer, CpuClock) else stats
    del a, b, ours, theirs
    return stats, wall


def run(ctx: Context, rows: dict[str, Row]) -> None:
    reps = ctx.pairs(5, 9)  # CPU timings here vary ±10 % pair to pair: more pairs for the median
    for case in cases(ctx.quick):
        row = rows[case.id]
        if case.device == "cuda" and not ctx.has_cuda:
            continue
        ctx.log(f"  {case.id}")
        warmup = 3 if case.compile else (1 if case.dtype == "bf16" and case.device == "cpu" else 2)
        stats, wall = measure_case(case, reps, warmup, log=ctx.log)
        row.set_pairs(stats)
        ips_a, ips_b = case.batch / wall.a_median, case.batch / wall.b_median
        row.context = (f"ours {fmt_s(wall.a_median)} ({ips_a:.1f} img/s), timm {fmt_s(wall.b_median)} "
                       f"({ips_b:.1f} img/s) per step")
        if wall is not stats:
            row.context += (f" wall clock, ratio {wall.ratio:.3f} ({wall.ratio_min:.3f} – {wall.ratio_max:.3f}); CPU "
                            f"seconds per step ours {fmt_s(stats.a_median)}, timm {fmt_s(stats.b_median)}")
        row.detail = {"case": case.__dict__, "pairs": stats.to_json(), "pairs_wall": wall.to_json(),
                      "threads": torch.get_num_threads(),
                      "optimizer": "AdamW fused" if case.device == "cuda" else "AdamW foreach",
                      "bf16_mode": "autocast" if case.dtype == "bf16" else None}
        ctx.shared[case.id] = {"ours_s": wall.a_median, "timm_s": wall.b_median, "batch": case.batch}


# ----------------------------------------------------------------------------------------- profiling


def profile_case(case: Case, steps: int = 3, row_limit: int = 25,
                 sort_by: str = "self_cpu_time_total") -> dict[str, str]:
    """torch.profiler op tables (self time) of ours and timm's, after one warm-up step each."""
    from torch.profiler import ProfilerActivity, profile

    ours, theirs = build_pair(case.model, case.device)
    x, y = inputs(case)
    tables = {}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if case.device == "cuda" else [])
    for label, model in (("ours", ours), ("timm", theirs)):
        step = make_step(model, x, y, case.dtype, case.compile)
        step()
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step()
        tables[label] = prof.key_averages().table(sort_by=sort_by, row_limit=row_limit, max_name_column_width=42)
    return tables


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.model_step")
    parser.add_argument("--profile", nargs=4, metavar=("MODEL", "SIZE", "BATCH", "DTYPE"))
    parser.add_argument("--case", nargs=4, metavar=("MODEL", "SIZE", "BATCH", "DTYPE"),
                        help="measure one case (ours ÷ timm) and print the pairs")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args(argv)
    import os

    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    if args.profile:
        m, s, b, d = args.profile
        for label, table in profile_case(Case(m, int(s), int(b), d), row_limit=args.rows).items():
            print(f"==== {label}: {m} {s}px batch {b} {d}, {torch.get_num_threads()} threads, 3 steps\n{table}")
    if args.case:
        m, s, b, d = args.case
        stats, _ = measure_case(Case(m, int(s), int(b), d), args.reps, 2)
        print(f"ours ÷ timm = {stats.ratio:.3f} (min {stats.ratio_min:.3f}, max {stats.ratio_max:.3f}); "
              f"ours {fmt_s(stats.a_median)}, timm {fmt_s(stats.b_median)}")


if __name__ == "__main__":
    main()
