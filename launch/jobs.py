"""`pretrain submit|status|logs|stop`: training as a Ray job, through the Jobs API.

The job's entrypoint is `python -m launch.cli train --config <resolved config> --address auto`, run
in the uploaded working dir. The config is validated and resolved here, before anything is sent.
Only non-secret variables travel in the job spec (the S3 endpoint, region, ...); credentials come
from the cluster (instance profiles, IRSA, the nodes' environment). `pretrain stop` sends the
driver SIGTERM, which makes the workers commit a checkpoint before the job ends; the job's
RAY_JOB_STOP_WAIT_TIME_S is set to leave them launch.preemption_grace_s for it.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import uuid
from pathlib import Path

from pretrain.config import ConfigError, dump_toml, load_config

SECRET_NAME = re.compile(r"(SECRET|TOKEN|PASSWORD|CREDENTIAL|SESSION|PRIVATE)", re.IGNORECASE)
EXCLUDES = [".git", ".venv", "venv", "demo_out", "runs", "**/__pycache__", "*.egg-info", ".pytest_cache",
            "benchmarks/results/*.tmp"]
SUBMIT_DIR = ".pretrain-submit"


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def job_env(names: list[str]) -> dict[str, str]:
    from launch.ray_train import forwarded_env

    env = forwarded_env()
    for name in names:
        if SECRET_NAME.search(name) or name == "AWS_ACCESS_KEY_ID":
            raise ConfigError(f"--env {name}: refusing to put a credential into the job spec (it is stored in "
                              "plain text by Ray); give the cluster its own credentials (instance profile, IRSA)")
        if name not in os.environ:
            raise ConfigError(f"--env {name}: not set in this environment")
        env[name] = os.environ[name]
    return env


def submit(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    working_dir = Path(args.working_dir).resolve()
    submission_id = args.submission_id or f"pretrain-{cfg.run.name}-{uuid.uuid4().hex[:8]}"
    env = job_env(args.env)  # may refuse (secrets): before anything is written
    env["RAY_JOB_STOP_WAIT_TIME_S"] = str(int(cfg.launch.preemption_grace_s + 60))
    env["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"  # the driver's ray.init adds its own worker variables
    config_dir = working_dir / SUBMIT_DIR
    config_dir.mkdir(exist_ok=True)
    config_path = config_dir / f"{submission_id}.toml"
    config_path.write_text(dump_toml(cfg))
    env["PRETRAIN_SUBMISSION_ID"] = submission_id  # named in the run's lease
    try:
        client = _client(args.address)
        deadline = time.monotonic() + 120
        while True:
            try:
                client.submit_job(
                    entrypoint=f"python -m launch.cli train --config {SUBMIT_DIR}/{config_path.name} --address auto",
                    submission_id=submission_id,
                    runtime_env={"working_dir": str(working_dir), "excludes": EXCLUDES, "env_vars": env},
                )
                break
            except RuntimeError as exc:  # a cluster that has just started has no job agent for a few seconds
                if "No available agent" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(2)
    finally:
        config_path.unlink(missing_ok=True)
    print(submission_id)
    print(f"follow it with: pretrain logs {submission_id} --address {args.address} --follow", file=sys.stderr)
    if args.wait:
        return _follow(client, submission_id)
    return 0


def _follow(client, submission_id: str) -> int:
    import asyncio

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            print(chunk, end="", flush=True)

    asyncio.run(tail())
    status = _wait_terminal(client, submission_id)
    print(f"job {submission_id}: {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def _wait_terminal(client, submission_id: str, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(submission_id)).split(".")[-1]
        if status in ("SUCCEEDED", "FAILED", "STOPPED") or time.monotonic() > deadline:
            return status
        time.sleep(1)


def status(args: argparse.Namespace) -> int:
    client = _client(args.address)
    info = client.get_job_info(args.submission_id)
    print(f"{args.submission_id}: {str(info.status).split('.')[-1]}" + (f" ({info.message})" if info.message else ""))
    return 0


def logs(args: argparse.Namespace) -> int:
    client = _client(args.address)
    if args.follow:
        return _follow(client, args.submission_id)
    print(client.get_job_logs(args.submission_id), end="")
    return 0


def stop(args: argparse.Namespace) -> int:
    client = _client(args.address)
    client.stop_job(args.submission_id)
    print(f"{args.submission_id}: stop requested; the workers commit a checkpoint, then the job ends. "
          f"Resubmit the same config to resume.")
    return 0
