"""The training worker's loop: one DeepSpeed engine per process, sharded EMA, checkpoints, metrics.

``Trainer`` is launcher-agnostic: torchrun, the DeepSpeed launcher and Ray Train workers all run
it through :func:`pretrain.worker.train_worker`. It never imports Ray. Start-up order matters and is
the integrity contract: check the data and the config, take (or continue) the run's lease, list the
checkpoints and decide how to resume (:mod:`pretrain.resume`), and only then build the engine and
copy state in.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from pretrain import init_from, resume, state_format, storage
from pretrain.checkpoint import CheckpointError, CheckpointManager, RankSnapshot, rng_state, set_rng_state
from pretrain.build import DataSetup, build_data, build_engine, build_model
from pretrain.config import Config, config_to_dict, dump_toml
from pretrain.data.batch import Batch
from pretrain.data.loader import EvalLoader
from pretrain.data.order import derive_seed
from pretrain.data.reader import SKIP_REASONS
from pretrain.engine import deepspeed as ds
from pretrain.engine.distributed import DistContext, all_gather_object, all_reduce_sum, on_rank0
from pretrain.lease import Lease
from pretrain.metrics import InputStall, MetricsSink, StepTimes, device_peak_flops, format_duration, memory_bytes
from pretrain.optim import lr_at
from pretrain.run_errors import FatalRunError
from pretrain.run_meta import RankRecord, RunMeta
from pretrain.run_status import RunStatus
from pretrain.train_state import TrainState

log = logging.getLogger(__name__)


class NonFiniteLossError(FatalRunError):
    """Too many consecutive micro-batches produced a NaN/inf loss."""


class DataQualityError(FatalRunError):
    """More than data.max_skip_fraction of the samples read had to be skipped."""


@dataclass
class _Loaded:
    """A checkpoint's tensors fetched and verified by this rank, not yet copied into the engine."""

    exact: bool
    tensors: dict[int, dict[str, torch.Tensor]]
    private: dict[str, Any] | None
    plan: list[list[state_format.Piece]] | None


class Trainer:
    def __init__(self, cfg: Config, ctx: DistContext, stop_requested: Callable[[], bool] = lambda: False,
                 lease_holder: str = "", on_first_step: Callable[[], None] | None = None,
                 data: DataSetup | None = None):
        self.cfg, self.ctx, self.stop_requested = cfg, ctx, stop_requested
        self.on_first_step = on_first_step
        self.state = TrainState()
        self.data_totals: dict[str, float] = {}
        self.last_loss = float("nan")
        self.last_perf: dict[str, float | None] = {}
        """The last logging window's throughput, times and memory (also in the run summary)."""
        self.input_stall: InputStall | None = None
        self.last_eval: dict[str, Any] = {}
        self.resumed_from: int | None = None
        self.lease: Lease | None = None
        self._own_lease = not lease_holder  # released by the trainer only when no driver holds it
        self.data = data if data is not None else build_data(cfg, ctx)
        self._take_lease(lease_holder)
        try:
            self._start()
        except BaseException:
            self._release_lease()
            raise

    def _start(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        self.checkpoints = CheckpointManager(cfg.run.url, cfg.checkpoint, cfg.storage, ctx.rank, ctx.world_size,
                                             fence=self.lease.verify if self.lease is not None else None)
        # Leftovers of interrupted saves are removed only while this job holds the run's lease.
        self.scan = resume.scan(self.checkpoints, may_clean=cfg.lease.enabled)
        newest = resume.next_candidate(self.checkpoints, self.scan, below=None)
        self.metrics = MetricsSink(cfg.run.url, cfg.logging, cfg.storage, enabled=ctx.is_main)
        if newest is not None:
            resume.check_compatible(cfg, newest.record, self.data.identity)  # fails fast, before any build
            if newest.record.run.finished and newest.record.step >= self.data.steps.total_steps:
                self.state.step = self.resumed_from = newest.record.step  # nothing to train: no engine at all
                return
        elif self.scan.committed:
            raise resume.NoUsableCheckpoint(self._no_usable_message())
        self._build_engine()
        self.resumed_from = self._restore(newest)

    # ----------------------------------------------------------------------------- building

    def _take_lease(self, holder: str) -> None:
        """Rank 0 takes the run's lease (or continues the driver's); every rank learns the outcome."""
        if not self.cfg.lease.enabled:
            return
        def take() -> Lease:
            lease = Lease(self.cfg.run.url, self.cfg.lease, self.cfg.storage, holder=holder)
            lease.adopt() if holder else lease.acquire()
            lease.start_heartbeat()
            return lease

        self.lease = on_rank0(take, share=False)

    def _build_engine(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        init = init_from.resolve(cfg.model, cfg.storage, resuming=bool(self.scan.committed))
        model = build_model(self.data.task, cfg.model, cfg.run.seed, init, self.data.manifest.classes, cfg.storage)
        built = build_engine(cfg, ctx, model, self.data.accum)
        self.engine, self.fragments, self.ema, self.dtype = built.engine, built.fragments, built.ema, built.dtype
        self.model_shapes, self.flops_per_image = built.model_shapes, built.flops_per_image
        self.peak_flops = device_peak_flops(cfg.logging, ctx.device)
        self.input_stall = InputStall() if ctx.device.type == "cuda" else None
        torch.manual_seed(derive_seed(cfg.run.seed, "train", ctx.rank))  # per-rank stochastic depth

    # ----------------------------------------------------------------------------- resume

    def _restore(self, candidate: resume.Candidate | None) -> int | None:
        """Load the newest committed checkpoint every rank can verify; None for a fresh run.

        Compatibility is checked from the manifest, then each rank fetches and verifies its files, and
        only when every rank succeeded is anything copied: a failed attempt leaves no partial state.
        """
        ctx = self.ctx
        while candidate is not None:
            data_change = resume.check_compatible(self.cfg, candidate.record, self.data.identity)
            resume.check_shapes(candidate.record, self.model_shapes, self.cfg)
            error, loaded = "", None
            try:
                loaded = self._fetch(candidate)
            except (CheckpointError, state_format.StateFormatError, OSError, KeyError, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"
            errors = [e for e in all_gather_object(error) if e]
            if not errors:
                self._apply(candidate, loaded, data_change)
                if ctx.is_main:
                    log.info("resumed from %s (step %d)", self.checkpoints.url(candidate.where), self.state.step)
                return self.state.step
            if ctx.is_main:
                self.scan.unusable.append(f"{candidate.where.name}: {errors[0]}")
                log.error("checkpoint %s is unusable (%s); trying an older one",
                          self.checkpoints.url(candidate.where), "; ".join(sorted(set(errors))))
            candidate = resume.next_candidate(self.checkpoints, self.scan, below=candidate.where)
        if self.scan.committed:
            raise resume.NoUsableCheckpoint(self._no_usable_message())
        return None

    def _no_usable_message(self) -> str:
        return (f"run.url {self.cfg.run.url} holds committed checkpoints {[d.name for d in self.scan.committed]} "
                f"but none can be loaded ({'; '.join(self.scan.unusable) or 'see the log'}); nothing was "
                "trained or changed. Restore the files, or use a new run.url to start over.")

    def _fetch(self, candidate: resume.Candidate) -> _Loaded:
        """This rank's part of a checkpoint, fetched and verified (no tensor of the engine is touched)."""
        where, manifest, rank = candidate.where, candidate.manifest, self.ctx.rank
        saved = state_format.rank_tables(candidate.record.fragment_tables)
        kinds = [state_format.MASTER, *ds.ADAM_STATES] + ([state_format.EMA] if self.ema else [])
        if candidate.record.world_size == self.ctx.world_size and state_format.is_exact(saved[rank], self.fragments):
            tensors = self.checkpoints.fetch_tensors(where, manifest, rank)
            state_format.check_complete(tensors, saved[rank], kinds)
            state_format.check_buffers(self.engine.module, tensors)
            private = self.checkpoints.fetch_private(where, manifest, rank)
            if "rng" not in private or "rng/torch" not in tensors:
                raise CheckpointError(f"{where.name}: rank {rank}'s RNG state is missing")
            return _Loaded(True, {rank: tensors}, private, None)
        plan = state_format.resharding_plan(saved, self.fragments)
        tensors = {}
        buffers = [0] if state_format.buffer_names(self.engine.module) else []  # rank 0's, on every rank
        for r in sorted(set(state_format.ranks_needed(plan)) | set(buffers)):
            tensors[r] = self.checkpoints.fetch_tensors(where, manifest, r)
            state_format.check_complete(tensors[r], saved[r], kinds)
        if buffers:
            state_format.check_buffers(self.engine.module, tensors[0])
        return _Loaded(False, tensors, None, plan)

    @torch.no_grad()
    def _apply(self, candidate: resume.Candidate, loaded: _Loaded, data_change: dict | None) -> None:
        record, run, ctx = candidate.record, candidate.record.run, self.ctx
        emas = self.ema.tensors if self.ema else None
        step = record.step
        if loaded.exact:
            state_format.load_exact(self.fragments, emas, loaded.tensors[ctx.rank])
            state_format.load_buffers(self.engine.module, loaded.tensors[ctx.rank])
            set_rng_state(loaded.private["rng"], loaded.tensors[ctx.rank])
            ds.load_loss_scaler_state(self.engine, loaded.private.get("loss_scaler", {}))
        else:
            state_format.load_resharded(self.fragments, emas, loaded.plan, loaded.tensors)
            if 0 in loaded.tensors:
                state_format.load_buffers(self.engine.module, loaded.tensors[0])
            torch.manual_seed(derive_seed(self.cfg.run.seed, "train", ctx.rank, step))
            ds.load_loss_scaler_state(self.engine, run.loss_scaler)
        ds.set_optimizer_step_count(self.engine, run.optimizer_step)
        ds.refresh_lp_params(self.engine)
        self.state.load_state_dict(record, ctx.rank, same_ranks=loaded.exact)
        if data_change is None:
            self.data.loader.load_state_dict(run.loader, [r.loader for r in record.ranks])
        else:  # run.allow_data_change: a fresh seeded epoch order on the new shard set, from this step
            self.state.data_changes.append(data_change)
            if ctx.is_main:
                log.warning("continuing on another shard set from step %d: %s -> %s", step, data_change["from"],
                            data_change["to"])
        self.engine.global_steps = step
        self.engine.global_samples = step * self.cfg.schedule.global_batch_size

    # ----------------------------------------------------------------------------- saving

    def _snapshot(self, finished: bool) -> RankSnapshot:
        tensors = state_format.snapshot(self.fragments, self.ema.tensors if self.ema else None)
        tensors.update(state_format.buffer_snapshot(self.engine.module))
        rng_meta, rng_tensors = rng_state()
        tensors.update(rng_tensors)
        private = {"rng": rng_meta, "loss_scaler": ds.loss_scaler_state(self.engine)}
        own = RankRecord(state_format.table(self.fragments), loader=self.data.loader.state_dict(),
                         **self.state.rank_state_dict())
        run: dict[str, Any] = {}
        if self.ctx.is_main:
            progress = self.state.state_dict()
            progress["metrics"].update(self.last_eval)
            run = RunMeta(config=config_to_dict(self.cfg), optimizer_step=ds.optimizer_step_count(self.engine),
                          total_steps=self.data.steps.total_steps, finished=finished,
                          epoch=self.state.epoch(self.cfg.schedule.global_batch_size, self.data.manifest.num_samples),
                          classes=self.data.manifest.classes, data=self.data.identity,
                          label_source=self.data.manifest.label_source, loader=self.data.loader.shared_state(),
                          loss_scaler=ds.loss_scaler_state(self.engine), **progress).state_dict()
        return RankSnapshot(self.state.step, self.ctx.rank, self.ctx.world_size, tensors, private, own.state_dict(),
                            run)

    def save(self, finished: bool = False, blocking: bool = False) -> float:
        """Checkpoint the current step; returns the seconds training was blocked.

        Every rank calls it at the same step, so the ranks agree here on whether any save failed.
        """
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            self.checkpoints.save(self._snapshot(finished), blocking=blocking)  # waits for the previous upload
        except (CheckpointError, FatalRunError) as exc:
            error = exc
        self._agree_on_checkpoints(error)
        if blocking:
            torch.distributed.barrier()  # rank 0 returns only after the manifest is committed
        return time.perf_counter() - started

    def _agree_on_checkpoints(self, error: BaseException | None, flags: list[float] | None = None) -> None:
        """Raise on every rank if a save failed on any: a rank alone in an error would leave the others
        waiting in a collective. Fatal failures (a full staging disk, a lost lease) end the run."""
        if flags is None:
            flags = all_reduce_sum([float(error is not None), float(isinstance(error, FatalRunError))], self.ctx.device)
        failed, fatal = flags
        if not failed:
            return
        if error is not None:
            raise error
        if fatal:
            raise CheckpointFailedElsewhere(f"a checkpoint save failed on another rank with an error a restart "
                                            f"would not fix (see that rank's log); {self.cfg.run.url} keeps its "
                                            "committed checkpoints")
        raise CheckpointError("a checkpoint save failed on another rank (see that rank's log)")

    # ----------------------------------------------------------------------------- training

    def _batches(self) -> Iterator[Batch]:
        return iter(self.data.loader)

    def train_step(self, batches: Iterator[Batch], times: StepTimes) -> tuple[torch.Tensor, int]:
        """One optimizer step of `accum` micro-batches; returns (sum of the micro-batch losses, on the
        device, and how many micro-batches had samples).

        Nothing here waits for the device: losses stay on it until the step's control all-reduce, and a
        step whose gradients are not finite is found and skipped (on every rank) by DeepSpeed's overflow
        check in ``engine.step()``, the only host synchronisation DeepSpeed makes per step.
        """
        ds.set_lr(self.engine, lr_at(self.state.step, self.cfg.optim, self.data.steps))
        loss_sum = torch.zeros((), device=self.ctx.device)
        with_samples = 0
        for micro in range(self.data.accum):
            t0 = time.perf_counter()
            batch = next(batches)
            t1 = time.perf_counter()
            times.data_s += t1 - t0
            if self.input_stall is not None:
                self.input_stall.input_ready()
            self.state.data_counters["samples_read"] += len(batch) + sum(batch.skipped.values())
            for reason, n in batch.skipped.items():
                self.state.data_counters[f"skipped/{reason}"] += n
            x, target = self.data.task.inputs(batch, self.ctx.device, self.dtype,
                                         derive_seed(self.cfg.run.seed, "mixup", self.state.step, self.ctx.rank, micro))
            if not len(batch):
                # Only a report of skipped samples: this rank takes part in the micro-step with zero
                # weight, so that every rank runs the same collectives (the skip threshold is judged by
                # this step's control all-reduce).
                loss = self.data.task.zero_loss(self.engine(x))
            else:
                if self.state.step == 0 and micro == 0 and self.ctx.is_main and self.resumed_from is None:
                    preview = self.data.task.preview(batch)
                    if preview is not None:
                        self.metrics.image_grid(0, preview, (0, 0, 0), (1, 1, 1))
                loss = self.data.task.loss(self.engine(x), target)
                loss_sum += loss.detach()
                with_samples += 1
            self.engine.backward(loss)
            self.engine.step()
            if self.input_stall is not None:
                self.input_stall.work_queued()
            times.compute_s += time.perf_counter() - t1
        self.state.step += 1
        if ds.overflowed(self.engine):
            self._on_overflow()
        else:
            self.state.step_counters["nonfinite_in_row"] = 0
        if self.ema is not None:
            self.ema.update(self.state.step)
        return loss_sum, with_samples

    def _on_overflow(self) -> None:
        """DeepSpeed skipped this step: fp16 loss-scale overflow, or (bf16/fp32) non-finite gradients."""
        if self.cfg.precision.dtype == "fp16":
            self.state.step_counters["fp16_overflow_steps"] += 1
            return
        self.state.step_counters["nonfinite_skipped"] += 1
        self.state.step_counters["nonfinite_in_row"] += 1
        in_row = self.state.step_counters["nonfinite_in_row"]
        log.warning("step %d: non-finite gradients; the optimizer step was skipped on every rank (%d in a row)",
                    self.state.step, in_row)
        if in_row >= self.cfg.optim.max_nonfinite_in_row:
            last = self.checkpoints.last_committed.name if self.checkpoints.last_committed else self.resumed_from
            raise NonFiniteLossError(
                f"{in_row} consecutive steps had non-finite gradients at step {self.state.step} "
                f"(optim.max_nonfinite_in_row={self.cfg.optim.max_nonfinite_in_row}); the last committed "
                f"checkpoint ({last}) is intact. Lower optim.lr or enable optim.grad_clip.")

    def _reduce_data_counters(self, flags: list[float], loss: tuple[torch.Tensor, int] | None = None) -> list[float]:
        """One all-reduce: `flags`, samples read and skipped per reason, and the step's loss sum and count.

        Updates ``data_totals`` (global) and ``last_loss`` (mean over ranks); returns the reduced flags.
        """
        local = [float(self.state.data_counters["samples_read"])]
        local += [float(self.state.data_counters[f"skipped/{r}"]) for r in SKIP_REASONS]
        if loss is not None:
            local.append(float(loss[1]))
        reduced = all_reduce_sum(flags + local, self.ctx.device, tail=loss[0] if loss is not None else None)
        out, totals = reduced[:len(flags)], reduced[len(flags):]
        if loss is not None:
            count, loss_sum = totals[-2], totals[-1]
            self.last_loss = loss_sum / count if count else float("nan")
            totals = totals[:-2]
        self.data_totals = {"samples_read": totals[0],
                            **{f"skipped/{r}": v for r, v in zip(SKIP_REASONS, totals[1:]) if v}}
        return out

    def _control(self, loss: tuple[torch.Tensor, int] | None = None) -> bool:
        """The step's one all-reduce (and host sync): a stop requested anywhere, a lost lease, a failed
        background save, the global skip counts and the step's mean loss."""
        lost = self.lease is not None and self.lease.lost is not None
        error = self.checkpoints.take_error()
        stop, lost_anywhere, failed, fatal = self._reduce_data_counters(
            [1.0 if self.stop_requested() else 0.0, float(lost), float(error is not None),
             float(isinstance(error, FatalRunError))], loss)
        if lost_anywhere:
            raise self.lease.lost if lost else _lease_lost_elsewhere(self.cfg)
        self._agree_on_checkpoints(error, [failed, fatal])
        reads = self.data_totals["samples_read"]
        skipped = sum(v for k, v in self.data_totals.items() if k.startswith("skipped/"))
        limit = self.cfg.data.max_skip_fraction
        if reads >= 100 and skipped / reads > limit:
            by_reason = {k.split("/", 1)[1]: int(v) for k, v in self.data_totals.items() if k.startswith("skipped/")}
            raise DataQualityError(
                f"{skipped:.0f} of {reads:.0f} samples read ({skipped / reads:.2%}) were skipped as corrupt or "
                f"unreadable, above data.max_skip_fraction={limit:.2%}; run `data-tools verify "
                f"{self.cfg.data.train_url}`. Counts by reason: {by_reason}")
        return stop > 0

    def fit(self) -> dict[str, Any]:
        total = self.data.steps.total_steps
        if self.state.step >= total:
            self.metrics.console(f"run {self.cfg.run.url} already finished at step {self.state.step}/{total}; nothing to "
                                 "do (use a new run.url, or to train further raise schedule.steps together "
                                 "with run.allow_config_change=true)")
            return self.summary(RunStatus.ALREADY_FINISHED)
        self.metrics.start(self.state.step)
        if self.ctx.is_main:
            self._print_plan()
            storage.write_bytes(storage.join(self.cfg.run.url, "config.toml"), dump_toml(self.cfg).encode(),
                                self.cfg.storage)
        batches = self._batches()
        times = StepTimes()
        window_start, window_steps = time.perf_counter(), 0
        while self.state.step < total:
            loss = self.train_step(batches, times)
            stop = self._control(loss)
            if window_steps == 0 and self.on_first_step is not None:
                self.on_first_step()
                self.on_first_step = None
            window_steps += 1
            if stop:
                return self._preempt()
            if self.state.step % self.cfg.checkpoint.every_steps == 0 and self.state.step < total:
                times.checkpoint_s += self.save()
            if self.cfg.eval.every_steps and self.state.step % self.cfg.eval.every_steps == 0 and self.state.step < total:
                self.run_eval()
            if self.state.step % self.cfg.logging.every_steps == 0 or self.state.step in (1, total):
                self._log(times, time.perf_counter() - window_start, window_steps)
                window_start, window_steps = time.perf_counter(), 0
                times.reset()
        self._reduce_data_counters([])
        if self.data.eval_manifest is not None:
            self.run_eval()
        self.save(finished=True, blocking=True)
        return self.summary(RunStatus.FINISHED)

    def _preempt(self) -> dict[str, Any]:
        started = time.perf_counter()
        self.save(blocking=True)
        elapsed = time.perf_counter() - started
        grace = self.cfg.launch.preemption_grace_s
        msg = (f"preemption: committed checkpoint at step {self.state.step} in {elapsed:.1f}s "
               f"(grace {grace:.0f}s); run the same command again to resume")
        (log.warning if elapsed > grace else log.info)(msg)
        self.metrics.console(msg)
        return self.summary(RunStatus.PREEMPTED)

    def _print_plan(self) -> None:
        cfg, plan = self.cfg, self.data.steps
        where = f"resuming at step {self.state.step}" if self.resumed_from is not None else "starting"
        self.metrics.console(
            f"{where}: {cfg.model.name} on {self.data.manifest.num_samples} samples / {self.data.manifest.num_classes} classes; "
            f"{self.ctx.world_size} workers x micro-batch {cfg.data.micro_batch_size} x accumulation {self.data.accum} = "
            f"{cfg.schedule.global_batch_size} per step; {plan.steps_per_epoch} steps/epoch, {plan.total_steps} "
            f"steps, {plan.warmup_steps} warmup; ZeRO-{cfg.zero.stage} {cfg.precision.dtype} "
            f"({ds.describe(self.engine)}); "
            f"EMA {'on' if self.ema else 'off'}; checkpoints -> {self.checkpoints.root}")
        for note in self.scan.unusable:
            self.metrics.console(f"unusable checkpoint passed over: {note}")
        self.metrics.text("config", "```\n" + str(config_to_dict(cfg)) + "\n```")

    def _log(self, times: StepTimes, elapsed: float, steps: int) -> None:
        ctx, cfg = self.ctx, self.cfg
        loss_mean = self.last_loss  # from this step's control all-reduce: no extra collective
        self.state.loss_first = loss_mean if self.state.loss_first is None else self.state.loss_first
        self.state.loss_last = loss_mean
        images_per_s = cfg.schedule.global_batch_size * steps / max(elapsed, 1e-9)
        train_flops = 3 * self.flops_per_image * images_per_s
        peak = self.peak_flops
        mfu = train_flops / (peak * ctx.world_size) if peak else None
        remaining = (self.data.steps.total_steps - self.state.step) * elapsed / max(steps, 1)
        lr = lr_at(self.state.step - 1, cfg.optim, self.data.steps)
        scalars = {
            "train/loss": loss_mean, "train/lr": lr, "train/weight_decay": cfg.optim.weight_decay,
            "train/grad_norm": ds.grad_norm(self.engine), "train/images_per_s": images_per_s,
            "train/images_per_s_per_worker": images_per_s / ctx.world_size,
            "time/step_s": elapsed / max(steps, 1), "time/data_wait_s": times.data_s / max(steps, 1),
            "time/compute_s": times.compute_s / max(steps, 1), "time/checkpoint_stall_s": times.checkpoint_s / max(steps, 1),
            "time/input_stall_s": self.input_stall.take() / max(steps, 1) if self.input_stall else None,
            "perf/train_tflops": train_flops / 1e12, "perf/mfu": mfu, "memory/max_bytes": memory_bytes(ctx.device),
            "train/epoch": self.state.step * cfg.schedule.global_batch_size / self.data.manifest.num_samples,
            "train/nonfinite_skipped": self.state.step_counters["nonfinite_skipped"],
            "ema/decay": self.ema.last_decay if self.ema else None,
            "data/samples_read": self.data_totals.get("samples_read"),
        }
        if cfg.precision.dtype == "fp16":
            scalars["train/loss_scale"] = ds.loss_scaler_state(self.engine).get("cur_scale")
        scalars.update({f"data/{k}": v for k, v in self.data_totals.items() if k.startswith("skipped/")})
        self.metrics.scalars(self.state.step, scalars)
        self.last_perf = {k.split("/", 1)[1]: v for k, v in scalars.items()
                          if k.split("/", 1)[0] in ("perf", "time", "memory") or k.startswith("train/images_per_s")}
        data_pct = 100 * times.data_s / max(elapsed, 1e-9)
        self.metrics.console(
            f"step {self.state.step}/{self.data.steps.total_steps} epoch {scalars['train/epoch']:.2f} loss {loss_mean:.4f} "
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
        if self.data.eval_manifest is None:
            return {}
        cfg, ctx = self.cfg, self.ctx
        loader = EvalLoader(cfg.data.eval_url, self.data.eval_manifest, cfg.data, cfg.storage, ctx.rank,
                            ctx.world_size, cfg.eval.batch_size, self.data.task.decoder(train=False), cfg.eval.max_samples)
        module = self.engine.module
        was_training = module.training
        module.eval()
        try:
            results = {"model": self.data.task.evaluate(self.engine, loader, self.dtype)}
            if self.ema is not None:
                with self.ema_weights():
                    results["ema"] = self.data.task.evaluate(self.engine, loader, self.dtype)
        finally:
            module.train(was_training)
        flat = {f"eval/{which}/{k}": v for which, r in results.items() for k, v in r.items()}
        self.metrics.scalars(self.state.step, flat)
        self.last_eval = {f"{which}_{k}": v for which, r in results.items() for k, v in r.items()}
        self.metrics.console(f"eval at step {self.state.step} on {self.data.task.describe(results)}")
        return results

    # ----------------------------------------------------------------------------- end

    def summary(self, status: RunStatus) -> dict[str, Any]:
        skipped = {k.split("/", 1)[1]: int(v) for k, v in self.data_totals.items() if k.startswith("skipped/")}
        return {"status": status.value, "step": self.state.step, "total_steps": self.data.steps.total_steps,
                "resumed_from": self.resumed_from, "loss_first": self.state.loss_first, "loss_last": self.state.loss_last,
                "eval": self.last_eval, "checkpoints": self.checkpoints.root,
                "tensorboard": storage.join(self.cfg.run.url, "tb"),
                "samples_read": int(self.data_totals.get("samples_read", 0)), "skipped": skipped,
                "skipped_total": sum(skipped.values()), "counters": dict(self.state.step_counters),
                "unusable_checkpoints": list(self.scan.unusable), "data_changes": self.state.data_changes,
                "perf": self.last_perf}

    def _release_lease(self) -> None:
        if self.lease is not None:
            if self._own_lease:
                self.lease.release()
            else:
                self.lease.stop_heartbeat()  # the driver holds it (and releases it at the end of the job)

    def close(self) -> None:
        try:
            self.checkpoints.close()
        finally:
            try:
                self.metrics.close()
            finally:
                self._release_lease()


class CheckpointFailedElsewhere(FatalRunError):
    """Another rank's save failed with an error that ends the run."""


def _lease_lost_elsewhere(cfg: Config):
    from pretrain.lease import LeaseLost

    return LeaseLost(f"rank 0 found that this job no longer holds the lease of {cfg.run.url}; stopping without "
                     "writing")
