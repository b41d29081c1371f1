"""One image rule set for every path: training (shards and cc_sbu_align), chat, curation's describe and
filter. EXIF orientation is applied, 16-bit grayscale is scaled (not clipped) to 8 bits, transparency is
composited on white, and a decompression bomb is `too_large`."""

from __future__ import annotations

import io
import os
import struct
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from mgpt4.data import DataConfig, SourceConfig, build_loader
from mgpt4.data.transforms import CLIP_MEAN, CLIP_STD, ImageError, ImageTransform, normalize_uint8
from mgpt4.images import eval_transform
from tests.data_fixtures import tiny_tokenizer, write_tar

S = 32  # the model's image size in these tests


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def _scene(width: int, height: int) -> np.ndarray:
    """An asymmetric RGB picture (a rotation or flip of it is a different picture)."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), np.full_like(x, 60)], axis=-1)
    rgb[: height // 4, : width // 3] = (250, 250, 20)  # a block in the top-left corner
    return rgb.astype(np.uint8)


def exif_rotated_jpeg() -> tuple[bytes, np.ndarray]:
    """A phone photo: pixels stored landscape, EXIF orientation 6 (rotate 90° clockwise to view).
    Returns (file, the upright pixels as PIL's exif_transpose shows them)."""
    img = Image.fromarray(_scene(48, 30))
    exif = img.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, exif=exif)
    data = buf.getvalue()
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert upright.shape == (48, 30, 3)
    return data, upright


def gray16_png() -> tuple[bytes, np.ndarray]:
    """A 16-bit grayscale PNG (scanners, medical and astronomy images); 8-bit value = round(v / 257)."""
    y, x = np.mgrid[0:30, 0:40]
    levels = ((x * 40 + y) * 54).astype(np.uint16)  # 0 .. 65,000
    data = _png(Image.fromarray(levels))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    gray = np.round(levels / 257.0).astype(np.uint8)
    return data, np.repeat(gray[..., None], 3, axis=-1)


def _on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255
    return np.round(rgb * a + 255 * (1 - a)).astype(np.uint8)


def transparent_images() -> dict[str, tuple[bytes, np.ndarray]]:
    """Images whose transparent parts hold black (or any) colour; on white, as a viewer shows them."""
    rgb = _scene(40, 30)
    alpha = np.zeros((30, 40), np.uint8)
    alpha[:, 20:] = 255
    alpha[10:20, :] = 128
    out = {"rgba": (_png(Image.fromarray(np.dstack([rgb, alpha]))), _on_white(rgb, alpha))}
    gray = rgb[..., 0]
    out["la"] = (
        _png(Image.fromarray(np.dstack([gray, alpha]), "LA")),
        _on_white(np.dstack([gray] * 3), alpha),
    )
    pal = Image.new("P", (40, 30), 0)
    pal.putpalette([0, 0, 0, 200, 30, 30])
    pal.paste(1, (20, 0, 40, 30))
    expected = np.full((30, 40, 3), 255, np.uint8)
    expected[:, 20:] = (200, 30, 30)
    out["palette"] = (_png(pal, transparency=0), expected)
    buf = io.BytesIO()
    pal.save(buf, "GIF", transparency=0)
    out["gif"] = (buf.getvalue(), expected)
    key = Image.fromarray(np.where(alpha[..., None] == 255, rgb, 0).astype(np.uint8))
    expected_key = np.where(alpha[..., None] == 255, rgb, 255).astype(np.uint8)
    out["rgb-colour-key"] = (_png(key, transparency=(0, 0, 0)), expected_key)
    return out


CASES = {"exif-rotated-jpeg": exif_rotated_jpeg, "16-bit-png": gray16_png}
CASES.update({name: (lambda n=name: transparent_images()[n]) for name in transparent_images()})


def _decoded_by_training(data: bytes) -> np.ndarray:
    return ImageTransform(S, train=False).decode(data)


@pytest.mark.parametrize("case", list(CASES))
def test_training_decodes_by_the_rules(case):
    data, expected = CASES[case]()
    got = _decoded_by_training(data)
    assert got.shape == expected.shape and got.dtype == np.uint8
    assert np.abs(got.astype(int) - expected).max() <= 1, case


@pytest.mark.parametrize("case", list(CASES))
def test_chat_and_curation_decode_by_the_rules(case, tmp_path):
    from mgpt4.chat.session import load_image
    from mgpt4.curate.images import decode_rgb

    data, expected = CASES[case]()
    path = tmp_path / "upload.img"
    path.write_bytes(data)
    for got in (np.asarray(load_image(path)), np.asarray(decode_rgb(data))):
        assert got.shape == expected.shape
        assert np.abs(got.astype(int) - expected).max() <= 1, case


class _Capture:
    """Stands in for the model in a chat session: keeps the pixels it is asked to encode."""

    tokenizer = object()
    cfg = SimpleNamespace(vision=SimpleNamespace(image_size=S))
    visual_encoder = torch.nn.Linear(1, 1)

    def encode_img(self, pixels: torch.Tensor) -> torch.Tensor:
        self.pixels = pixels
        return pixels

    def new_conversation(self):
        from mgpt4.model.prompts import Conversation

        return Conversation()


def _levels(normalised: torch.Tensor) -> torch.Tensor:
    """CLIP-normalised pixels back to 0-255 levels."""
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(CLIP_STD).view(3, 1, 1) * 255
    return normalised * std + mean


@pytest.mark.parametrize("case", ["exif-rotated-jpeg", "16-bit-png"])
def test_the_same_file_gives_the_same_tensor_on_every_path(case, tmp_path):
    """Chat (and the demo, which uses its session), describe, filter's cc_sbu_align copy read by stage-2
    training, and stage-1 shards: the same pixels, upright, at the model's input."""
    from mgpt4.chat.session import ChatSession
    from mgpt4.curate.images import write_jpeg
    from mgpt4.image_sources import EvalImages, list_images

    data, upright = CASES[case]()
    folder = tmp_path / "photos"
    folder.mkdir()
    name = "photo.jpg" if case.endswith("jpeg") else "scan.png"
    (folder / name).write_bytes(data)

    fake = _Capture()
    ChatSession(fake).set_image(folder / name)
    chat = fake.pixels[0]
    # The right pixels, not just the same ones: the upright 8-bit picture through the eval transform.
    reference = eval_transform(Image.fromarray(upright), S)
    assert (_levels(chat) - _levels(reference)).abs().max() <= 1.01

    [item] = list_images([str(folder)])
    _, described, error = EvalImages([item], S)[0]
    assert error is None
    assert torch.equal(described, chat)  # the same function, exactly

    # Stage 1: the file as a shard member, eval transform (a resize of the whole image).
    shard = write_tar(str(tmp_path / "s.tar"), [("k", {name.rsplit(".")[1]: data, "txt": b"a photo"})])
    cfg = DataConfig(
        sources=[SourceConfig(shards=[shard, shard])], batch_size=1, num_workers=0, image_size=S,
        transform="eval", shuffle_buffer=1,
    )  # fmt: skip
    trained = normalize_uint8(next(iter(build_loader(cfg, tiny_tokenizer(), 8, "\n")))["image"])[0]
    # torch's antialiased bicubic resize against PIL's: at most one level apart.
    assert (_levels(trained) - _levels(chat)).abs().max() <= 1.01

    # Stage 2: filter writes the cc_sbu_align image; training reads that file.
    align = tmp_path / "cc_sbu_align"
    (align / "image").mkdir(parents=True)
    write_jpeg(data, str(align / "image" / "0.jpg"), str(folder / name))
    (align / "filter_cap.json").write_text('{"annotations": [{"image_id": "0", "caption": "a photo"}]}')
    written = Image.open(align / "image" / "0.jpg")
    assert written.format == "JPEG" and written.size == (upright.shape[1], upright.shape[0])
    assert written.getexif().get(0x0112, 1) == 1  # stored upright: any reader sees what describe saw
    cfg = DataConfig(
        kind="align", align_root=str(align), batch_size=1, num_workers=0, image_size=S, transform="eval"
    )
    stage2 = normalize_uint8(next(iter(build_loader(cfg, tiny_tokenizer(), 8, "###")))["image"])[0]
    diff = (_levels(stage2) - _levels(chat)).abs()
    assert diff.mean() < 1.5 and diff.max() < 12  # a JPEG re-encode at quality 95, not another picture


def test_filter_links_a_jpeg_that_needs_no_rotation(tmp_path):
    from mgpt4.curate.images import write_jpeg

    img = Image.fromarray(_scene(40, 30))
    src = tmp_path / "plain.jpg"
    img.save(src, "JPEG", quality=90)
    dst = tmp_path / "0.jpg"
    write_jpeg(src.read_bytes(), str(dst), str(src))
    assert os.stat(dst).st_ino == os.stat(src).st_ino


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height 8-bit gray pixels (its header is all a decoder reads first)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def _jpeg_declaring(width: int, height: int) -> bytes:
    """A small JPEG whose frame header is rewritten to declare width x height."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (9, 9, 9)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize("make", [_png_header, _jpeg_declaring], ids=["png", "jpeg"])
def test_a_196_megapixel_image_is_too_large_not_corrupt(make):
    data = make(14_000, 14_000)
    out = torch.empty(3, S, S, dtype=torch.uint8)
    for train in (True, False):
        with pytest.raises(ImageError) as e:
            ImageTransform(S, train=train)(data, np.full(22, 0.5), out)
        assert e.value.reason == "too_large", e.value
        assert "pixel limit" in str(e.value)
