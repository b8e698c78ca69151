"""Engine overhead: the real worker step through DeepSpeed ÷ a bare PyTorch loop doing the same math.

World size 1: one process, a one-rank gloo group (so both sides run alternately in one process).

* A, the worker step: a ``pretrain.trainer.Trainer`` whose engine is built by its own
  ``_build_engine`` (DeepSpeed ZeRO-2, bf16, AdamW, sharded EMA) from ``configs/demo.toml``; each step
  runs exactly what ``Trainer.fit`` runs per step: ``train_step()`` (LR set, on-device normalization
  of the uint8 batch, forward, ``engine.backward``, ``engine.step``, EMA update), ``_control()`` (the
  per-step all-reduce carrying the loss and the only host sync of ours) and, every
  ``logging.every_steps``, ``_log()`` (TensorBoard scalars to a local directory, console line). Only the data loader is replaced by
  a ready batch, and mixup is off (augmentation is not engine work).
* B, the bare loop: the same model, batch and on-device normalization, in bf16 weights with fp32 master copies and
  ``torch.optim.AdamW(foreach=True)`` on the masters (the same numerics as DeepSpeed's bf16 mode):
  forward, the same soft-target loss, backward, grads copied to the masters, step, masters copied back.

One repetition = ``logging.every_steps`` (5) optimizer steps on each side, so each one includes one log.

Engine overhead is per parameter (gradient copies, overflow checks, the optimizer, EMA) while model
time is per FLOP, so the proxy is sized like the XL recipe: convnext_atto at 224 px, micro-batch 32
does 3 × 2 × 0.55 GMAC × 32 ≈ 106 GFLOP per step over 3.7 M parameters, ≈ 2.9·10⁴ FLOP per parameter,
as XL does at 224 px and micro-batch 32 (3 × 2 × 61 GMAC × 32 / 393 M ≈ 3.0·10⁴). ``--quick`` uses
128 px (≈ 0.9·10⁴, so its ratio is an upper bound).
"""

from __future__ import annotations

import contextlib
import io
import os
import types
from collections import Counter

import torch

from benchmarks.harness import Context, Goal, Row, alternate, fmt_s

NAME = "engine_overhead"
FULL_PX, QUICK_PX, MICRO = 224, 128, 32
DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.toml")
STEPS_PER_REP = 5


def plan(ctx: Context) -> list[Row]:
    px = QUICK_PX if ctx.quick else FULL_PX
    return [Row("engine/zero2-bf16-ema-log", NAME,
                f"worker step (ZeRO-2, bf16, EMA, logging; world size 1) of convnext_atto {px}px batch {MICRO}",
                Goal("<=", 1.05), sides="Trainer step via DeepSpeed ÷ bare PyTorch loop")]


def _config(workdir: str, px: int):
    from pretrain.config import load_config

    return load_config(DEMO, [f"run.url={os.path.join(workdir, 'engine-run')}", "data.train_url=unused",
                              "launch.num_workers=1",
                              "data.mixup=0.0", "data.cutmix=0.0", "data.num_workers=0",
                              f"schedule.global_batch_size={MICRO}", f"data.micro_batch_size={MICRO}",
                              f"data.image_size={px}",
                              f"logging.every_steps={STEPS_PER_REP}", "logging.image_grid=false",
                              "schedule.steps=100000", "schedule.warmup_steps=10"])


def build_trainer(cfg, ctx):
    """A Trainer with its real engine, EMA and metrics, minus data/checkpoint set-up (not engine work)."""
    from pretrain.checkpoint import CheckpointManager
    from pretrain.metrics import MetricsSink
    from pretrain.optim import step_plan
    from pretrain.trainer import Trainer

    trainer = Trainer.__new__(Trainer)
    trainer.cfg, trainer.ctx, trainer.stop_requested = cfg, ctx, (lambda: False)
    trainer.step, trainer.data_counters, trainer.step_counters, trainer.data_totals = 0, Counter(), Counter(), {}
    trainer.loss_first = trainer.loss_last = None
    trainer.last_eval, trainer.data_changes = {}, []
    trainer.resumed_from, trainer.lease, trainer.on_first_step = 0, None, None
    trainer.last_loss = float("nan")
    trainer.checkpoints = CheckpointManager(cfg.run.url, cfg.checkpoint, cfg.storage, ctx.rank, ctx.world_size)
    trainer.accum = 1
    trainer.manifest = types.SimpleNamespace(num_samples=1_000_000)
    trainer.plan = step_plan(cfg.schedule, trainer.manifest.num_samples)
    trainer.mixup = None
    trainer.metrics = MetricsSink(cfg.run.url, cfg.logging, cfg.storage, enabled=ctx.is_main)
    trainer.metrics.start(0)
    trainer._build_engine()
    return trainer


def bare_loop(cfg, batch: dict):
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
    plan = step_plan(cfg.schedule, 1_000_000)
    state = {"step": 0}

    def step() -> None:
        for g in opt.param_groups:
            g["lr"] = lr_at(state["step"], cfg.optim, plan)
        x = augment(batch["image"]).to(torch.bfloat16)  # uint8 NHWC -> normalized NCHW, channels last
        target = smooth_one_hot(batch["label"], m.num_classes, cfg.data.label_smoothing)
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
    from pretrain.metrics import StepTimes

    cfg = _config(ctx.workdir, QUICK_PX if ctx.quick else FULL_PX)
    dist_ctx = init_distributed(300.0)  # one group for the whole run: DeepSpeed caches it (see __main__)
    trainer = build_trainer(cfg, dist_ctx)
    g = torch.Generator().manual_seed(0)
    size = (cfg.data.micro_batch_size, cfg.data.image_size, cfg.data.image_size, 3)
    batch = {"image": torch.randint(0, 256, size, generator=g, dtype=torch.uint8),
             "label": torch.randint(0, cfg.model.num_classes, (cfg.data.micro_batch_size,), generator=g),
             "skipped": {}}

    def batches():
        while True:
            yield batch

    stream = batches()
    times = StepTimes()
    sink = io.StringIO()

    def worker_rep() -> None:
        with contextlib.redirect_stdout(sink):
            for _ in range(STEPS_PER_REP):
                trainer._control(trainer.train_step(stream, times))  # as Trainer.fit, per step
                if trainer.step % cfg.logging.every_steps == 0:
                    trainer._log(times, 1.0, STEPS_PER_REP)
                    times.reset()

    bare = bare_loop(cfg, batch)

    def bare_rep() -> None:
        for _ in range(STEPS_PER_REP):
            bare()

    stats = alternate(worker_rep, bare_rep, reps=ctx.pairs(5, 7), warmup=1, log=ctx.log)
    row = rows["engine/zero2-bf16-ema-log"]
    row.set_pairs(stats)
    row.context = (f"per step: worker {fmt_s(stats.a_median / STEPS_PER_REP)}, bare "
                   f"{fmt_s(stats.b_median / STEPS_PER_REP)} ({STEPS_PER_REP} steps per rep, 1 log each)")
    row.detail = {"pairs": stats.to_json(), "world_size": 1, "backend": "gloo", "steps_per_rep": STEPS_PER_REP,
                  "console_lines": sink.getvalue().count("\n"),
                  "ema": trainer.ema is not None, "zero_stage": cfg.zero.stage, "dtype": cfg.precision.dtype}
    trainer.metrics.close()
