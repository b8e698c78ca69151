"""Engine: the real worker step through DeepSpeed ÷ a bare PyTorch loop, and fp32 ÷ bf16 gradient reductions.

**Overhead** (world size 1: one process, a one-rank gloo group, so both sides run alternately in it):

* A, the worker step: a ``pretrain.trainer.Trainer`` built as the worker builds it (DeepSpeed ZeRO-2,
  bf16, AdamW, sharded EMA; ``configs/demo.toml``) over a stand-in manifest; each step runs exactly
  what ``Trainer.fit`` runs per step: ``train_step()`` (LR set, on-device normalization of the uint8
  batch, forward, ``engine.backward``, ``engine.step``, EMA update), ``_control()`` (the per-step
  all-reduce carrying the loss: the step's one host sync of ours) and, every ``logging.every_steps``,
  ``_log()`` (TensorBoard scalars to a local directory, console line). Only the data loader is replaced
  by a ready batch, mixup is off (augmentation is not engine work) and so is the run lease (a
  heartbeat thread every 30 s).
* B, the bare loop: the same model, batch and on-device normalization, in bf16 weights with fp32 master
  copies and ``torch.optim.AdamW(foreach=True)`` on the masters (the same numerics as DeepSpeed's bf16
  mode): forward, the same soft-target loss, backward, grads copied to the masters, step, masters
  copied back.

The two sides alternate step by step (A B A B ...), and a pair sums ``logging.every_steps`` (5) steps of
each, so each pair holds one log. The figure is CPU seconds of the process (all threads, ``CpuClock``):
on CPU a step's time *is* its CPU work, and a process waiting for a core on the shared host accrues
none, so a load burst does not land on one side of a pair; wall-clock ratios are in the context. Host
syncs, which the trainer removed for the GPU's sake, cost nothing measurable on CPU. Engine overhead is
per parameter (gradient copies, overflow checks, the optimizer, EMA) while model time is per FLOP, so
the proxy is sized like the XL recipe: convnext_atto at 224 px, micro-batch 32 does
3 × 2 × 0.55 GMAC × 32 ≈ 106 GFLOP per step over 3.7 M parameters, ≈ 2.9·10⁴ FLOP per parameter, as XL
does at 224 px and micro-batch 32 (3 × 2 × 61 GMAC × 32 / 393 M ≈ 3.0·10⁴). ``--quick`` uses 128 px
(≈ 0.9·10⁴, so its ratio is an upper bound).

**Gradient communication dtype** (CPU, gloo, 2 ranks, one thread each; *not* a GPU/NCCL figure): the
worker step (as A above) of two trainers that differ only in ``zero.communication_dtype``, fp32 ÷ bf16,
alternating step by step in both ranks; rank 0's CPU seconds (gloo's loopback transfers are CPU work:
copies through the kernel, summation), wall clock in the context. With fp32 DeepSpeed casts each gradient
bucket to fp32, reduces twice the bytes and casts back. convnext_atto at 128 px, micro-batch 16 per rank: ≈ 5·10³ FLOP per
parameter, 6× less compute per communicated byte than the XL recipe, so on this host the figure bounds
the cost from above; on NCCL over NVLink/EFA the communication share differs and must be measured there.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os

import torch

from benchmarks.harness import CONTEXT, Context, CpuClock, Goal, PairStats, Row, alternate, fmt_s, launch_ranks

NAME = "engine_overhead"
FULL_PX, QUICK_PX, MICRO = 224, 128, 32
COMM_PX, COMM_MICRO, COMM_RANKS = 128, 16, 2
DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.toml")
STEPS_PER_PAIR = 5
STAND_IN_SAMPLES = 1_000_000


def plan(ctx: Context) -> list[Row]:
    px = QUICK_PX if ctx.quick else FULL_PX
    return [Row("engine/zero2-bf16-ema-log", NAME,
                f"worker step (ZeRO-2, bf16, EMA, logging; world size 1) of convnext_atto {px}px batch {MICRO}",
                Goal("<=", 1.02), sides="Trainer step via DeepSpeed ÷ bare PyTorch loop"),
            Row("engine/comm-fp32-vs-bf16", NAME,
                f"worker step with fp32 ÷ bf16 gradient reductions (zero.communication_dtype), ZeRO-2, "
                f"{COMM_RANKS} ranks on CPU gloo (not a GPU figure), convnext_atto {COMM_PX}px batch {COMM_MICRO} "
                "per rank", CONTEXT, sides="communication_dtype fp32 ÷ bf16")]


def config(workdir: str, *overrides: str, px: int = FULL_PX, micro: int = MICRO, ranks: int = 1):
    """The demo config as a benchmark trainer runs it: no mixup, no lease, a long schedule, `overrides` last."""
    from pretrain.config import load_config

    return load_config(DEMO, [f"run.url={os.path.join(workdir, 'engine-run')}", "data.train_url=unused",
                              f"launch.num_workers={ranks}", "lease.enabled=false",
                              "data.mixup=0.0", "data.cutmix=0.0", "data.num_workers=0",
                              f"schedule.global_batch_size={micro * ranks}", f"data.micro_batch_size={micro}",
                              f"data.image_size={px}", f"logging.every_steps={STEPS_PER_PAIR}",
                              "logging.image_grid=false", "schedule.steps=100000", "schedule.warmup_steps=10",
                              *overrides])


def stand_in_manifest(num_classes: int, samples: int = STAND_IN_SAMPLES, per_shard: int = 1000):
    """A manifest of `samples` made-up samples: what the trainer plans with; nothing is ever read."""
    from pretrain.data.shards import Manifest, ShardInfo

    return Manifest(num_samples=samples, classes=[f"class_{i:04d}" for i in range(num_classes)],
                    label_source="sorted",
                    shards=[ShardInfo(f"shard-{i:06d}.tar", min(per_shard, samples - i * per_shard), 10**8, "0" * 64)
                            for i in range(-(-samples // per_shard))])


def build_trainer(cfg, ctx, manifest=None):
    """The worker's Trainer, built by its own constructor (engine, EMA, metrics, checkpoints, a loader
    that is never iterated) over `manifest` (default: a stand-in one)."""
    from pretrain.build import build_data
    from pretrain.trainer import Trainer

    manifest = manifest or stand_in_manifest(cfg.model.num_classes)
    trainer = Trainer(cfg, ctx, data=build_data(cfg, ctx, manifest=manifest))
    trainer.metrics.start(0)
    return trainer


def fixed_batch(cfg, seed: int = 0):
    """One random uint8 micro-batch as the loader delivers it."""
    from pretrain.data.batch import Batch

    g = torch.Generator().manual_seed(seed)
    size = (cfg.data.micro_batch_size, cfg.data.image_size, cfg.data.image_size, 3)
    return Batch(torch.randint(0, 256, size, generator=g, dtype=torch.uint8),
                 torch.randint(0, cfg.model.num_classes, (cfg.data.micro_batch_size,), generator=g))


def worker_step(trainer, batch, console: io.StringIO):
    """A closure running one step of ``Trainer.fit`` on `batch`: train_step, the control all-reduce and,
    every ``logging.every_steps``, the log (its console line goes to `console`)."""
    from pretrain.metrics import StepTimes

    batches = iter(lambda: batch, None)  # endless
    times = StepTimes()
    every = trainer.cfg.logging.every_steps

    def step() -> None:
        with contextlib.redirect_stdout(console):
            trainer._control(trainer.train_step(batches, times))
            if trainer.state.step % every == 0:
                trainer._log(times, 1.0, every)
                times.reset()

    return step


def bare_loop(cfg, batch):
    """The same model/batch/loss with bf16 weights, fp32 masters and torch AdamW: a closure per step."""
    from pretrain.data.transforms import DeviceAugment, smooth_one_hot
    from pretrain.engine import cpu_bf16
    from pretrain.models import create_model
    from pretrain.objectives import soft_target_cross_entropy
    from pretrain.optim import lr_at, param_groups, step_plan

    m = cfg.model
    torch.manual_seed(cfg.run.seed)
    model = create_model(m.name, num_classes=m.num_classes, drop_path_rate=m.drop_path_rate,
                         layer_scale_init=m.layer_scale_init, head_init_scale=m.head_init_scale)
    if cpu_bf16.needed("bf16", torch.device("cpu")):
        cpu_bf16.apply(model)  # as the worker does
    augment = DeviceAugment(cfg.data, torch.device("cpu"))
    masters = [p.detach().clone().float() for p in model.parameters()]
    model = model.to(torch.bfloat16)
    params = list(model.parameters())
    index = {id(p): i for i, p in enumerate(params)}
    groups = [{**g, "params": [masters[index[id(p)]] for p in g["params"]]}
              for g in param_groups(model, cfg.optim.weight_decay)]
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps, foreach=True)
    plan = step_plan(cfg.schedule, STAND_IN_SAMPLES)
    state = {"step": 0}

    def step() -> None:
        for g in opt.param_groups:
            g["lr"] = lr_at(state["step"], cfg.optim, plan)
        x = augment(batch.image).to(torch.bfloat16)  # uint8 NHWC -> normalized NCHW, channels last
        target = smooth_one_hot(batch.target, m.num_classes, cfg.data.label_smoothing)
        loss = soft_target_cross_entropy(model(x), target)
        loss.backward()
        for master, p in zip(masters, params):
            master.grad = p.grad.float()
            p.grad = None
        opt.step()
        with torch.no_grad():
            torch._foreach_copy_(params, masters)
        state["step"] += 1

    return step


def run(ctx: Context, rows: dict[str, Row]) -> None:
    from pretrain.engine.distributed import init_distributed

    cfg = config(ctx.workdir, px=QUICK_PX if ctx.quick else FULL_PX)
    dist_ctx = init_distributed(300.0)  # one group for the whole run: DeepSpeed caches it (see __main__)
    trainer = build_trainer(cfg, dist_ctx)
    batch = fixed_batch(cfg)
    console = io.StringIO()
    a, b = worker_step(trainer, batch, console), bare_loop(cfg, batch)
    clock, reps = CpuClock(), ctx.pairs(5, 7)
    try:
        stats = alternate(a, b, reps=reps, warmup=2, group=STEPS_PER_PAIR, timer=clock, log=ctx.log)
    finally:
        trainer.close()
    wall = clock.wall_pairs(a, b, reps, STEPS_PER_PAIR)
    row = rows["engine/zero2-bf16-ema-log"]
    row.set_pairs(stats)
    row.context = (f"CPU per step: worker {fmt_s(stats.a_median / STEPS_PER_PAIR)}, bare "
                   f"{fmt_s(stats.b_median / STEPS_PER_PAIR)} ({STEPS_PER_PAIR} steps per side and pair, interleaved, "
                   f"1 log each; {ctx.threads} torch threads); wall clock {fmt_s(wall.a_median / STEPS_PER_PAIR)} and "
                   f"{fmt_s(wall.b_median / STEPS_PER_PAIR)} per step, {wall.ratio:.3f} "
                   f"({wall.ratio_min:.3f} – {wall.ratio_max:.3f})")
    row.detail = {"pairs_cpu": stats.to_json(), "pairs_wall": wall.to_json(), "world_size": 1, "backend": "gloo",
                  "steps_per_pair": STEPS_PER_PAIR, "console_lines": console.getvalue().count("\n"),
                  "ema": trainer.ema is not None, "zero_stage": cfg.zero.stage, "dtype": cfg.precision.dtype}

    out_dir = launch_ranks(ctx, COMM_RANKS, "benchmarks.engine_overhead", ["--reps", str(reps)], "comm-dtype")
    with open(os.path.join(out_dir, "rank0.json")) as f:
        comm = json.load(f)
    stats, wall = PairStats(**comm["cpu"]), PairStats(**comm["wall"])
    row = rows["engine/comm-fp32-vs-bf16"]
    row.set_pairs(stats)
    row.context = (f"CPU per step (rank 0, 1 thread): fp32 reductions {fmt_s(stats.a_median / STEPS_PER_PAIR)}, bf16 "
                   f"{fmt_s(stats.b_median / STEPS_PER_PAIR)} ({STEPS_PER_PAIR} steps per side and pair, interleaved); "
                   f"wall clock {wall.ratio:.3f} ({wall.ratio_min:.3f} – {wall.ratio_max:.3f}); {comm['psi']:,} "
                   f"gradient elements, {comm['psi'] * 4 / 2**20:.1f} vs {comm['psi'] * 2 / 2**20:.1f} MiB reduced "
                   "per step; gloo on loopback, not NCCL")
    row.detail = {"pairs_cpu": stats.to_json(), "pairs_wall": wall.to_json(), "world_size": COMM_RANKS,
                  "backend": "gloo", "px": COMM_PX, "micro_batch": COMM_MICRO, "psi": comm["psi"],
                  "threads_per_rank": 1}
    ctx.log(f"    fp32 ÷ bf16 gradient reductions ({COMM_RANKS} ranks, gloo): {stats.ratio:.3f} "
            f"({stats.ratio_min:.3f} – {stats.ratio_max:.3f})")


def comm_worker(out_dir: str, reps: int, px: int = COMM_PX, micro: int = COMM_MICRO) -> None:
    """One rank of the communication-dtype row: two trainers (fp32 / bf16 reductions), alternated."""
    from pretrain.engine.distributed import destroy, init_distributed

    dist_ctx = init_distributed(300.0)
    console = io.StringIO()
    steps, trainers = [], []
    for dtype in ("fp32", "bf16"):
        cfg = config(os.path.join(out_dir, dtype), f"zero.communication_dtype={dtype}", px=px, micro=micro,
                     ranks=dist_ctx.world_size)
        trainers.append(build_trainer(cfg, dist_ctx))
        steps.append(worker_step(trainers[-1], fixed_batch(cfg, dist_ctx.rank), console))
    clock = CpuClock()
    stats = alternate(steps[0], steps[1], reps=reps, warmup=2, group=STEPS_PER_PAIR, timer=clock)
    wall = clock.wall_pairs(steps[0], steps[1], reps, STEPS_PER_PAIR)
    psi = sum(p.numel() for p in trainers[0].engine.module.parameters())
    for trainer in trainers:
        trainer.close()
    with open(os.path.join(out_dir, f"rank{dist_ctx.rank}.json"), "w") as f:
        json.dump({"cpu": {"a_s": stats.a_s, "b_s": stats.b_s}, "wall": {"a_s": wall.a_s, "b_s": wall.b_s},
                   "psi": psi}, f)
    destroy()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="communication-dtype benchmark worker (one rank; started by run())")
    parser.add_argument("--worker", required=True, help="output directory")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--px", type=int, default=COMM_PX)
    parser.add_argument("--micro", type=int, default=COMM_MICRO)
    args = parser.parse_args()
    comm_worker(args.worker, args.reps, args.px, args.micro)
