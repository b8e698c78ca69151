"""Everything that can be checked before Ray, DeepSpeed or any S3 write starts, checked there.

The driver (`pretrain train`, `pretrain submit`) runs :func:`check_run` before it starts Ray; the
workers run it again (rank 0, broadcast) because they are also started without a driver (torchrun).
A missing shard set, a class count that does not match the model, an unreadable ``model.init_from``
or a run.url in a bucket that does not exist is a :class:`pretrain.config.ConfigError` (exit code 2),
never a worker failure for Ray to retry.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pretrain import storage
from pretrain.config import Config, ConfigError
from pretrain.data.shards import Manifest, read_manifest

SUPPORTED_SCHEMES = ("s3", "s3a", "file", "local")


@dataclass
class DataSets:
    train: Manifest
    eval: Manifest | None


def _check_url(key: str, url: str) -> None:
    if url and storage.protocol(url) not in SUPPORTED_SCHEMES:
        raise ConfigError(f"{key}: scheme {storage.protocol(url)!r} of {url!r} is not supported; use an s3:// URL "
                          "or a local path")


def _manifest(key: str, url: str, cfg: Config) -> Manifest:
    try:
        return read_manifest(url, cfg.storage)
    except FileNotFoundError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    except PermissionError as exc:
        raise ConfigError(f"{key}: access to {url} is denied ({exc}); check the credentials the job runs with") \
            from None
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def check_data(cfg: Config) -> DataSets:
    """Read the train (and eval) shard manifests and check them against the model."""
    if not cfg.data.train_url:
        raise ConfigError("data.train_url: empty; point it at a shard set built by `data-tools make-shards`")
    _check_url("data.train_url", cfg.data.train_url)
    _check_url("data.eval_url", cfg.data.eval_url)
    train = _manifest("data.train_url", cfg.data.train_url, cfg)
    if train.task != cfg.task.name:
        raise ConfigError(f"task.name is {cfg.task.name!r} but the shards at {cfg.data.train_url} hold a {train.task} "
                          f"set; set task.name = {train.task!r}, or build {cfg.task.name} shards with "
                          f"`data-tools make-shards --task {cfg.task.name}`")
    if train.num_classes != cfg.model.num_classes:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but the shards at {cfg.data.train_url} have "
                          f"{train.num_classes} classes")
    held_out = None
    if cfg.data.eval_url:
        held_out = _manifest("data.eval_url", cfg.data.eval_url, cfg)
        if held_out.classes != train.classes:
            raise ConfigError(f"data.eval_url: its {held_out.num_classes} classes are not the training set's "
                              f"{train.num_classes} (label maps differ); evaluate on a set sharded with the same "
                              "class list, or set data.eval_url = \"\"")
    return DataSets(train, held_out)


def check_run(cfg: Config, on_cuda: bool) -> DataSets:
    """All start-up checks; returns the shard manifests read on the way."""
    if cfg.precision.dtype == "fp16" and not on_cuda:
        raise ConfigError("precision.dtype: DeepSpeed supports fp16 (with loss scaling) only on CUDA devices; use "
                          "bf16 or fp32 on CPU")
    _check_url("run.url", cfg.run.url)
    if storage.protocol(cfg.run.url) in ("s3", "s3a"):
        bucket = cfg.run.url.split("://", 1)[1].split("/", 1)[0]
        if not storage.exists(f"s3://{bucket}", cfg.storage):
            raise ConfigError(f"run.url: bucket {bucket!r} of {cfg.run.url} does not exist (or is not visible with "
                              "these credentials)")
    _check_url("model.init_from", cfg.model.init_from)
    if cfg.checkpoint.staging_dir:
        try:
            os.makedirs(cfg.checkpoint.staging_dir, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"checkpoint.staging_dir: cannot create {cfg.checkpoint.staging_dir} ({exc})") from None
        if not os.access(cfg.checkpoint.staging_dir, os.W_OK):
            raise ConfigError(f"checkpoint.staging_dir: {cfg.checkpoint.staging_dir} is not writable")
    datasets = check_data(cfg)
    check_init_from(cfg, datasets.train)
    return datasets


def check_init_from(cfg: Config, train: Manifest) -> None:
    """``model.init_from`` exists, reads and fits the model (:func:`pretrain.init_from.check`), unless the run
    already has committed checkpoints: it resumes from those and never reads init_from again."""
    if not cfg.model.init_from:
        return
    from pretrain.checkpoint import CheckpointManager
    from pretrain.init_from import check

    if cfg.model.init_from.rstrip("/") == cfg.run.url.rstrip("/"):
        raise ConfigError(f"model.init_from: {cfg.model.init_from} is this run's own run.url (a run resumes from its "
                          "own checkpoints by itself); point it at another run or a weights file")
    manager = CheckpointManager(cfg.run.url, cfg.checkpoint, cfg.storage, rank=0, world_size=1)
    try:
        resumes = bool(manager.committed())
    finally:
        manager.close()
    if not resumes:
        check(cfg.model, train.classes, cfg.storage)
