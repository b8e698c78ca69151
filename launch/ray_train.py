"""Ray Train runs the DeepSpeed workers: `pretrain train` (local Ray by default, or `--address`).

One source of truth for checkpoints: the project's own atomic checkpoints under ``<run.url>``
(see :mod:`pretrain.checkpoint`), not Ray's checkpoint registry. Ray is used for what it does well,
placing and restarting workers; it never holds model state, so there are never two competing copies.
- Worker crash (SIGKILL, OOM, lost node): Ray's FailureConfig restarts the whole worker group; each
  new worker loads the latest *committed* checkpoint from run.url and continues bit-exactly.
- Driver crash, or the cluster is gone: run the same command again. Ray starts a new run (a fresh
  Ray run name each time, so no stale Ray state is restored) and the workers resume from run.url.
- Resubmission / finished run: the workers see the committed final checkpoint and do nothing.
- Preemption: SIGTERM to the driver is relayed to the workers through a small named actor; SIGTERM
  to a worker process and Ray's node-drain notice (``ray.train.get_preemption_info``) set the same
  flag. All ranks agree at the next step, commit a checkpoint and exit cleanly (exit code 75).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import uuid
from typing import Any

from pretrain import storage
from pretrain.config import Config, config_to_dict
from pretrain.worker import EXIT_CODES

log = logging.getLogger(__name__)

# Non-secret variables forwarded to workers. Credentials stay with the cluster (instance profiles,
# Kubernetes secrets, the nodes' environment) and are never written into a job or run spec.
FORWARDED_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
                 "AWS_CA_BUNDLE")
PREEMPTION_POLL_EVERY = 10  # steps between polls of the stop actor / Ray's preemption notice


def forwarded_env() -> dict[str, str]:
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def _stop_actor_class():
    import ray

    @ray.remote(num_cpus=0, max_restarts=-1)
    class StopSignal:
        """Set by the driver on SIGTERM/SIGINT; polled by the workers."""

        def __init__(self) -> None:
            self.requested = False

        def set(self) -> None:
            self.requested = True

        def is_set(self) -> bool:
            return self.requested

    return StopSignal


class _WorkerStopHook:
    """Polled once per step on every rank (same call count everywhere, as Ray's barrier needs)."""

    def __init__(self, actor_name: str, namespace: str):
        import ray

        self.calls = 0
        self.sigterm = False
        self.actor = ray.get_actor(actor_name, namespace=namespace)
        _relay_worker_sigterm(self)

    def __call__(self) -> bool:
        import ray
        import ray.train

        self.calls += 1
        if self.sigterm:
            return True
        if self.calls % PREEMPTION_POLL_EVERY:
            return False
        if ray.get(self.actor.is_set.remote()):
            return True
        return ray.train.get_preemption_info() is not None


def _relay_worker_sigterm(hook: _WorkerStopHook) -> None:
    """Turn SIGTERM to a Ray worker process into a checkpoint-then-exit request.

    Ray's worker main loop exits the process on SIGTERM, and the training function runs in a daemon
    thread that cannot install a signal handler. Ray's handler looks its exit helper up as a module
    global at call time, so we route it to our flag, with a hard exit after the grace period as
    before. Pinned to ray 2.60 and covered by the launch tests.
    """
    import ray._private.worker as ray_worker

    original = ray_worker.raise_sys_exit_with_custom_error_message
    grace = float(os.environ.get("PRETRAIN_PREEMPTION_GRACE_S", "120"))

    def on_sigterm(message: str, exit_code: int = 0) -> None:
        if hook.sigterm:
            return original(message, exit_code)
        hook.sigterm = True
        import threading

        threading.Timer(grace, lambda: os._exit(exit_code or 1)).start()

    ray_worker.raise_sys_exit_with_custom_error_message = on_sigterm


def _train_loop(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Runs in every Ray Train worker; rank 0's return value reaches the driver.

    Errors that would recur on every restart (a config that does not match the run's checkpoints,
    corrupt data, a diverged loss) end the run instead of burning FailureConfig retries; every rank
    reaches the same decision, because the trainer takes them collectively.
    """
    from pretrain.config import ConfigError
    from pretrain.trainer import DataQualityError, NonFiniteLossError
    from pretrain.worker import train_worker

    hook = _WorkerStopHook(loop_config["stop_actor"], loop_config["namespace"])
    try:
        return train_worker(loop_config["config"], stop_requested=hook)
    except (ConfigError, DataQualityError, NonFiniteLossError) as exc:
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}


def _storage_for_ray(cfg: Config) -> tuple[str, Any]:
    """Ray's own run state (not checkpoints) goes next to the run; S3 through s3fs for custom endpoints."""
    if storage.is_remote(cfg.run.url):
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        fs, path = storage.filesystem(storage.join(cfg.run.url, "ray"), cfg.storage)
        return path, PyFileSystem(FSSpecHandler(fs))
    path = os.path.abspath(storage.join(cfg.run.url, "ray"))
    os.makedirs(path, exist_ok=True)
    return path, None


def run_training(cfg: Config, address: str | None = None) -> int:
    """Train on a local or remote Ray cluster; returns the process exit code."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    address = address or cfg.launch.address or None
    namespace = "convnext-pretrain"
    env = {**forwarded_env(), "PRETRAIN_PREEMPTION_GRACE_S": str(cfg.launch.preemption_grace_s),
           "RAY_CHDIR_TO_TRIAL_DIR": "0",
           # Ray Train would also route print() through the root logger: every line twice.
           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, namespace=namespace, runtime_env={"env_vars": env}, log_to_driver=True,
                 logging_level=logging.WARNING)
    stop_name = f"pretrain-stop-{uuid.uuid4().hex[:10]}"
    stop_actor = _stop_actor_class().options(name=stop_name, namespace=namespace).remote()
    previous = _install_driver_signals(stop_actor)
    storage_path, storage_fs = _storage_for_ray(cfg)
    resources = {"CPU": cfg.launch.cpus_per_worker}
    if cfg.launch.use_gpu:
        resources["GPU"] = cfg.launch.gpus_per_worker
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"config": config_to_dict(cfg), "stop_actor": stop_name, "namespace": namespace},
        scaling_config=ScalingConfig(num_workers=cfg.launch.num_workers, use_gpu=cfg.launch.use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=cfg.launch.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if cfg.launch.use_gpu else "gloo",
                                 timeout_s=int(cfg.launch.collective_timeout_s)),
        run_config=RunConfig(name=f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
                             storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=cfg.launch.max_failures)),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray wraps worker errors; show the root cause, not Ray's stack
        print(f"pretrain train: training failed: {_root_cause(exc)}", file=sys.stderr)
        return 1
    finally:
        _restore_signals(previous)
        if started_here:
            ray.shutdown()
    summary = result.return_value
    if summary["status"] == "failed":
        print(f"pretrain train: {summary['error']}", file=sys.stderr)
    else:
        print_summary(summary)
    return EXIT_CODES.get(summary["status"], 1)


def _install_driver_signals(stop_actor) -> dict:
    """First SIGTERM/SIGINT: ask the workers to checkpoint and stop. A second SIGINT aborts."""
    seen = {"count": 0}

    def handler(signum, frame):
        seen["count"] += 1
        if seen["count"] > 1 and signum == signal.SIGINT:
            raise KeyboardInterrupt
        print(f"pretrain train: received {signal.Signals(signum).name}; workers will commit a checkpoint "
              "and stop (run the same command again to resume)", file=sys.stderr, flush=True)
        stop_actor.set.remote()

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handler)
    return previous


def _restore_signals(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def print_summary(summary: dict[str, Any]) -> None:
    status = summary["status"]
    lines = [f"status: {status} at step {summary['step']}/{summary['total_steps']}"]
    if summary.get("loss_first") is not None and summary.get("loss_last") is not None:
        lines.append(f"loss: {summary['loss_first']:.4f} (first step) -> {summary['loss_last']:.4f} (last step)")
    for key, value in (summary.get("eval") or {}).items():
        if key.endswith(("top1", "top5")):
            lines.append(f"eval {key}: {value:.2%}")
    lines.append(f"checkpoints: {summary['checkpoints']}")
    lines.append(f"tensorboard: {summary['tensorboard']}")
    print("\n".join(lines), flush=True)
