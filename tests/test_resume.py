"""Resume decisions from a manifest alone: what is a mismatch (exit 2) and what may continue."""

from __future__ import annotations

import pytest

from pretrain import resume
from pretrain.config import ResumeMismatch, config_to_dict, load_config
from pretrain.run_meta import CheckpointRecord, DataIdentity

pytestmark = pytest.mark.unit

SAME = DataIdentity("s3://b/train", 400, "a" * 64)


def manifest_of(cfg, data=SAME, fragments=(("w", [2, 3], 0, 6),)) -> CheckpointRecord:
    return CheckpointRecord.from_manifest({"step": 4, "world_size": 1, "config": config_to_dict(cfg),
                                           "data": data.to_dict(), "ranks": [{"fragments": [list(f) for f in fragments]}]})


def cfg(*overrides):
    return load_config("configs/smoke.toml", ["data.train_url=s3://b/train", *overrides])


def test_the_same_run_continues_and_elastic_keys_may_change():
    saved = manifest_of(cfg())
    assert resume.check_compatible(cfg("launch.num_workers=1", "data.micro_batch_size=16", "zero.stage=3"), saved,
                                   SAME) is None


@pytest.mark.parametrize("data", [DataIdentity("s3://b/train", 300, "a" * 64),
                                  DataIdentity("s3://b/train", 400, "b" * 64)], ids=["count", "digest"])
def test_another_shard_set_is_a_mismatch_unless_allowed(data):
    saved = manifest_of(cfg())
    with pytest.raises(ResumeMismatch, match="trained on another shard set.*run.allow_data_change=true"):
        resume.check_compatible(cfg(), saved, data)
    change = resume.check_compatible(cfg("run.allow_data_change=true"), saved, data)
    assert change["step"] == 4 and change["from"]["num_samples"] == 400 and change["to"] == data.to_dict()


def test_a_moved_copy_of_the_same_shards_is_not_a_change():
    moved = DataIdentity("s3://elsewhere/train", 400, "a" * 64)
    assert resume.check_compatible(cfg(), manifest_of(cfg()), moved) is None


def test_other_model_or_config_is_a_mismatch():
    saved = manifest_of(cfg())
    with pytest.raises(ResumeMismatch, match="holds a convnext_atto model with 10 classes"):
        resume.check_compatible(cfg("model.name=convnext_femto"), saved, SAME)
    with pytest.raises(ResumeMismatch, match="schedule.global_batch_size: 16 -> 32"):
        resume.check_compatible(cfg("schedule.global_batch_size=32"), saved, SAME)
    assert resume.check_compatible(cfg("schedule.global_batch_size=32", "run.allow_config_change=true"), saved,
                                   SAME) is None


def test_parameter_shapes_are_checked_by_name():
    saved = manifest_of(cfg())
    resume.check_shapes(saved, {"w": (2, 3)}, cfg())
    with pytest.raises(ResumeMismatch, match=r"w: checkpoint \(2, 3\) vs model \(3, 3\)"):
        resume.check_shapes(saved, {"w": (3, 3)}, cfg())
    with pytest.raises(ResumeMismatch, match="w: not in the model"):
        resume.check_shapes(saved, {"v": (2, 3)}, cfg())
