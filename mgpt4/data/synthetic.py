"""Procedurally drawn image-caption data in the official formats, for demos, tests and benchmarks.

Each image is a colour gradient with a few shapes (circles, squares, triangles, bars) at named
positions, plus mild sensor-like noise so that JPEG sizes and decode costs resemble photographs
(about 1-3 bits per pixel) rather than flat cartoons. Captions say what is drawn: short alt-text style
for the stage-1 shards, several detailed sentences for the stage-2 cc_sbu_align folder.

    python -m mgpt4.data.synthetic --out DIR [--shards N --per-shard M --align K --min-size 500 --max-size 1000]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (210, 40, 40),
    "green": (50, 160, 60),
    "blue": (40, 80, 200),
    "yellow": (235, 210, 50),
    "orange": (240, 140, 30),
    "purple": (130, 60, 170),
    "pink": (240, 150, 190),
    "brown": (130, 85, 45),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "cyan": (60, 200, 210),
}
SHAPES = ("circle", "square", "triangle", "bar")
POSITIONS = {
    "top left": (0.2, 0.2),
    "top": (0.5, 0.2),
    "top right": (0.8, 0.2),
    "left": (0.2, 0.5),
    "center": (0.5, 0.5),
    "right": (0.8, 0.5),
    "bottom left": (0.2, 0.8),
    "bottom": (0.5, 0.8),
    "bottom right": (0.8, 0.8),
}
FORMAT_VERSION = 1
# Random streams of the held-out sets (the training sets use 1 and 2).
_VAL_SHARD_STREAM, _VAL_ALIGN_STREAM = 3, 4


@dataclass
class Scene:
    background: tuple[str, str]
    shapes: list[tuple[str, str, str, str]]  # (size word, colour, shape, position)


@dataclass
class SyntheticData:
    """Where `ensure_synthetic` put the data."""

    root: str
    shards: list[str]  # tar paths, img2dataset layout
    align_root: str  # cc_sbu_align layout: filter_cap.json + image/
    # Every training caption (held-out ones are not among them), e.g. to train a tiny tokenizer.
    captions: list[str] = field(default_factory=list)
    # Held-out data drawn apart from the training data (other random streams): one shard and one
    # cc_sbu_align folder of `val` samples each; empty when val is 0.
    val_shards: list[str] = field(default_factory=list)
    val_align_root: str | None = None


def _scene(rng: np.random.Generator, shapes: tuple[int, int] = (1, 3)) -> Scene:
    names = list(COLOURS)
    bg = tuple(str(c) for c in rng.choice(names, size=2, replace=False))
    n = int(rng.integers(shapes[0], shapes[1] + 1))
    positions = rng.choice(list(POSITIONS), size=n, replace=False)
    shapes = []
    for pos in positions:
        colour = str(rng.choice([c for c in names if c not in bg]))
        shapes.append((str(rng.choice(["small", "large"])), colour, str(rng.choice(SHAPES)), str(pos)))
    return Scene(background=bg, shapes=shapes)  # type: ignore[arg-type]


def draw(scene: Scene, width: int, height: int, rng: np.random.Generator, noise: float = 3.0) -> Image.Image:
    """Render a scene: vertical gradient, shapes, low-frequency shading and per-pixel noise."""
    top = np.array(COLOURS[scene.background[0]], dtype=np.float32)
    bottom = np.array(COLOURS[scene.background[1]], dtype=np.float32)
    t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    column = top * (1 - t) + bottom * t  # [H, 3]
    img = Image.fromarray(np.repeat(column[:, None, :], width, axis=1).astype(np.uint8))
    pen = ImageDraw.Draw(img)
    side = min(width, height)
    for size_word, colour, shape, pos in scene.shapes:
        cx, cy = POSITIONS[pos]
        cx, cy = cx * width, cy * height
        r = side * (0.17 if size_word == "large" else 0.08) * float(rng.uniform(0.85, 1.15))
        fill = COLOURS[colour]
        if shape == "circle":
            pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape == "square":
            pen.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape == "triangle":
            pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        else:
            pen.rectangle([cx - 1.6 * r, cy - 0.4 * r, cx + 1.6 * r, cy + 0.4 * r], fill=fill)
    # Shading from a coarse random field, upsampled: the smooth variation photographs have.
    coarse = rng.normal(0.0, 12.0, size=(max(2, height // 96), max(2, width // 96))).astype(np.float32)
    shade = np.asarray(Image.fromarray(coarse, mode="F").resize((width, height), Image.BILINEAR))
    pixels = np.asarray(img, dtype=np.float32) + shade[:, :, None]
    if noise > 0:
        pixels += rng.normal(0.0, noise, size=(height, width, 1)).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def short_caption(scene: Scene) -> str:
    things = [f"a {size} {colour} {shape}" for size, colour, shape, _ in scene.shapes]
    return f"{_join(things)} on a {scene.background[0]} and {scene.background[1]} background"


def detailed_caption(scene: Scene) -> str:
    count = len(scene.shapes)
    parts = [
        f"The image shows {count} simple shape{'s' if count > 1 else ''} on a smooth background that fades "
        f"from {scene.background[0]} at the top to {scene.background[1]} at the bottom."
    ]
    for size, colour, shape, pos in scene.shapes:
        where = "in the center" if pos == "center" else f"at the {pos}"
        parts.append(f"There is a {size} {colour} {shape} {where} of the picture.")
    parts.append(
        "The surfaces are slightly grainy, like a photograph taken in low light, and the edges are sharp."
    )
    return " ".join(parts)


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o444
    tar.addfile(info, io.BytesIO(data))


def _size(rng: np.random.Generator, min_size: int, max_size: int) -> tuple[int, int]:
    return int(rng.integers(min_size, max_size + 1)), int(rng.integers(min_size, max_size + 1))


def _quality(rng: np.random.Generator, quality: Sequence[int]) -> int:
    return int(rng.integers(quality[0], quality[-1] + 1))


def write_shards(
    out_dir: str,
    shards: int,
    per_shard: int,
    min_size: int = 500,
    max_size: int = 1000,
    quality: Sequence[int] = (80, 95),
    noise: Sequence[float] = (2.0, 4.0),
    seed: int = 0,
    stream: int = 1,
    shapes: tuple[int, int] = (1, 3),
) -> tuple[list[str], list[str]]:
    """img2dataset-format tars `{00000..}.tar` (`KEY.jpg`, `KEY.txt`, `KEY.json`); returns (paths, captions).

    `stream` keeps sets apart under one seed (held-out shards use another than the training ones).
    Each image has `shapes` (min, max) shapes; a caption has 10 words for one, 5 more for each other."""
    os.makedirs(out_dir, exist_ok=True)
    paths, captions = [], []
    for s in range(shards):
        rng = np.random.default_rng([seed, stream, s])
        path = os.path.join(out_dir, f"{s:05d}.tar")
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                scene = _scene(rng, shapes)
                w, h = _size(rng, min_size, max_size)
                jpg = _jpeg(draw(scene, w, h, rng, float(rng.uniform(*noise))), _quality(rng, quality))
                caption = short_caption(scene)
                meta = {
                    "url": f"synthetic://{key}",
                    "key": key,
                    "status": "success",
                    "caption": caption,
                    "width": w,
                    "height": h,
                    "original_width": w,
                    "original_height": h,
                }
                _add(tar, f"{key}.jpg", jpg)
                _add(tar, f"{key}.txt", caption.encode("utf-8"))
                _add(tar, f"{key}.json", json.dumps(meta).encode("utf-8"))
                captions.append(caption)
        paths.append(path)
    return paths, captions


def write_align(
    out_dir: str,
    count: int,
    min_size: int = 500,
    max_size: int = 1000,
    quality: Sequence[int] = (80, 95),
    noise: Sequence[float] = (2.0, 4.0),
    seed: int = 0,
    stream: int = 2,
) -> list[str]:
    """A cc_sbu_align folder: `filter_cap.json` and `image/{image_id}.jpg`; returns the captions."""
    os.makedirs(os.path.join(out_dir, "image"), exist_ok=True)
    rng = np.random.default_rng([seed, stream])
    annotations = []
    for i in range(count):
        scene = _scene(rng)
        w, h = _size(rng, min_size, max_size)
        jpg = _jpeg(draw(scene, w, h, rng, float(rng.uniform(*noise))), _quality(rng, quality))
        with open(os.path.join(out_dir, "image", f"{i}.jpg"), "wb") as f:
            f.write(jpg)
        annotations.append({"image_id": str(i), "caption": detailed_caption(scene)})
    with open(os.path.join(out_dir, "filter_cap.json"), "w", encoding="utf-8") as f:
        json.dump({"annotations": annotations}, f, indent=1)
    return [a["caption"] for a in annotations]


def write_coco_references(align_root: str, out_file: str) -> str:
    """The captions of the cc_sbu_align folder `align_root` as a COCO captions file (`images` with
    `id` and `file_name`, `annotations` with `image_id` and `caption`), for caption evaluation at tiny
    size: `python -m mgpt4.eval captions --images <align_root>/image --references <out_file>`."""
    with open(os.path.join(align_root, "filter_cap.json"), encoding="utf-8") as f:
        pairs = json.load(f)["annotations"]
    coco = {
        "images": [{"id": int(a["image_id"]), "file_name": f"{a['image_id']}.jpg"} for a in pairs],
        "annotations": [
            {"id": n, "image_id": int(a["image_id"]), "caption": a["caption"]} for n, a in enumerate(pairs)
        ],
    }
    with open(out_file, "w", encoding="utf-8") as f:
        json.dump(coco, f, indent=1)
    return out_file


def default_cache_dir() -> str:
    base = os.environ.get("MGPT4_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mgpt4")
    return os.path.join(base, "synthetic")


def synthetic_location(
    root: str | None = None,
    shards: int = 4,
    per_shard: int = 32,
    align: int = 32,
    min_size: int = 500,
    max_size: int = 1000,
    quality: Sequence[int] = (80, 95),
    seed: int = 0,
    val: int = 0,
) -> SyntheticData:
    """Where `ensure_synthetic` puts (or has put) the set with these parameters; reads and writes nothing.

    The folder name holds every parameter, so each variant has its own folder.
    """
    root = root or default_cache_dir()
    q = f"{quality[0]}-{quality[-1]}"
    name = f"v{FORMAT_VERSION}-s{shards}x{per_shard}-a{align}-px{min_size}-{max_size}-q{q}-seed{seed}"
    if val:
        name += f"-val{val}"
    final = os.path.join(root, name)
    return SyntheticData(
        root=final,
        shards=[os.path.join(final, "shards", f"{s:05d}.tar") for s in range(shards)],
        align_root=os.path.join(final, "cc_sbu_align"),
        val_shards=[os.path.join(final, "val_shards", "00000.tar")] if val else [],
        val_align_root=os.path.join(final, "cc_sbu_align_val") if val else None,
    )


def ensure_synthetic(
    root: str | None = None,
    shards: int = 4,
    per_shard: int = 32,
    align: int = 32,
    min_size: int = 500,
    max_size: int = 1000,
    quality: Sequence[int] = (80, 95),
    seed: int = 0,
    val: int = 0,
) -> SyntheticData:
    """Generate the synthetic set once under `root` (default ~/.cache/mgpt4/synthetic) and reuse it.

    With `val`, a held-out shard and cc_sbu_align folder of `val` samples each come with it; the
    training data is the same with or without them. The data appears by an atomic rename, so
    several ranks may call this at the same time.
    """
    where = synthetic_location(root, shards, per_shard, align, min_size, max_size, quality, seed, val)
    final = where.root
    parent = os.path.dirname(final)
    manifest = os.path.join(final, "manifest.json")
    if not os.path.exists(manifest):
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.", dir=parent)
        try:
            paths, captions = write_shards(
                os.path.join(tmp, "shards"), shards, per_shard, min_size, max_size, quality, seed=seed
            )
            captions += write_align(
                os.path.join(tmp, "cc_sbu_align"), align, min_size, max_size, quality, seed=seed
            )
            if val:  # not in `captions`: the tiny tokenizer is trained on the training captions only
                write_shards(
                    os.path.join(tmp, "val_shards"), 1, val, min_size, max_size, quality,
                    seed=seed, stream=_VAL_SHARD_STREAM,
                )  # fmt: skip
                write_align(
                    os.path.join(tmp, "cc_sbu_align_val"), val, min_size, max_size, quality,
                    seed=seed, stream=_VAL_ALIGN_STREAM,
                )  # fmt: skip
            with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
                json.dump({"shards": [os.path.basename(p) for p in paths], "captions": captions}, f)
            try:
                os.rename(tmp, final)
            except OSError:
                if not os.path.exists(manifest):  # not another process winning the race
                    raise
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
    with open(manifest, encoding="utf-8") as f:
        info = json.load(f)
    where.captions = info["captions"]
    return where


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    return int(lo), int(hi or lo)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mgpt4.data.synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out",
        required=True,
        help="folder to write shards/, cc_sbu_align/ and references.json (its captions, COCO format) into",
    )
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--per-shard", type=int, default=32)
    p.add_argument("--align", type=int, default=32, help="number of cc_sbu_align pairs")
    p.add_argument("--min-size", type=int, default=500)
    p.add_argument("--max-size", type=int, default=1000)
    p.add_argument("--quality", default="80-95", help="JPEG quality, Q or LO-HI")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 0 < args.min_size <= args.max_size:
        p.error("--min-size must be positive and at most --max-size")
    start = time.perf_counter()
    quality = _range(args.quality)
    paths, _ = write_shards(
        os.path.join(args.out, "shards"),
        args.shards,
        args.per_shard,
        args.min_size,
        args.max_size,
        quality,
        seed=args.seed,
    )
    write_align(
        os.path.join(args.out, "cc_sbu_align"),
        args.align,
        args.min_size,
        args.max_size,
        quality,
        seed=args.seed,
    )
    references = write_coco_references(
        os.path.join(args.out, "cc_sbu_align"), os.path.join(args.out, "references.json")
    )
    summary = {
        "shards": os.path.join(args.out, "shards", f"{{00000..{args.shards - 1:05d}}}.tar")
        if paths
        else None,
        "align_root": os.path.join(args.out, "cc_sbu_align"),
        "references": references,
        "samples": args.shards * args.per_shard,
        "align_pairs": args.align,
        "seconds": round(time.perf_counter() - start, 2),
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
