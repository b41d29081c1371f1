"""Any supported annotation format -> webdataset shards, in parallel, resumable, with a progress bar.

    python -m mgpt4.data.convert --format llava --annotations blip_laion_cc_sbu_558k.json \\
        --image-root images/ --out shards/llava558k

Entry i goes to shard i // per_shard as `{i:09d}.jpg` (or .png / .webp: the image's own bytes, re-encoded
to JPEG only with --reencode), `.txt` (the caption: the first answer) and `.json` (`caption`, `key` and
the conversation as `messages`, `system` and `images`), the members img2dataset writes, so stage 1 reads
the shards as it reads LAION's and the JSON keeps the turns. A shard is written under a temporary name
and renamed when complete, with a `.stats.json` beside it: a killed run, run again, writes only the
shards still missing. Problems of the input stop the run before anything is written, all of them listed
(`mgpt4.data.formats`); samples that cannot be read (an unreadable image, an image URL) are skipped and
counted per reason, in the summary and in `convert.json`.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import multiprocessing
import os
import sys
import tarfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from mgpt4.data.config import SOURCE_FORMATS
from mgpt4.data.formats.annotations import AnnotationIndex, load_index
from mgpt4.data.formats.hf import HFIndex, load_hf
from mgpt4.data.formats.records import parse_record

SUMMARY_FILE = "convert.json"
log = logging.getLogger(__name__)
_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"))


def image_ext(data: bytes) -> str:
    """The file extension of image bytes by their signature (jpg, png, webp); jpg when unknown."""
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "jpg"


def reencode(data: bytes, quality: int, max_side: int) -> bytes:
    """`data` decoded and written as an RGB JPEG of `quality`, its longer side cut to `max_side` (0: kept)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        if max_side and max(img.size) > max_side:
            img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
        out = io.BytesIO()
        img.save(out, "JPEG", quality=quality)
        return out.getvalue()


@dataclass(frozen=True)
class Job:
    """What a worker needs to write one shard."""

    entries: AnnotationIndex | HFIndex
    shard: int
    start: int
    stop: int
    path: str
    quality: int  # 0: images as they are
    max_side: int


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o444
    tar.addfile(info, io.BytesIO(data))


def write_shard(job: Job) -> tuple[int, int, dict[str, int]]:
    """Write one shard (temporary name, renamed when complete); (shard, samples written, skips by reason)."""
    skipped: dict[str, int] = {}
    written = 0
    tmp = job.path + ".tmp"
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(job.start, job.stop):
            sample = job.entries.sample(i)
            if sample[0] != "ok":
                skipped[sample[0]] = skipped.get(sample[0], 0) + 1
                continue
            files = sample[3]
            image = files["jpg"]
            if job.quality:
                try:
                    image = reencode(image, job.quality, job.max_side)
                except (OSError, ValueError):  # PIL's errors for bytes that are not an image it can read
                    skipped["corrupt_image"] = skipped.get("corrupt_image", 0) + 1
                    continue
            record, _ = parse_record(json.loads(files["json"]), job.entries.fmt)
            key = f"{i:09d}"
            caption = files["txt"].decode()
            meta: dict[str, Any] = {
                "key": key,
                "caption": caption,
                "messages": [{"role": r, "content": t} for r, t in record.turns],
                "images": list(record.images),
            }
            if record.system is not None:
                meta["system"] = record.system
            _add(tar, f"{key}.{image_ext(image)}", image)
            _add(tar, f"{key}.txt", caption.encode())
            _add(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode())
            written += 1
    stats = {"samples": written, "skipped": skipped, "entries": [job.start, job.stop]}
    with open(job.path[: -len(".tar")] + ".stats.json", "w", encoding="utf-8") as f:
        json.dump(stats, f)
    os.replace(tmp, job.path)  # the shard counts as done only from here on
    return job.shard, written, skipped


def open_source(fmt: str, annotations: str, image_root: str, image_column: str, text_column: str):
    if fmt == "huggingface":
        return load_hf(annotations, image_column, text_column, image_root)
    return load_index(annotations, fmt, image_root or None, pairs=True)


def convert(
    entries: AnnotationIndex | HFIndex,
    out: str,
    per_shard: int = 10_000,
    workers: int = 4,
    quality: int = 0,
    max_side: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Write every entry into shards under `out` (those already there are kept); returns the summary that
    is also written to `out/convert.json`: shards, samples and skipped items by reason, over all runs."""
    if per_shard < 1 or workers < 0 or not 0 <= quality <= 100 or max_side < 0:
        raise ValueError(
            "--per-shard must be positive, --workers 0 or more, --quality 0-100, --max-side 0 or more"
        )
    os.makedirs(out, exist_ok=True)
    count = len(entries)
    shards = (count + per_shard - 1) // per_shard
    width = max(5, len(str(shards - 1)))
    jobs = []
    for k in range(shards):
        path = os.path.join(out, f"{k:0{width}d}.tar")
        if os.path.exists(path):
            continue
        if os.path.exists(path + ".tmp"):  # what a killed run left
            os.remove(path + ".tmp")
        jobs.append(Job(entries, k, k * per_shard, min(count, (k + 1) * per_shard), path, quality, max_side))
    bar = tqdm(total=sum(j.stop - j.start for j in jobs), unit="sample", disable=not progress, desc="convert")
    try:
        if workers == 0 or len(jobs) <= 1:
            for job in jobs:
                write_shard(job)
                bar.update(job.stop - job.start)
        else:
            lost = _write_in_pool(jobs, workers, bar)
            if lost:
                # A worker died (killed for memory, a crashing image decoder): once more, in fresh processes.
                log.warning("a conversion worker died; writing shards %s again", [j.shard for j in lost])
                lost = _write_in_pool(lost, workers, bar)
            if lost:
                names = ", ".join(os.path.basename(j.path) for j in lost)
                raise RuntimeError(
                    f"{out}: a conversion worker died twice while writing {names}; the other shards are "
                    "written, and running the same command again writes only the missing ones"
                )
    finally:
        bar.close()
    return summarize(out, width, shards)


def _write_in_pool(jobs: list[Job], workers: int, bar: tqdm) -> list[Job]:
    """Write `jobs` in `workers` fresh interpreters; returns the jobs lost to a worker that died.

    concurrent.futures, not multiprocessing.Pool: a Pool whose worker is killed waits for its task forever,
    where the executor marks every unfinished task broken.
    """
    # Fresh interpreters, not forks of this one: each gets the index (arrays and a path) pickled.
    ctx = multiprocessing.get_context("spawn")
    lost = []
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
        futures = {pool.submit(write_shard, job): job for job in jobs}
        for future in as_completed(futures):
            job = futures[future]
            try:
                future.result()
            except BrokenProcessPool:
                lost.append(job)
                continue
            bar.update(job.stop - job.start)
    return sorted(lost, key=lambda j: j.shard)


def summarize(out: str, width: int, shards: int) -> dict[str, Any]:
    """Totals over every shard's stats file; written to `out/convert.json`."""
    samples, skipped = 0, {}
    for k in range(shards):
        with open(os.path.join(out, f"{k:0{width}d}.stats.json"), encoding="utf-8") as f:
            stats = json.load(f)
        samples += stats["samples"]
        for reason, n in stats["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    first, last = f"{0:0{width}d}", f"{shards - 1:0{width}d}"
    summary = {
        "shards": shards,
        "pattern": os.path.join(out, f"{{{first}..{last}}}.tar"),
        "samples": samples,
        "skipped": skipped,
    }
    with open(os.path.join(out, SUMMARY_FILE), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mgpt4.data.convert", description=__doc__.split("\n")[0])
    formats = [f for f in SOURCE_FORMATS if f != "webdataset"]
    p.add_argument("--format", required=True, choices=formats, help="the input's format")
    p.add_argument(
        "--annotations", required=True, help="the .json/.jsonl file, or parquet / save_to_disk folder"
    )
    p.add_argument(
        "--image-root", default="", help="where relative image paths start (default: beside the file)"
    )
    p.add_argument("--image-column", default="", help="huggingface: the image column (default: image)")
    p.add_argument(
        "--text-column", default="", help="huggingface: the caption or messages column (default: caption)"
    )
    p.add_argument("--out", required=True, help="folder of the shards")
    p.add_argument("--per-shard", type=int, default=10_000, help="samples per shard")
    p.add_argument("--workers", type=int, default=4, help="processes writing shards (0: this one)")
    p.add_argument(
        "--reencode", type=int, default=0, metavar="QUALITY", help="re-encode images as JPEG of this quality"
    )
    p.add_argument(
        "--max-side", type=int, default=0, help="with --reencode: longer side cut to this many pixels"
    )
    args = p.parse_args(argv)
    try:
        entries = open_source(
            args.format, args.annotations, args.image_root, args.image_column, args.text_column
        )
        summary = convert(entries, args.out, args.per_shard, args.workers, args.reencode, args.max_side)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as e:
        print(f"mgpt4.data.convert: error: {e}", file=sys.stderr)
        return 2
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(summary["skipped"].items())) or "none"
    print(f"{summary['samples']} samples in {summary['shards']} shards: {summary['pattern']}")
    print(f"skipped: {skipped}")
    print(f"train on them: --set data.sources.0.shards='{summary['pattern']}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
