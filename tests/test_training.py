"""The training worker on real components: 2 gloo processes under torchrun, DeepSpeed ZeRO 1/2/3,
a tiny ConvNeXt, shards and checkpoints on the moto S3 server (local disk where noted)."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch
from safetensors.torch import load as load_safetensors

from pretrain import storage
from pretrain import state_format
from pretrain.checkpoint import CHECKPOINTS, MANIFEST, rank_file
from pretrain.data.loader import merge_rank_states
from pretrain.data.order import LoaderState, Topology
from reliability.handmade_shards import jpeg_bytes, write_shard_set
from reliability.fault_proxy import FaultProxy, Rule
from tests.workers import run_workers, start_workers

pytestmark = pytest.mark.integration

# No mixup/RandAugment in the smoke config, so a short run's loss falls visibly.
QUIET = ["data.mixup=0.0", "data.num_workers=0", "model.drop_path_rate=0.1", "logging.every_steps=1"]
# The bitwise-resume reference also exercises a DataLoader worker process per rank.
WITH_WORKER = ["data.num_workers=1"]


def overrides(shards, run_url, *extra):
    return [f"data.train_url={shards['train']}", "data.eval_url=", f"run.url={run_url}", *QUIET, *extra]


def kill_tree(proc) -> None:
    """SIGKILL torchrun and its workers (they run in sessions of their own, which killpg would miss)."""
    import psutil

    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)
    proc.wait()


def step_dir(run_url, step):
    return storage.join(run_url, CHECKPOINTS, f"step_{step}")


def manifest(run_url, step):
    return json.loads(storage.read_bytes(storage.join(step_dir(run_url, step), MANIFEST)))


def rank_tensors(run_url, step, rank):
    return load_safetensors(storage.read_bytes(storage.join(step_dir(run_url, step), rank_file(rank, "safetensors"))))


def full_state(run_url, step, kind):
    """Consolidated full tensors of one kind ('master', 'ema', 'exp_avg', ...) of a committed checkpoint."""
    saved = state_format.rank_tables(r["fragments"] for r in manifest(run_url, step)["ranks"])
    return state_format.consolidate(saved, lambda r: rank_tensors(run_url, step, r), kind)


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def copy_checkpoint(src_run, dst_run, step):
    src = step_dir(src_run, step)
    for name in storage.listdir(src):
        storage.write_bytes(storage.join(step_dir(dst_run, step), name), storage.read_bytes(storage.join(src, name)))


@pytest.fixture(scope="module")
def run_root(make_bucket):
    return make_bucket("runs")


@pytest.fixture(scope="module")
def straight(synth_shards, run_root):
    """8 steps on 2 ranks with a checkpoint at 4: the reference for resume tests."""
    url = f"{run_root}/straight"
    run = run_workers(2, overrides(synth_shards, url, *WITH_WORKER))
    assert run.returncode == 0, run.output[-3000:]
    return url, run


def test_training_on_s3_commits_checkpoints_and_tensorboard(straight):
    url, run = straight
    assert run.summary["status"] == "finished" and run.summary["step"] == 8
    m = manifest(url, 8)
    assert m["finished"] and m["world_size"] == 2 and set(m["files"]) == {
        rank_file(r, ext) for r in (0, 1) for ext in ("safetensors", "json")}
    assert storage.exists(storage.join(step_dir(url, 4), MANIFEST))
    assert any(name.startswith("events.out.tfevents") for name in storage.listdir(storage.join(url, "tb")))


def test_rerunning_a_finished_run_is_a_no_op(synth_shards, straight):
    url, _ = straight
    run = run_workers(2, overrides(synth_shards, url, *WITH_WORKER))
    assert run.returncode == 0 and run.summary["status"] == "already_finished"
    assert "already finished at step 8/8" in run.output
    assert storage.listdir(storage.join(url, CHECKPOINTS)) == ["step_4", "step_8"]


def test_resume_is_bitwise_identical_to_an_uninterrupted_run(synth_shards, straight, run_root, s3_server):
    url, _ = straight
    resumed = f"{run_root}/resumed"
    copy_checkpoint(url, resumed, 4)  # as if the run had died after committing step 4
    counting = FaultProxy(s3_server.endpoint).start()  # no faults: it counts requests by class and path
    try:
        run = run_workers(2, overrides(synth_shards, resumed, *WITH_WORKER, f"storage.endpoint_url={counting.url}"))
        resume_reads = [i for i in counting.log if "/checkpoints/step_4/" in i[1]]
    finally:
        counting.stop()
    assert run.returncode == 0 and "resuming at step 4" in run.output, run.output[-3000:]
    # O(files), not O(ranks x files): rank 0 reads the manifest once; each rank reads its own two files.
    assert sorted(path.rsplit("/", 1)[1] for _, path in resume_reads) == sorted(
        ["manifest.json", "rank_00000.json", "rank_00000.safetensors", "rank_00001.json", "rank_00001.safetensors"])
    assert all(op == "GET" for op, _ in resume_reads), resume_reads
    assert run.summary["samples_read"] == 8 * 16 and run.summary["skipped_total"] == 0  # counters carried over
    for kind in ("master", "ema"):
        assert_same(full_state(url, 8, kind), full_state(resumed, 8, kind))
    for rank in (0, 1):  # optimizer moments too, fragment by fragment
        assert_same(rank_tensors(url, 8, rank), rank_tensors(resumed, 8, rank))


def loader_state(run_url, step) -> dict:
    m = manifest(run_url, step)
    return merge_rank_states(m["loader"], [r["loader"] for r in m["ranks"]])


def consumed_positions(state: dict) -> list[int]:
    """S positions a saved loader state has consumed since its plan began (from the real saved state)."""
    s = LoaderState.from_dict(state)
    topo, out = s.topology, []
    for stream, cursor in enumerate(s.cursors):
        k = 0
        while k * topo.window < cursor:
            order = s.plan.window_order(s.plan.stream_window(stream, k, topo), topo, s.seed)
            out += order[: cursor - k * topo.window].tolist()
            k += 1
    return out


@pytest.mark.parametrize("first,second", [((2, 2), (1, 1)), ((1, 2), (2, 3))], ids=["2to1-zero1", "1to2-zero3"])
def test_elastic_resume_changes_world_size_and_zero_stage(synth_shards, straight, run_root, first, second):
    (n1, z1), (n2, z2) = first, second
    url = f"{run_root}/elastic-{n1}to{n2}"
    if (n1, z1) == (2, 2):
        copy_checkpoint(straight[0], url, 4)  # data.num_workers changes too: 1 -> 0 loader workers
        extra = []
    else:  # a 4-step run, then extended to 8 steps on the other world size
        base = run_workers(n1, overrides(synth_shards, url, f"zero.stage={z1}", "schedule.steps=4"))
        assert base.returncode == 0, base.output[-3000:]
        extra = ["run.allow_config_change=true"]
    # What the resharded resume loaded, committed as it was loaded (step_4.1), equals the source exactly.
    extra += ["checkpoint.keep_last=5"]  # keep step_4 for the checks below
    probe = run_workers(n2, overrides(synth_shards, url, f"zero.stage={z2}", *extra), module="tests.reshard_probe")
    assert probe.returncode == 0, probe.output[-3000:]
    for kind in ("master", "ema", "exp_avg", "exp_avg_sq"):
        assert_same(full_state(url, 4, kind), full_state(url, "4.1", kind))
    run = run_workers(n2, overrides(synth_shards, url, f"zero.stage={z2}", *extra))
    assert run.returncode == 0 and "resuming at step 4" in run.output, run.output[-3000:]
    assert f"{n2} workers x micro-batch 8 x accumulation {2 // n2}" in run.output
    assert run.summary["samples_read"] == 8 * 16  # totals survive another world size (not n2 x rank 0's)
    before, after = loader_state(url, 4), loader_state(url, 8)
    assert manifest(url, 8)["dir"] == "step_8"
    # Positions read before the checkpoint, then after it under the re-planned order.
    seen = consumed_positions(before)
    resumed = LoaderState.from_dict(after)
    assert resumed.topology == Topology(n2, 1, 256)
    plan_start = LoaderState.from_dict(before).resumed_on(resumed.topology, 0, 400)
    assert plan_start.plan == resumed.plan
    seen += consumed_positions(after)
    assert len(seen) == 8 * 16 and len(set(seen)) == len(seen), "a sample was repeated"
    assert all(torch.isfinite(t).all() for t in full_state(url, 8, "master").values())


@pytest.fixture(scope="module")
def zero_runs(synth_shards, tmp_path_factory):
    """The same 16-step fp32 run under ZeRO-1 and ZeRO-3 (fp32, so that the two stages' weight
    trajectories agree to fp32 rounding; in bf16 they reduce gradients in different orders and
    precisions). The EMA starts at step 13, so the last 4 checkpoints hold every weight it averaged."""
    runs = {}
    for stage in (1, 3):
        url = str(tmp_path_factory.mktemp(f"zero{stage}"))
        run = run_workers(2, overrides(synth_shards, url, f"zero.stage={stage}", "schedule.steps=16",
                                       "precision.dtype=fp32", "checkpoint.every_steps=1", "checkpoint.keep_last=4",
                                       "ema.decay=0.7", "ema.update_after_step=12", "data.num_workers=0",
                                       "optim.lr=2e-3"))
        assert run.returncode == 0, run.output[-3000:]
        runs[stage] = (url, run)
    return runs


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_stage_trains_and_lowers_the_loss(zero_runs, stage):
    losses = list(zero_runs[stage][1].steps_logged().values())
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.05, losses


@pytest.mark.parametrize("stage", [1, 3])
def test_sharded_ema_equals_a_reference_ema_of_the_full_weights(zero_runs, stage):
    url, _ = zero_runs[stage]
    reference = full_state(url, 13, "master")  # the first EMA update copies the weights
    for step in (14, 15, 16):
        master = full_state(url, step, "master")
        reference = {k: 0.7 * reference[k] + 0.3 * master[k] for k in master}  # asymmetric: order matters
    ema = full_state(url, 16, "ema")
    for key, value in reference.items():
        torch.testing.assert_close(ema[key], value, rtol=1e-6, atol=1e-7)


def test_zero1_and_zero3_emas_agree_to_fp32_rounding(zero_runs):
    ema1, ema3 = (full_state(zero_runs[stage][0], 16, "ema") for stage in (1, 3))
    for key in ema1:
        torch.testing.assert_close(ema1[key], ema3[key], rtol=1e-5, atol=1e-6)


def test_zero2_bf16_accuracy_rises_well_above_chance(synth_shards, tmp_path):
    run = run_workers(2, overrides(synth_shards, str(tmp_path / "run"), f"data.eval_url={synth_shards['holdout']}",
                                   "eval.max_samples=0", "schedule.steps=40", "schedule.warmup_steps=3",
                                   "optim.lr=6e-3", "data.micro_batch_size=16", "schedule.global_batch_size=32",
                                   "checkpoint.every_steps=1000", "data.num_workers=0", "logging.every_steps=5"))
    assert run.returncode == 0, run.output[-3000:]
    losses = list(run.steps_logged().values())
    assert losses[-1] < losses[0] - 0.1, losses
    assert run.summary["eval"]["model_samples"] == 100
    assert run.summary["eval"]["model_top1"] >= 0.25, run.summary["eval"]  # chance: 10%


def test_a_save_killed_mid_upload_is_never_loaded(synth_shards, straight, s3_server, run_root):
    url = f"{run_root}/killed"
    delayed = f"/{url[len('s3://'):]}/{CHECKPOINTS}/step_8/{rank_file(1, 'safetensors')}"
    proxy = FaultProxy(s3_server.endpoint, rules=[Rule(lambda m, p: m == "PUT" and p.startswith(delayed),
                                                          delay_s=120)]).start()
    try:
        proc = start_workers(2, overrides(synth_shards, url, *WITH_WORKER, f"storage.endpoint_url={proxy.url}"))
        deadline = time.monotonic() + 300
        while not storage.exists(storage.join(step_dir(url, 8), rank_file(0, "json"))):
            assert proc.poll() is None and time.monotonic() < deadline, "rank 0 never uploaded step 8"
            time.sleep(0.5)
        kill_tree(proc)  # the whole job dies; rank 1 is still uploading, so nothing is committed
    finally:
        proxy.stop()
    assert not storage.exists(storage.join(step_dir(url, 8), MANIFEST))
    run = run_workers(2, overrides(synth_shards, url, *WITH_WORKER))
    assert run.returncode == 0, run.output[-3000:]
    assert "removed uncommitted checkpoint leftovers at steps [8]" in run.output
    assert "resuming at step 4" in run.output
    assert_same(full_state(straight[0], 8, "master"), full_state(url, 8, "master"))


def test_sigterm_commits_a_checkpoint_and_the_same_command_resumes(synth_shards, run_root):
    url = f"{run_root}/sigterm"
    args = overrides(synth_shards, url, "schedule.steps=500", "checkpoint.every_steps=1000")
    proc = start_workers(2, args)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 3/"):
            break
    import psutil

    workers = [p for p in psutil.Process(proc.pid).children() if "pretrain.worker" in " ".join(p.cmdline())]
    assert len(workers) == 2
    workers[1].send_signal(signal.SIGTERM)  # one rank is preempted; all ranks agree at the next step
    output = "".join(lines) + proc.stdout.read()
    proc.wait(timeout=120)
    assert "preemption: committed checkpoint at step" in output, output[-3000:]
    step = int(output.split("preemption: committed checkpoint at step ")[1].split()[0])
    assert step >= 3 and manifest(url, step)["step"] == step
    run = run_workers(2, args[:-2] + [f"schedule.steps={step + 2}", "checkpoint.every_steps=1000",
                                      "run.allow_config_change=true"])
    assert run.returncode == 0 and f"resuming at step {step}" in run.output, run.output[-3000:]


def test_non_finite_losses_stop_the_run_and_keep_the_last_checkpoint(synth_shards, tmp_path):
    url = str(tmp_path / "run")
    run = run_workers(2, overrides(synth_shards, url, "optim.lr=1e30", "schedule.warmup_steps=0",
                                   "checkpoint.every_steps=1", "optim.max_nonfinite_in_row=3",
                                   "data.num_workers=0", "precision.dtype=fp32"))
    assert run.returncode == 2
    assert "consecutive steps had non-finite gradients" in run.output, run.output[-3000:]
    committed = [s for s in (1, 2, 3) if storage.exists(storage.join(step_dir(url, s), MANIFEST))]
    assert committed, "no checkpoint survived"
    assert all(torch.isfinite(t).all() for t in full_state(url, committed[0], "master").values())


@pytest.mark.parametrize("every", [4, 1], ids=["a-quarter", "all"])
def test_too_many_corrupt_samples_stop_the_run(s3_bucket, tmp_path, every):
    data = f"{s3_bucket}/corrupt-{every}"
    samples = [{"jpg": jpeg_bytes(i) if i % every else b"garbage", "cls": str(i % 10).encode()} for i in range(240)]
    write_shard_set(data, samples, per_shard=40, num_classes=10)
    run = run_workers(2, overrides({"train": data}, str(tmp_path / "run"), "data.max_skip_fraction=0.05",
                                   "data.num_workers=0"), timeout=300)
    assert run.returncode == 2
    assert "were skipped as corrupt or unreadable, above data.max_skip_fraction=5.00%" in run.output, \
        run.output[-3000:]
    import ast
    import re

    skipped, reasons = re.search(r"(\d+) of \d+ samples read .*Counts by reason: (\{[^}]*\})", run.output).groups()
    assert sum(ast.literal_eval(reasons).values()) == int(skipped)  # the report adds up


def test_a_different_config_refuses_to_resume(synth_shards, straight):
    run = run_workers(2, overrides(synth_shards, straight[0], "model.name=convnext_femto"))
    assert run.returncode == 2
    assert "holds a convnext_atto model with 10 classes; this run builds convnext_femto" in run.output
    run = run_workers(2, overrides(synth_shards, straight[0], "optim.lr=1e-3"))
    assert run.returncode == 2
    assert "holds checkpoints of a different configuration" in run.output
    assert "optim.lr: 0.004 -> 0.001" in run.output


def test_export_loads_in_timm_with_identical_logits(straight, tmp_path):
    import timm

    from launch.cli import main as pretrain_cli
    from pretrain.models import create_model
    from pretrain.models.weights import load_weights

    out = tmp_path / "atto_ema.safetensors"
    assert pretrain_cli(["export", straight[0], str(out), "--ema"]) == 0
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["variant"] == "convnext_atto" and card["step"] == 8 and len(card["classes"]) == 10
    reference = timm.create_model("convnext_atto", pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(out), num_classes=10)).eval()
    ours = create_model("convnext_atto", num_classes=10).eval()
    load_weights(ours, str(out))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=1e-5)
    assert_same(dict(ours.state_dict()), full_state(straight[0], 8, "ema"))


def test_a_hung_rank_fails_the_step_after_the_collective_timeout(synth_shards, tmp_path):
    import psutil

    proc = start_workers(2, overrides(synth_shards, str(tmp_path / "run"), "schedule.steps=500",
                                      "checkpoint.every_steps=1000", "launch.collective_timeout_s=15"))
    lines, workers = [], []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step 3/"):
                workers = [p for p in psutil.Process(proc.pid).children() if "pretrain.worker" in " ".join(p.cmdline())]
                workers[1].suspend()  # SIGSTOP: rank 1 hangs mid-run
                started = time.monotonic()
            if "another rank is hung or dead" in line:
                break
        waited = time.monotonic() - started
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for worker in workers:  # torchrun's workers have their own session: a stopped one outlives killpg
            try:
                worker.kill()
            except psutil.NoSuchProcess:
                pass
    output = "".join(lines)
    assert "rank 0: a collective timed out after launch.collective_timeout_s=15s; another rank is hung or dead" \
        in output, output[-3000:]
    assert waited < 120
