"""The streaming loader on real shards in the moto S3 server, with real DataLoader worker processes."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from pretrain.config import DataConfig, StorageConfig
from pretrain.data import shards
from pretrain.data.loader import EvalLoader, TrainLoader
from pretrain.data.reader import register_s3_with_webdataset
from pretrain.tasks import ClassDecoder
from reliability.handmade_shards import jpeg_bytes, write_shard_set
from reliability.fault_proxy import FaultProxy, Rule

CFG = DataConfig(image_size=32, micro_batch_size=4, num_workers=2, shuffle_window=16, randaugment="",
                 random_erasing=0.0, mixup=0.0, cutmix=0.0)


def loader(url, rank=0, world=1, cfg=CFG, storage_cfg=None, seed=0) -> TrainLoader:
    manifest = shards.read_manifest(url, storage_cfg)
    return TrainLoader(url, manifest, cfg, storage_cfg, rank, world, seed,
                       ClassDecoder.of(cfg, manifest.num_classes, train=True))


def take(it, n):
    return list(itertools.islice(it, n))


def keys(batches) -> list[str]:
    return [k for b in batches for k in b.keys]


def test_one_epoch_is_every_key_once_across_2_ranks_x_2_workers(synth_shards):
    url = synth_shards["train"]
    n = shards.read_manifest(url).num_samples  # 400 = 2 ranks x 50 batches x 4
    # 4 streams x 20-sample windows divide the epoch evenly, so its boundary is exact (in general it
    # is exact up to one shuffle window per stream; see pretrain.data.order).
    cfg = DataConfig(**{**CFG.__dict__, "shuffle_window": 20})
    seen, positions = [], []
    for rank in range(2):
        batches = take(iter(loader(url, rank, 2, cfg=cfg)), n // 2 // cfg.micro_batch_size)
        seen += keys(batches)
        positions += [p for b in batches for p in b.positions]
    assert len(seen) == n and len(set(seen)) == n
    assert sorted(positions) == list(range(n))


def test_resume_same_world_size_is_bit_exact(synth_shards):
    url = synth_shards["train"]
    straight = take(iter(loader(url)), 12)
    first = loader(url)
    head = take(iter(first), 5)
    shared, own = json.loads(json.dumps([first.shared_state(), first.state_dict()]))  # checkpoints store JSON
    second = loader(url)
    second.load_state_dict(shared, [own])
    tail = take(iter(second), 7)
    for a, b in zip(straight, head + tail):
        assert a.keys == b.keys
        assert torch.equal(a.image, b.image) and torch.equal(a.target, b.target)


@pytest.mark.parametrize("old_world,new_world", [(2, 1), (1, 2)])
def test_elastic_resume_neither_repeats_nor_skips(synth_shards, old_world, new_world):
    url = synth_shards["train"]
    n = shards.read_manifest(url).num_samples
    old = [loader(url, r, old_world) for r in range(old_world)]
    positions = []
    for ld in old:  # 96 samples before the "checkpoint"
        positions += [p for b in take(iter(ld), 24 // old_world) for p in b.positions]
    shared, parts = old[0].shared_state(), [ld.state_dict() for ld in old]
    new = [loader(url, r, new_world) for r in range(new_world)]
    for ld in new:
        ld.load_state_dict(shared, parts)
    iters = [iter(ld) for ld in new]
    while not set(range(n)) <= set(positions):
        for it in iters:
            positions += next(it).positions
    assert len(positions) == len(set(positions)), "a sample was read twice"
    # The epoch's last samples may interleave with the next epoch's first ones, by at most one
    # shuffle window per reader stream; nothing of the epoch is skipped (checked by the loop).
    assert max(positions) < n + new[0].topology.num_streams * CFG.shuffle_window


def test_eval_loader_covers_the_holdout_set_once_with_equal_batch_counts(synth_shards):
    url = synth_shards["holdout"]
    manifest = shards.read_manifest(url)
    counts, total = [], 0
    for rank in range(3):
        batches = list(EvalLoader(url, manifest, CFG, None, rank, 3, batch_size=8,
                                      decoder=ClassDecoder.of(CFG, 10, train=False)))
        counts.append(len(batches))
        total += sum(len(b.target) for b in batches)
    assert total == manifest.num_samples
    assert len(set(counts)) == 1  # ZeRO-3 needs every rank to run the same number of forwards


def test_plain_webdataset_streams_the_shards_from_s3(synth_shards):
    import webdataset as wds

    register_s3_with_webdataset()
    manifest = shards.read_manifest(synth_shards["train"])
    first = f"{synth_shards['train']}/{manifest.shards[0].name}"
    samples = list(wds.WebDataset(first, shardshuffle=False, empty_check=False))
    assert len(samples) == manifest.shards[0].num_samples and "jpg" in samples[0]


# ------------------------------------------------------------------------------------------- faults


def test_corrupt_samples_are_skipped_and_counted_by_reason(s3_bucket):
    url = f"{s3_bucket}/corrupt"
    good = [{"jpg": jpeg_bytes(i), "cls": str(i % 3).encode()} for i in range(20)]
    bad = [{"jpg": b"\xff\xd8 not a jpeg", "cls": b"0"}, {"jpg": jpeg_bytes(99)},  # undecodable; no label
           {"jpg": jpeg_bytes(98), "cls": b"7"}, {"cls": b"1"}]  # label out of range; no image
    samples = good[:10] + bad + good[10:]
    write_shard_set(url, samples, per_shard=6, truncate_last_shard=700)  # the last sample is cut short
    cfg = DataConfig(image_size=16, micro_batch_size=2, num_workers=0, shuffle_window=8, randaugment="",
                     random_erasing=0.0, mixup=0.0, cutmix=0.0)
    expected = {"decode_error": 1, "bad_label": 2, "missing_image": 1, "truncated": 1}
    it, seen, skipped = iter(loader(url, cfg=cfg)), set(), dict_counter({})
    # Skips are reported with the next good batch, so read until the whole epoch has been processed;
    # the last batch may already count some of the next epoch's skips (at most once more).
    while len(seen) < 19 or sum(skipped.values()) < 5:
        batch = next(it)
        seen |= set(batch.keys)
        skipped += dict_counter(batch.skipped)
    assert len(seen) == 19  # 20 good samples, the last one truncated
    assert all(expected[r] <= skipped[r] <= 2 * expected[r] for r in expected) and set(skipped) == set(expected)


def test_a_shard_cut_short_is_detected_once_on_open_without_a_request_per_sample(s3_bucket, s3_server, caplog):
    url = f"{s3_bucket}/cut"
    samples = [{"jpg": jpeg_bytes(i), "cls": str(i % 3).encode()} for i in range(40)]
    # The last shard lost its second half; the manifest (and index) still describe the whole tar.
    write_shard_set(url, samples, per_shard=20, truncate_last_shard=6000, manifest_lists_full_size=True)
    cfg = DataConfig(image_size=16, micro_batch_size=2, num_workers=0, shuffle_window=40, randaugment="",
                     random_erasing=0.0, mixup=0.0, cutmix=0.0)
    proxy = FaultProxy(s3_server.endpoint).start()
    try:
        ld = loader(url, cfg=cfg, storage_cfg=StorageConfig(endpoint_url=proxy.url, retry_base_s=0.01))
        skipped, good, it = dict_counter({}), 0, iter(ld)
        while good + sum(skipped.values()) < 40:
            batch = next(it)
            good += len(batch.keys)
            skipped += dict_counter(batch.skipped)
        requests = dict(proxy.summary())
    finally:
        proxy.stop()
    assert set(skipped) == {"truncated"} and 1 <= skipped["truncated"] < 20
    tar_gets = requests["RANGED_GET"]["requests"]
    assert tar_gets <= 4, requests  # one ranged GET per run of samples, never one per truncated sample
    warnings = [r.message for r in caplog.records if "an interrupted upload" in r.message]
    assert len(warnings) == 1 and "shard-000001.tar" in warnings[0]


def dict_counter(d):
    from collections import Counter

    return Counter(d)


def test_transient_s3_errors_are_retried_and_a_dead_shard_is_skipped_and_reported(synth_shards, s3_server, caplog):
    url = synth_shards["train"]
    manifest = shards.read_manifest(url)
    flaky, dead = manifest.shards[0].name, manifest.shards[1].name
    proxy = FaultProxy(s3_server.endpoint, rules=[
        Rule(lambda m, p: m == "GET" and p.endswith(flaky), fail_times=2),  # SlowDown twice, then fine
        Rule(lambda m, p: m == "GET" and p.endswith(dead), fail_times=-1),  # never readable
    ]).start()
    try:
        cfg = DataConfig(image_size=16, micro_batch_size=10, num_workers=0, shuffle_window=50, randaugment="",
                         random_erasing=0.0, mixup=0.0, cutmix=0.0)
        ld = loader(url, cfg=cfg, storage_cfg=StorageConfig(endpoint_url=proxy.url, retries=2, retry_base_s=0.01,
                                                            retry_max_s=0.05))
        it, batches = iter(ld), []
        while sum(len(b.keys) for b in batches) < 350:  # all but the dead shard's 50 samples
            batches.append(next(it))  # (a window with no good sample at all comes as an empty report batch)
        seen = keys(batches)
        skipped = sum((dict_counter(b.skipped) for b in batches), dict_counter({}))
    finally:
        proxy.stop()
    assert proxy.failures[f"/{url[5:]}/{flaky}"] == 2 and proxy.bytes_served
    assert skipped == {"read_error": 50}
    assert len(seen) == len(set(seen)) == 350
    assert any("giving up after 3 attempts" in r.message and dead in r.message for r in caplog.records)


def test_resume_fetches_only_what_is_left_of_a_window(synth_shards, s3_server):
    url = synth_shards["train"]
    cfg = DataConfig(image_size=16, micro_batch_size=10, num_workers=0, shuffle_window=50, randaugment="",
                     random_erasing=0.0, mixup=0.0, cutmix=0.0)
    first = loader(url, cfg=cfg)
    take(iter(first), 4)  # 40 of the first 50-sample window consumed
    proxy = FaultProxy(s3_server.endpoint).start()
    try:
        resumed = loader(url, cfg=cfg, storage_cfg=StorageConfig(endpoint_url=proxy.url))
        resumed.load_state_dict(first.shared_state(), [first.state_dict()])
        take(iter(resumed), 1)
        tar_bytes = sum(v for k, v in proxy.bytes_served.items() if k.endswith(".tar"))
    finally:
        proxy.stop()
    full_window = shards.read_manifest(url).shards[0].bytes
    # The rest of the first window (10 samples) plus the prefetched next window, not 2 full windows.
    assert tar_bytes < 1.5 * full_window



@pytest.mark.unit
def test_per_sample_seeding_is_repeatable_restores_the_caller_and_queues_no_cuda_work():
    import random

    import numpy as np

    from pretrain.data.loader import _seeded

    tracker = torch.cuda._lazy_seed_tracker
    queued = tracker.manual_seed_all_cb
    caller = torch.get_rng_state()
    draws = []
    for _ in range(2):
        with _seeded(123, restore=True):
            draws.append((random.random(), float(np.random.rand()), torch.rand(3)))
    assert draws[0][:2] == draws[1][:2] and torch.equal(draws[0][2], draws[1][2])
    assert torch.equal(torch.get_rng_state(), caller)
    # torch.manual_seed would queue a CUDA re-seed with a formatted stack trace per sample (~1 ms each)
    assert tracker.manual_seed_all_cb is queued
