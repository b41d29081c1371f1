"""Safe image intake for the server: an `image_url` part -> an RGB PIL image, or ApiError 400 saying why.

Accepted by default: `data:` URLs (base64). Local files only under the `--allow-path` roots (an
absolute path or a `file://` URL; symlinks are resolved before the check, so a link cannot lead out
of a root). Remote `http(s)` URLs only with `--allow-remote-images`: the server never fetches an
arbitrary URL unless the operator says so. Every image is held to a size in bytes and a number of
pixels, the latter read from the header before any pixel is decoded (a decompression bomb stops there).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import warnings
from dataclasses import dataclass, field
from urllib.parse import unquote, urlparse

from PIL import Image

from mgpt4.images import to_rgb
from mgpt4.serve.protocol import ApiError


@dataclass(frozen=True)
class ImagePolicy:
    """Where images may come from, and how large they may be."""

    # 20 MB holds any camera photo; 40 megapixels is above phone cameras (the chat's limits too).
    max_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    allow_paths: tuple[str, ...] = field(default_factory=tuple)  # real paths of the allowed roots
    allow_remote: bool = False
    remote_timeout_s: float = 10.0


def _refuse(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code="invalid_image")


def read_image(url: str, policy: ImagePolicy, param: str) -> Image.Image:
    """The image an `image_url.url` names, checked against `policy`; `param` names the request field."""
    scheme = url.split(":", 1)[0].lower() if ":" in url[:12] else ""
    if scheme == "data":
        data = _data_url(url, policy, param)
    elif scheme in ("http", "https"):
        if not policy.allow_remote:
            raise _refuse(
                param,
                "remote image URLs are refused by this server (start it with --allow-remote-images to "
                "fetch them); send the image as a data: URL (base64)",
            )
        data = _fetch(url, policy, param)
    elif scheme == "file" or url.startswith("/"):
        data = _local(unquote(urlparse(url).path) if scheme == "file" else url, policy, param)
    else:
        raise _refuse(
            param, "expected a data: URL (base64), an absolute file path or file:// URL, or http(s)"
        )
    return decode(data, policy, param)


def _data_url(url: str, policy: ImagePolicy, param: str) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.lower().endswith(";base64"):
        raise _refuse(param, "a data: URL must be base64 (data:image/png;base64,...)")
    # base64 is 4 characters per 3 bytes: the size is known before decoding.
    if len(payload) * 3 // 4 > policy.max_bytes:
        raise _refuse(param, f"the image is over {policy.max_bytes / 2**20:.1f} MB")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _refuse(param, "the data: URL is not valid base64") from None


def _local(path: str, policy: ImagePolicy, param: str) -> bytes:
    if not policy.allow_paths:
        raise _refuse(param, "local image paths are refused by this server (start it with --allow-path DIR)")
    real = os.path.realpath(path)
    if not any(os.path.commonpath([real, root]) == root for root in policy.allow_paths):
        raise _refuse(param, f"{path} is outside the allowed folders (--allow-path)")
    try:
        size = os.path.getsize(real)
        if size > policy.max_bytes:
            raise _refuse(param, f"the image is over {policy.max_bytes / 2**20:.1f} MB")
        with open(real, "rb") as f:
            return f.read(policy.max_bytes + 1)
    except OSError as e:
        raise _refuse(param, f"{path}: cannot read the file ({e.strerror or e})") from None


def _fetch(url: str, policy: ImagePolicy, param: str) -> bytes:
    import httpx

    try:
        with httpx.stream("GET", url, timeout=policy.remote_timeout_s, follow_redirects=True) as r:
            if r.status_code != 200:
                raise _refuse(param, f"fetching the image gave HTTP {r.status_code}")
            data = bytearray()
            for piece in r.iter_bytes():
                data += piece
                if len(data) > policy.max_bytes:
                    raise _refuse(param, f"the image is over {policy.max_bytes / 2**20:.1f} MB")
            return bytes(data)
    except httpx.HTTPError as e:
        raise _refuse(param, f"cannot fetch the image ({type(e).__name__}: {e})") from None


def decode(data: bytes, policy: ImagePolicy, param: str) -> Image.Image:
    """Image bytes -> RGB by mgpt4's rules (EXIF upright, 16-bit scaled, transparency on white)."""
    if not data:
        raise _refuse(param, "the image is empty")
    if len(data) > policy.max_bytes:
        raise _refuse(param, f"the image is over {policy.max_bytes / 2**20:.1f} MB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise _refuse(param, "the image decodes to too many pixels") from None
    except Exception:
        raise _refuse(
            param, "not an image that can be read (PNG, JPEG, WebP, GIF, BMP and TIFF are)"
        ) from None
    w, h = img.size
    if w * h > policy.max_pixels:
        raise _refuse(
            param,
            f"the image is {w}x{h} pixels; images up to {policy.max_pixels / 1e6:g} megapixels are accepted",
        )
    try:
        return to_rgb(img)
    except Exception as e:
        raise _refuse(param, f"the image is damaged or truncated ({e})") from None
