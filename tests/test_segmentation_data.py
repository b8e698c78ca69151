"""Segmentation data end to end on real components: the synthetic scene set, make-shards from the
ADE20K layout and from a list file (hand-made examples, bad inputs), verify, the manifest's task
field, and the joint augmentation (alignment, cat_max_ratio, eval padding, decoder skips, determinism)."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_tools import synth
from data_tools.cli import main
from pretrain.data import shards
from pretrain.data.loader import _decode_sample
from pretrain.data.reader import RawSample, ShardReader, Skipped
from pretrain.data.segmentation import (IGNORE, SegmentationDecoder, SegmentationTransform, random_crop,
                                        reduce_zero_label)


def _encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


def _samples(dest: Path, manifest: shards.Manifest) -> list[dict[str, bytes]]:
    import webdataset as wds

    return [s for info in manifest.shards
            for s in wds.WebDataset(str(dest / info.name), shardshuffle=False, empty_check=False)]


def _pair(h: int, w: int, boxes: list[tuple[int, ...]], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A grey noise image with solid rectangles (y0, y1, x0, x1, value) and the matching mask."""
    rng = np.random.default_rng(seed)
    image = (rng.integers(90, 110, (h, w, 3))).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    colours = {1: (230, 20, 20), 2: (20, 20, 230), 3: (20, 230, 20)}
    for y0, y1, x0, x1, v in boxes:
        image[y0:y1, x0:x1] = colours[v]
        mask[y0:y1, x0:x1] = v
    return image, mask


# --------------------------------------------------------------------------------------------------
# Synthetic scenes


def test_synth_scenes_have_exact_masks(monkeypatch):
    """Before noise and blur, each object is painted through exactly its mask pixels: every colour
    found in a class's region (solid fill or the two tones of a binary texture) occurs nowhere else."""
    monkeypatch.setattr(synth, "_finish", lambda image, rng: np.clip(image, 0, 255).astype(np.uint8))
    for i in range(6):
        image, label = synth.render_scene(5, 64, np.random.default_rng([7, 0, i]))
        assert label.dtype == np.uint8 and set(np.unique(label)) <= set(range(6)) and (label > 0).any()
        colour = image.astype(np.int64) @ np.array([1, 256, 65536])
        for value in np.unique(label[label > 0]):
            inside = np.unique(colour[label == value])
            assert len(inside) <= 8  # <= 4 objects x 2 texture tones
            assert not np.isin(colour[label != value], inside).any()


def test_synth_cli_layout_is_deterministic_and_shards(capsys, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    rc, out, _ = _cli(capsys, "synth", a, "--task", "segmentation", "--classes", 3, "--images", 5,
                      "--size", 48, "--holdout", 2, "--workers", 1)
    assert rc == 0 and "images=5" in out and "validation=2" in out
    synth.make_segmentation_dataset(str(b), 3, 5, 48, holdout=2, workers=2)
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*.*"))
    names = [f"{split}/{i:05d}" for split, n in (("training", 5), ("validation", 2)) for i in range(n)]
    assert files == ([f"annotations/{n}.png" for n in names] + ["classes.txt"]
                     + [f"images/{n}.jpg" for n in names])
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "classes.txt").read_text().split() == ["class_000", "class_001", "class_002"]
    with Image.open(a / "annotations/training/00003.png") as mask:
        assert mask.mode == "L" and mask.size == (48, 48)
        expected = synth.render_scene(3, 48, np.random.default_rng([0, 0, 3]))[1]
        assert np.array_equal(np.asarray(mask), expected)
    rc, _, err = _cli(capsys, "synth", tmp_path / "c", "--task", "segmentation", "--classes", 3,
                      "--per-class", 2)
    assert rc == 2 and "--images" in err

    dest = tmp_path / "shards"
    rc, out, _ = _cli(capsys, "make-shards", a, dest, "--task", "segmentation", "--split", "validation",
                      "--no-progress", "--workers", 1)
    assert rc == 0 and "3 classes (classes_file)" in out
    manifest = shards.read_manifest(str(dest))
    assert manifest.task == "segmentation" and manifest.reduce_zero_label and manifest.num_samples == 2
    assert manifest.classes == ["class_000", "class_001", "class_002"]
    assert manifest.build["split"] == "validation"
    raw = ShardReader(str(dest), manifest).read(0, np.arange(2))[0]
    image, target = SegmentationDecoder.of(manifest, train=False, scale=(48, 48))(raw)
    assert image.shape == (64, 64, 3) and target.shape == (64, 64)  # padded to a multiple of 32
    assert set(target.unique().tolist()) <= {0, 1, 2, IGNORE}


# --------------------------------------------------------------------------------------------------
# make-shards and verify on hand-made examples


@pytest.fixture
def ade_root(tmp_path) -> Path:
    root = tmp_path / "ADEChallengeData2016"
    for kind in ("images", "annotations"):
        (root / kind / "training").mkdir(parents=True)
    for i, (h, w) in enumerate([(20, 30), (24, 16), (18, 18)]):
        image, mask = _pair(h, w, [(2, 9, 3, 12, 1), (10, 16, 4, 14, 2 + i % 2)], seed=i)
        mask[0, 0] = IGNORE
        (root / "images/training" / f"ADE_{i}.jpg").write_bytes(_encode(image, "JPEG"))
        (root / "annotations/training" / f"ADE_{i}.png").write_bytes(_encode(mask))
    image, mask = _pair(16, 16, [(1, 5, 1, 5, 1)])
    (root / "images/training/no_mask.jpg").write_bytes(_encode(image, "JPEG"))
    (root / "annotations/training/no_image.png").write_bytes(_encode(mask))
    (root / "images/training/small.jpg").write_bytes(_encode(image, "JPEG"))
    (root / "annotations/training/small.png").write_bytes(_encode(mask[:8]))
    (root / "images/training/rgb.jpg").write_bytes(_encode(image, "JPEG"))
    (root / "annotations/training/rgb.png").write_bytes(_encode(image))
    return root


def test_ade_layout_to_shards(capsys, tmp_path, ade_root):
    dest = tmp_path / "shards"
    rc, out, _ = _cli(capsys, "make-shards", ade_root, dest, "--task", "segmentation", "--shard-samples", 2,
                      "--no-progress", "--workers", 1)
    assert rc == 0 and "3 classes (max_label)" in out
    manifest = shards.read_manifest(str(dest))
    assert manifest.task == "segmentation" and manifest.reduce_zero_label
    assert manifest.label_source == "max_label"
    assert manifest.classes == ["class_1", "class_2", "class_3"] and manifest.num_samples == 3
    assert manifest.skipped == {"bad_mask": 1, "mask_size_mismatch": 1, "missing_image": 1, "missing_mask": 1}
    report = json.loads((dest / "report.json").read_text())
    assert report["skipped_items"]["missing_mask"] == ["images/training/no_mask.jpg"]
    assert report["skipped_items"]["missing_image"] == ["annotations/training/no_image.png"]
    for sample in _samples(dest, manifest):
        assert sorted(k for k in sample if not k.startswith("__")) == ["jpg", "json", "png"]
        meta = json.loads(sample["json"])
        assert sample["jpg"] == (ade_root / meta["source"]).read_bytes()  # originals, byte for byte
        assert sample["png"] == (ade_root / meta["mask"]).read_bytes()
        assert Image.open(io.BytesIO(sample["jpg"])).size == (meta["w"], meta["h"])
    rc, out, _ = _cli(capsys, "verify", dest, "--decode-sample", -1)
    assert rc == 0 and "3 images decoded" in out and out.strip().endswith("OK")
    raw = ShardReader(str(dest), manifest).read(0, np.arange(1))[0]
    assert isinstance(raw, RawSample) and set(raw.fields) == {"jpg", "json", "png"}
    (dest / "manifest.json").write_text((dest / "manifest.json").read_text().replace('"class_3"', '"x"')
                                        .replace('"class_2",', ''))  # now 2 classes: value 3 is out of range
    rc, out, _ = _cli(capsys, "verify", dest, "--decode-sample", -1)
    assert rc == 1 and "mask value 3 outside 0..2" in out

    # a class file: mask value 3 is beyond its two classes, so that sample is a bad label
    (tmp_path / "names.txt").write_text("wall\nfloor\n")
    rc, out, _ = _cli(capsys, "make-shards", ade_root, tmp_path / "named", "--task", "segmentation",
                      "--classes", tmp_path / "names.txt", "--no-progress", "--workers", 1)
    named = shards.read_manifest(str(tmp_path / "named"))
    assert rc == 0 and named.classes == ["wall", "floor"] and named.label_source == "classes_file"
    assert named.num_samples == 2 and named.skipped["bad_label"] == 1


def test_ade_layout_on_s3_into_s3(capsys, tmp_path, ade_root, s3_bucket):
    """The same layout behind s3:// (listed and read in place) gives the same shards as on local disk."""
    from pretrain import storage

    for path in ade_root.rglob("*.*"):
        storage.write_bytes(f"{s3_bucket}/ade/{path.relative_to(ade_root)}", path.read_bytes())
    for src, dest in ((ade_root, tmp_path / "local"), (f"{s3_bucket}/ade", f"{s3_bucket}/shards")):
        rc, _, err = _cli(capsys, "make-shards", src, dest, "--task", "segmentation", "--no-progress",
                          "--workers", 1)
        assert rc == 0, err
    remote, local = shards.read_manifest(f"{s3_bucket}/shards"), shards.read_manifest(str(tmp_path / "local"))
    assert remote.shards == local.shards and remote.skipped == local.skipped
    assert remote.classes == local.classes
    assert _cli(capsys, "verify", f"{s3_bucket}/shards")[0] == 0


def test_list_file_to_shards_with_max_side(capsys, tmp_path):
    (tmp_path / "data").mkdir()
    lines = []
    for i in range(3):
        image, mask = _pair(20, 40, [(0, 20, 0, 10 + 5 * i, 1), (5, 15, 25, 35, 2)], seed=i)
        (tmp_path / "data" / f"{i}.png").write_bytes(_encode(image))  # a PNG photo: re-encoded as JPEG
        (tmp_path / "data" / f"{i}_mask.png").write_bytes(_encode(mask))
        lines.append(f"data/{i}.png\tdata/{i}_mask.png" if i else f"{tmp_path}/data/0.png data/0_mask.png")
    (tmp_path / "list.txt").write_text("\n".join(lines + ["# comment", "only_one_column"]) + "\n")
    dest = tmp_path / "shards"
    rc, _, err = _cli(capsys, "make-shards", tmp_path / "list.txt", dest, "--task", "segmentation",
                      "--max-side", 20, "--no-progress", "--workers", 1)
    assert rc == 0, err
    manifest = shards.read_manifest(str(dest))
    assert manifest.build["source_type"] == "list" and not manifest.reduce_zero_label  # off for list files
    assert manifest.classes == ["class_0", "class_1", "class_2"] and manifest.skipped == {"bad_list_line": 1}
    for sample in _samples(dest, manifest):
        image = np.asarray(Image.open(io.BytesIO(sample["jpg"])))
        mask = np.asarray(Image.open(io.BytesIO(sample["png"])))
        assert image.shape == (10, 20, 3) and mask.shape == (10, 20) and set(np.unique(mask)) == {0, 1, 2}
        assert image[mask == 1, 0].mean() > 180 and image[mask == 2, 2].mean() > 150  # nearest, aligned
        assert image[mask == 0].mean() < 120
    assert _cli(capsys, "verify", dest)[0] == 0
    rc, _, err = _cli(capsys, "make-shards", tmp_path / "list.txt", tmp_path / "x", "--classes", "names.txt")
    assert rc == 2 and "need --task segmentation" in err


def test_manifest_task_field_is_back_compatible():
    manifest = shards.Manifest(1, ["a"], "sorted", [shards.ShardInfo("shard-000000.tar", 1, 10, "x")])
    text = manifest.to_json()
    assert "task" not in json.loads(text) and "reduce_zero_label" not in json.loads(text)  # bytes as before
    assert shards.Manifest.from_json(text).task == "classification"
    seg = shards.Manifest(1, ["a"], "max_label", [], task="segmentation", reduce_zero_label=True)
    back = shards.Manifest.from_json(seg.to_json())
    assert back.task == "segmentation" and back.reduce_zero_label


# --------------------------------------------------------------------------------------------------
# Joint augmentation and the decoder


def _near(region: np.ndarray) -> np.ndarray:
    """`region` dilated by one pixel (8-neighbourhood)."""
    padded = np.pad(region, 1)
    h, w = region.shape
    return np.any([padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=0)


def test_train_augmentation_keeps_masks_aligned():
    image, mask = _pair(60, 80, [(5, 30, 10, 40, 1), (35, 55, 30, 70, 2), (10, 25, 55, 75, 3)])
    transform = SegmentationTransform(True, crop_size=(48, 48), scale=(80, 60), photometric=False)
    unflipped = SegmentationTransform(True, crop_size=(48, 48), scale=(80, 60), photometric=False, hflip=0.0)
    flips = padded = 0
    for seed in range(24):
        np.random.seed(seed)
        pixels, out = transform(Image.fromarray(image), mask)
        assert pixels.shape == (48, 48, 3) and out.shape == (48, 48) and pixels.dtype == out.dtype == np.uint8
        for value, channel in ((1, 0), (2, 2), (3, 1)):
            coloured, labelled = pixels[..., channel] > 160, out == value
            # colour and mask agree except on the seam, where bilinear resizing blends neighbours
            assert ((coloured != labelled) <= (_near(labelled) & _near(~labelled))).all()
        pad = out == IGNORE
        assert (pixels[pad] == (124, 116, 104)).all()  # image padding: the mean colour; mask: ignore
        padded += pad.any()
        np.random.seed(seed)  # the same draws, without the flip
        _, straight = unflipped(Image.fromarray(image), mask)
        h, w = (~pad).any(1).sum(), (~pad).any(0).sum()  # flips happen before padding
        if not np.array_equal(straight, out):
            assert np.array_equal(straight[:h, :w][:, ::-1], out[:h, :w])
            flips += 1
    assert padded and 4 <= flips <= 20  # rescale ratios < 1 were padded; about half were flipped


def test_photometric_distortion_is_pointwise_and_varies():
    image, mask = _pair(40, 40, [(5, 20, 5, 20, 1), (20, 35, 20, 35, 2)])
    transform = SegmentationTransform(True, crop_size=(40, 40), scale=(40, 40), ratio_range=(1.0, 1.0),
                                      cat_max_ratio=1.0, hflip=0.0)
    outputs = []
    for seed in range(8):
        np.random.seed(seed)
        pixels, out = transform(Image.fromarray(image), mask)
        assert np.array_equal(out, mask)  # photometric distortion leaves the mask alone
        for value in (1, 2):  # a solid region stays one colour: the distortion is a function of the pixel
            assert len(np.unique(pixels[mask == value], axis=0)) == 1
        outputs.append(pixels)
    assert len({o.tobytes() for o in outputs}) == 8


def test_random_crop_cat_max_ratio():
    mask = np.zeros((40, 100), np.uint8)
    mask[:, 70:] = 1  # a 40x40 crop starts at x in 0..60 and holds < 75% of either class for 40 < x < 60
    mask[:, :5] = IGNORE
    image = np.zeros((40, 100, 3), np.uint8)

    def ratio_ok(crop: np.ndarray) -> bool:
        labels, counts = np.unique(crop, return_counts=True)
        counts = counts[labels != IGNORE]
        return len(counts) > 1 and counts.max() / counts.sum() < 0.75

    good = {}
    for limit in (0.75, 1.0):
        np.random.seed(0)
        good[limit] = sum(ratio_ok(random_crop(image, mask, (40, 40), limit)[1]) for _ in range(200))
    assert good[0.75] > 180 and good[1.0] < 100  # retries find a mixed crop almost always
    # a single-class mask never passes: as mmseg, 10 checked windows, then an 11th taken unchecked
    np.random.seed(1)
    _, crop = random_crop(image, np.zeros((40, 100), np.uint8), (40, 40), 0.75)
    after = np.random.randint(1 << 30)
    np.random.seed(1)
    for _ in range(11):
        np.random.randint(0, 1), np.random.randint(0, 61)
    assert crop.shape == (40, 40) and np.random.randint(1 << 30) == after


def test_eval_transform_and_collate_pad_with_ignore():
    decoder = SegmentationDecoder(3, SegmentationTransform(False, scale=(200, 50)))
    images, targets = [], []
    for h, w in ((40, 100), (60, 60)):
        image, mask = _pair(h, w, [(0, h // 2, 0, w // 2, 1)])
        result = decoder(RawSample("k", {"jpg": _encode(image, "JPEG"), "png": _encode(mask)}))
        images.append(result[0])
        targets.append(result[1])
    assert images[0].shape == (64, 128, 3) and targets[0].shape == (64, 128)  # 50x125 resized, padded to 32
    assert (targets[0][50:] == IGNORE).all() and (targets[0][:, 125:] == IGNORE).all()
    assert images[1].shape == (64, 64, 3) and (targets[1][:50, :50] != IGNORE).all()
    batch_images, batch_targets = decoder.collate(images, targets)
    assert batch_images.shape == (2, 64, 128, 3) and batch_images.dtype == torch.uint8
    assert batch_targets.shape == (2, 64, 128) and batch_targets.dtype == torch.int64
    assert (batch_targets[1, :, 64:] == IGNORE).all() and torch.equal(batch_targets[0], targets[0])
    assert decoder.empty_target().shape == (0, 512, 512)


def test_decoder_skips_with_reasons_and_reduces_zero_label():
    image, mask = _pair(32, 32, [(0, 16, 0, 16, 1), (16, 32, 16, 32, 2)])
    jpg, png = _encode(image, "JPEG"), _encode(mask)
    decoder = SegmentationDecoder(2, SegmentationTransform(False, scale=(32, 32)), reduce_zero_label=True)
    cases = {"missing_image": {"png": png}, "missing_mask": {"jpg": jpg},
             "decode_error": {"jpg": jpg, "png": b"not a png"},
             "bad_label": {"jpg": jpg, "png": _encode(mask[:16])}}
    for reason, fields in cases.items():
        assert decoder(RawSample("k", fields)) == Skipped(reason)
    assert decoder(RawSample("k", {"jpg": jpg, "png": _encode(image)})) == Skipped("decode_error")  # RGB mask
    assert SegmentationDecoder(1, decoder.transform, True)(RawSample("k", {"jpg": jpg, "png": png})) == \
        Skipped("bad_label")  # value 2 -> class 1, beyond one class
    _, target = decoder(RawSample("k", {"jpg": jpg, "png": png}))
    assert torch.equal(target, torch.from_numpy(reduce_zero_label(mask)).long())
    assert set(target.unique().tolist()) == {0, 1, IGNORE}
    assert reduce_zero_label(np.array([0, 1, 5, 255], np.uint8)).tolist() == [255, 0, 4, 255]


def test_decoder_is_deterministic_under_the_loader_seed():
    image, mask = _pair(50, 70, [(5, 30, 10, 40, 1), (30, 45, 30, 60, 2)])
    raw = RawSample("k", {"jpg": _encode(image, "JPEG"), "png": _encode(mask)})
    decoder = pickle.loads(pickle.dumps(SegmentationDecoder(3, SegmentationTransform(
        True, crop_size=32, scale=[70, 50]))))  # workers get a pickled copy; config values may be lists
    first = [_decode_sample(raw, decoder, seed, in_worker=True) for seed in range(5)]
    again = [_decode_sample(raw, decoder, seed, in_worker=False) for seed in range(5)]
    for (a, b), (c, d) in zip(first, again):
        assert a.shape == (32, 32, 3) and torch.equal(a, c) and torch.equal(b, d)
    assert len({a.numpy().tobytes() for a, _ in first}) == 5
