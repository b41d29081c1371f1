"""Annotation-source benchmark: start-up time and the memory each data worker adds, for a synthetic
LLaVA-Pretrain-sized JSON list (600K entries by default).

    python -m mgpt4.bench.formats [--entries 600000] [--workers 2] [--images 100]

The file holds LLaVA-Pretrain-558K's entries in shape (id, image path, a `<image>` instruction, a
caption of 10-20 words); the image paths cycle over `--images` real JPEGs (600K image files would
only measure the file system: the check lists each image folder once and looks every entry's image up
in it, served warm here).
Printed:

  index:   building and checking the index in the trainer's process (parse, check, images) on a first
           run, loading it from the cache on a later one, and what travels to each worker (pickled)
  workers: the start-up of a loader with `--workers` workers until its first batch, and each
           worker's own memory (USS: the pages no other process shares) after a few batches
  objects: for comparison, the resident memory that `json.load` of the same file takes
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import tempfile
import time

import numpy as np
import psutil

from mgpt4.data.config import DataConfig, SourceConfig
from mgpt4.data.formats import annotations
from mgpt4.data.loader import build_loader
from mgpt4.data.synthetic import Scene, draw
from mgpt4.tokenizer import train_tiny_tokenizer

_WORDS = [
    "a",
    "the",
    "red",
    "blue",
    "green",
    "large",
    "small",
    "dog",
    "cat",
    "man",
    "woman",
    "car",
    "tree",
    "house",
    "on",
    "in",
    "with",
    "near",
    "of",
    "street",
    "park",
]
_INSTRUCTIONS = (
    "Render a clear and concise summary of the photo.",
    "Describe the image concisely.",
    "Give a brief description of the image.",
    "Share a concise interpretation of the image provided.",
)


def write_llava_json(folder: str, entries: int, images: int, seed: int = 0) -> str:
    """`entries` LLaVA-Pretrain-like entries as one JSON list, images under folder/images/ (`images` JPEGs)."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "images", "00000"), exist_ok=True)
    for i in range(images):
        img = draw(Scene(("blue", "yellow"), [("large", "red", "circle", "center")]), 64, 48, rng, noise=3.0)
        img.save(os.path.join(folder, "images", "00000", f"{i:09d}.jpg"), quality=90)
    path = os.path.join(folder, "llava_pretrain.json")
    with open(path, "w", encoding="utf-8") as f:
        f.write("[")
        for i in range(entries):
            words = " ".join(
                _WORDS[int(w)] for w in rng.integers(len(_WORDS), size=int(rng.integers(10, 21)))
            )
            entry = {
                "id": f"{i:09d}",
                "image": f"00000/{i % images:09d}.jpg",
                "conversations": [
                    {"from": "human", "value": f"<image>\n{_INSTRUCTIONS[i % len(_INSTRUCTIONS)]}"},
                    {"from": "gpt", "value": words},
                ],
            }
            f.write(("," if i else "") + json.dumps(entry))
        f.write("]")
    return path


def _rss() -> int:
    return psutil.Process().memory_info().rss


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mgpt4.bench.formats", description=__doc__.split("\n")[0])
    p.add_argument("--entries", type=int, default=600_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--batches", type=int, default=8, help="batches taken before the workers' memory is read")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mgpt4-bench-formats-") as tmp:
        t = time.perf_counter()
        path = write_llava_json(tmp, args.entries, args.images)
        size = os.path.getsize(path)
        print(
            f"file: {args.entries} entries, {size / 2**20:.1f} MiB, written in {time.perf_counter() - t:.1f} s"
        )
        root = os.path.join(tmp, "images")
        t = time.perf_counter()
        index = annotations.load_index(path, "llava", root, pairs=True)
        built = time.perf_counter() - t
        shipped = len(pickle.dumps(index))
        annotations._INDEXES.clear()  # as a new run finds it: in the cache, not in this process
        t = time.perf_counter()
        annotations.load_index(path, "llava", root, pairs=True)
        cached = time.perf_counter() - t
        print(
            f"index: first run builds and checks it in {built:.2f} s, a later run loads it from the cache in "
            f"{cached:.3f} s; {shipped / 2**20:.1f} MiB travel to each worker "
            f"({index.starts.nbytes + index.ends.nbytes} bytes of offsets)"
        )
        del index
        tok = train_tiny_tokenizer(_WORDS * 50, os.path.join(tmp, "tok"))
        cfg = DataConfig(
            sources=[SourceConfig(format="llava", annotations=path, image_root=root)],
            batch_size=64,
            num_workers=args.workers,
            image_size=224,
        )
        t = time.perf_counter()
        loader = build_loader(cfg, tok, 32, "\n")
        it = iter(loader)
        next(it)
        started = time.perf_counter() - t
        for _ in range(args.batches):
            next(it)
        workers = [psutil.Process(w.pid) for w in loader._dl_iter._workers]
        uss = [w.memory_full_info().uss for w in workers]
        rss = [w.memory_info().rss for w in workers]
        print(
            f"workers: {args.workers} started, first batch after {started:.2f} s; "
            f"per worker after {args.batches + 1} batches: USS "
            + ", ".join(f"{u / 2**20:.0f} MiB" for u in uss)
            + " (RSS "
            + ", ".join(f"{r / 2**20:.0f} MiB" for r in rss)
            + ")"
        )
        loader.close()
        gc.collect()
        before = _rss()
        t = time.perf_counter()
        with open(path, encoding="utf-8") as f:
            objects = json.load(f)
        took = time.perf_counter() - t
        print(
            f"objects: json.load takes {(_rss() - before) / 2**20:.0f} MiB resident for {len(objects)} entries "
            f"({took:.1f} s): what each worker would hold without the index"
        )


if __name__ == "__main__":
    main()
