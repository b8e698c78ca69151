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

import contextlib
import logging
import os
import signal
import sys
import time
import uuid
from typing import Any

from pretrain import storage
from pretrain.config import Config, config_to_dict
from pretrain.engine.distributed import nccl_debug_env
from pretrain.run_status import RunStatus, exit_code

log = logging.getLogger(__name__)

# Non-secret variables forwarded to workers. Credentials stay with the cluster (instance profiles,
# Kubernetes secrets, the nodes' environment) and are never written into a job or run spec.
FORWARDED_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
                 "AWS_CA_BUNDLE")
PREEMPTION_POLL_EVERY = 10  # steps between polls of the stop actor / Ray's preemption notice


def forwarded_env() -> dict[str, str]:
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def _control_actor_class():
    import ray

    @ray.remote(num_cpus=0, max_restarts=-1)
    class RunControl:
        """The driver's side of a run, reachable from every worker: the stop flag and the restart policy.

        Attempts are worker-group starts. Each rank joins the open attempt when it starts; a failure
        recorded by any rank closes it. An attempt that a rank joins twice died without a recorded
        error (a killed process). The failures before progress of the last attempts decide whether
        a new group may try again (:meth:`join`'s verdict, identical for every rank of an attempt).
        """

        def __init__(self, max_repeated: int) -> None:
            self.requested = False
            self.max_repeated = max_repeated
            self.attempts: list[dict] = []

        def set(self) -> None:
            self.requested = True

        def is_set(self) -> bool:
            return self.requested

        def _open(self) -> dict:
            attempt = {"index": len(self.attempts), "ranks": set(), "progressed": False, "failure": None}
            self.attempts.append(attempt)
            return attempt

        def join(self, rank: int) -> tuple[int, str]:
            """(attempt index, verdict): a non-empty verdict means "do not train, end the run with it"."""
            attempt = self.attempts[-1] if self.attempts else self._open()
            if attempt["failure"] is not None or rank in attempt["ranks"]:
                if attempt["failure"] is None:
                    attempt["failure"] = ("" if attempt["progressed"] else
                                          "a worker process died before the first step (killed by a signal or "
                                          "the OOM killer; see the worker's log)")
                attempt = self._open()
            attempt["ranks"].add(rank)
            return attempt["index"], self._verdict()

        def _verdict(self) -> str:
            closed = [a for a in self.attempts if a["failure"] is not None]
            last = closed[-self.max_repeated:]
            if len(last) < self.max_repeated or any(a["progressed"] for a in last):
                return ""
            failures = {a["failure"] for a in last}
            if len(failures) != 1 or "" in failures:
                return ""
            return (f"{failures.pop()} -- the same failure ended {self.max_repeated} (re)starts in a row before "
                    f"their first step (launch.max_repeated_startup_failures={self.max_repeated}); not restarting")

        def progressed(self, index: int) -> None:
            self.attempts[index]["progressed"] = True

        def failed(self, index: int, signature: str) -> None:
            attempt = self.attempts[index]
            if attempt["failure"] is None:  # the first failure of an attempt is its cause
                attempt["failure"] = "" if attempt["progressed"] else signature

    return RunControl


def failure_signature(exc: BaseException) -> str:
    """Type and first line of an error, digits blanked: the same failure on another rank or GPU matches."""
    import re

    text = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {re.sub(r'[0-9]+', '#', text)}"


class _WorkerHooks:
    """Polled once per step on every rank (same call count everywhere, as Ray's barrier needs)."""

    def __init__(self, actor_name: str, namespace: str, rank: int):
        import ray

        self.calls = 0
        self.sigterm = False
        self.actor = ray.get_actor(actor_name, namespace=namespace)
        self.rank = rank
        self.attempt, self.verdict = ray.get(self.actor.join.remote(rank))
        _relay_worker_sigterm(self)

    def __call__(self) -> bool:
        import ray
        import ray.train

        self.calls += 1
        if self.calls % PREEMPTION_POLL_EVERY:
            return self.sigterm
        # get_preemption_info() is a barrier across ranks: every rank calls it on the same steps, whatever
        # its own flags say (returning early on one rank would leave the others waiting in it).
        preempted = ray.train.get_preemption_info() is not None
        return self.sigterm or preempted or bool(ray.get(self.actor.is_set.remote()))

    def on_first_step(self) -> None:
        import ray

        if self.rank == 0:
            ray.get(self.actor.progressed.remote(self.attempt))

    def on_failure(self, exc: BaseException) -> None:
        import ray

        try:
            ray.get(self.actor.failed.remote(self.attempt, failure_signature(exc)), timeout=30)
        except Exception:  # the restart policy is best effort; Ray's own failure handling still applies
            pass


def _relay_worker_sigterm(hook: _WorkerHooks) -> None:
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

    Errors that would recur on every restart (:data:`pretrain.run_errors.RUN_ENDING`: a config that
    does not match the run's checkpoints, corrupt data, a diverged loss, a lost lease) end the run
    instead of burning FailureConfig retries; the trainer takes them collectively, so every rank
    returns. Other errors restart the group, unless the restart policy (:class:`RunControl`) says the
    same failure has already ended launch.max_repeated_startup_failures starts before their first step.
    """
    import ray.train

    from pretrain.run_errors import RUN_ENDING
    from pretrain.run_status import RunStatus
    from pretrain.worker import train_worker

    hooks = _WorkerHooks(loop_config["control_actor"], loop_config["namespace"],
                         ray.train.get_context().get_world_rank())
    if hooks.verdict:
        return {"status": RunStatus.FAILED.value, "error": hooks.verdict}
    device = None
    if loop_config["config"]["launch"]["use_gpu"]:
        import ray.train.torch

        device = ray.train.torch.get_device()  # this worker's own GPU (not LOCAL_RANK: see gpus_per_worker)
    try:
        return train_worker(loop_config["config"], stop_requested=hooks, lease_holder=loop_config["lease_holder"],
                            on_first_step=hooks.on_first_step, device=device)
    except RUN_ENDING as exc:
        return {"status": RunStatus.FAILED.value, "error": f"{type(exc).__name__}: {exc}"}
    except BaseException as exc:
        hooks.on_failure(exc)
        raise


def _storage_for_ray(cfg: Config) -> tuple[str, Any]:
    """Ray's own run state (not checkpoints) goes next to the run; S3 through s3fs for custom endpoints.

    Ray calls this filesystem directly, outside :mod:`pretrain.retry_policy`, so it gets s3fs's and
    botocore's own retries back (the project's filesystems make one attempt each).
    """
    if storage.is_remote(cfg.run.url):
        import s3fs
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        options = storage.s3_options(cfg.storage)
        options["config_kwargs"] = {**options["config_kwargs"], "retries": {"max_attempts": 8, "mode": "adaptive"}}
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
        path = storage.join(cfg.run.url, "ray").split("://", 1)[1]
        return path, PyFileSystem(FSSpecHandler(fs))
    path = os.path.abspath(storage.join(cfg.run.url, "ray"))
    os.makedirs(path, exist_ok=True)
    return path, None


def run_training(cfg: Config, address: str | None = None) -> int:
    """Train on a local or remote Ray cluster; returns the process exit code.

    Everything that can be checked is checked before Ray starts (:func:`pretrain.preflight.check_run`),
    and the run's lease is taken here, so a second job on the same run.url never reaches the cluster.
    """
    from pretrain.preflight import check_run

    check_run(cfg, on_cuda=cfg.launch.use_gpu)
    with driver_lease(cfg) as holder:
        return _run_on_ray(cfg, address, holder)


def _run_on_ray(cfg: Config, address: str | None, lease_holder: str) -> int:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    address = address or cfg.launch.address or "local"  # "local": a new Ray here, not a stale one
    namespace = "convnext-pretrain"
    env = {**forwarded_env(), **nccl_debug_env(cfg.launch.nccl_trace_dir),
           "PRETRAIN_PREEMPTION_GRACE_S": str(cfg.launch.preemption_grace_s),
           "RAY_CHDIR_TO_TRIAL_DIR": "0",
           # Ray Train would also route print() through the root logger: every line twice.
           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, namespace=namespace, runtime_env={"env_vars": env}, log_to_driver=True,
                 logging_level=logging.WARNING)
    control_name = f"pretrain-control-{uuid.uuid4().hex[:10]}"
    control = _control_actor_class().options(name=control_name, namespace=namespace).remote(
        cfg.launch.max_repeated_startup_failures)
    previous = _install_driver_signals(control)
    storage_path, storage_fs = _storage_for_ray(cfg)
    resources = {"CPU": cfg.launch.cpus_per_worker}
    if cfg.launch.use_gpu:
        resources["GPU"] = cfg.launch.gpus_per_worker
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"config": config_to_dict(cfg), "control_actor": control_name, "namespace": namespace,
                           "lease_holder": lease_holder},
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
    if summary["status"] == RunStatus.FAILED.value:
        print(f"pretrain train: {summary['error']}", file=sys.stderr)
    else:
        print_summary(summary)
    return exit_code(summary["status"])


@contextlib.contextmanager
def driver_lease(cfg: Config):
    """The run's lease, held by the driver for the whole job (all of Ray's restarts); yields the holder id."""
    from pretrain.lease import Lease

    if not cfg.lease.enabled:
        yield ""
        return
    lease = Lease(cfg.run.url, cfg.lease, cfg.storage).acquire()
    lease.start_heartbeat()
    try:
        yield lease.holder
    finally:
        lease.release()


def _install_driver_signals(control) -> dict:
    """First SIGTERM/SIGINT: ask the workers to checkpoint and stop. A second SIGINT aborts."""
    seen = {"count": 0}

    def handler(signum, frame):
        seen["count"] += 1
        if seen["count"] > 1 and signum == signal.SIGINT:
            raise KeyboardInterrupt
        print(f"pretrain train: received {signal.Signals(signum).name}; workers will commit a checkpoint "
              "and stop (run the same command again to resume)", file=sys.stderr, flush=True)
        control.set.remote()

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
