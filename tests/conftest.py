"""Shared fixtures: a real moto S3 server over HTTP on 127.0.0.1 (never in-process mocks)."""

from __future__ import annotations

import os
import uuid

import pytest

from launch.local_s3 import start_local_s3


@pytest.fixture(scope="session")
def s3_server():
    """A moto standalone server; the AWS env vars point every client (and subprocess) at it."""
    server = start_local_s3()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield server
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket; returns its s3:// URL."""
    from pretrain import storage

    url = f"s3://test-{uuid.uuid4().hex[:12]}"
    storage.ensure_bucket(url)
    return url
