"""The training worker's loop: one DeepSpeed engine per process, sharded EMA, checkpoints, metrics.

``Trainer`` is launcher-agnostic: torchrun, the DeepSpeed launcher and Ray Train workers all run
it through :func:`pretrain.worker.train_worker`. It never imports Ray.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from typing import Any, Callable, Iterator

import numpy as np
import torch

from pretrain import storage
from pretrain.checkpoint import CheckpointError, CheckpointManager, RankSnapshot, rng_state, set_rng_state
from pretrain.config import Config, ConfigError, config_diff, config_to_dict, dump_toml, grad_accum_steps
from pretrain.data.loader import EvalLoader, TrainLoader, merge_rank_states
from pretrain.data.order import derive_seed
from pretrain.data.shards import read_manifest
from pretrain.data.transforms import build_mixup, smooth_one_hot
from pretrain.ema import ShardedEma
from pretrain.engine import deepspeed as ds
from pretrain.engine.distributed import DistContext, all_reduce_sum, any_rank, broadcast_object
from pretrain.evaluate import evaluate, in1k_subset
from pretrain.metrics import MetricsSink, StepTimes, device_peak_flops, format_duration, memory_bytes
from pretrain.models import create_model
from pretrain.models.flops import flops_per_image
from pretrain.models.weights import load_weights
from pretrain.objectives import soft_target_cross_entropy
from pretrain.optim import build_optimizer, lr_at, step_plan

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive micro-batches produced a NaN/inf loss."""


class DataQualityError(RuntimeError):
    """More than data.max_skip_fraction of the samples read had to be skipped."""


class Trainer:
    def __init__(self, cfg: Config, ctx: DistContext, stop_requested: Callable[[], bool] = lambda: False):
        self.cfg, self.ctx, self.stop_requested = cfg, ctx, stop_requested
        self.step = 0
        self.counters: Counter = Counter()
        self.loss_first: float | None = None
        self.loss_last: float | None = None
        self.last_eval: dict[str, Any] = {}
        self._build_data()
        self._build_checkpointing()
        candidates, newest = self._resumable_steps()  # fails fast on a mismatched config
        self.metrics = MetricsSink(cfg.run.url, cfg.logging, cfg.storage, enabled=ctx.is_main)
        if newest and newest.get("finished") and newest["step"] >= self.plan.total_steps:
            self.step = self.resumed_from = newest["step"]  # nothing to train: skip the engine entirely
            return
        self._build_engine()
        self.resumed_from = self._restore(candidates)

    # ----------------------------------------------------------------------------- building

    def _build_data(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        if not cfg.data.train_url:
            raise ConfigError("data.train_url: empty; point it at a shard set built by `data-tools make-shards`")
        if cfg.precision.dtype == "fp16" and ctx.device.type != "cuda":
            raise ConfigError("precision.dtype: DeepSpeed supports fp16 (with loss scaling) only on CUDA devices; "
                              "use bf16 or fp32 on CPU")
        self.manifest = read_manifest(cfg.data.train_url, cfg.storage)
        if self.manifest.num_classes != cfg.model.num_classes:
            raise ConfigError(f"model.num_classes={cfg.model.num_classes} but the shards at {cfg.data.train_url} "
                              f"have {self.manifest.num_classes} classes")
        self.accum = grad_accum_steps(cfg.schedule, cfg.data, ctx.world_size)
        self.plan = step_plan(cfg.schedule, self.manifest.num_samples)
        self.loader = TrainLoader(cfg.data.train_url, self.manifest, cfg.data, cfg.storage, ctx.rank,
                                  ctx.world_size, cfg.run.seed, cfg.model.num_classes,
                                  pin_memory=ctx.device.type == "cuda")
        self.mixup = build_mixup(cfg.data, cfg.model.num_classes)
        self.eval_manifest = read_manifest(cfg.data.eval_url, cfg.storage) if cfg.data.eval_url else None

    def _build_engine(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        m = cfg.model
        model = create_model(m.name, num_classes=m.num_classes, drop_path_rate=m.drop_path_rate,
                             layer_scale_init=m.layer_scale_init, head_init_scale=m.head_init_scale,
                             checkpoint_stages=m.checkpoint_stages)
        if m.init_from:
            load_weights(model, m.init_from)
        # Parameters stay contiguous: ZeRO flattens them into shared buffers. Inputs (and so every
        # activation) are channels_last when model.channels_last is set.
        model = model.to(ctx.device)
        self.flops_per_image = flops_per_image(model, cfg.data.image_size)
        optimizer = build_optimizer(model, cfg.optim, on_cuda=ctx.device.type == "cuda")
        ds.quiet_deepspeed_logging()
        ds_config = ds.deepspeed_config(cfg.precision, cfg.zero, cfg.optim.grad_clip, cfg.data.micro_batch_size,
                                        self.accum, ctx.world_size)
        self.engine = ds.initialize(model, optimizer, ds_config)
        self.dtype = ds.lp_dtype(cfg.precision)
        self.fragments = ds.local_fragments(self.engine)
        self.ema = ShardedEma(cfg.ema, self.fragments) if cfg.ema.enabled else None
        torch.manual_seed(derive_seed(cfg.run.seed, "train", ctx.rank))  # per-rank stochastic depth

    def _build_checkpointing(self) -> None:
        self.checkpoints = CheckpointManager(
            self.cfg.run.url, self.cfg.checkpoint, self.cfg.storage, self.ctx.rank, self.ctx.world_size,
            merge_markers=lambda markers: {"loader": merge_rank_states([m["loader"] for m in markers])})

    # ----------------------------------------------------------------------------- resume

    def _resumable_steps(self) -> tuple[list[int], dict[str, Any] | None]:
        """Committed checkpoint steps and the newest manifest (rank 0 first removes leftovers)."""
        steps = None
        if self.ctx.is_main:
            removed = self.checkpoints.cleanup_uncommitted()
            if removed:
                log.warning("removed uncommitted checkpoint leftovers at steps %s", removed)
            steps = self.checkpoints.committed_steps()
        steps = broadcast_object(steps)
        newest = None
        for step in reversed(steps):  # the newest manifest that reads back (restore re-verifies)
            try:
                newest = self.checkpoints.read_manifest(step)
                break
            except (CheckpointError, FileNotFoundError, ValueError) as exc:
                log.error("checkpoint step %d is unreadable (%s)", step, exc)
        if newest is not None:
            self._check_compatible(newest)
        return steps, newest

    def _restore(self, steps: list[int]) -> int | None:
        """Load the newest committed checkpoint that verifies on every rank; None for a fresh run."""
        ctx = self.ctx
        for step in reversed(steps):
            error = ""
            try:
                manifest = self.checkpoints.read_manifest(step)
                self._check_compatible(manifest)
                self._load(step, manifest)
            except (CheckpointError, FileNotFoundError, KeyError, ValueError) as exc:
                if isinstance(exc, ConfigError):
                    raise
                error = f"{type(exc).__name__}: {exc}"
            if not any_rank(bool(error), ctx.device):
                if ctx.is_main:
                    log.info("resumed from %s (step %d)", self.checkpoints.step_url(step), step)
                return step
            log.error("checkpoint step %d cannot be loaded (%s); trying an older one", step,
                      error or "failed on another rank")
        return None

    def _check_compatible(self, manifest: dict[str, Any]) -> None:
        old, new = manifest.get("config", {}), config_to_dict(self.cfg)
        diffs = config_diff(old, new)
        if diffs and not self.cfg.run.allow_config_change:
            raise ConfigError(
                f"run.url {self.cfg.run.url} holds checkpoints of a different configuration:\n  "
                + "\n  ".join(diffs) + "\nUse a new run.url, or set run.allow_config_change=true to resume anyway.")
        if old.get("model", {}).get("name") != new["model"]["name"] or \
                old.get("model", {}).get("num_classes") != new["model"]["num_classes"]:
            raise ConfigError(f"the checkpoint at {self.cfg.run.url} is a {old.get('model')} model; this run "
                              f"builds {new['model']['name']} with {new['model']['num_classes']} classes")

    @torch.no_grad()
    def _load(self, step: int, manifest: dict[str, Any]) -> None:
        ctx, ckpt = self.ctx, self.checkpoints
        saved_world = manifest["world_size"]
        own_meta = ckpt.fetch_rank_meta(step, manifest, ctx.rank) if ctx.rank < saved_world else None
        own_keys = [f"{n}#{s}" for n, _, s, _ in own_meta["fragments"]] if own_meta else None
        exact = saved_world == ctx.world_size and own_keys == [f.key for f in self.fragments]
        if exact:
            tensors = ckpt.fetch_tensors(step, manifest, ctx.rank)
            for f, ema in zip(self.fragments, self.ema.tensors if self.ema else [None] * len(self.fragments)):
                f.master.copy_(tensors[f"master/{f.key}"])
                for k, v in f.states.items():
                    v.copy_(tensors[f"{k}/{f.key}"])
                if ema is not None:
                    ema.copy_(tensors.get(f"ema/{f.key}", tensors[f"master/{f.key}"]))
            set_rng_state(own_meta["rng"], tensors)
        else:
            self._load_resharded(step, manifest)
            torch.manual_seed(derive_seed(self.cfg.run.seed, "train", ctx.rank, step))
        ds.set_optimizer_step_count(self.engine, manifest["optimizer_step"])
        ds.refresh_lp_params(self.engine)
        if own_meta:
            ds.load_loss_scaler_state(self.engine, own_meta.get("loss_scaler", {}))
        self.loader.load_state_dict(manifest["loader"])
        self.step = step
        self.engine.global_steps = step
        self.engine.global_samples = step * self.cfg.schedule.global_batch_size
        self.counters = Counter(manifest.get("counters", {}))
        self.loss_first = manifest.get("metrics", {}).get("loss_first")

    def _load_resharded(self, step: int, manifest: dict[str, Any]) -> None:
        """Fill this rank's fragments from whichever saved fragments overlap them (elastic resume)."""
        ckpt = self.checkpoints
        pieces: dict[str, list[tuple[int, int, int]]] = {}
        for rank in range(manifest["world_size"]):
            for name, _, start, numel in ckpt.fetch_rank_meta(step, manifest, rank)["fragments"]:
                pieces.setdefault(name, []).append((start, numel, rank))
        cache: dict[int, dict[str, torch.Tensor]] = {}
        emas = self.ema.tensors if self.ema else [None] * len(self.fragments)
        for f, ema in zip(self.fragments, emas):
            covered = 0
            for start, numel, rank in pieces.get(f.name, []):
                lo, hi = max(start, f.start), min(start + numel, f.start + f.numel)
                if lo >= hi:
                    continue
                if rank not in cache:
                    cache[rank] = ckpt.fetch_tensors(step, manifest, rank)
                src = cache[rank]
                dst = slice(lo - f.start, hi - f.start)
                part = slice(lo - start, hi - start)
                key = f"{f.name}#{start}"
                f.master[dst] = src[f"master/{key}"][part]
                for k, v in f.states.items():
                    v[dst] = src[f"{k}/{key}"][part]
                if ema is not None:
                    ema[dst] = src.get(f"ema/{key}", src[f"master/{key}"])[part]
                covered += hi - lo
            if covered != f.numel:
                raise CheckpointError(f"{f.name}[{f.start}:{f.start + f.numel}]: checkpoint covers {covered} of "
                                      f"{f.numel} elements (is it from a different model?)")

    # ----------------------------------------------------------------------------- saving

    def _snapshot(self, finished: bool) -> RankSnapshot:
        tensors: dict[str, torch.Tensor] = {}
        emas = self.ema.tensors if self.ema else [None] * len(self.fragments)
        with torch.no_grad():
            for f, ema in zip(self.fragments, emas):
                tensors[f"master/{f.key}"] = f.master.detach().to("cpu", copy=True)
                for k, v in f.states.items():
                    tensors[f"{k}/{f.key}"] = v.detach().to("cpu", copy=True)
                if ema is not None:
                    tensors[f"ema/{f.key}"] = ema.to("cpu", copy=True)
        rng_meta, rng_tensors = rng_state()
        tensors.update(rng_tensors)
        meta = {"fragments": [[f.name, list(f.shape), f.start, f.numel] for f in self.fragments],
                "rng": rng_meta, "loader": self.loader.state_dict(),
                "loss_scaler": ds.loss_scaler_state(self.engine)}
        run_meta: dict[str, Any] = {}
        if self.ctx.is_main:
            run_meta = {"config": config_to_dict(self.cfg), "optimizer_step": ds.optimizer_step_count(self.engine),
                        "total_steps": self.plan.total_steps, "finished": finished,
                        "epoch": self.step * self.cfg.schedule.global_batch_size / self.manifest.num_samples,
                        "counters": dict(self.counters), "classes": self.manifest.classes,
                        "data": {"train_url": self.cfg.data.train_url, "num_samples": self.manifest.num_samples,
                                 "label_source": self.manifest.label_source,
                                 "manifest_sha256": self.manifest_sha256()},
                        "metrics": {"loss_first": self.loss_first, "loss_last": self.loss_last, **self.last_eval}}
        return RankSnapshot(self.step, self.ctx.rank, self.ctx.world_size, tensors, meta, run_meta)

    def manifest_sha256(self) -> str:
        """Digest of the data manifest, computed once: encoding a 22k manifest costs ~60 ms per save."""
        import hashlib

        digest = getattr(self, "_manifest_sha256", None)
        if digest is None:
            digest = self._manifest_sha256 = hashlib.sha256(self.manifest.to_json().encode()).hexdigest()
        return digest

    def save(self, finished: bool = False, blocking: bool = False) -> float:
        """Checkpoint the current step; returns the seconds training was blocked."""
        started = time.perf_counter()
        self.checkpoints.save(self._snapshot(finished), blocking=blocking)
        if blocking:
            torch.distributed.barrier()  # rank 0 returns only after the manifest is committed
        return time.perf_counter() - started

    # ----------------------------------------------------------------------------- training

    def _batches(self) -> Iterator[dict]:
        return iter(self.loader)

    def _inputs(self, batch: dict, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        device, cfg = self.ctx.device, self.cfg
        x = batch["image"].to(device, non_blocking=True)
        y = batch["label"].to(device, non_blocking=True)
        if cfg.model.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.mixup is not None:
            # timm's Mixup draws from numpy's global RNG: seed it per micro-batch for exact resume.
            np.random.seed(derive_seed(cfg.run.seed, "mixup", self.step, self.ctx.rank, micro) % 2**32)
            x, target = self.mixup(x, y)
        else:
            target = smooth_one_hot(y, cfg.model.num_classes, cfg.data.label_smoothing)
        return x.to(self.dtype), target

    def train_step(self, batches: Iterator[dict], times: StepTimes) -> float:
        """One optimizer step (accumulating `accum` good micro-batches); returns the mean loss."""
        ds.set_lr(self.engine, lr_at(self.step, self.cfg.optim, self.plan))
        losses = []
        while len(losses) < self.accum:
            t0 = time.perf_counter()
            batch = next(batches)
            t1 = time.perf_counter()
            times.data_s += t1 - t0
            self.counters["samples_read"] += len(batch["label"]) + sum(batch["skipped"].values())
            for reason, n in batch["skipped"].items():
                self.counters[f"skipped/{reason}"] += n
            if self.step == 0 and not losses and self.ctx.is_main and self.resumed_from is None:
                self.metrics.image_grid(0, batch["image"], self.cfg.data.mean, self.cfg.data.std)
            x, target = self._inputs(batch, len(losses) + self.counters["_nonfinite_in_row"])
            loss = soft_target_cross_entropy(self.engine(x), target)
            if any_rank(not bool(torch.isfinite(loss).item()), self.ctx.device):
                self._on_nonfinite()
                continue  # the micro-batch is dropped on every rank; the window takes the next one
            self.counters["_nonfinite_in_row"] = 0
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach())
            times.compute_s += time.perf_counter() - t1
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.step)
        if ds.overflowed(self.engine):
            self.counters["fp16_overflow_steps"] += 1
        return float(torch.stack(losses).float().mean())

    def _on_nonfinite(self) -> None:
        self.counters["nonfinite_skipped"] += 1
        self.counters["_nonfinite_in_row"] += 1
        in_row = self.counters["_nonfinite_in_row"]
        log.warning("step %d: non-finite loss; micro-batch skipped (%d in a row)", self.step, in_row)
        if in_row >= self.cfg.optim.max_nonfinite_in_row:
            raise NonFiniteLossError(
                f"{in_row} consecutive micro-batches had a non-finite loss at step {self.step} "
                f"(optim.max_nonfinite_in_row={self.cfg.optim.max_nonfinite_in_row}); the last committed "
                f"checkpoint ({self.checkpoints.last_committed or self.resumed_from}) is intact. "
                "Lower optim.lr or enable optim.grad_clip.")

    def _control(self) -> bool:
        """One all-reduce per step: preemption requested anywhere, and the global skipped fraction."""
        reads = float(self.counters["samples_read"])
        skipped = float(sum(v for k, v in self.counters.items() if k.startswith("skipped/")))
        stop, reads, skipped = all_reduce_sum([1.0 if self.stop_requested() else 0.0, reads, skipped],
                                              self.ctx.device)
        limit = self.cfg.data.max_skip_fraction
        if reads >= 100 and skipped / reads > limit:
            raise DataQualityError(
                f"{skipped:.0f} of {reads:.0f} samples read ({skipped / reads:.2%}) were skipped as corrupt or "
                f"unreadable, above data.max_skip_fraction={limit:.2%}; run `data-tools verify "
                f"{self.cfg.data.train_url}`. Counts by reason: "
                f"{ {k: v for k, v in self.counters.items() if k.startswith('skipped/')} }")
        return stop > 0

    def fit(self) -> dict[str, Any]:
        total = self.plan.total_steps
        if self.step >= total:
            self.metrics.console(f"run {self.cfg.run.url} already finished at step {self.step}/{total}; nothing to "
                                 "do (use a new run.url, or to train further raise schedule.steps together "
                                 "with run.allow_config_change=true)")
            return self.summary("already_finished")
        self.metrics.start(self.step)
        if self.ctx.is_main:
            self._print_plan()
            storage.write_bytes(storage.join(self.cfg.run.url, "config.toml"), dump_toml(self.cfg).encode(),
                                self.cfg.storage)
        batches = self._batches()
        times = StepTimes()
        window_start, window_steps = time.perf_counter(), 0
        while self.step < total:
            if self._control():
                return self._preempt()
            loss = self.train_step(batches, times)
            window_steps += 1
            if self.step % self.cfg.checkpoint.every_steps == 0 and self.step < total:
                times.checkpoint_s += self.save()
            self.checkpoints.check()
            if self.cfg.eval.every_steps and self.step % self.cfg.eval.every_steps == 0 and self.step < total:
                self.run_eval()
            if self.step % self.cfg.logging.every_steps == 0 or self.step in (1, total):
                self._log(loss, times, time.perf_counter() - window_start, window_steps)
                window_start, window_steps = time.perf_counter(), 0
                times.reset()
        if self.eval_manifest is not None:
            self.run_eval()
        self.save(finished=True, blocking=True)
        return self.summary("finished")

    def _preempt(self) -> dict[str, Any]:
        started = time.perf_counter()
        self.save(blocking=True)
        elapsed = time.perf_counter() - started
        grace = self.cfg.launch.preemption_grace_s
        msg = (f"preemption: committed checkpoint at step {self.step} in {elapsed:.1f}s "
               f"(grace {grace:.0f}s); run the same command again to resume")
        (log.warning if elapsed > grace else log.info)(msg)
        self.metrics.console(msg)
        return self.summary("preempted")

    def _print_plan(self) -> None:
        cfg, plan = self.cfg, self.plan
        where = f"resuming at step {self.step}" if self.resumed_from is not None else "starting"
        self.metrics.console(
            f"{where}: {cfg.model.name} on {self.manifest.num_samples} samples / {self.manifest.num_classes} classes; "
            f"{self.ctx.world_size} workers x micro-batch {cfg.data.micro_batch_size} x accumulation {self.accum} = "
            f"{cfg.schedule.global_batch_size} per step; {plan.steps_per_epoch} steps/epoch, {plan.total_steps} "
            f"steps, {plan.warmup_steps} warmup; ZeRO-{cfg.zero.stage} {cfg.precision.dtype}; "
            f"EMA {'on' if self.ema else 'off'}; checkpoints -> {self.checkpoints.root}")
        self.metrics.text("config", "```\n" + str(config_to_dict(cfg)) + "\n```")

    def _log(self, loss: float, times: StepTimes, elapsed: float, steps: int) -> None:
        ctx, cfg = self.ctx, self.cfg
        loss_sum, = all_reduce_sum([loss], ctx.device)
        loss_mean = loss_sum / ctx.world_size
        self.loss_first = loss_mean if self.loss_first is None else self.loss_first
        self.loss_last = loss_mean
        images_per_s = cfg.schedule.global_batch_size * steps / max(elapsed, 1e-9)
        train_flops = 3 * self.flops_per_image * images_per_s
        peak = device_peak_flops(cfg.logging, ctx.device)
        mfu = train_flops / (peak * ctx.world_size) if peak else None
        remaining = (self.plan.total_steps - self.step) * elapsed / max(steps, 1)
        lr = lr_at(self.step - 1, cfg.optim, self.plan)
        scalars = {
            "train/loss": loss_mean, "train/lr": lr, "train/weight_decay": cfg.optim.weight_decay,
            "train/grad_norm": ds.grad_norm(self.engine), "train/images_per_s": images_per_s,
            "train/images_per_s_per_worker": images_per_s / ctx.world_size,
            "time/step_s": elapsed / max(steps, 1), "time/data_wait_s": times.data_s / max(steps, 1),
            "time/compute_s": times.compute_s / max(steps, 1), "time/checkpoint_stall_s": times.checkpoint_s / max(steps, 1),
            "perf/train_tflops": train_flops / 1e12, "perf/mfu": mfu, "memory/max_bytes": memory_bytes(ctx.device),
            "train/epoch": self.step * cfg.schedule.global_batch_size / self.manifest.num_samples,
            "train/nonfinite_skipped": self.counters["nonfinite_skipped"],
            "ema/decay": self.ema.last_decay if self.ema else None,
        }
        if cfg.precision.dtype == "fp16":
            scalars["train/loss_scale"] = ds.loss_scaler_state(self.engine).get("cur_scale")
        scalars.update({f"data/{k}": float(v) for k, v in self.counters.items() if k.startswith("skipped/")})
        self.metrics.scalars(self.step, scalars)
        data_pct = 100 * times.data_s / max(elapsed, 1e-9)
        self.metrics.console(
            f"step {self.step}/{self.plan.total_steps} epoch {scalars['train/epoch']:.2f} loss {loss_mean:.4f} "
            f"lr {lr:.2e} {images_per_s:.0f} img/s (data wait {data_pct:.0f}%) ETA {format_duration(remaining)}")

    # ----------------------------------------------------------------------------- evaluation

    @contextlib.contextmanager
    def ema_weights(self):
        """Temporarily put the EMA into the model (every rank swaps its own fragments)."""
        with torch.no_grad():
            backup = [f.master.clone() for f in self.fragments]
            for f, ema in zip(self.fragments, self.ema.tensors):
                f.master.copy_(ema)
            ds.refresh_lp_params(self.engine)
        try:
            yield
        finally:
            with torch.no_grad():
                for f, saved in zip(self.fragments, backup):
                    f.master.copy_(saved)
                ds.refresh_lp_params(self.engine)

    def run_eval(self) -> dict[str, Any]:
        if self.eval_manifest is None:
            return {}
        cfg, ctx = self.cfg, self.ctx
        loader = EvalLoader(cfg.data.eval_url, self.eval_manifest, cfg.data, cfg.storage, ctx.rank,
                            ctx.world_size, cfg.eval.batch_size, cfg.model.num_classes, cfg.eval.max_samples)
        subset = in1k_subset(self.manifest.classes) if self.manifest.label_source == "imagenet22k_synsets" else None
        module = self.engine.module
        was_training = module.training
        module.eval()
        try:
            results = {"model": evaluate(self.engine, loader, ctx.device, self.dtype, cfg.model.channels_last, subset)}
            if self.ema is not None:
                with self.ema_weights():
                    results["ema"] = evaluate(self.engine, loader, ctx.device, self.dtype, cfg.model.channels_last,
                                              subset)
        finally:
            module.train(was_training)
        flat = {f"eval/{which}/{k}": v for which, r in results.items() for k, v in r.items()}
        self.metrics.scalars(self.step, flat)
        self.last_eval = {f"{which}_{k}": v for which, r in results.items() for k, v in r.items()}
        summary = ", ".join(f"{which} top-1 {r['top1']:.1%} top-5 {r['top5']:.1%}" for which, r in results.items())
        self.metrics.console(f"eval at step {self.step} on {int(results['model']['samples'])} held-out samples: "
                             f"{summary} (chance {1 / cfg.model.num_classes:.1%})")
        return results

    # ----------------------------------------------------------------------------- end

    def summary(self, status: str) -> dict[str, Any]:
        return {"status": status, "step": self.step, "total_steps": self.plan.total_steps,
                "resumed_from": self.resumed_from, "loss_first": self.loss_first, "loss_last": self.loss_last,
                "eval": self.last_eval, "checkpoints": self.checkpoints.root,
                "tensorboard": storage.join(self.cfg.run.url, "tb"),
                "counters": {k: v for k, v in self.counters.items() if not k.startswith("_")}}

    def close(self) -> None:
        try:
            self.checkpoints.close()
        finally:
            self.metrics.close()
