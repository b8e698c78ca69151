"""Held-out accuracy, including ImageNet-1k accuracy of a 22k-class head (a 1-rank gloo group)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from pretrain.engine.distributed import free_port
from pretrain.config import DataConfig
from pretrain.data.batch import Batch
from pretrain.data.shards import load_synsets
from pretrain.data.transforms import DeviceAugment
from pretrain.evaluate import evaluate, in1k_subset


@pytest.fixture(scope="module", autouse=True)
def process_group():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_top1_top5_and_imagenet1k_subset_of_a_22k_head():
    classes = load_synsets("imagenet22k_synsets")
    subset = in1k_subset(classes)
    synsets_1k = load_synsets("imagenet_synsets")
    assert subset is not None and len(subset) == 999  # "teddy bear" (n04399382) is not in the 22k list
    assert [classes[i] for i in subset] == [s for s in synsets_1k if s != "n04399382"]
    # Three samples of 1k classes and one of a 22k-only class; logits favour fixed answers.
    labels = torch.tensor([subset[0], subset[1], subset[2], 5])
    assert 5 not in set(subset.tolist())

    def forward(x):
        logits = torch.zeros(len(x), len(classes))
        if len(x) == 0:
            return logits
        logits[0, subset[0]] = 3                      # right
        logits[1, 7] = 5                              # a non-1k class wins overall...
        logits[1, subset[1]] = 4                      # ...but over the 1k logits this one is right
        logits[2, subset[9]] = 2                      # wrong either way
        logits[3, 5] = 1                              # right (22k-only class)
        return logits

    batches = [Batch(torch.zeros(4, 8, 8, 3, dtype=torch.uint8), labels),  # uint8 (N, H, W, 3)
               Batch.empty((8, 8, 3))]  # padding
    prepare = DeviceAugment(DataConfig(), torch.device("cpu"), train=False)
    out = evaluate(forward, batches, prepare, torch.float32, subset)
    assert out["samples"] == 4 and out["top1"] == 0.5
    assert out["in1k_samples"] == 3 and out["in1k_top1"] == pytest.approx(2 / 3)


def test_no_subset_for_other_class_lists():
    assert in1k_subset([f"class_{i:03d}" for i in range(10)]) is None
