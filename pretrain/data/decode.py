"""Image bytes -> RGB PIL image, the same way for shard building, training, evaluation and inspection.

Web-scale sets (ImageNet-22k included) hold grayscale, CMYK, palette and alpha images, 16-bit PNGs and
photos whose pixels are stored sideways with an EXIF orientation tag. Every consumer must see the same
upright RGB picture, so all decoding goes through :func:`decode_rgb`. Failures raise
:class:`UndecodableImage` with a short ``reason`` so callers can count skips by cause instead of
catching PIL's grab-bag of exception types.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

REASON_EMPTY = "empty"
REASON_NOT_IMAGE = "not_an_image"
REASON_CORRUPT = "corrupt_image"
REASON_TOO_LARGE = "too_large"

_ALPHA_MODES = ("RGBA", "LA", "PA", "P", "RGBa", "La")


class UndecodableImage(ValueError):
    """The bytes are not a decodable image; ``reason`` is one of the REASON_* constants."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def open_image(data: bytes) -> Image.Image:
    """Open and fully decode `data` (so truncation is caught here), without converting its mode."""
    if not data:
        raise UndecodableImage(REASON_EMPTY, "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on odd EXIF / palette transparency; not errors
            image = Image.open(io.BytesIO(data))
            image.load()
    except UnidentifiedImageError as exc:
        raise UndecodableImage(REASON_NOT_IMAGE, str(exc)) from None
    except Image.DecompressionBombError as exc:
        raise UndecodableImage(REASON_TOO_LARGE, str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        raise UndecodableImage(REASON_CORRUPT, f"{type(exc).__name__}: {exc}") from None
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright RGB: EXIF orientation applied, alpha composited on white, 16-bit scaled to 8-bit."""
    try:
        ImageOps.exif_transpose(image, in_place=True)  # not a copy of every upright image
    except Exception:  # a malformed EXIF block must not cost us the pixels; keep them as stored
        pass
    if image.mode == "RGB":
        return image
    if image.mode in _ALPHA_MODES:  # palette images may carry transparency; compositing is harmless
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I") or image.mode == "F":
        # PIL's own I;16 -> L conversion clips instead of scaling, turning most 16-bit photos white.
        pixels = np.asarray(image, dtype=np.float64)
        scale = 257.0 if image.mode.startswith("I;16") or pixels.max(initial=0) > 255 else 1.0
        gray = np.clip(np.rint(pixels / scale), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    return image.convert("RGB")


def decode_rgb(data: bytes) -> Image.Image:
    """Decode image bytes to an upright 8-bit RGB image; raises :class:`UndecodableImage`."""
    image = open_image(data)
    try:
        return to_rgb(image)
    except (OSError, ValueError) as exc:
        raise UndecodableImage(REASON_CORRUPT, f"{type(exc).__name__}: {exc}") from None
