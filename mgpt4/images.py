"""Image files -> the RGB pixels the model sees, and the official eval transform; one module for
training data, chat, the web demo and curation, so the same file gives the same pixels everywhere.

The rules, applied by `to_rgb` (and so by `decode_rgb` and `eval_transform`):
- **EXIF orientation is applied**: a phone photo stored sideways with an orientation tag is turned
  upright, as every image viewer, the web demo's upload and the person writing its caption see it. The
  official training pipeline ignores the tag (PIL's `open().convert("RGB")`) while its Gradio demo
  applies it; mgpt4 applies it in both, so that training and inference see the same picture.
- **16-bit grayscale** (PNG and TIFF scans) is scaled to 8 bits, value / 257 rounded, instead of
  clipped at 255 (which turns it white).
- **Transparency** (an alpha channel, a transparent palette entry or colour key) is composited on
  white, as a viewer shows it, instead of dropped (which shows what the transparent pixels happen to
  hold, usually black).
- Images above `MAX_PIXELS` are `too_large` (decompression bombs), told apart from damaged files.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
import torch
from PIL import Image

# CLIP's normalisation, which EVA-CLIP and BLIP-2 were trained with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# PIL refuses images above twice its MAX_IMAGE_PIXELS (decompression bombs); use the same bound.
MAX_PIXELS = 2 * 89_478_485

_ORIENTATION = 0x0112
# EXIF orientation -> the transpose that shows the image upright (the EXIF 2.3 table, as PIL's
# ImageOps.exif_transpose applies it).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
_EXIF_MARK = b"Exif\x00\x00"


class ImageError(ValueError):
    """An image cannot be used; `reason` is the skip counter it goes to: `corrupt_image`,
    `truncated_image` or `too_large`."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _pil_error(e: Exception) -> str:
    """`Type: message` of a PIL error, without the in-memory file's repr that PIL puts in it
    ("cannot identify image file <_io.BytesIO object at 0x...>"): noise in a skip line."""
    return f"{type(e).__name__}: {_BYTES_IO.sub('', str(e))}"


_BYTES_IO = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def _damage(e: Exception) -> ImageError:
    reason = "truncated_image" if "truncated" in str(e).lower() else "corrupt_image"
    return ImageError(reason, _pil_error(e))


def orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8) that `to_rgb` applies; 1 when there is none or it cannot be read."""
    try:
        value = img.getexif().get(_ORIENTATION, 1)
    except Exception:  # a damaged EXIF block: the pixels are still the picture, as stored
        return 1
    return value if value in _UPRIGHT else 1


def _has_exif_segment(data: bytes) -> bool:
    """Whether JPEG bytes hold an EXIF (APP1) segment before the image data, where PIL looks for one.

    Walks the segment headers (about 3 us for a typical JPEG; searching the bytes takes 4x longer).
    """
    pos, end = 2, len(data)
    while pos + 10 <= end:
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # a fill byte before a marker
            pos += 1
            continue
        if marker == 0xE1 and data[pos + 4 : pos + 10] == _EXIF_MARK:
            return True
        if marker == 0xDA:  # start of scan: the headers are over
            return False
        pos += 2 + (data[pos + 2] << 8 | data[pos + 3])
    return False


def jpeg_orientation(data: bytes) -> int:
    """`orientation` of JPEG bytes, from the header only. JPEGs without an EXIF segment (what
    img2dataset writes) are answered without opening them, so the fast decoder stays fast."""
    if not _has_exif_segment(data):
        return 1
    try:
        with Image.open(io.BytesIO(data)) as img:
            return orientation(img)
    except Exception:
        return 1


def _to_eight_bits(img: Image.Image) -> Image.Image:
    """16-bit (or 32-bit integer) grayscale -> L, value / 257 rounded; a colour key becomes alpha (LA)."""
    levels = np.asarray(img, dtype=np.int64)
    gray = Image.fromarray(((np.clip(levels, 0, 65535) + 128) // 257).astype(np.uint8), "L")
    key = img.info.get("transparency")
    if isinstance(key, int):
        gray.putalpha(Image.fromarray(np.where(levels == key, 0, 255).astype(np.uint8), "L"))
    return gray


def to_rgb(img: Image.Image) -> Image.Image:
    """An opened image -> RGB by the module's rules (EXIF upright, 16-bit scaled, transparency on white).

    Decodes the pixels; PIL's errors (OSError for damaged or truncated data) pass through.
    """
    method = _UPRIGHT.get(orientation(img))
    if img.mode in _SIXTEEN_BIT:
        img = _to_eight_bits(img)
    if img.mode in _ALPHA or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    rgb = img.convert("RGB")
    if method is not None:
        rgb = rgb.transpose(method)
    # Copied metadata would make a second pass turn or composite the pixels again.
    rgb.info = {}
    return rgb


def open_image(data: bytes) -> Image.Image:
    """Open image bytes (the header only); ImageError `too_large` above MAX_PIXELS, `corrupt_image` when
    no image format recognises them."""
    try:
        with warnings.catch_warnings():
            # Between PIL's warning and error bounds an image is still accepted (MAX_PIXELS is the error).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageError("too_large", f"above the {MAX_PIXELS} pixel limit: {e}") from None
    except Exception as e:
        # Without a readable header there is no image to speak of, cut short or not.
        raise ImageError("corrupt_image", _pil_error(e)) from None
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise ImageError("too_large", f"{w}x{h} pixels is above the {MAX_PIXELS} pixel limit")
    return img


def display_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of the image as `to_rgb` shows it (EXIF orientations 5-8 swap the sides)."""
    w, h = img.size
    return (h, w) if orientation(img) >= 5 else (w, h)


def decode_rgb(data: bytes, reduce: int = 1) -> Image.Image:
    """Image bytes -> RGB PIL image by the module's rules, fully decoded; ImageError with a reason.

    `reduce` > 1 lets a JPEG decode at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, the largest that
    keeps each side at least size / reduce); other formats decode at full size.
    """
    img = open_image(data)
    try:
        if reduce > 1 and img.format == "JPEG":
            img.draft("RGB", (img.size[0] // reduce, img.size[1] // reduce))
        return to_rgb(img)
    except Exception as e:
        raise _damage(e) from None


def eval_transform(img: Image.Image, size: int) -> torch.Tensor:
    """The official eval transform: bicubic resize to size x size, to [0, 1], CLIP normalisation -> [3,S,S].

    The image is first made RGB by the module's rules (`to_rgb`), so a PIL image straight from
    `Image.open` gives the same tensor as one from `decode_rgb`.
    """
    img = to_rgb(img).resize((size, size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1).div_(255)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std
