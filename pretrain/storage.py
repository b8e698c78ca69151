"""The one seam between the project and storage: local paths, file:// and s3:// through fsspec/s3fs.

S3 endpoint and credentials come from the standard AWS environment/config (``AWS_ENDPOINT_URL_S3``,
``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, instance profiles, ...) or from the ``[storage]`` config
section; credentials are never taken from the config. Filesystem objects are created per process
(keyed by pid) because s3fs sessions do not survive fork into DataLoader workers.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import threading
import uuid
from typing import Any, Iterable, Iterator

import fsspec

from pretrain.config import StorageConfig

_CACHE: dict[tuple, fsspec.AbstractFileSystem] = {}
_LOCK = threading.Lock()


def endpoint_url(storage: StorageConfig | None = None) -> str:
    """The S3 endpoint in effect: config first, then the AWS environment variables."""
    if storage is not None and storage.endpoint_url:
        return storage.endpoint_url
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""


def s3_options(storage: StorageConfig | None = None) -> dict[str, Any]:
    """Keyword arguments for s3fs.S3FileSystem (also used to register webdataset's s3:// opener)."""
    storage = storage or StorageConfig()
    opts: dict[str, Any] = {}
    client_kwargs: dict[str, Any] = {}
    url = endpoint_url(storage)
    if url:
        opts["endpoint_url"] = url
    region = storage.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        client_kwargs["region_name"] = region
    if storage.profile:
        opts["profile"] = storage.profile
    if storage.anon:
        opts["anon"] = True
    if client_kwargs:
        opts["client_kwargs"] = client_kwargs
    # s3fs retries throttling/5xx briefly (with botocore once more); readers and checkpoint uploads add
    # their own longer backoff on top (data.read_retries, checkpoint.upload_retries).
    opts["config_kwargs"] = {"retries": {"max_attempts": 2, "mode": "standard"}}
    return opts


def protocol(url: str) -> str:
    if "://" in url:
        return url.split("://", 1)[0]
    return "file"


def is_remote(url: str) -> bool:
    return protocol(url) not in ("file", "local")


def filesystem(url: str, storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a URL or local path."""
    proto = protocol(url)
    if proto in ("file", "local"):
        path = url.split("://", 1)[1] if "://" in url else url
        proto_opts: dict[str, Any] = {}
        path = os.path.abspath(os.path.expanduser(path))
    elif proto in ("s3", "s3a"):
        proto, path, proto_opts = "s3", url.split("://", 1)[1], s3_options(storage)
    else:
        proto_opts = {}
        path = url
    key = (os.getpid(), proto, repr(sorted(proto_opts.items())))
    with _LOCK:
        fs = _CACHE.get(key)
        if fs is None:
            fs = fsspec.filesystem(proto, skip_instance_cache=True, **proto_opts)
            _CACHE[key] = fs
    if proto not in ("file", "s3"):
        path = fs._strip_protocol(url)
    return fs, path


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL or local path."""
    if "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://{posixpath.join(rest.rstrip('/'), *parts)}"
    return os.path.join(url, *parts)


def exists(url: str, storage: StorageConfig | None = None) -> bool:
    fs, path = filesystem(url, storage)
    return fs.exists(path)


def read_bytes(url: str, storage: StorageConfig | None = None, start: int | None = None,
               end: int | None = None) -> bytes:
    fs, path = filesystem(url, storage)
    if start is None and end is None:
        return fs.cat_file(path)
    return fs.cat_file(path, start=start, end=end)


def write_bytes(url: str, data: bytes, storage: StorageConfig | None = None) -> None:
    """Write a whole object so that readers never see a partial file.

    S3 PUTs are atomic per object; on a local filesystem we write a temporary sibling and rename.
    """
    fs, path = filesystem(url, storage)
    if protocol(url) in ("file", "local"):
        _replace_local(path, [data])
    else:
        fs.pipe_file(path, data)


def upload_file(local_path: str, url: str, storage: StorageConfig | None = None) -> None:
    """Copy a local file to a URL atomically (temp + rename locally; one object PUT on S3)."""
    fs, path = filesystem(url, storage)
    if protocol(url) in ("file", "local"):
        with open(local_path, "rb") as src:
            _replace_local(path, _chunks(src, 1 << 24))
    else:
        fs.put_file(local_path, path)


def _replace_local(path: str, chunks: Iterable[bytes]) -> None:
    """Write a temporary sibling, fsync it and rename it over `path` (atomic on POSIX)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def listdir(url: str, storage: StorageConfig | None = None) -> list[str]:
    """Base names directly under a directory/prefix (empty when it does not exist)."""
    fs, path = filesystem(url, storage)
    try:
        entries = fs.ls(path, detail=False, refresh=True) if is_remote(url) else fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(e.rstrip("/")) for e in entries)


def size(url: str, storage: StorageConfig | None = None) -> int:
    fs, path = filesystem(url, storage)
    return int(fs.size(path))


def remove_tree(url: str, storage: StorageConfig | None = None) -> None:
    fs, path = filesystem(url, storage)
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def makedirs(url: str, storage: StorageConfig | None = None) -> None:
    if not is_remote(url):
        fs, path = filesystem(url, storage)
        fs.makedirs(path, exist_ok=True)


def open_url(url: str, mode: str = "rb", storage: StorageConfig | None = None, **kwargs: Any):
    fs, path = filesystem(url, storage)
    return fs.open(path, mode, **kwargs)


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_url(url: str, storage: StorageConfig | None = None) -> str:
    digest = hashlib.sha256()
    with open_url(url, "rb", storage) as f:
        for chunk in _chunks(f):
            digest.update(chunk)
    return digest.hexdigest()


def _chunks(f: Any, size: int = 1 << 23) -> Iterator[bytes]:
    while chunk := f.read(size):
        yield chunk


def ensure_bucket(url: str, storage: StorageConfig | None = None) -> None:
    """Create the S3 bucket of `url` if it does not exist (demo and tests on a fresh endpoint)."""
    if protocol(url) not in ("s3", "s3a"):
        return
    fs, path = filesystem(url, storage)
    bucket = path.split("/", 1)[0]
    if not fs.exists(bucket):
        # s3fs.mkdir sends LocationConstraint=us-east-1, which S3 rejects; create the bucket directly.
        fs.call_s3("create_bucket", Bucket=bucket)
        fs.invalidate_cache()
