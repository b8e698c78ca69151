"""Ray launches the workers: a real local Ray cluster (`ray start --head` on 127.0.0.1) and the moto
S3 server; `pretrain train` joins it, `pretrain submit` goes through the Jobs API."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from launch.local_ray import start_local_ray
from pretrain import storage
from pretrain.checkpoint import CHECKPOINTS, MANIFEST
from tests.test_training import full_state
from tests.workers import ROOT, SMOKE

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    """A one-node Ray cluster; its workers inherit the S3 endpoint from the environment."""
    saved = os.environ.get("RAY_AUTH_MODE")
    cluster = start_local_ray(num_cpus=4)
    yield {"address": cluster.address, "dashboard": cluster.dashboard}
    cluster.stop()
    if saved is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = saved


@pytest.fixture(scope="module")
def runs(make_bucket):
    return make_bucket("launch")


def args_for(shards, run_url, *extra):
    sets = [f"data.train_url={shards['train']}", "data.eval_url=", f"run.url={run_url}", "data.mixup=0.0",
            "logging.every_steps=1", "data.num_workers=0", *extra]
    return [x for s in sets for x in ("--set", s)]


def pretrain(*argv, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def start_pretrain(*argv) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "launch.cli", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for(proc: subprocess.Popen, text: str, lines: list[str], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    for line in proc.stdout:  # type: ignore[union-attr]
        lines.append(line)
        if text in line:
            return
        assert time.monotonic() < deadline, "".join(lines[-50:])
    raise AssertionError(f"{text!r} never appeared:\n" + "".join(lines[-80:]))


def train_workers() -> list:
    import psutil

    return [p for p in psutil.process_iter(["cmdline"]) if " ".join(p.info["cmdline"] or []).startswith(
        "ray::RayTrainWorker")]


def committed(run_url, step):
    return storage.exists(storage.join(run_url, CHECKPOINTS, f"step_{step}", MANIFEST))


@pytest.fixture(scope="module")
def submitted(ray_cluster, synth_shards, runs):
    """A training job submitted through the Jobs API: Ray runs its 2 DeepSpeed workers."""
    url = f"{runs}/submitted"
    refused = pretrain("submit", "--config", str(SMOKE), "--address", ray_cluster["dashboard"],
                       "--env", "AWS_ACCESS_KEY_ID", *args_for(synth_shards, url))
    assert refused.returncode == 2 and "refusing to put a credential" in refused.stdout
    assert not list(ROOT.glob(".pretrain-submit/*")), "a refused submission left its config behind"
    result = pretrain("submit", "--config", str(SMOKE), "--address", ray_cluster["dashboard"], "--wait",
                      *args_for(synth_shards, url))
    assert result.returncode == 0, result.stdout[-4000:]
    return url, result


def test_job_submission_through_the_jobs_api(ray_cluster, submitted):
    url, result = submitted
    submission_id = re.search(r"pretrain-smoke-[0-9a-f]{8}", result.stdout).group(0)
    assert "status: finished at step 8/8" in result.stdout
    status = pretrain("status", submission_id, "--address", ray_cluster["dashboard"])
    assert f"{submission_id}: SUCCEEDED" in status.stdout
    logs = pretrain("logs", submission_id, "--address", ray_cluster["dashboard"])
    assert "status: finished at step 8/8" in logs.stdout
    assert committed(url, 4) and committed(url, 8)
    from ray.job_submission import JobSubmissionClient

    spec = JobSubmissionClient(ray_cluster["dashboard"]).get_job_info(submission_id)
    assert "AWS_SECRET_ACCESS_KEY" not in json.dumps(spec.runtime_env or {})


def test_the_secret_key_is_nowhere_the_job_wrote(ray_cluster, submitted):
    """The workers hold a real secret value; scan the job spec, its logs and every object of the run."""
    from ray.job_submission import JobSubmissionClient

    url, result = submitted
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert secret.startswith("canary-")  # set by the s3_server fixture for every process of the session
    submission_id = re.search(r"pretrain-smoke-[0-9a-f]{8}", result.stdout).group(0)
    client = JobSubmissionClient(ray_cluster["dashboard"])
    places = {"job spec": json.dumps(client.get_job_info(submission_id).runtime_env or {}),
              "job logs": client.get_job_logs(submission_id), "submit output": result.stdout}
    written = storage.list_files(url)
    assert any(p.startswith("tb/") for p in written) and "config.toml" in written and any(
        p.endswith(".safetensors") for p in written) and any(p.startswith("ray/") for p in written)
    for path in written:  # checkpoints, manifests, TensorBoard events, config dump, lease, Ray's run state
        places[path] = storage.read_bytes(storage.join(url, path)).decode("latin-1")
    leaked = [where for where, text in places.items() if secret in text]
    assert not leaked, f"the secret value appears in {leaked}"


def test_what_can_be_checked_fails_before_ray_starts(synth_shards, runs, tmp_path):
    """No cluster: a held lease, missing eval shards and a bad policy string end `pretrain train` with
    exit 2 in seconds, before a Ray (local by default) or anything under run.url is started."""
    from pretrain.config import LeaseConfig
    from pretrain.lease import Lease

    url = f"{runs}/refused"
    holder = Lease(url, LeaseConfig(), None, job="the-first-job").acquire()
    started = time.monotonic()
    held = pretrain("train", "--config", str(SMOKE), *args_for(synth_shards, url), timeout=120)
    assert held.returncode == 2 and "held by another job" in held.stdout and "the-first-job" in held.stdout
    holder.release()
    missing = pretrain("train", "--config", str(SMOKE), *args_for(synth_shards, f"{runs}/missing-eval"),
                       "--set", f"data.eval_url={synth_shards['train']}-nope", timeout=120)
    assert missing.returncode == 2 and "data.eval_url: no manifest.json at" in missing.stdout, missing.stdout[-2000:]
    policy = pretrain("train", "--config", str(SMOKE), *args_for(synth_shards, url), "--set",
                      "data.randaugment=rand-zz", timeout=120)
    assert policy.returncode == 2 and "section 'zz' of 'rand-zz'" in policy.stdout
    assert time.monotonic() - started < 90
    assert "Started a local Ray" not in held.stdout + missing.stdout + policy.stdout
    assert storage.list_files(f"{runs}/missing-eval") == [] and storage.list_files(url) == ["lease.json"]


def test_a_failure_that_recurs_at_every_start_ends_the_run(ray_cluster, synth_shards, runs, tmp_path):
    """A weights file that exists but cannot be loaded: every (re)start fails before its first step. With
    unlimited restarts, the restart policy ends the run with exit 2 after 2 identical failures."""
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    started = time.monotonic()
    result = pretrain("train", "--config", str(SMOKE), "--address", ray_cluster["address"],
                      *args_for(synth_shards, f"{runs}/recurring", f"model.init_from={broken}",
                                "launch.max_failures=-1", "launch.max_repeated_startup_failures=2"), timeout=400)
    assert result.returncode == 2, result.stdout[-3000:]
    assert "the same failure ended 2 (re)starts in a row before their first step" in result.stdout
    assert time.monotonic() - started < 300


def test_train_joins_the_cluster_and_a_finished_run_is_a_no_op(ray_cluster, synth_shards, submitted):
    url, _ = submitted
    again = pretrain("train", "--config", str(SMOKE), "--address", ray_cluster["address"],
                     *args_for(synth_shards, url))
    assert again.returncode == 0 and "already finished at step 8/8" in again.stdout, again.stdout[-3000:]
    assert storage.listdir(storage.join(url, CHECKPOINTS)) == ["step_4", "step_8"]


def test_sigkill_of_a_worker_recovers_bitwise(ray_cluster, synth_shards, runs, submitted):
    reference, _ = submitted  # the same config, never interrupted
    url = f"{runs}/killed"
    proc = start_pretrain("train", "--config", str(SMOKE), "--address", ray_cluster["address"],
                          *args_for(synth_shards, url))
    lines: list[str] = []
    wait_for(proc, "step 6/8", lines)
    deadline = time.monotonic() + 120
    while not committed(url, 4):  # its upload is asynchronous: under load it can land after step 6
        assert time.monotonic() < deadline, "".join(lines)[-3000:]
        time.sleep(0.05)
    victims = train_workers()
    assert len(victims) == 2
    victims[1].send_signal(signal.SIGKILL)
    output = "".join(lines) + proc.stdout.read()
    assert proc.wait(timeout=600) == 0, output[-4000:]
    assert re.search(r"resuming at step [48]\b|already finished at step 8/8", output), output[-4000:]
    for kind in ("master", "ema"):
        ours, theirs = full_state(url, 8, kind), full_state(reference, 8, kind)
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), kind


def test_stop_and_sigterm_to_a_worker_commit_a_checkpoint_and_the_same_command_resumes(
        ray_cluster, synth_shards, runs):
    from ray.job_submission import JobSubmissionClient

    url = f"{runs}/preempted"
    args = [*args_for(synth_shards, url, "schedule.steps=400", "checkpoint.every_steps=1000")]
    submitted = pretrain("submit", "--config", str(SMOKE), "--address", ray_cluster["dashboard"], *args)
    submission_id = re.search(r"pretrain-smoke-[0-9a-f]{8}", submitted.stdout).group(0)
    client = JobSubmissionClient(ray_cluster["dashboard"])
    deadline = time.monotonic() + 300
    while "step 3/400" not in client.get_job_logs(submission_id):
        assert time.monotonic() < deadline, client.get_job_logs(submission_id)[-3000:]
        time.sleep(1)
    stopped = pretrain("stop", submission_id, "--address", ray_cluster["dashboard"])  # SIGTERM to the driver
    assert stopped.returncode == 0, stopped.stdout
    while str(client.get_job_status(submission_id)).split(".")[-1] not in ("STOPPED", "SUCCEEDED", "FAILED"):
        assert time.monotonic() < deadline + 300
        time.sleep(1)
    logs = client.get_job_logs(submission_id)
    assert "preemption: committed checkpoint at step" in logs, logs[-3000:]
    step = int(logs.split("preemption: committed checkpoint at step ")[1].split()[0])
    assert committed(url, step)

    proc = start_pretrain("train", "--config", str(SMOKE), "--address", ray_cluster["address"], *args)
    lines: list[str] = []
    wait_for(proc, f"resuming at step {step}", lines)
    wait_for(proc, f"step {step + 2}/400", lines)
    train_workers()[0].send_signal(signal.SIGTERM)  # a worker process (e.g. its node is reclaimed)
    output = "".join(lines) + proc.stdout.read()
    assert proc.wait(timeout=300) == 75, output[-4000:]
    second = int(output.split("preemption: committed checkpoint at step ")[1].split()[0])
    assert second > step and committed(url, second)
