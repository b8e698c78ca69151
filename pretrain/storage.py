"""The one seam between the project and storage: local paths, file:// and s3:// through fsspec/s3fs.

S3 endpoint and credentials come from the standard AWS environment/config (``AWS_ENDPOINT_URL_S3``,
``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, instance profiles, ...) or from the ``[storage]`` config
section; credentials are never taken from the config. Filesystem objects are created per process
(keyed by pid) because s3fs sessions do not survive fork into DataLoader workers.

Every call runs under :mod:`pretrain.retry_policy` (s3fs and botocore make one attempt each), and
s3fs's listing cache is off: a cached listing would let a checkpoint or lease decision read a
stale view of the run. The conditional writes (:func:`create_exclusive`, :func:`replace_if_match`)
use S3's ``If-None-Match: *`` / ``If-Match: <etag>`` PUTs (AWS since 2024, MinIO, moto 5); on a local
filesystem they use an exclusive hard link and an ``flock``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import posixpath
import threading
import uuid
from typing import Any, Callable, Iterable, Iterator, TypeVar

import fsspec

from pretrain import retry_policy
from pretrain.config import StorageConfig

T = TypeVar("T")
_CACHE: dict[tuple, fsspec.AbstractFileSystem] = {}
_LOCK = threading.Lock()


class PreconditionFailed(OSError):
    """A conditional write lost: the object exists (create) or changed (If-Match)."""


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
    # One attempt in botocore (`max_attempts` would count retries; `total_max_attempts` counts tries) and
    # in s3fs (set on the instance in `filesystem`): pretrain.retry_policy is the only layer that retries.
    opts["use_listings_cache"] = False
    opts["config_kwargs"] = {"retries": {"total_max_attempts": 1, "mode": "standard"},
                             "connect_timeout": storage.connect_timeout_s, "read_timeout": storage.read_timeout_s}
    return opts


def retry(storage: StorageConfig | None, fn: Callable[[], T], what: str) -> T:
    """Run one storage call under the project's retry policy (see :mod:`pretrain.retry_policy`)."""
    storage = storage or StorageConfig()
    policy = retry_policy.RetryPolicy(storage.retries + 1, storage.retry_base_s, storage.retry_max_s)
    return retry_policy.call(fn, what, policy)


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
            if proto == "s3":
                fs.retries = 1  # s3fs's own retry loop: one try (not a constructor argument in s3fs 2026.9)
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
    return retry(storage, lambda: fs.exists(path), f"exists {url}")


def read_bytes(url: str, storage: StorageConfig | None = None, start: int | None = None,
               end: int | None = None) -> bytes:
    fs, path = filesystem(url, storage)
    if start is None and end is None:
        # one request: s3fs would HEAD first to decide on concurrent ranged reads
        kwargs = {"max_concurrency": 1} if is_remote(url) and protocol(url) in ("s3", "s3a") else {}
        return retry(storage, lambda: fs.cat_file(path, **kwargs), f"read {url}")
    return retry(storage, lambda: fs.cat_file(path, start=start, end=end), f"read {url} bytes {start}-{end}")


def write_bytes(url: str, data: bytes, storage: StorageConfig | None = None) -> None:
    """Write a whole object so that readers never see a partial file.

    S3 PUTs are atomic per object; on a local filesystem we write a temporary sibling and rename.
    """
    fs, path = filesystem(url, storage)
    if protocol(url) in ("file", "local"):
        retry(storage, lambda: _replace_local(path, [data]), f"write {url}")
    else:
        retry(storage, lambda: fs.pipe_file(path, data), f"write {url}")


def upload_file(local_path: str, url: str, storage: StorageConfig | None = None) -> None:
    """Copy a local file to a URL atomically (temp + rename locally; one object PUT on S3)."""
    fs, path = filesystem(url, storage)
    if protocol(url) in ("file", "local"):
        def copy() -> None:
            with open(local_path, "rb") as src:
                _replace_local(path, _chunks(src, 1 << 24))

        retry(storage, copy, f"upload {url}")
    else:
        # S3 allows 10,000 parts: larger files get larger parts
        chunk = max((storage or StorageConfig()).multipart_chunk_mb << 20, -(-os.path.getsize(local_path) // 10_000))

        def put() -> None:
            try:
                fs.put_file(local_path, path, chunksize=chunk)
            except Exception as exc:
                # A multipart completion whose answer was lost makes s3fs abort an upload that no longer
                # exists, and report only that (NoSuchUpload): uploading the file again is always safe.
                if retry_policy.http_status(exc)[1] == "NoSuchUpload" or "upload does not exist" in str(exc):
                    raise retry_policy.TransientError(f"multipart upload of {url} lost its answer: {exc}") from exc
                raise

        retry(storage, put, f"upload {url}")


def _replace_local(path: str, chunks: Iterable[bytes]) -> None:
    """Write a temporary sibling, fsync it and rename it over `path` (atomic on POSIX)."""
    tmp = _write_temp_sibling(path, chunks)
    os.replace(tmp, path)


def _write_temp_sibling(path: str, chunks: Iterable[bytes]) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return tmp


# ------------------------------------------------------------------------------------- conditional writes


def etag_of(data: bytes) -> str:
    """The tag local conditional writes compare (S3 computes its own ETag)."""
    return hashlib.sha256(data).hexdigest()


def read_with_etag(url: str, storage: StorageConfig | None = None) -> tuple[bytes, str]:
    """An object's bytes and its ETag (raises FileNotFoundError when it does not exist)."""
    fs, path = filesystem(url, storage)
    if not is_remote(url):
        def read_local() -> tuple[bytes, str]:
            with open(path, "rb") as f:
                data = f.read()
            return data, etag_of(data)

        return retry(storage, read_local, f"read {url}")
    bucket, key = path.split("/", 1)

    def read_s3() -> tuple[bytes, str]:
        response = fs.call_s3("get_object", Bucket=bucket, Key=key)
        body = response["Body"]
        try:
            data = _read_body(fs, body)
        finally:
            body.close()
        return data, response["ETag"]

    try:
        return retry(storage, read_s3, f"read {url}")
    except Exception as exc:
        if retry_policy.is_not_found(exc):
            raise FileNotFoundError(url) from exc
        raise


def _read_body(fs: fsspec.AbstractFileSystem, body: Any) -> bytes:
    from fsspec.asyn import sync

    return sync(fs.loop, body.read)


def create_exclusive(url: str, data: bytes, storage: StorageConfig | None = None) -> str:
    """Create `url` only if it does not exist (S3 ``If-None-Match: *``); returns the new ETag.

    Raises :class:`PreconditionFailed` when it exists. A retried PUT whose first answer was lost can
    also report that, so callers that care read the object back and compare it with `data`.
    """
    fs, path = filesystem(url, storage)
    if not is_remote(url):
        def create_local() -> str:
            tmp = _write_temp_sibling(path, [data])
            try:
                os.link(tmp, path)  # fails if `path` exists: an atomic create with the full content
            except FileExistsError:
                raise PreconditionFailed(f"{url} already exists") from None
            finally:
                os.remove(tmp)
            return etag_of(data)

        return retry(storage, create_local, f"create {url}")
    bucket, key = path.split("/", 1)
    try:
        return retry(storage, lambda: fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data,
                                                 IfNoneMatch="*")["ETag"], f"create {url}")
    except Exception as exc:
        if retry_policy.is_precondition_failed(exc) or isinstance(exc, FileExistsError):
            raise PreconditionFailed(f"{url} already exists") from exc
        raise


def replace_if_match(url: str, data: bytes, etag: str, storage: StorageConfig | None = None) -> str:
    """Overwrite `url` only if its ETag is still `etag` (S3 ``If-Match``); returns the new ETag."""
    fs, path = filesystem(url, storage)
    if not is_remote(url):
        def replace_local() -> str:
            with _local_lock(path):
                try:
                    with open(path, "rb") as f:
                        current = etag_of(f.read())
                except FileNotFoundError:
                    raise PreconditionFailed(f"{url} no longer exists") from None
                if current != etag:
                    raise PreconditionFailed(f"{url} changed (etag {current[:12]}, expected {etag[:12]})")
                _replace_local(path, [data])
            return etag_of(data)

        return retry(storage, replace_local, f"replace {url}")
    bucket, key = path.split("/", 1)
    try:
        return retry(storage, lambda: fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data,
                                                 IfMatch=etag)["ETag"], f"replace {url}")
    except Exception as exc:
        if retry_policy.is_precondition_failed(exc) or retry_policy.is_not_found(exc):
            raise PreconditionFailed(f"{url} changed since etag {etag}") from exc
        raise


@contextlib.contextmanager
def _local_lock(path: str) -> Iterator[None]:
    """Serialise read-compare-write on one host (flock is not reliable on every network filesystem)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------- listing and deleting


def listdir(url: str, storage: StorageConfig | None = None) -> list[str]:
    """Base names directly under a directory/prefix (empty when it does not exist)."""
    fs, path = filesystem(url, storage)

    def ls() -> list[str]:
        try:
            return fs.ls(path, detail=False, refresh=True) if is_remote(url) else fs.ls(path, detail=False)
        except FileNotFoundError:
            return []

    entries = retry(storage, ls, f"list {url}")
    return sorted(posixpath.basename(e.rstrip("/")) for e in entries)


def list_files(url: str, storage: StorageConfig | None = None) -> list[str]:
    """Every file below a directory/prefix, as relative posix paths (one flat listing on S3)."""
    fs, path = filesystem(url, storage)

    def find() -> list[str]:
        try:
            return fs.find(path)
        except FileNotFoundError:
            return []

    root = path.rstrip("/") + "/"
    found = retry(storage, find, f"list {url}")
    return sorted(p.replace(os.sep, "/")[len(root):] if p.startswith(root) else p for p in found)


def size(url: str, storage: StorageConfig | None = None) -> int:
    fs, path = filesystem(url, storage)
    return int(retry(storage, lambda: fs.size(path), f"size of {url}"))


def remove_tree(url: str, storage: StorageConfig | None = None) -> None:
    fs, path = filesystem(url, storage)

    def rm() -> None:
        try:
            fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    retry(storage, rm, f"remove {url}")


def remove_file(url: str, storage: StorageConfig | None = None) -> None:
    fs, path = filesystem(url, storage)

    def rm() -> None:
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass

    retry(storage, rm, f"remove {url}")


def makedirs(url: str, storage: StorageConfig | None = None) -> None:
    if not is_remote(url):
        fs, path = filesystem(url, storage)
        fs.makedirs(path, exist_ok=True)


def open_url(url: str, mode: str = "rb", storage: StorageConfig | None = None, **kwargs: Any):
    """A streaming file object (tools and webdataset streaming; not retried mid-stream)."""
    fs, path = filesystem(url, storage)
    return fs.open(path, mode, **kwargs)


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_url(url: str, storage: StorageConfig | None = None) -> str:
    def digest_all() -> str:
        digest = hashlib.sha256()
        with open_url(url, "rb", storage) as f:
            for chunk in _chunks(f):
                digest.update(chunk)
        return digest.hexdigest()

    return retry(storage, digest_all, f"sha256 of {url}")


def _chunks(f: Any, size: int = 1 << 23) -> Iterator[bytes]:
    while chunk := f.read(size):
        yield chunk


def ensure_bucket(url: str, storage: StorageConfig | None = None) -> None:
    """Create the S3 bucket of `url` if it does not exist (demo and tests on a fresh endpoint)."""
    if protocol(url) not in ("s3", "s3a"):
        return
    fs, path = filesystem(url, storage)
    bucket = path.split("/", 1)[0]
    if not retry(storage, lambda: fs.exists(bucket), f"exists {bucket}"):
        # s3fs.mkdir sends LocationConstraint=us-east-1, which S3 rejects; create the bucket directly.
        retry(storage, lambda: fs.call_s3("create_bucket", Bucket=bucket), f"create bucket {bucket}")
        fs.invalidate_cache()
