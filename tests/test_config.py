"""Config loading is strict: every recipe loads; typos, wrong types and impossible values fail early."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from pretrain.config import (ConfigError, config_diff, config_to_dict, dump_toml, grad_accum_steps,
                             load_config)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_file_loads(path):
    cfg = load_config(path)
    assert grad_accum_steps(cfg.schedule, cfg.data, cfg.launch.num_workers) >= 1
    # The resolved config round-trips through plain TOML.
    assert config_to_dict(load_config_from_text(dump_toml(cfg), path.parent)) == config_to_dict(cfg)


def load_config_from_text(text, tmp_dir):
    from pretrain.config import config_from_dict

    return config_from_dict(tomllib.loads(text))


def test_xlarge_in22k_is_the_paper_recipe():
    cfg = load_config(CONFIG_DIR / "convnext_xlarge_in22k.toml")
    assert (cfg.model.name, cfg.model.num_classes, cfg.model.drop_path_rate) == ("convnext_xlarge", 21841, 0.2)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas, cfg.optim.eps) == (4e-3, 0.05, (0.9, 0.999), 1e-8)
    assert (cfg.optim.min_lr, cfg.schedule.global_batch_size) == (1e-6, 4096)
    assert (cfg.schedule.epochs, cfg.schedule.warmup_epochs) == (90, 5)
    assert cfg.data.randaugment == "rand-m9-mstd0.5-inc1"
    assert (cfg.data.mixup, cfg.data.cutmix, cfg.data.label_smoothing, cfg.data.random_erasing) == (0.8, 1.0, 0.1, 0.25)
    assert (cfg.data.image_size, cfg.data.interpolation, cfg.model.layer_scale_init) == (224, "bicubic", 1e-6)
    assert (cfg.precision.dtype, cfg.zero.stage, cfg.ema.enabled) == ("bf16", 2, True)
    # 128 workers x 32 per GPU = 4096: no accumulation on the 16 x 8 GPU cluster.
    assert grad_accum_steps(cfg.schedule, cfg.data, cfg.launch.num_workers) == 1


@pytest.mark.parametrize("name,drop_path", [("tiny", 0.0), ("small", 0.0), ("base", 0.1), ("large", 0.1)])
def test_smaller_recipes_differ_only_in_model_and_drop_path(name, drop_path):
    xl = config_to_dict(load_config(CONFIG_DIR / "convnext_xlarge_in22k.toml"))
    other = config_to_dict(load_config(CONFIG_DIR / f"convnext_{name}_in22k.toml"))
    assert other["model"]["name"] == f"convnext_{name}"
    assert other["model"]["drop_path_rate"] == drop_path
    for section in ("optim", "schedule", "data", "precision", "zero", "ema"):
        assert other[section] == xl[section]


def test_required_keys_exist():
    cfg = load_config(CONFIG_DIR / "demo.toml")
    for dotted in ("run.url", "data.train_url", "launch.num_workers", "checkpoint.every_steps", "schedule.steps"):
        section, key = dotted.split(".")
        assert hasattr(getattr(cfg, section), key)


def test_overrides_are_typed_by_annotation():
    cfg = load_config(CONFIG_DIR / "demo.toml", ["optim.lr=1e-3", "zero.stage=3", "data.train_url=s3://b/x",
                                                  "ema.enabled=false", "data.scale=[0.5, 1.0]",
                                                  "model.checkpoint_stages=[0, 2]", "optim.grad_clip=1"])
    assert cfg.optim.lr == 1e-3 and cfg.zero.stage == 3 and cfg.data.train_url == "s3://b/x"
    assert cfg.ema.enabled is False and cfg.data.scale == (0.5, 1.0) and cfg.model.checkpoint_stages == (0, 2)
    assert cfg.optim.grad_clip == 1.0 and isinstance(cfg.optim.grad_clip, float)


@pytest.mark.parametrize("override,needle", [
    ("optim.lrr=1", "optim: unknown key(s) ['lrr']"),
    ("optimizer.lr=1", "config: unknown key(s) ['optimizer']"),
    ("optim.lr=-1", "optim.lr: must be > 0"),
    ("zero.stage=4", "zero.stage: must be 1, 2 or 3"),
    ("zero.stage=two", "zero.stage: expected an integer"),
    ("precision.dtype=fp8", "precision.dtype: must be one of ['bf16', 'fp16', 'fp32']"),
    ("model.name=convnext_huge", "model.name: unknown variant 'convnext_huge'"),
    ("data.micro_batch_size=24", "schedule.global_batch_size: 64 is not divisible"),
    ("data.micro_batch_size=7", "data.micro_batch_size: must be even when mixup"),
    ("ema.decay=1.5", "ema.decay: must be in (0, 1)"),
    ("data.randaugment=rand-zz", "data.randaugment: section 'zz' of 'rand-zz' is not one of"),
    ("data.randaugment=rand-m9-txx", "data.randaugment: unknown transform set 'xx'"),
    ("data.randaugment=autoaug", "data.randaugment: timm cannot parse 'autoaug'"),
    ("data.interpolation=cubic", "data.interpolation: must be one of ['bicubic', 'bilinear', 'nearest']"),
    ("data.random_erasing_mode=noise", "data.random_erasing_mode: must be one of"),
    ("lease.timeout_s=10", "lease.timeout_s: must be >= 3 x lease.heartbeat_s"),
    ("storage.multipart_chunk_mb=1", "storage.multipart_chunk_mb: must be in 5..5120"),
    ("launch.num_workers=0", "launch.num_workers: must be >= 1"),
    ("ema.enabled=1", "ema.enabled: expected true or false"),
    ("storage.endpoint_url=localhost:9000", "storage.endpoint_url: must start with http://"),
    ("lr=1", "expected section.key=value"),
    ("task.name=detection", "task.name: must be one of ['classification', 'segmentation']"),
    ("task.name=segmentation", "task.name: segmentation does not use the classification augmentations"),
    ("segmentation.dice_weight=-1", "segmentation.*_weight: loss weights must be >= 0"),
    ("segmentation.class_weights=[1.0,2.0]", "segmentation.class_weights: has 2 entries; model.num_classes is 10"),
])
def test_bad_values_fail_with_the_key_named(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config(CONFIG_DIR / "demo.toml", [override])
    assert needle in str(info.value)


def test_batch_error_lists_valid_micro_batches():
    with pytest.raises(ConfigError, match=r"micro-batch sizes that work with 3 workers: \[1, 2, 4"):
        load_config(CONFIG_DIR / "convnext_xlarge_in22k.toml", ["launch.num_workers=3", "data.micro_batch_size=6",
                                                                 "schedule.global_batch_size=4092"])


def test_unknown_key_in_file_is_rejected(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[model]\nname = "convnext_atto"\ndrop_path = 0.1\n')
    with pytest.raises(ConfigError, match=r"model: unknown key\(s\) \['drop_path'\]; valid keys: .*drop_path_rate"):
        load_config(path)


def test_missing_file_and_invalid_toml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)


def test_config_diff_ignores_elastic_keys():
    a = config_to_dict(load_config(CONFIG_DIR / "demo.toml"))
    b = config_to_dict(load_config(CONFIG_DIR / "demo.toml", ["launch.num_workers=1", "zero.stage=3",
                                                               "data.micro_batch_size=64"]))
    assert config_diff(a, b) == []
    c = config_to_dict(load_config(CONFIG_DIR / "demo.toml", ["model.name=convnext_femto", "optim.lr=1e-3"]))
    assert config_diff(a, c) == ["model.name: 'convnext_atto' -> 'convnext_femto'", "optim.lr: 0.004 -> 0.001"]


def test_keys_added_after_a_checkpoint_count_as_their_defaults():
    """A checkpoint written before a key existed resumes unless the run sets that key to a non-default."""
    new = config_to_dict(load_config(CONFIG_DIR / "demo.toml"))
    old = {section: dict(keys) for section, keys in new.items() if section != "task"}
    del old["model"]["layer_scale_init"]
    assert config_diff(old, new) == []
    changed = config_to_dict(load_config(CONFIG_DIR / "demo.toml", ["model.layer_scale_init=0.1"]))
    assert config_diff(old, changed) == ["model.layer_scale_init: 1e-06 -> 0.1"]
