"""Small data made on the fly for the data tests: JPEGs, tars, one cached tiny tokenizer."""

from __future__ import annotations

import functools
import gzip
import io
import json
import os
import tarfile
import tempfile

import numpy as np

from mgpt4.data.synthetic import Scene, draw

WORDS = (
    "a large small red green blue yellow orange purple pink brown white black gray cyan circle square "
    "triangle bar on and background the image shows picture there is at of top bottom left right center"
)


@functools.cache
def tiny_tokenizer():
    """One tiny LLaMA-style tokenizer for the whole test session (training it takes about a second)."""
    from mgpt4.tokenizer import train_tiny_tokenizer

    texts = [WORDS] * 20 + [f"sample number {i} of shard {i % 7}" for i in range(200)]
    return train_tiny_tokenizer(texts, tempfile.mkdtemp(prefix="mgpt4-test-tok-"))


def jpeg(width: int, height: int, seed: int = 0, quality: int = 90, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    scene = Scene(background=("blue", "yellow"), shapes=[("large", "red", "circle", "center")])
    img = draw(scene, width, height, rng, noise=3.0)
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@functools.cache
def _tiny_jpeg(seed: int) -> bytes:
    return jpeg(40, 32, seed)


def sample_files(key: str, caption: str | None = "a red circle", seed: int = 0) -> dict[str, bytes]:
    """The three files img2dataset writes for one sample."""
    files = {"jpg": _tiny_jpeg(seed % 4)}
    if caption is not None:
        files["txt"] = caption.encode()
        files["json"] = json.dumps({"key": key, "caption": caption}).encode()
    return files


def write_tar(path: str, samples: list[tuple[str, dict[str, bytes]]]) -> str:
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def numbered_shards(folder: str, shards: int, per_shard: int, prefix: str = "") -> list[str]:
    """Shards whose captions name the sample: 'sample number N of shard S'."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for s in range(shards):
        samples = [
            (f"{s:05d}{i:04d}", sample_files(f"{s:05d}{i:04d}", f"sample number {i} of shard {s}", seed=i))
            for i in range(per_shard)
        ]
        paths.append(write_tar(os.path.join(folder, f"{prefix}{s:05d}.tar"), samples))
    return paths


def bad_shard(path: str) -> str:
    """8 good samples with one of each kind of damage between them (none after the last good one)."""
    good = _tiny_jpeg(0)
    big = jpeg(120, 100, seed=1)  # big enough that a cut lands in the scan data, after the headers
    bad = [
        ("corrupt", {"jpg": b"\xff\xd8\xff\xe0 not really a jpeg" * 20, "txt": b"corrupt"}),
        ("truncated", {"jpg": big[: len(big) * 7 // 10], "txt": b"truncated"}),
        ("nocaption", {"jpg": good}),
        ("badjson", {"jpg": good, "json": b"{not json"}),
        ("noimage", {"txt": b"caption without an image"}),
    ]
    samples = []
    for i in range(8):
        samples.append((f"good{i}", sample_files(f"good{i}", f"sample number {i}")))
        if i < len(bad):
            samples.append(bad[i])
    return write_tar(path, samples)


def make_align(root, count: int) -> str:
    os.makedirs(os.path.join(root, "image"), exist_ok=True)
    anns = []
    for i in range(count):
        with open(os.path.join(root, "image", f"{i}.jpg"), "wb") as f:
            f.write(_tiny_jpeg(i % 4))
        anns.append({"image_id": str(i), "caption": f"Sample number {i}. It shows a red circle!"})
    with open(os.path.join(root, "filter_cap.json"), "w") as f:
        json.dump({"annotations": anns}, f)
    return str(root)


# What a failed download leaves under a shard's name: an object store's error body.
HTTP_ERROR_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code><Message>Access Denied'
    b"</Message><RequestId>4442587FB7D0A2F9</RequestId><HostId>" + b"x" * 3000 + b"</HostId></Error>\n"
)


def gzip_bytes(data: bytes) -> bytes:
    """`data` as a gzip file (as `tar czf` or `gzip shard.tar` writes it); no time stamp, reproducible."""
    return gzip.compress(data, mtime=0)


def flipped(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    """`data` with the byte at `offset` XOR `mask`."""
    out = bytearray(data)
    out[offset] ^= mask
    return bytes(out)


def member_spans(path: str) -> list[tuple[str, int, int, int]]:
    """(key, header start, data start, data end) of each member of an uncompressed tar, read by tarfile."""
    with tarfile.open(path) as tar:
        return [(m.name.rsplit(".", 1)[0], m.offset, m.offset_data, m.offset_data + m.size) for m in tar]
