"""Shared fixtures: a real moto S3 server over HTTP on 127.0.0.1 (never in-process mocks)."""

from __future__ import annotations

import os
import uuid

import pytest

from launch.local_s3 import start_local_s3


# The secret key every process of the session holds (moto accepts any): it must never appear in a log, a
# job spec, a config dump, TensorBoard or a checkpoint (tests/test_launch.py scans them for it).
SECRET_CANARY = f"canary-{uuid.uuid4().hex}"


@pytest.fixture(scope="session")
def s3_server():
    """A moto standalone server; the AWS env vars point every client (and subprocess) at it."""
    server = start_local_s3()
    env = {**server.env, "AWS_SECRET_ACCESS_KEY": SECRET_CANARY}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield server
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def make_bucket(s3_server):
    """``make_bucket(prefix)`` creates a fresh bucket in the moto server and returns its s3:// URL."""
    from pretrain import storage

    def make(prefix: str = "test") -> str:
        url = f"s3://{prefix}-{uuid.uuid4().hex[:12]}"
        storage.ensure_bucket(url)
        return url

    return make


@pytest.fixture
def s3_bucket(make_bucket):
    """A fresh bucket; returns its s3:// URL."""
    return make_bucket()


@pytest.fixture(scope="session")
def synth_shards(make_bucket, tmp_path_factory):
    """A learnable synthetic set (10 classes, 32 px) sharded into the moto S3 server, with a holdout set."""
    return shard_synthetic_set(tmp_path_factory.mktemp("synth"), make_bucket("shards"), size=32, seed=0,
                               holdout=10, shard_samples=50)


def shard_synthetic_set(root, prefix: str, size: int, seed: int, holdout: int, shard_samples: int,
                        classes: int = 10, per_class: int = 40) -> dict[str, str]:
    """data_tools' synthetic set under `root`, sharded to `<prefix>/train` and `<prefix>/holdout`."""
    from data_tools.make_shards import BuildParams, make_shards
    from data_tools.synth import make_dataset

    make_dataset(str(root / "train"), classes=classes, per_class=per_class, size=size, seed=seed, holdout=holdout)
    urls = {}
    for split, folder in (("train", "train"), ("holdout", "train_holdout")):
        urls[split] = f"{prefix}/{split}"
        make_shards(str(root / folder), urls[split], params=BuildParams(shard_samples=shard_samples), workers=1,
                    progress=False, log=lambda _: None)
    return urls
