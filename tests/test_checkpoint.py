"""CheckpointManager on its own: commit protocol, retention, verification, upload retries (moto S3)."""

from __future__ import annotations

import json

import pytest
import torch

from pretrain import storage
from pretrain.checkpoint import (MANIFEST, CheckpointError, CheckpointManager, RankSnapshot, consolidate,
                                 rank_file)
from pretrain.config import CheckpointConfig, StorageConfig
from tests.s3_proxy import FaultyS3Proxy, Rule


def snapshot(step: int, rank: int = 0, world: int = 1, value: float = 1.0) -> RankSnapshot:
    tensors = {"master/w#0": torch.full((6,), value), "rng/torch": torch.get_rng_state()}
    meta = {"fragments": [["w", [2, 3], 0, 6]], "loader": {"cursors": [step]}}
    return RankSnapshot(step, rank, world, tensors, meta, {"config": {}, "step_meta": step} if rank == 0 else {})


def manager(url, rank=0, world=1, storage_cfg=None, **cfg) -> CheckpointManager:
    return CheckpointManager(url, CheckpointConfig(**{"retry_backoff_s": 0.05, **cfg}), storage_cfg, rank, world)


def test_commit_retention_and_cleanup_of_uncommitted_leftovers(tmp_path):
    url = str(tmp_path / "run")
    ckpt = manager(url, keep_last=2, keep_every_steps=20)
    for step in (10, 20, 30, 40, 50):
        ckpt.save(snapshot(step), blocking=True)
    assert ckpt.committed_steps() == [20, 40, 50]  # the newest 2, plus every 20th
    manifest = ckpt.read_manifest(50)
    assert manifest["step_meta"] == 50 and set(manifest["files"]) == {rank_file(0, "safetensors"),
                                                                      rank_file(0, "json")}
    # A save that died before its manifest: never listed as committed, removed at the next start.
    storage.write_bytes(storage.join(ckpt.step_url(60), rank_file(0, "json")), b"{}")
    assert ckpt.committed_steps() == [20, 40, 50]
    assert ckpt.cleanup_uncommitted() == [60]
    assert not (tmp_path / "run" / "checkpoints" / "step_60").exists()
    assert (tmp_path / "run" / "unrelated").exists() is False
    ckpt.close()


def test_commit_waits_for_every_rank(tmp_path):
    url = str(tmp_path / "run")
    rank0, rank1 = manager(url, 0, 2), manager(url, 1, 2)
    rank0.save(snapshot(5, 0, 2, 1.0))  # async: rank 0's thread waits for rank 1's marker
    assert not storage.exists(storage.join(rank0.step_url(5), MANIFEST))
    rank1.save(snapshot(5, 1, 2, 2.0), blocking=True)
    rank0.wait()
    manifest = rank0.read_manifest(5)
    assert len(manifest["files"]) == 4
    tables = [rank0.fetch_rank_meta(5, manifest, r)["fragments"] for r in (0, 1)]
    assert tables == [[["w", [2, 3], 0, 6]]] * 2
    with pytest.raises(CheckpointError, match="fragments cover 12 of 6"):  # overlapping pieces are refused
        consolidate(tables, lambda r: rank0.fetch_tensors(5, manifest, r), "master")


def test_a_corrupted_file_fails_verification(tmp_path):
    url = str(tmp_path / "run")
    ckpt = manager(url)
    ckpt.save(snapshot(1), blocking=True)
    path = tmp_path / "run" / "checkpoints" / "step_1" / rank_file(0, "safetensors")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    manifest = ckpt.read_manifest(1)
    with pytest.raises(CheckpointError, match="does not match its manifest"):
        ckpt.fetch_tensors(1, manifest, 0)
    path.write_bytes(bytes(data[:-10]))
    with pytest.raises(CheckpointError, match="bytes, manifest says"):
        ckpt.read_manifest(1)


def test_upload_errors_are_retried_and_a_failed_commit_is_raised(s3_bucket, s3_server):
    url = f"{s3_bucket}/run"
    flaky = FaultyS3Proxy(s3_server.endpoint, rules=[
        Rule(lambda m, p: m == "PUT" and "step_1/" in p, fail_times=3),
        Rule(lambda m, p: m == "PUT" and "step_2/" in p, fail_times=-1),
    ]).start()
    try:
        ckpt = manager(url, storage_cfg=StorageConfig(endpoint_url=flaky.url), upload_retries=3)
        ckpt.save(snapshot(1), blocking=True)  # s3fs and our own retries ride out the SlowDowns
        assert ckpt.committed_steps() == [1]
        failing = manager(url, storage_cfg=StorageConfig(endpoint_url=flaky.url), upload_retries=0)
        failing.save(snapshot(2))
        with pytest.raises(CheckpointError, match="checkpoint could not be committed"):
            failing.wait()
        assert ckpt.committed_steps() == [1]  # the previous checkpoint is intact
    finally:
        flaky.stop()
    assert sum(flaky.failures.values()) >= 3
    assert json.loads(storage.read_bytes(storage.join(url, "checkpoints", "step_1", MANIFEST)))["step"] == 1
