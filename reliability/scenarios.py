"""The chaos scenarios: each injects one class of fault into a real run and checks the documented outcome.

Where the fault should be transparent, the run's final checkpoint (fp32 master weights, EMA and both
Adam moments, consolidated) must be bitwise equal to a clean run of the same config: on CPU the
training is deterministic, so any lost, repeated or mixed step shows up as a difference.
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import threading
import time
from typing import Callable

from reliability.fault_proxy import KINDS, READS, WRITES, FaultProxy, Rule
from reliability.harness import (STEPS, Env, Row, bitwise_equal, committed, copy_checkpoint, final_state, manifest,
                                 snapshot_files, train_workers)

Scenario = Callable[[Env, dict], Row]
REGISTRY: dict[str, Scenario] = {}


def scenario(name: str) -> Callable[[Scenario], Scenario]:
    def register(fn: Scenario) -> Scenario:
        REGISTRY[name] = fn
        return fn
    return register


def _finished(result, step: int = STEPS) -> bool:
    return result.code == 0 and f"status: finished at step {step}/{step}" in result.output or (
        result.code == 0 and '"status": "finished"' in result.output)


def _compare(row: Row, run_url: str, reference: dict) -> bool:
    same = bitwise_equal(final_state(run_url), reference)
    row.bitwise = "yes" if same else "no"
    return same


# ----------------------------------------------------------------------------------------- references


@scenario("clean")
def clean(env: Env, refs: dict) -> Row:
    """The references: the same config, uninterrupted, with the Ray launcher and with torchrun."""
    row = Row("clean runs", "nothing", "exit 0 on both launchers; identical final checkpoints")
    ray_url, torch_url = env.run_url("clean-ray"), env.run_url("clean-torchrun")
    ray_run = env.train(env.args(ray_url))
    torch_run = env.train(env.args(torch_url), launcher="torchrun")
    refs.update(ray_url=ray_url, torch_url=torch_url)
    ok = _finished(ray_run) and _finished(torch_run)
    if ok:
        refs["state"] = final_state(ray_url)
        ok = _compare(row, torch_url, refs["state"])
    row.outcome = f"ray exit {ray_run.code}, torchrun exit {torch_run.code}; {committed(ray_url)}"
    row.passed = ok
    return row


# ----------------------------------------------------------------------------------------- storage


@scenario("storage-faults")
def storage_faults(env: Env, refs: dict) -> Row:
    read_rate, write_rate = 0.08, 0.15
    row = Row("random storage faults", f"seeded: {read_rate:.0%} of reads, {write_rate:.0%} of writes; every kind "
              f"({', '.join(KINDS)}) on every request class", "exit 0, bitwise equal to the clean run")
    proxy = FaultProxy(env.s3.endpoint, seed=env.seed, read_fault_rate=read_rate, write_fault_rate=write_rate).start()
    try:
        url = env.run_url("storage-faults")
        # a checkpoint every step and retention at 2: uploads, commits and purges (DELETE) at every step
        result = env.train(env.args(url, "checkpoint.every_steps=1", "checkpoint.keep_last=2", endpoint=proxy.url),
                           launcher="torchrun")
        summary = proxy.summary()
    finally:
        proxy.stop()
    row.details = {"proxy": summary}
    injected = {op: sum(v for k, v in s["injected"].items() if k != "delay") for op, s in summary.items()}
    requests = {op: s["requests"] for op, s in summary.items()}
    reads = sum(requests.get(op, 0) for op in READS)
    writes = sum(requests.get(op, 0) for op in WRITES)
    failed_reads = sum(injected.get(op, 0) for op in READS)
    failed_writes = sum(injected.get(op, 0) for op in WRITES)
    kinds_seen = {k for s in summary.values() for k in s["injected"]}
    missing = [op for op in (*READS, *WRITES) if not injected.get(op)]
    row.injected = (f"{failed_reads}/{reads} reads ({failed_reads / max(reads, 1):.0%}), {failed_writes}/{writes} "
                    f"writes ({failed_writes / max(writes, 1):.0%}) failed; kinds {sorted(kinds_seen)}; by class "
                    + ", ".join(f"{op} {injected.get(op, 0)}/{requests.get(op, 0)}" for op in (*READS, *WRITES)))
    ok = _finished(result) and not missing and kinds_seen >= set(KINDS)
    row.outcome = f"exit {result.code}, {result.output.count('transient error')} retries" + (
        f"; no fault landed on {missing}" if missing else "")
    row.passed = _finished(result) and _compare(row, url, refs["state"]) and ok
    return row


@scenario("bad-data")
def bad_data(env: Env, refs: dict) -> Row:
    """A tar cut short by an interrupted upload, and corrupt JPEGs in the middle of another shard."""
    from reliability.handmade_shards import jpeg_bytes, write_shard_set

    row = Row("truncated shard + corrupt JPEGs", "shard 5 of 6 cut short by 9 kB (its manifest entry and index "
              "still describe the whole tar); 3 corrupt JPEGs mid-shard 3", "exit 0; skipped and counted by reason, totals add up; one size "
              "check per shard, no retry storm")
    data = "s3://chaos-data/bad"
    samples = [{"jpg": jpeg_bytes(i, 32) if i not in (50, 51, 55) else b"\xff\xd8 corrupt", "cls": str(i % 10).encode()}
               for i in range(120)]
    write_shard_set(data, samples, per_shard=20, num_classes=10, manifest_lists_full_size=True, truncate_shard=4,
                    truncate_bytes=9000)
    proxy = FaultProxy(env.s3.endpoint).start()
    try:
        url = env.run_url("bad-data")
        result = env.train(env.args(url, "data.max_skip_fraction=0.3", endpoint=proxy.url, train_url=data),
                           launcher="torchrun", timeout_s=300)
        requests = dict(proxy.requests)
        truncated_gets = sum(v for k, v in proxy.bytes_served.items() if "shard-000004.tar" in k)
    finally:
        proxy.stop()
    summary = _summary(result.output)
    skipped = summary.get("skipped", {})
    adds_up = summary.get("skipped_total") == sum(skipped.values()) and \
        summary.get("samples_read") == STEPS * 16 + summary.get("skipped_total", -1)
    row.details = {"summary": summary, "requests": requests}
    row.outcome = (f"exit {result.code} in {result.seconds:.0f}s; skipped {skipped} of {summary.get('samples_read')} "
                   f"read ({'totals add up' if adds_up else 'TOTALS DO NOT ADD UP'}); {requests.get('RANGED_GET', 0)} "
                   f"ranged GETs, {truncated_gets} bytes of the cut shard read")
    retried = result.output.count("transient error")
    row.outcome += f"; {retried} retries"
    row.passed = (_finished(result) and set(skipped) == {"truncated", "decode_error"} and adds_up
                  and result.seconds < 180 and retried == 0)
    return row


# ----------------------------------------------------------------------------------------- processes


def _kill_a_worker(rng: random.Random) -> int | None:
    workers = train_workers()
    if not workers:
        return None
    victim = workers[rng.randrange(len(workers))]
    victim.send_signal(signal.SIGKILL)
    return victim.pid


@scenario("worker-kills")
def worker_kills(env: Env, refs: dict) -> Row:
    rng = random.Random(env.seed)
    first_step = rng.choice([1, 2])
    upload_step = rng.choice([3, 6])
    row = Row("SIGKILL a worker x3", f"SIGKILL of a random worker at step {first_step}, during the async upload of "
              f"checkpoint step_{upload_step}, and during the retention purge after step_9", "Ray restarts the "
              "group each time; exit 0, bitwise equal to the clean run")
    fired = {name: threading.Event() for name in ("upload", "purge")}
    armed = {"upload": True, "purge": True}

    def one_shot(name: str, test: Callable[[str, str], bool]) -> Callable[[str, str], bool]:
        def matches(method: str, path: str) -> bool:
            if armed[name] and test(method, path):
                armed[name] = False
                fired[name].set()
                return True
            return False
        return matches

    url = env.run_url("worker-kills")
    prefix = f"/{url[len('s3://'):]}/checkpoints/"
    proxy = FaultProxy(env.s3.endpoint, rules=[
        Rule(one_shot("upload", lambda m, p: m in ("PUT", "POST") and p.startswith(f"{prefix}step_{upload_step}/")
                      and "safetensors" in p), delay_s=4.0),
        Rule(one_shot("purge", lambda m, p: (m == "DELETE" or (m == "POST" and "delete" in p))
                      and committed_at_least(url, 9)), delay_s=4.0),
    ]).start()
    kills = []
    try:
        run = env.start_run(env.args(url, "checkpoint.keep_last=2", endpoint=proxy.url))
        if run.wait_for(rf"(^|\s)step {first_step}/{STEPS} ") and _kill_a_worker(rng):
            kills.append("step")
        for name in ("upload", "purge"):
            if _wait(fired[name], run, 400):
                time.sleep(0.5)  # inside the delayed request
                if _kill_a_worker(rng):
                    kills.append(name)
        result = run.finish()
    finally:
        proxy.stop()
    restarts = result.output.count("resuming at step") + result.output.count("starting:") - 1
    row.outcome = f"{len(kills)} kills ({', '.join(kills)}), {restarts} restarts, exit {result.code}; " \
                  f"committed {committed(url)}"
    row.passed = len(kills) == 3 and _finished(result) and _compare(row, url, refs["state"])
    return row


def committed_at_least(run_url: str, step: int) -> bool:
    try:
        return any(int(d.split("_")[1].split(".")[0]) >= step for d in committed(run_url))
    except Exception:
        return False


def _wait(event: threading.Event, run, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if event.wait(0.2):
            return True
        if run.proc.poll() is not None:
            return False
    return False


@scenario("driver-kill")
def driver_kill(env: Env, refs: dict) -> Row:
    row = Row("SIGKILL the driver, run again", "SIGKILL of `pretrain train` at step 5, then the same command",
              "the second run takes the dead driver's lease, resumes from step_3; exit 0, bitwise equal")
    url = env.run_url("driver-kill")
    args = env.args(url)
    run = env.start_run(args)
    ok = run.wait_for(rf"(^|\s)step 5/{STEPS} ")
    run.signal(signal.SIGKILL)
    run.finish()
    deadline = time.monotonic() + 90
    while train_workers() and time.monotonic() < deadline:  # Ray ends the dead driver's job
        time.sleep(0.5)
    again = env.train(args)
    resumed = again.step_of(r"resuming at step (\d+)")
    row.outcome = f"second run exit {again.code}, resumed at step {resumed}"
    row.passed = ok and _finished(again) and resumed is not None and _compare(row, url, refs["state"])
    return row


@scenario("preemption")
def preemption(env: Env, refs: dict) -> Row:
    row = Row("SIGTERM (preemption), resubmit", "SIGTERM to `pretrain train` at step 5, then the same command",
              "a checkpoint is committed, exit 75; the resubmission resumes there; exit 0, bitwise equal")
    url = env.run_url("preemption")
    args = env.args(url)
    run = env.start_run(args)
    ok = run.wait_for(rf"(^|\s)step 5/{STEPS} ")
    run.signal(signal.SIGTERM)
    first = run.finish()
    at = first.step_of(r"preemption: committed checkpoint at step (\d+)")
    again = env.train(args)
    resumed = again.step_of(r"resuming at step (\d+)")
    row.outcome = f"exit {first.code} after committing step {at}; resubmission exit {again.code}, resumed at {resumed}"
    row.passed = ok and first.code == 75 and at is not None and resumed == at and _finished(again) and \
        _compare(row, url, refs["state"])
    return row


@scenario("second-job")
def second_job(env: Env, refs: dict) -> Row:
    row = Row("a second job on the same run.url", "`pretrain train --launcher torchrun` on a run.url that a Ray job is "
              "training", "the second job exits 2 at once, naming the holder; the first finishes, bitwise equal")
    url = env.run_url("second-job")
    first = env.start_run(env.args(url))
    ok = first.wait_for(rf"(^|\s)step 2/{STEPS} ")
    second = env.train(env.args(url), launcher="torchrun", timeout_s=120)
    result = first.finish()
    named = "held by another job" in second.output and "last heartbeat" in second.output
    row.outcome = f"second job exit {second.code} after {second.seconds:.0f}s ({'holder named' if named else '?'}); " \
                  f"first exit {result.code}"
    row.passed = ok and second.code == 2 and named and second.seconds < 60 and _finished(result) and \
        _compare(row, url, refs["state"])
    return row


# ----------------------------------------------------------------------------------------- checkpoints and data


@scenario("changed-shards")
def changed_shards(env: Env, refs: dict) -> Row:
    row = Row("changed shard set", "resume step_6 of a 320-sample run on a rebuilt 280-sample set, without and with "
              "run.allow_data_change", "without: exit 2, nothing written; with: exit 0, the change recorded")
    url = env.run_url("changed-shards")
    copy_checkpoint(refs["torch_url"], url, "step_6")
    before = snapshot_files(url)
    refused = env.train(env.args(url, train_url="s3://chaos-data/train-rebuilt"), launcher="torchrun")
    untouched = snapshot_files(url) == before
    allowed = env.train(env.args(url, "run.allow_data_change=true", train_url="s3://chaos-data/train-rebuilt"),
                        launcher="torchrun")
    changes = manifest(url, committed(url)[-1]).get("data_changes", []) if _finished(allowed) else []
    recorded = len(changes) == 1 and changes[0]["from"]["num_samples"] == 320 and changes[0]["to"]["num_samples"] == 280
    row.outcome = (f"without: exit {refused.code}, checkpoints {'untouched' if untouched else 'CHANGED'}; with: exit "
                   f"{allowed.code}, change {'recorded' if recorded else 'NOT recorded'}")
    row.passed = refused.code == 2 and "another shard set" in refused.output and untouched and \
        _finished(allowed) and recorded
    return row


@scenario("tampered-checkpoint")
def tampered_checkpoint(env: Env, refs: dict) -> Row:
    from pretrain import storage
    from pretrain.checkpoint import rank_file

    row = Row("tampered checkpoint file", "one byte flipped in step_9/rank_00001.safetensors (newest of step_6, "
              "step_9)", "step_9 reported unusable and left as it is; resume from step_6; exit 0, bitwise equal")
    url = env.run_url("tampered")
    for step in ("step_6", "step_9"):
        copy_checkpoint(refs["torch_url"], url, step)
    target = storage.join(url, "checkpoints", "step_9", rank_file(1, "safetensors"))
    data = bytearray(storage.read_bytes(target))
    data[len(data) // 2] ^= 0x01
    storage.write_bytes(target, bytes(data))
    result = env.train(env.args(url), launcher="torchrun")
    reported = "step_9" in result.output and "sha256" in result.output
    kept = storage.read_bytes(target) == bytes(data)
    resumed = result.step_of(r"resuming at step (\d+)")
    row.outcome = f"exit {result.code}; resumed at {resumed}; tampered file {'reported' if reported else 'NOT reported'} " \
                  f"and {'kept' if kept else 'CHANGED'}; committed {committed(url)}"
    row.passed = _finished(result) and resumed == 6 and reported and kept and "step_9.1" in committed(url) and \
        _compare(row, url, refs["state"])
    return row


@scenario("staging-disk-full")
def staging_disk_full(env: Env, refs: dict) -> Row:
    row = Row("staging disk full", "checkpoint.staging_dir on a 1 MB filesystem: the save at step 9 cannot be written",
              "a clear error, exit 2; step_6 intact; the next run resumes from it; exit 0, bitwise equal")
    url = env.run_url("disk-full")
    copy_checkpoint(refs["torch_url"], url, "step_6")
    before = snapshot_files(url)
    staging = env.workdir / "tiny-staging"
    staging.mkdir(exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(staging)],
                             capture_output=True).returncode == 0
    wrapper = None
    if not mounted:  # not root: a private mount namespace where we may mount a tmpfs
        inner = f"mount -t tmpfs -o size=1m tmpfs {staging} && exec \"$@\""
        wrapper = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", inner, "sh"]
    try:
        run = env.start_run(env.args(url, f"checkpoint.staging_dir={staging}"), launcher="torchrun", wrapper=wrapper)
        full = run.finish()
    finally:
        if mounted:
            subprocess.run(["umount", str(staging)], capture_output=True)
    intact = all(snapshot_files(url).get(k) == v for k, v in before.items())
    clear = "is full while writing step_9" in full.output
    again = env.train(env.args(url), launcher="torchrun")
    row.outcome = (f"exit {full.code} ({'clear error' if clear else 'no clear error'}); step_6 "
                   f"{'intact' if intact else 'DAMAGED'}; rerun exit {again.code}")
    row.passed = full.code == 2 and clear and intact and _finished(again) and _compare(row, url, refs["state"])
    shutil.rmtree(staging, ignore_errors=True)
    return row


def _summary(output: str) -> dict:
    import json

    lines = [line for line in output.splitlines() if line.startswith("SUMMARY ")]
    return json.loads(lines[-1][len("SUMMARY "):]) if lines else {}
