"""CheckpointManager on its own: commit protocol, retention, verification, immutability, fencing (moto S3)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from pretrain import state_format, storage
from pretrain.checkpoint import (MANIFEST, CheckpointDir, CheckpointError, CheckpointManager, RankSnapshot,
                                 StagingDiskFull, rank_file)
from pretrain.config import CheckpointConfig, StorageConfig
from reliability.fault_proxy import FaultProxy, Rule

FAST = StorageConfig(retries=3, retry_base_s=0.01, retry_max_s=0.05)


def snapshot(step: int, rank: int = 0, world: int = 1, value: float = 1.0) -> RankSnapshot:
    tensors = {"master/w#0": torch.full((6,), value), "rng/torch": torch.get_rng_state()}
    shared = {"fragments": [["w", [2, 3], 0, 6]], "loader": {"rank": rank, "cursors": [step], "next_stream": 0}}
    return RankSnapshot(step, rank, world, tensors, {"rng": {}}, shared,
                        {"config": {}, "step_meta": step} if rank == 0 else {})


def manager(url, rank=0, world=1, storage_cfg=FAST, fence=None, **cfg) -> CheckpointManager:
    return CheckpointManager(url, CheckpointConfig(**cfg), storage_cfg, rank, world, fence=fence)


def test_commit_retention_and_cleanup_of_uncommitted_leftovers(tmp_path):
    url = str(tmp_path / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("not a checkpoint")  # retention never leaves checkpoints/
    ckpt = manager(url, keep_last=2, keep_every_steps=20)
    for step in (10, 20, 30, 40, 50):
        ckpt.save(snapshot(step), blocking=True)
    assert ckpt.committed_steps() == [20, 40, 50]  # the newest 2, plus every 20th
    manifest = ckpt.read_manifest(CheckpointDir(50))
    assert manifest["step_meta"] == 50 and set(manifest["files"]) == {rank_file(0, "safetensors"),
                                                                      rank_file(0, "json")}
    assert manifest["ranks"][0]["fragments"] == [["w", [2, 3], 0, 6]]
    # A save that died before its manifest: never listed as committed, removed at the next start.
    storage.write_bytes(storage.join(ckpt.url(CheckpointDir(60)), rank_file(0, "json")), b"{}")
    committed, uncommitted = ckpt.scan()
    assert [d.step for d in committed] == [20, 40, 50] and uncommitted == [CheckpointDir(60)]
    assert ckpt.cleanup_uncommitted(uncommitted) == [CheckpointDir(60)]
    assert not (tmp_path / "run" / "checkpoints" / "step_60").exists()
    assert (tmp_path / "run" / "notes.txt").read_text() == "not a checkpoint"
    ckpt.close()


def test_commit_waits_for_every_rank_and_the_manifest_holds_every_fragment_table(tmp_path):
    url = str(tmp_path / "run")
    rank0, rank1 = manager(url, 0, 2), manager(url, 1, 2)
    rank0.save(snapshot(5, 0, 2, 1.0))  # async: rank 0's thread waits for rank 1's marker
    assert not storage.exists(storage.join(rank0.url(CheckpointDir(5)), MANIFEST))
    rank1.save(snapshot(5, 1, 2, 2.0), blocking=True)
    rank0.wait()
    manifest = rank0.read_manifest(CheckpointDir(5))
    assert len(manifest["files"]) == 4 and [r["loader"]["rank"] for r in manifest["ranks"]] == [0, 1]
    saved = state_format.rank_tables(r["fragments"] for r in manifest["ranks"])
    with pytest.raises(state_format.StateFormatError, match="cover 12 of 6 elements and overlap"):
        state_format.consolidate(saved, lambda r: rank0.fetch_tensors(CheckpointDir(5), manifest, r), "master")


def test_a_corrupted_or_truncated_file_fails_verification(tmp_path):
    url = str(tmp_path / "run")
    ckpt = manager(url)
    ckpt.save(snapshot(1), blocking=True)
    where = CheckpointDir(1)
    path = tmp_path / "run" / "checkpoints" / "step_1" / rank_file(0, "safetensors")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    manifest = ckpt.read_manifest(where)
    with pytest.raises(CheckpointError, match="does not match its manifest's sha256"):
        ckpt.fetch_tensors(where, manifest, 0)
    path.write_bytes(bytes(data[:-10]))
    with pytest.raises(CheckpointError, match="bytes, the manifest says"):
        ckpt.fetch_tensors(where, manifest, 0)
    path.unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        ckpt.fetch_tensors(where, manifest, 0)


def test_a_committed_step_is_never_written_again(tmp_path):
    url = str(tmp_path / "run")
    first = manager(url)
    first.save(snapshot(4, value=1.0), blocking=True)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run" / "checkpoints" / "step_4").iterdir()}
    again = manager(url)  # a later start that fell back past step 4 and reaches it again
    committed, uncommitted = again.scan()
    again.reserve(committed + uncommitted)
    assert again.dir_for(4) == CheckpointDir(4, 1) and again.dir_for(8) == CheckpointDir(8)
    again.save(snapshot(4, value=2.0), blocking=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run" / "checkpoints" / "step_4").iterdir()} == before
    assert again.committed() == [CheckpointDir(4), CheckpointDir(4, 1)]
    # Even a writer that ignores the reservation cannot commit over a manifest (create-if-absent).
    rogue = manager(url)
    rogue.save(snapshot(4, value=3.0))
    with pytest.raises(CheckpointError, match="was committed by another writer"):
        rogue.wait()


def test_a_fenced_writer_cannot_commit(tmp_path):
    from pretrain.lease import LeaseLost

    def fence():
        raise LeaseLost("taken over")

    ckpt = manager(str(tmp_path / "run"), fence=fence)
    ckpt.save(snapshot(3))
    with pytest.raises(LeaseLost, match="taken over"):
        ckpt.wait()
    assert ckpt.committed() == []


def test_transient_upload_errors_are_retried_and_permanent_ones_are_not(s3_bucket, s3_server):
    url = f"{s3_bucket}/run"
    flaky = FaultProxy(s3_server.endpoint, rules=[
        Rule(lambda m, p: m == "PUT" and "step_1/" in p, fail_times=3),
        Rule(lambda m, p: m == "PUT" and "step_2/" in p, fail_times=-1, status=403),
    ]).start()
    try:
        cfg = StorageConfig(endpoint_url=flaky.url, retries=4, retry_base_s=0.01, retry_max_s=0.05)
        ckpt = manager(url, storage_cfg=cfg)
        ckpt.save(snapshot(1), blocking=True)  # the SlowDowns are ridden out
        assert ckpt.committed_steps() == [1]
        ckpt.save(snapshot(2))
        with pytest.raises(CheckpointError, match="checkpoint could not be committed"):
            ckpt.wait()
        assert ckpt.committed_steps() == [1]  # the previous checkpoint is intact
    finally:
        flaky.stop()
    assert sum(v for k, v in flaky.failures.items() if "step_1/" in k) == 3
    assert sum(v for k, v in flaky.failures.items() if "step_2/" in k) == 1  # a 403 is not retried
    assert json.loads(storage.read_bytes(storage.join(url, "checkpoints", "step_1", MANIFEST)))["step"] == 1


def test_retention_decommits_before_deleting(tmp_path):
    url = str(tmp_path / "run")
    ckpt = manager(url, keep_last=1)
    deleted: list[str] = []
    original = storage.remove_file

    def spy(target, storage_cfg=None):
        deleted.append(target.rsplit("/", 1)[-1])
        return original(target, storage_cfg)

    storage.remove_file = spy
    try:
        for step in (1, 2):
            ckpt.save(snapshot(step), blocking=True)
    finally:
        storage.remove_file = original
    assert deleted == [MANIFEST] and ckpt.committed_steps() == [2]


def test_a_full_staging_disk_is_a_clear_error(tmp_path):
    staging = tmp_path / "staging"
    staging.mkdir()
    import subprocess

    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(staging)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root); `make chaos` covers a full disk too")
    try:
        ckpt = manager(str(tmp_path / "run"), staging_dir=str(staging))
        big = snapshot(1)
        big.tensors["master/w#0"] = torch.zeros(64 * 1024)
        ckpt.save(big)
        with pytest.raises(StagingDiskFull, match="is full while writing step_1"):
            ckpt.wait()
        assert ckpt.committed() == []
    finally:
        subprocess.run(["umount", str(staging)], capture_output=True)


def test_a_rank_that_cannot_save_tells_rank_0_at_once(tmp_path):
    url = str(tmp_path / "run")
    (tmp_path / "not-a-dir").write_text("")
    rank0 = manager(url, 0, 2, commit_timeout_s=600)
    rank1 = manager(url, 1, 2, staging_dir=str(tmp_path / "not-a-dir"))  # its staging file cannot be written
    rank0.save(snapshot(7, 0, 2))
    rank1.save(snapshot(7, 1, 2))
    with pytest.raises(CheckpointError):
        rank1.wait()
    started = time.monotonic()
    with pytest.raises(CheckpointError, match="rank 1 could not save its part"):
        rank0.wait()
    assert time.monotonic() - started < 30 and rank0.committed() == []


def test_model_buffers_are_saved_whole_and_a_missing_one_is_refused_before_copying():
    """BatchNorm statistics are buffers, not ZeRO fragments: they travel whole in each rank's file."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    model(torch.randn(2, 3, 5, 5))  # running statistics move away from their initial values
    saved = state_format.buffer_snapshot(model)
    assert sorted(saved) == ["buffer/1.num_batches_tracked", "buffer/1.running_mean", "buffer/1.running_var"]
    fresh = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    state_format.check_buffers(fresh, saved)
    state_format.load_buffers(fresh, saved)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(fresh[1], name), getattr(model[1], name))
    with pytest.raises(state_format.StateFormatError, match="lacks the model's buffers.*running_var"):
        state_format.check_buffers(fresh, {k: v for k, v in saved.items() if "running_var" not in k})
    assert state_format.buffer_names(torch.nn.Linear(2, 2)) == []  # ConvNeXt classification: no buffers
