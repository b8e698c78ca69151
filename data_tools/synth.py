"""A learnable synthetic ImageFolder, for demos and tests that must train something real in minutes.

Why synthetic: the end-to-end demo and the tests need data that (a) is generated offline in seconds,
(b) is deterministic, and (c) a tiny ConvNeXt provably learns on 2 CPU cores -- so that "loss goes
down, top-1 rises well above chance" is a meaningful check of the whole pipeline, not of the data.

Design. Class ``c`` is the combination ``(shape c % 7, colour c % 8, texture c % 5)``; since 7, 8 and
5 are pairwise coprime, the first 280 classes are all distinct combinations (Chinese remainder
theorem) and neighbouring classes differ in every attribute. Each image draws one object of its
class's shape, filled with its colour and texture (stripes, dots, checks, rings in the object's own
rotated frame), at a random position, scale (22-38% of the side as radius) and rotation, over a random
desaturated background (two-colour gradient, blurred colour noise or stripes), with 0-2 small
distractor blobs, per-image colour jitter and Gaussian pixel noise. Saturated objects on desaturated
backgrounds keep the task learnable under RandomResizedCrop/RandAugment; distractors, jitter and
textures that only differ at a few pixels keep it from being trivial.

Layout: ``OUT/class_000/00000.jpg`` ... (sorted class names = label order). ``--holdout K`` writes K
further images per class, drawn from a separate random stream, to a sibling ImageFolder
(default ``OUT_holdout``) for evaluation. Every image has its own generator seeded by
``(seed, split, class, index)``, so output does not depend on the order of generation.
Hand-written (numpy + PIL.ImageDraw) because no library ships such a generator.

Segmentation (:func:`make_segmentation_dataset`, ``data-tools synth --task segmentation``): scenes of
1-4 objects of the same classes on the same backgrounds and distractors, drawn with the same code but
through hard (non-anti-aliased) coverage, so each label mask is exact. ADE20K layout and convention:
``OUT/images/{training,validation}/00000.jpg``, ``OUT/annotations/.../00000.png`` (8-bit; 0 = "other",
``c + 1`` = class ``c``) and ``OUT/classes.txt``, which ``make-shards --task segmentation`` reads.
"""

from __future__ import annotations

import io
import math
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pretrain import storage
from pretrain.config import StorageConfig

SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon", "ring")
COLOURS = ((220, 35, 35), (35, 175, 60), (40, 80, 225), (235, 210, 30),
           (200, 45, 200), (30, 200, 215), (245, 125, 15), (245, 245, 245))
TEXTURES = ("solid", "stripes", "dots", "checker", "rings")
MAX_CLASSES = len(SHAPES) * len(COLOURS) * len(TEXTURES)
JPEG_QUALITY = 90
SEG_SPLITS = ("training", "validation")
CLASSES_FILE = "classes.txt"
"""Class names of a segmentation scene set in label-id order: line i (from 0) names mask value i + 1."""


def class_name(c: int) -> str:
    return f"class_{c:03d}"


def class_spec(c: int) -> tuple[str, tuple[int, int, int], str]:
    """(shape, colour, texture) of class `c`."""
    return SHAPES[c % len(SHAPES)], COLOURS[c % len(COLOURS)], TEXTURES[c % len(TEXTURES)]


def _polygon(shape: str) -> list[np.ndarray]:
    """Unit-radius outline(s) of a shape; the second polygon (if any) is a hole."""
    def ngon(n: int, r: float = 1.0, phase: float = 0.0) -> np.ndarray:
        a = phase + 2 * math.pi * np.arange(n) / n
        return r * np.stack([np.cos(a), np.sin(a)], 1)

    if shape == "circle":
        return [ngon(40)]
    if shape == "square":
        return [ngon(4, 1.0, math.pi / 4)]
    if shape == "triangle":
        return [ngon(3, 1.1, -math.pi / 2)]
    if shape == "hexagon":
        return [ngon(6)]
    if shape == "star":
        pts = ngon(10, 1.0, -math.pi / 2)
        pts[1::2] *= 0.45
        return [pts]
    if shape == "cross":
        w = 0.34
        return [np.array([(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1),
                          (-w, w), (-1, w), (-1, -w), (-w, -w)], dtype=float)]
    if shape == "ring":
        return [ngon(40), ngon(40, 0.5)]
    raise ValueError(shape)


def _background(rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    grey = rng.uniform(60, 200)
    colours = 0.45 * rng.uniform(0, 255, (2, 3)) + 0.55 * grey  # desaturated, so objects stand out
    kind = rng.integers(3)
    if kind == 0:  # linear gradient in a random direction
        a = rng.uniform(0, 2 * math.pi)
        t = ((xx * math.cos(a) + yy * math.sin(a)) / size + 1) / 2
    elif kind == 1:  # smooth colour noise
        small = rng.uniform(0, 1, (4, 4)).astype(np.float32)
        t = np.asarray(Image.fromarray(small, "F").resize((size, size), Image.BICUBIC))
    else:  # soft stripes
        a = rng.uniform(0, math.pi)
        t = 0.5 + 0.5 * np.sin((xx * math.cos(a) + yy * math.sin(a)) * rng.uniform(0.1, 0.5))
    t = np.clip(t, 0, 1)[..., None].astype(np.float32)
    return (colours[0] * (1 - t) + colours[1] * t).astype(np.float32)


def _texture(texture: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if texture == "solid":
        return np.ones_like(u)
    if texture == "stripes":
        return (np.sin(u * 3 * math.pi) > 0).astype(np.float32)
    if texture == "dots":
        du, dv = (u * 2.5) % 1 - 0.5, (v * 2.5) % 1 - 0.5
        return (du * du + dv * dv > 0.09).astype(np.float32)
    if texture == "checker":
        return ((np.floor(u * 2) + np.floor(v * 2)) % 2).astype(np.float32)
    if texture == "rings":
        return (np.sin(np.hypot(u, v) * 3 * math.pi) > 0).astype(np.float32)
    raise ValueError(texture)


def _mask(polys: list[np.ndarray], size: int, cx: float, cy: float, r: float, angle: float,
          antialias: bool = True) -> np.ndarray:
    """Coverage of the rotated, scaled shape, (size, size, 1) in [0, 1]: anti-aliased (2x supersampled)
    for classification images; exactly 0/1 with ``antialias=False``, so a segmentation image is painted
    through the very pixels its label mask marks."""
    s = 2 if antialias else 1
    canvas = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(canvas)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    for k, poly in enumerate(polys):
        pts = (poly @ rot.T) * r + (cx, cy)
        draw.polygon([(float(x) * s, float(y) * s) for x, y in pts], fill=0 if k else 255)
    if antialias:
        canvas = canvas.resize((size, size), Image.BOX)
    return np.asarray(canvas, dtype=np.float32)[..., None] / 255.0


def _distractors(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """0-2 small blobs in muted colours (unlabelled clutter)."""
    for _ in range(rng.integers(0, 3)):
        blob = _mask(_polygon("circle"), size, *rng.uniform(0, size, 2), size * rng.uniform(0.05, 0.12), 0.0)
        tint = (0.5 * rng.uniform(0, 255, 3) + 0.5 * image.mean()).astype(np.float32)
        image = image * (1 - blob) + tint * blob
    return image


def _paint(image: np.ndarray, class_index: int, mask: np.ndarray, cx: float, cy: float, r: float,
           angle: float, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`image` with the object of `class_index` (its jittered colour and texture) painted through `mask`."""
    _, colour, texture = class_spec(class_index)
    u = ((xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)) / r
    v = (-(xx - cx) * math.sin(angle) + (yy - cy) * math.cos(angle)) / r
    base = np.clip(np.array(colour) * rng.uniform(0.8, 1.1, 3) + rng.normal(0, 10, 3), 0, 255)
    base = base.astype(np.float32)
    t = _texture(texture, u, v)[..., None]
    fill = base * (0.35 + 0.65 * t)
    return image * (1 - mask) + fill * mask


def _finish(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-image Gaussian pixel noise and, sometimes, a slight blur; uint8 RGB."""
    image = image + rng.standard_normal(image.shape, dtype=np.float32) * np.float32(rng.uniform(2, 14))
    out = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.3:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.9)))
    return np.asarray(out)


def render(class_index: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One (size, size, 3) uint8 image of class `class_index`."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    image = _distractors(_background(rng, size, yy, xx), size, rng)
    r = size * rng.uniform(0.22, 0.38)
    cx, cy = rng.uniform(r * 0.8, size - r * 0.8, 2)
    angle = rng.uniform(0, 2 * math.pi)
    mask = _mask(_polygon(class_spec(class_index)[0]), size, cx, cy, r, angle)
    return _finish(_paint(image, class_index, mask, cx, cy, r, angle, yy, xx, rng), rng)


def render_scene(classes: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A segmentation scene: (uint8 (size, size, 3) image, uint8 (size, size) ADE-style label mask).

    1-4 objects of random classes among the first `classes` (radius 10-25% of the side, possibly cut
    by the border), painted in order so later ones occlude earlier ones, over a background with
    distractors. Mask value ``c + 1`` marks class ``c``; 0 is "other" (background, distractor blobs,
    ring holes). The mask uses the same hard (non-anti-aliased) coverage the object is painted through,
    so it is exact; only the final noise/blur of the image crosses the edges.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    image = _distractors(_background(rng, size, yy, xx), size, rng)
    label = np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(1, 5)):
        c = int(rng.integers(classes))
        r = size * rng.uniform(0.10, 0.25)
        cx, cy = rng.uniform(r * 0.5, size - r * 0.5, 2)
        angle = rng.uniform(0, 2 * math.pi)
        mask = _mask(_polygon(class_spec(c)[0]), size, cx, cy, r, angle, antialias=False)
        image = _paint(image, c, mask, cx, cy, r, angle, yy, xx, rng)
        label[mask[..., 0] > 0] = c + 1
    return _finish(image, rng), label


def _encode(array: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **({"quality": JPEG_QUALITY} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _pipe(url: str, data: bytes, storage_cfg: StorageConfig | None) -> None:
    fs, path = storage.filesystem(url, storage_cfg)
    fs.pipe_file(path, data)


def _write_class(args: tuple[str, int, int, int, int, int, StorageConfig | None]) -> int:
    root, c, count, size, seed, split, storage_cfg = args
    class_dir = storage.join(root, class_name(c))
    storage.makedirs(class_dir, storage_cfg)
    for i in range(count):
        rng = np.random.default_rng([seed, split, c, i])
        _pipe(storage.join(class_dir, f"{i:05d}.jpg"), _encode(render(c, size, rng)), storage_cfg)
    return count


def _write_scenes(args: tuple[str, int, int, int, int, int, int, StorageConfig | None]) -> int:
    root, split, start, count, classes, size, seed, storage_cfg = args
    for i in range(start, start + count):
        image, label = render_scene(classes, size, np.random.default_rng([seed, split, i]))
        _pipe(storage.join(root, "images", SEG_SPLITS[split], f"{i:05d}.jpg"), _encode(image), storage_cfg)
        _pipe(storage.join(root, "annotations", SEG_SPLITS[split], f"{i:05d}.png"), _encode(label, "PNG"),
              storage_cfg)
    return count


def _run(fn, jobs: list, workers: int) -> int:
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(workers, os.cpu_count() or 1)) as pool:
            return sum(pool.map(fn, jobs))
    return sum(map(fn, jobs))


def _check_classes(classes: int) -> None:
    if not 1 <= classes <= MAX_CLASSES:
        raise ValueError(f"--classes must be in 1..{MAX_CLASSES} (distinct shape/colour/texture "
                         f"combinations), got {classes}")


def make_dataset(out_dir: str, classes: int, per_class: int, size: int, seed: int = 0, holdout: int = 0,
                 holdout_dir: str = "", workers: int = 1,
                 storage_cfg: StorageConfig | None = None) -> dict[str, str | int]:
    """Write the synthetic ImageFolder (and optional holdout folder); returns a summary."""
    _check_classes(classes)
    if per_class < 1 or size < 16 or holdout < 0:
        raise ValueError(f"need --per-class >= 1, --size >= 16 and --holdout >= 0; got "
                         f"{per_class}, {size}, {holdout}")
    holdout_dir = holdout_dir or out_dir.rstrip("/") + "_holdout"
    jobs = [(out_dir, c, per_class, size, seed, 0, storage_cfg) for c in range(classes)]
    if holdout:
        jobs += [(holdout_dir, c, holdout, size, seed, 1, storage_cfg) for c in range(classes)]
    total = _run(_write_class, jobs, workers)
    summary: dict[str, str | int] = {"train_dir": out_dir, "classes": classes, "images": total}
    if holdout:
        summary["holdout_dir"] = holdout_dir
    return summary


def make_segmentation_dataset(out_dir: str, classes: int, images: int, size: int = 128, seed: int = 0,
                              holdout: int = 0, workers: int = 1,
                              storage_cfg: StorageConfig | None = None) -> dict[str, str | int]:
    """Write an ADE20K-style scene set: `images` training and `holdout` validation scenes, plus
    ``classes.txt`` (names of mask values 1..K, which ``make-shards --task segmentation`` picks up);
    returns a summary. Every scene has its own generator seeded by ``(seed, split, index)``."""
    _check_classes(classes)
    if images < 1 or size < 32 or holdout < 0:
        raise ValueError(f"need --images >= 1, --size >= 32 and --holdout >= 0; got {images}, {size}, "
                         f"{holdout}")
    for split, count in enumerate((images, holdout)):
        for kind in ("images", "annotations"):
            if count:
                storage.makedirs(storage.join(out_dir, kind, SEG_SPLITS[split]), storage_cfg)
    _pipe(storage.join(out_dir, CLASSES_FILE), "".join(f"{class_name(c)}\n" for c in range(classes)).encode(),
          storage_cfg)
    chunk = 32
    jobs = [(out_dir, split, start, min(chunk, count - start), classes, size, seed, storage_cfg)
            for split, count in enumerate((images, holdout)) for start in range(0, count, chunk)]
    total = _run(_write_scenes, jobs, workers)
    return {"root": out_dir, "classes": classes, "images": total - holdout, "validation": holdout}
