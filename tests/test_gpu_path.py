"""The GPU path's defects, proven on CPU where they can be: host syncs per step, compile, DeepSpeed's
BF16_Optimizer (ZeRO-1 + fp32 accumulation), bucket sizing, one GPU per worker. 2 gloo ranks, tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from pretrain import storage
from pretrain.config import ConfigError, LaunchConfig, ZeroConfig
from tests.test_training import assert_same, copy_checkpoint, full_state, manifest, overrides
from tests.workers import run_workers

pytestmark = pytest.mark.integration


def test_one_host_sync_and_one_collective_of_ours_per_step(synth_shards, tmp_path):
    """Steps 3..6 (no logging, no checkpoint): the loss and the non-finite check stay on the device until
    the step's single control all-reduce. DeepSpeed's own per-step calls are reported, not ours to remove
    (its overflow check is what skips a non-finite step)."""
    run = run_workers(2, overrides(synth_shards, str(tmp_path / "run"), "data.num_workers=1",
                                   "data.micro_batch_size=4", "logging.every_steps=1000",
                                   "checkpoint.every_steps=1000"), module="tests.sync_probe")
    assert run.returncode == 0, run.output[-3000:]
    counts = json.loads(next(line for line in run.output.splitlines() if line.startswith("SYNCS "))[6:])
    ours = {k: v for k, v in counts.items() if k.startswith("pretrain/")}
    assert ours == {"pretrain/collective/all_reduce": 1.0, "pretrain/sync/tolist": 1.0}, counts
    deepspeed_syncs = sum(v for k, v in counts.items() if k.startswith("deepspeed/sync/"))
    assert deepspeed_syncs <= 8, counts  # gradient accumulation 2: per step, not per micro-batch


def test_compiled_blocks_train_like_eager(synth_shards, tmp_path):
    """torch.compile per block (inductor on CPU), with ZeRO-2 and activation checkpointing: the same
    weights as eager within fp32 rounding after 4 steps."""
    common = ["precision.dtype=fp32", "model.checkpoint_stages=[1]", "schedule.steps=4", "model.drop_path_rate=0.0"]
    runs = {}
    for compiled in (False, True):
        url = str(tmp_path / f"compile-{compiled}")
        run = run_workers(2, overrides(synth_shards, url, *common, f"model.compile={str(compiled).lower()}"))
        assert run.returncode == 0, run.output[-3000:]
        runs[compiled] = url
    eager, compiled = full_state(runs[False], 4, "master"), full_state(runs[True], 4, "master")
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-3, atol=1e-4)  # Adam amplifies ulps
    assert list(eager) == list(compiled)  # block-level compile keeps every parameter name (no _orig_mod.)


def test_zero1_with_fp32_accumulation_uses_bf16_optimizer_and_resumes_exactly(synth_shards, tmp_path):
    """bf16 + ZeRO-1 + zero.grad_accum_dtype=fp32 switches DeepSpeed to BF16_Optimizer, whose fp32
    partitions have another name: fragments, EMA and resume must still be right."""
    url, resumed = str(tmp_path / "bf16opt"), str(tmp_path / "bf16opt-resumed")
    args = ["zero.stage=1", "zero.grad_accum_dtype=fp32", "zero.communication_dtype=fp32",
            "data.micro_batch_size=4", "ema.update_after_step=7"]
    run = run_workers(2, overrides(synth_shards, url, *args))
    assert run.returncode == 0 and "BF16_Optimizer over AdamW" in run.output, run.output[-3000:]
    assert_same(full_state(url, 8, "ema"), full_state(url, 8, "master"))  # the first EMA update copies
    copy_checkpoint(url, resumed, 4)
    again = run_workers(2, overrides(synth_shards, resumed, *args))
    assert again.returncode == 0 and "resuming at step 4" in again.output, again.output[-3000:]
    for kind in ("master", "exp_avg", "exp_avg_sq", "ema"):
        assert_same(full_state(url, 8, kind), full_state(resumed, 8, kind))
    assert manifest(url, 8)["config"]["zero"]["grad_accum_dtype"] == "fp32"
    assert storage.exists(url)


@pytest.mark.unit
def test_buckets_are_sized_from_the_model():
    from pretrain.engine.deepspeed import bucket_elements

    xl = 392_900_177
    assert bucket_elements(ZeroConfig(), xl) == (49_112_522, 49_112_522)  # XL: Ψ/8
    assert bucket_elements(ZeroConfig(), 3_700_000)[0] == 10_000_000  # floor: per-collective latency
    assert bucket_elements(ZeroConfig(), 4_000_000_000)[0] == 200_000_000  # ceiling: buffer memory
    assert bucket_elements(ZeroConfig(reduce_bucket_size=12_345_679), xl) == (12_345_679, 12_345_680)


@pytest.mark.unit
def test_one_gpu_per_worker_is_required_on_gpu():
    with pytest.raises(ConfigError, match="launch.gpus_per_worker: must be 1 with launch.use_gpu"):
        LaunchConfig(use_gpu=True, gpus_per_worker=2)
    with pytest.raises(ConfigError, match="launch.gpus_per_worker: must be 1"):
        LaunchConfig(use_gpu=True, gpus_per_worker=0.5)
    LaunchConfig(use_gpu=False, gpus_per_worker=0.5)  # CPU workers: no GPU assignment involved


def test_gpu_check_dry_run_passes_end_to_end(tmp_path):
    """`make gpu-check --dry-run`: the device script's own code path (recipe, torchrun worker, resume,
    compile, optimizer choices, suite rows) on CPU with a tiny variant; every row passes and the resumed
    run equals the uninterrupted one bitwise (CPU is deterministic)."""
    import subprocess
    import sys

    from tests.workers import ROOT

    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--steps", "4",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = json.loads(next(tmp_path.glob("dryrun-cpu-*.json")).read_text())
    rows = {r["check"]: r for r in result["rows"]}
    assert all(r["ok"] for r in rows.values()), rows
    resume = rows["resume: max |resumed - uninterrupted| (master, EMA)"]
    assert "bitwise equal: True" in resume["detail"], resume
    assert rows["compiled: step time"]["value"] > 0 and rows["optimizer torch_fused: step time"]["value"] > 0
    assert next(tmp_path.glob("dryrun-cpu-*.md")).read_text().startswith("# GPU check: ")
