"""Segmentation as a Task, end to end: synthetic ADE20K-style scenes sharded to S3, 2 gloo ranks training
ConvNeXt + UperNet with ZeRO-2 bf16 and EMA, mIoU above the majority-class baseline, bitwise resume
(BatchNorm statistics included), and a backbone started from a pretraining run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pretrain import state_format
from pretrain.evaluate import segmentation_scores
from tests.test_training import assert_same, copy_checkpoint, full_state, rank_tensors
from tests.workers import run_workers

pytestmark = pytest.mark.integration

CLASSES = 4
SEG = ["task.name=segmentation", f"model.num_classes={CLASSES}", "data.image_size=64", "data.micro_batch_size=4",
       "schedule.global_batch_size=8", "data.mixup=0.0", "data.cutmix=0.0", "data.num_workers=1",
       "model.drop_path_rate=0.0", "segmentation.scale=[96,64]", "segmentation.channels=32",
       "segmentation.aux_channels=16", "segmentation.dice_weight=0.5", "optim.lr=2e-3", "schedule.warmup_steps=2",
       "logging.every_steps=10", "eval.batch_size=8", "eval.max_samples=0"]


def summary(output: str) -> dict:
    return json.loads(next(line for line in output.splitlines()[::-1] if line.startswith("SUMMARY "))[8:])


@pytest.fixture(scope="module")
def seg_shards(make_bucket, tmp_path_factory):
    from data_tools.cli import main as data_tools

    root = tmp_path_factory.mktemp("scenes")
    assert data_tools(["synth", str(root), "--task", "segmentation", "--classes", str(CLASSES), "--images", "96",
                       "--size", "64", "--holdout", "24", "--seed", "0"]) == 0
    bucket = make_bucket("segshards")
    urls = {"train": f"{bucket}/train", "holdout": f"{bucket}/holdout"}
    assert data_tools(["make-shards", str(root), urls["train"], "--task", "segmentation", "--shard-samples", "32"]) == 0
    assert data_tools(["make-shards", str(root), urls["holdout"], "--task", "segmentation", "--split", "validation",
                       "--shard-samples", "32"]) == 0
    return {**urls, "root": root}


def majority_baseline(root) -> float:
    """mIoU of predicting the most frequent training class everywhere, on the validation masks (ADE's
    reduce_zero_label: 0 is ignored, k -> k - 1)."""
    import torch

    from pretrain.evaluate import confusion_matrix

    def masks(split):
        for path in sorted((root / "annotations" / split).glob("*.png")):
            m = np.asarray(Image.open(path)).astype(np.int64)
            yield torch.from_numpy(np.where(m == 0, 255, m - 1))

    counts = np.bincount(np.concatenate([m[m != 255].numpy() for m in masks("training")]), minlength=CLASSES)
    conf = sum(confusion_matrix(torch.full_like(m, int(counts.argmax())), m, CLASSES) for m in masks("validation"))
    return segmentation_scores(conf)["mIoU"]


def test_segmentation_learns_above_the_majority_baseline_and_resumes_bitwise(seg_shards, make_bucket, tmp_path):
    runs = make_bucket("segruns")
    common = [f"data.train_url={seg_shards['train']}", f"data.eval_url={seg_shards['holdout']}", *SEG,
              "schedule.steps=60", "checkpoint.every_steps=30"]
    straight = run_workers(2, [f"run.url={runs}/straight", *common])
    assert straight.returncode == 0, straight.output[-3000:]
    result = summary(straight.output)
    baseline = majority_baseline(seg_shards["root"])
    assert result["eval"]["model_mIoU"] > baseline + 0.15, (result["eval"], baseline)
    assert "held-out pixels: model mIoU" in straight.output

    # BatchNorm statistics differ per rank (no SyncBN on CPU) and travel in each rank's file.
    assert any(k.startswith(f"{state_format.BUFFER}/") and "running_mean" in k
               for k in rank_tensors(f"{runs}/straight", 60, 1))
    from safetensors.torch import load_file

    from pretrain.export import export

    export(f"{runs}/straight", str(tmp_path / "seg.safetensors"))  # the whole task model, rank 0's statistics
    exported = load_file(str(tmp_path / "seg.safetensors"))
    assert_same({k: exported[k] for k in state_format.buffers_in(rank_tensors(f"{runs}/straight", 60, 0))},
                state_format.buffers_in(rank_tensors(f"{runs}/straight", 60, 0)))
    copy_checkpoint(f"{runs}/straight", f"{runs}/resumed", 30)
    resumed = run_workers(2, [f"run.url={runs}/resumed", *common])
    assert resumed.returncode == 0 and "resuming at step 30" in resumed.output, resumed.output[-3000:]
    for kind in ("master", "ema", "exp_avg"):
        assert_same(full_state(f"{runs}/straight", 60, kind), full_state(f"{runs}/resumed", 60, kind))
    for rank in (0, 1):
        a, b = rank_tensors(f"{runs}/straight", 60, rank), rank_tensors(f"{runs}/resumed", 60, rank)
        assert_same(state_format.buffers_in(a), state_format.buffers_in(b))


def test_a_classification_run_initialises_the_backbone_and_the_wrong_shards_are_refused(
        seg_shards, synth_shards, make_bucket):
    runs = make_bucket("segruns2")
    pre = run_workers(2, [f"data.train_url={synth_shards['train']}", "data.eval_url=", f"run.url={runs}/pre",
                          "data.mixup=0.0", "data.num_workers=0", "schedule.steps=4", "checkpoint.every_steps=4"])
    assert pre.returncode == 0, pre.output[-3000:]
    from pretrain.config import ModelConfig
    from pretrain.init_from import initialize_backbone
    from pretrain.models import create_model
    from pretrain.models.upernet import ConvNeXtUperNet

    model = ConvNeXtUperNet(create_model("convnext_atto", num_classes=CLASSES), CLASSES, 32, 16)
    initialize_backbone(model.backbone, ModelConfig(name="convnext_atto", num_classes=CLASSES,
                                                    init_from=f"{runs}/pre"))
    ema = {k: v for k, v in full_state(f"{runs}/pre", 4, "ema").items() if not k.startswith("head.")}
    assert_same(dict(model.backbone.state_dict()), ema)
    common = [f"data.train_url={seg_shards['train']}", "data.eval_url=", *SEG, "schedule.steps=2",
              "schedule.warmup_steps=0", "checkpoint.every_steps=2"]
    run = run_workers(2, [f"run.url={runs}/seg", f"model.init_from={runs}/pre", *common])
    assert run.returncode == 0 and "the backbone of" in run.output, run.output[-3000:]
    wrong = run_workers(2, [f"run.url={runs}/wrong", *common[1:], f"data.train_url={synth_shards['train']}"])
    assert wrong.returncode == 2 and "task.name is 'segmentation' but the shards" in wrong.output, wrong.output[-2000:]
