"""A local S3-compatible endpoint (moto's standalone server on loopback) for the demo and tests.

Runs ``python -m moto.server`` as a separate process so that every client (s3fs in trainers,
DataLoader workers, Ray workers) reaches it over HTTP exactly as it would reach AWS or MinIO.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

from pretrain.engine.distributed import free_port

# moto accepts any credentials; these are placeholders for the local endpoint only.
LOCAL_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class LocalS3:
    """Handle on a running moto server; `env` holds the variables clients need."""

    process: subprocess.Popen
    endpoint: str

    @property
    def env(self) -> dict[str, str]:
        return {**LOCAL_CREDENTIALS, "AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_ENDPOINT_URL": self.endpoint}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_local_s3(port: int | None = None, timeout_s: float = 60.0, log_path: str | None = None) -> LocalS3:
    port = port or free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=log, env={**os.environ, **LOCAL_CREDENTIALS})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with code {proc.returncode}; is moto[server] installed?")
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).read()
            return LocalS3(proc, endpoint)
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"moto server did not answer on {endpoint} within {timeout_s:.0f} s")
