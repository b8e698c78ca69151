"""Decoding odd real-world images, and the timm-built train/eval transforms and mixup targets."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.config import DataConfig
from pretrain.data.decode import UndecodableImage, decode_rgb
from pretrain.data.transforms import (build_eval_transform, build_mixup, build_train_transform,
                                      smooth_one_hot)

pytestmark = pytest.mark.unit


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def test_decode_grayscale_and_cmyk():
    gray = decode_rgb(_encode(Image.new("L", (20, 10), 77), "JPEG"))
    assert gray.mode == "RGB" and gray.size == (20, 10)
    assert abs(np.asarray(gray).astype(int) - 77).max() <= 2
    cmyk = decode_rgb(_encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=100))
    r, g, b = np.asarray(cmyk).reshape(-1, 3).mean(0)
    assert cmyk.mode == "RGB" and r > 200 and g < 60 and b < 60  # CMYK (0, 1, 1, 0) is red


def test_decode_palette_and_alpha_composite_on_white():
    rgba = Image.new("RGBA", (6, 6), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    out = np.asarray(decode_rgb(_encode(rgba, "PNG")))
    assert out[0, 0].tolist() == [0, 0, 255] and out[3, 3].tolist() == [255, 255, 255]
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.info["transparency"] = 0
    palette.putpixel((0, 0), 0)
    out = np.asarray(decode_rgb(_encode(palette, "PNG")))
    assert out[0, 0].tolist() == [255, 255, 255] and out[1, 1].tolist() == [10, 200, 30]


def test_decode_16bit_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    image = Image.fromarray(ramp)
    assert image.mode == "I;16"
    out = np.asarray(decode_rgb(_encode(image, "PNG")))[..., 0]
    assert out.min() == 0 and out.max() == 255 and 120 < out.mean() < 135


def test_decode_applies_exif_orientation():
    image = Image.new("RGB", (40, 20), (0, 200, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = decode_rgb(_encode(image, "JPEG", exif=exif))
    assert out.size == (20, 40)


@pytest.mark.parametrize("data,reason", [(b"", "empty"), (b"hello, not an image", "not_an_image")])
def test_decode_rejects_garbage_with_reason(data, reason):
    with pytest.raises(UndecodableImage) as err:
        decode_rgb(data)
    assert err.value.reason == reason


def test_decode_rejects_truncated_jpeg():
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = _encode(noise, "JPEG")
    with pytest.raises(UndecodableImage) as err:
        decode_rgb(data[: len(data) // 2])
    assert err.value.reason == "corrupt_image"


def test_train_transform_output_and_components():
    cfg = DataConfig(image_size=48, random_erasing=0.5)
    transform = build_train_transform(cfg)
    names = [type(t).__name__ for t in transform.transforms]
    assert names[0] == "RandomResizedCropAndInterpolation" and "RandAugment" in names
    assert "RandomErasing" in names and "ColorJitter" not in names
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (70, 90, 3), dtype=np.uint8))
    for seed in range(300):  # covers RandAugment's extreme magnitudes (posterize to 0 bits)
        random.seed(seed)
        x = transform(image)
        assert x.shape == (3, 48, 48) and x.dtype == torch.float32
    jitter = build_train_transform(DataConfig(image_size=32, randaugment="", random_erasing=0.0))
    names = [type(t).__name__ for t in jitter.transforms]
    assert "ColorJitter" in names and "RandomErasing" not in names


def test_eval_transform_resizes_then_center_crops():
    cfg = DataConfig(image_size=32, crop_pct=0.5)
    image = np.zeros((100, 200, 3), np.uint8)
    image[40:60, 90:110] = 255  # a white square in the centre fills the crop after resize to 64
    x = build_eval_transform(cfg)(Image.fromarray(image))
    assert x.shape == (3, 32, 32)
    unnorm = x * torch.tensor(cfg.std).view(3, 1, 1) + torch.tensor(cfg.mean).view(3, 1, 1)
    assert unnorm[:, 10:22, 10:22].min() > 0.9 and unnorm[:, 0, 0].max() < 0.1
    assert torch.equal(x, build_eval_transform(cfg)(Image.fromarray(image)))


def test_mixup_gives_soft_targets_that_sum_to_one():
    cfg = DataConfig(mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    mixup = build_mixup(cfg, num_classes=10)
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8)
    mixed_x, target = mixup(x, y)
    assert mixed_x.shape == x.shape and target.shape == (8, 10)
    assert torch.allclose(target.sum(1), torch.ones(8)) and (target > 0).all()
    assert build_mixup(DataConfig(mixup=0.0, cutmix=0.0), 10) is None


def test_smooth_one_hot():
    target = smooth_one_hot(torch.tensor([2, 0]), num_classes=4, smoothing=0.2)
    assert torch.allclose(target.sum(1), torch.ones(2))
    assert target[0, 2].item() == pytest.approx(0.85) and target[0, 0].item() == pytest.approx(0.05)
    assert torch.equal(smooth_one_hot(torch.tensor([1]), 3, 0.0), torch.tensor([[0.0, 1.0, 0.0]]))


def _seeded_images(n: int = 6, size: int = 48) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)) for _ in range(n)]


def test_uint8_collation_and_device_normalization_equal_the_host_transform():
    """Batches cross shared memory as uint8 channels-last; normalizing on the device gives exactly what
    ToTensor + Normalize gave on the host (random erasing off here: it moved too, see below)."""
    from torch.utils.data import default_collate

    from pretrain.data.transforms import DeviceAugment

    cfg = DataConfig(image_size=32, randaugment="rand-m9-mstd0.5-inc1", random_erasing=0.0)
    host, uint8 = build_train_transform(cfg), build_train_transform(cfg, uint8=True)
    reference, crops = [], []
    for i, image in enumerate(_seeded_images()):
        for transform, out in ((host, reference), (uint8, crops)):
            random.seed(i)
            np.random.seed(i)
            torch.manual_seed(i)
            out.append(transform(image))
    batch = default_collate(crops)
    assert batch.dtype == torch.uint8 and batch.shape == (6, 32, 32, 3) and batch.is_contiguous()
    x = DeviceAugment(cfg, torch.device("cpu"))(batch)
    assert x.shape == (6, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x, torch.stack(reference))
    held_out = DeviceAugment(cfg, torch.device("cpu"), train=False)
    eval_batch = default_collate([build_eval_transform(cfg, uint8=True)(im) for im in _seeded_images()])
    assert torch.equal(held_out(eval_batch), torch.stack([build_eval_transform(cfg)(im) for im in _seeded_images()]))


def test_random_erasing_runs_on_the_device_batch():
    from pretrain.data.transforms import DeviceAugment

    cfg = DataConfig(image_size=32, random_erasing=1.0, random_erasing_mode="pixel")
    batch = torch.full((64, 32, 32, 3), 128, dtype=torch.uint8)
    random.seed(0)
    x = DeviceAugment(cfg, torch.device("cpu"))(batch)
    plain = DeviceAugment(cfg, torch.device("cpu"), train=False)(batch)
    erased = (x != plain).any(dim=1).float().mean(dim=(1, 2))  # fraction of each image's pixels replaced
    assert (erased > 0).float().mean() > 0.9 and 0.02 <= erased.mean() <= 0.4  # timm: 2%..1/3 of the area
