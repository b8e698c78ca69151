"""A labelled contact sheet of shard samples, raw or exactly as the training transform sees them.

Looking at the data is the cheapest bug detector there is (wrong labels, rotated photos, broken
colour conversion, augmentation that destroys the object). Samples are picked at random (seeded) over
the whole set and fetched with ranged reads through the project's own reader, so a sheet of a 1.3 TB
set costs a few requests; tiles show ``id:class`` (ImageNet synsets with their lemma).
"""

from __future__ import annotations

import io
import math
import random
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from pretrain import storage
from pretrain.config import DataConfig, StorageConfig
from pretrain.data import shards
from pretrain.data.decode import UndecodableImage, decode_rgb

LABEL_HEIGHT = 14
COLUMNS = 8


def pick_samples(manifest: shards.Manifest, n: int, seed: int) -> list[tuple[int, int]]:
    """`n` distinct (shard, sample) positions drawn uniformly over the whole set, in read order."""
    counts = np.array([s.num_samples for s in manifest.shards])
    starts = np.concatenate([[0], np.cumsum(counts)])
    total = int(starts[-1])
    chosen = np.sort(np.random.default_rng(seed).choice(total, min(n, total), replace=False))
    shard_of = np.searchsorted(starts, chosen, side="right") - 1
    return [(int(s), int(g - starts[s])) for s, g in zip(shard_of, chosen)]


def _class_text(manifest: shards.Manifest) -> Callable[[int], str]:
    describe: Callable[[str], str] = lambda name: name
    if manifest.label_source == "imagenet22k_synsets":
        from timm.data import ImageNetInfo

        info = ImageNetInfo("imagenet-22k")
        describe = lambda name: info.label_name_to_description(name).split(",")[0]  # noqa: E731
    return lambda label: f"{label}:{describe(manifest.classes[label])}" if 0 <= label < manifest.num_classes \
        else f"{label}:?"


def _tile_transform(augmented: bool, image_size: int, seed: int) -> Callable[[Image.Image], Image.Image]:
    if not augmented:
        return lambda img: ImageOps.pad(img, (image_size, image_size), Image.BICUBIC, color=(128, 128, 128))
    import torch

    from pretrain.data.transforms import build_train_transform

    cfg = DataConfig(image_size=image_size)
    transform = build_train_transform(cfg)
    mean, std = torch.tensor(cfg.mean).view(3, 1, 1), torch.tensor(cfg.std).view(3, 1, 1)
    random.seed(seed)  # timm's RandAugment draws from `random`, RandomErasing from torch
    torch.manual_seed(seed)
    np.random.seed(seed)

    def apply(img: Image.Image) -> Image.Image:
        x = (transform(img) * std + mean).clamp(0, 1)  # un-normalize for display
        return Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))

    return apply


def contact_sheet(url: str, out: str, n: int = 32, image_size: int = 224, augmented: bool = False,
                  seed: int = 0, storage_cfg: StorageConfig | None = None) -> int:
    """Write the PNG sheet to `out` (local path or URL); returns the number of tiles."""
    from pretrain.data.reader import RawSample, ShardReader

    manifest = shards.read_manifest(url, storage_cfg)
    reader = ShardReader(url, manifest, storage_cfg)
    picks = pick_samples(manifest, n, seed)
    text, tile = _class_text(manifest), _tile_transform(augmented, image_size, seed)
    tiles: list[tuple[Image.Image, str]] = []
    for shard in sorted({s for s, _ in picks}):
        wanted = np.array([i for s, i in picks if s == shard])
        for i, raw in sorted(reader.read(shard, wanted).items()):
            if not isinstance(raw, RawSample) or "jpg" not in raw.fields:
                continue
            try:
                image = decode_rgb(raw.fields["jpg"])
            except UndecodableImage:
                continue
            label = int(raw.fields.get("cls", b"-1").decode().strip() or -1)
            tiles.append((tile(image), text(label)))
    if not tiles:
        raise ValueError(f"{url}: no decodable samples to show")
    columns = min(COLUMNS, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    sheet = Image.new("RGB", (columns * image_size, rows * (image_size + LABEL_HEIGHT)), (255, 255, 255))
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    for k, (img, label) in enumerate(tiles):
        x, y = (k % columns) * image_size, (k // columns) * (image_size + LABEL_HEIGHT)
        sheet.paste(img, (x, y))
        draw.text((x + 2, y + image_size + 1), label[: max(4, image_size // 6)], fill=(0, 0, 0), font=font)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    storage.write_bytes(out, buf.getvalue(), storage_cfg)
    return len(tiles)
