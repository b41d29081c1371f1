"""Image decoding and the official train/eval transforms, producing uint8 [3, S, S] in the worker.

The official pipeline decodes the full JPEG with PIL, crops with torchvision's RandomResizedCrop and
resizes with PIL bicubic. Here the crop box is drawn with the same distribution in original-image
coordinates, the JPEG is decoded by libjpeg-turbo at 1/2, 1/4 or 1/8 scale when the scaled crop is
still at least the output size (a DCT-domain downscale, so no extra aliasing), the box is mapped into
the decoded image, and torch's uint8 antialiased bicubic resize (PIL's kernel, a = -0.5) makes the
output. Normalisation happens on the device (see feeder.py).

Pixels follow mgpt4.images' rules (EXIF orientation, 16-bit, transparency on white). libjpeg-turbo's
RGB decode gives exactly PIL's pixels for the JPEGs it takes (8-bit YCbCr, gray or RGB) when they carry
no EXIF rotation; every other image goes through `mgpt4.images.decode_rgb`.
"""

from __future__ import annotations

import functools
import math
import re
import zlib
from collections.abc import Sequence

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F

from mgpt4.data.streams import Stream, stream_rng
from mgpt4.images import (
    CLIP_MEAN,
    CLIP_STD,
    MAX_PIXELS,
    ImageError,
    decode_rgb,
    display_size,
    jpeg_orientation,
    open_image,
)

# RandomResizedCrop makes up to 10 attempts of 2 uniforms each, then 2 for the position.
CROP_UNIFORMS = 22
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)

_DCT_SCALES = (8, 4, 2)
# The JPEG colour spaces libjpeg-turbo turns into RGB exactly as PIL does.
_TURBO_COLORSPACES = ("YCbCr", "Gray", "RGB")


def crop_box(
    height: int,
    width: int,
    u: Sequence[float],
    scale: Sequence[float] = (0.5, 1.0),
    ratio: Sequence[float] = CROP_RATIO,
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, h, w), drawn from the uniforms `u` (CROP_UNIFORMS of them).

    Same distribution as torchvision: area fraction uniform in `scale`, log aspect ratio uniform,
    10 attempts, then a centre crop clamped to `ratio`.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for attempt in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[2 * attempt])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[2 * attempt + 1])
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u[20] * (height - h + 1)), height - h)
            left = min(int(u[21] * (width - w + 1)), width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = round(w / min(ratio))
    elif in_ratio > max(ratio):
        h = height
        w = round(h * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_crop_uniforms(seed: int, shard: str, key: str) -> np.ndarray:
    """The CROP_UNIFORMS of a sample drawn from its shard's file name and its key (`data.crops: sample`):
    the same crop whenever and wherever the sample is read, in training or in feature extraction."""
    rng = stream_rng(
        Stream.SAMPLE_CROP, seed=seed, shard_crc=zlib.crc32(shard.encode()), key_crc=zlib.crc32(key.encode())
    )
    return rng.random(CROP_UNIFORMS)


def dct_factor(box_h: int, box_w: int, size: int, margin: float = 1.0) -> int:
    """The largest JPEG DCT downscale (8, 4, 2 or 1) that keeps the box at least `margin * size` on
    both sides, so the final resize still only shrinks (or keeps) the decoded crop."""
    for k in _DCT_SCALES:
        if box_h >= k * size * margin and box_w >= k * size * margin:
            return k
    return 1


def _scaled_box(
    top: int, left: int, h: int, w: int, k: int, dec_h: int, dec_w: int
) -> tuple[int, int, int, int]:
    """Map a box in original pixels onto an image decoded at 1/k (pixel x there covers [k x, k x + k))."""
    if k == 1:
        return top, left, top + h, left + w
    r0, c0 = round(top / k), round(left / k)
    r1 = min(max(round((top + h) / k), r0 + 1), dec_h)
    c1 = min(max(round((left + w) / k), c0 + 1), dec_w)
    return r0, c0, r1, c1


def _image_size(data: bytes) -> tuple[int, int, bool]:
    """(height, width, libjpeg-turbo decodes it) read from the header only; the size is the image's as
    shown, after its EXIF orientation."""
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        pass
    else:
        if colorspace in _TURBO_COLORSPACES and jpeg_orientation(data) == 1:
            return h, w, True
    w, h = display_size(open_image(data))
    return h, w, False


class ImageTransform:
    """Bytes -> uint8 [3, S, S] written into a caller's tensor; train (random crop) or eval (resize)."""

    def __init__(
        self,
        size: int,
        train: bool = True,
        scale: Sequence[float] = (0.5, 1.0),
        fast: bool = False,
        dct_margin: float = 1.0,
    ):
        self.size = size
        self.train = train
        self.scale = (float(scale[0]), float(scale[1]))
        self.fast = fast
        self.dct_margin = dct_margin

    def __call__(self, data: bytes, u: Sequence[float] | None, out: torch.Tensor) -> None:
        """Decode `data`, crop (train: the box drawn from uniforms `u`) and resize into `out` [3, S, S]."""
        if not data:
            raise ImageError("corrupt_image", "empty image file")
        height, width, turbo = _image_size(data)
        if height * width > MAX_PIXELS:
            raise ImageError("too_large", f"{width}x{height} pixels is above the {MAX_PIXELS} pixel limit")
        if self.train:
            if u is None:
                raise ValueError("the train transform needs the crop uniforms")
            box = crop_box(height, width, u, self.scale)
        else:
            box = (0, 0, height, width)
        self.render(data, box, out, (height, width, turbo))

    def render(
        self,
        data: bytes,
        box: tuple[int, int, int, int],
        out: torch.Tensor,
        header: tuple[int, int, bool] | None = None,
    ) -> None:
        """Resize the box (top, left, h, w) of the image in original pixels into `out`."""
        header = header or _image_size(data)
        height = header[0]
        top, left, h, w = box
        k = dct_factor(h, w, self.size, self.dct_margin)
        pixels = self.decode(data, k, header)
        dec_h, dec_w = pixels.shape[:2]
        k_eff = max(1, round(height / dec_h))
        r0, c0, r1, c1 = _scaled_box(top, left, h, w, k_eff, dec_h, dec_w)
        # A channels-last contiguous crop takes torch's vectorised uint8 resampler (about 2x faster).
        x = torch.from_numpy(pixels).permute(2, 0, 1)[None, :, r0:r1, c0:c1]
        x = x.contiguous(memory_format=torch.channels_last)
        y = F.interpolate(x, size=(self.size, self.size), mode="bicubic", antialias=True)
        out.copy_(y[0])

    def decode(self, data: bytes, k: int = 1, header: tuple[int, int, bool] | None = None) -> np.ndarray:
        """Image bytes -> writable uint8 [H, W, 3] RGB by mgpt4.images' rules; a JPEG at 1/k scale
        (k = 1, 2, 4 or 8; each side rounded up). Raises ImageError with the skip reason."""
        height, width, turbo = header or _image_size(data)
        if turbo:
            try:
                return simplejpeg.decode_jpeg(
                    data,
                    colorspace="RGB",
                    fastdct=self.fast,
                    fastupsample=self.fast,
                    min_height=-(-height // k) if k > 1 else 0,
                    min_width=-(-width // k) if k > 1 else 0,
                )
            except ValueError as e:
                if "premature end" in str(e).lower():
                    raise ImageError("truncated_image", str(e)) from e
                # Recoverable damage: PIL decodes what it can, as the official pipeline does.
        return np.array(decode_rgb(data, k))  # writable, for torch.from_numpy


def image_transform(cfg) -> ImageTransform:
    """The transform a DataConfig asks for."""
    return ImageTransform(
        cfg.image_size, cfg.transform == "train", cfg.crop_scale, cfg.fast_decode, cfg.dct_margin
    )


_CLEAN_PUNCT = re.compile(r"([.!\"()*#:;~])")
_MULTI_SPACE = re.compile(r"\s{2,}")


def clean_caption(caption: str, max_words: int = 50) -> str:
    """The official stage-1 caption cleaning (BLIP's pre_caption)."""
    caption = _CLEAN_PUNCT.sub(" ", caption.lower())
    caption = _MULTI_SPACE.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def caption_char_limit(tokenizer, max_txt_len: int) -> int:
    """How many characters of a caption are kept for its first `max_txt_len` tokens: 2 x max_txt_len x
    the longest vocabulary piece, in characters.

    Why that is safe: a token stands for at most as many characters of the text as its piece is long
    (SentencePiece's '▁' is the one space it stands for, a byte-fallback piece such as '<0xE2>' for
    less than one character, a byte-level BPE piece for one byte per character), so the first L tokens
    lie within the first L x P characters, and the cut leaves at least L x P more (at least L more
    tokens) after them, far beyond the reach of the merges next to the cut. `cut_caption` checks the
    L spare tokens are there, for tokenizers whose normalizer drops characters (runs of spaces).
    """
    vocab = tokenizer.get_vocab()
    return 2 * max(1, max_txt_len) * max((len(piece) for piece in vocab), default=1)


def cut_caption(caption: str, limit: int, tokenizer, max_txt_len: int) -> str:
    """`caption` cut to `limit` characters (`caption_char_limit`) before it is tokenized: a 1.5 MB alt
    text would otherwise cost a whole tokenization to keep max_txt_len tokens. Its first max_txt_len
    tokens are those of the whole caption; a cut that leaves fewer than 2 x max_txt_len tokens (a
    normalizer dropped characters) is not made and the caption is kept whole."""
    if len(caption) <= limit:
        return caption
    head = caption[:limit]
    if len(tokenizer(head, add_special_tokens=False)["input_ids"]) >= 2 * max_txt_len:
        return head
    return caption


@functools.lru_cache(maxsize=8)
def _clip_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per device: building them per batch would be a synchronous host-to-device copy.
    mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1) * 255.0
    inv_std = 1.0 / (torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1) * 255.0)
    return mean, inv_std


def normalize_uint8(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> CLIP-normalised `dtype`, contiguous, computed in fp32 on the images' device.

    Equal to the official ToTensor + Normalize: (x / 255 - mean) / std = (x - 255 mean) / (255 std).
    """
    mean, inv_std = _clip_constants(images.device)
    x = images.to(dtype=torch.float32, memory_format=torch.contiguous_format)
    x.sub_(mean).mul_(inv_std)
    return x if dtype == torch.float32 else x.to(dtype)
