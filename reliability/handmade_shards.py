"""Shard sets written by hand, so that they can contain what `data-tools make-shards` would refuse
(tests and the chaos suite)."""

from __future__ import annotations

import io
import tarfile

from pretrain import storage
from pretrain.data import shards


def jpeg_bytes(seed: int, size: int = 16) -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write_shard_set(url: str, samples: list[dict[str, bytes]], per_shard: int, num_classes: int = 3,
                    truncate_last_shard: int = 0, manifest_lists_full_size: bool = False,
                    truncate_shard: int | None = None, truncate_bytes: int = 0) -> None:
    """Hand-written shards (so that they can contain what make-shards would refuse).

    `truncate_last_shard` cuts that many bytes off the last tar (or `truncate_bytes` off shard
    `truncate_shard`); with `manifest_lists_full_size` the manifest keeps the full size, as after an
    upload that was interrupted once the manifest was written.
    """
    infos = []
    for index in range(0, len(samples), per_shard):
        buf, offsets = io.BytesIO(), []
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i, sample in enumerate(samples[index:index + per_shard]):
                offsets.append(buf.tell())
                for ext, data in sample.items():
                    info = tarfile.TarInfo(f"{index + i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            offsets.append(buf.tell())
        data = buf.getvalue()
        listed = len(data)
        name = shards.shard_name(index // per_shard)
        if truncate_last_shard and index + per_shard >= len(samples):
            data = data[: offsets[-1] - truncate_last_shard]
        if truncate_shard == index // per_shard:
            data = data[: offsets[-1] - truncate_bytes]
        storage.write_bytes(storage.join(url, name), data)
        storage.write_bytes(storage.join(url, shards.index_name(name)), shards.encode_index(offsets))
        infos.append(shards.ShardInfo(name, len(offsets) - 1, listed if manifest_lists_full_size else len(data), "-"))
    manifest = shards.Manifest(len(samples), [f"c{i}" for i in range(num_classes)], "sorted", infos)
    storage.write_bytes(storage.join(url, shards.MANIFEST), manifest.to_json().encode())
