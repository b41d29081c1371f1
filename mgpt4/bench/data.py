"""Data benchmark: samples per second per worker process, mgpt4 loader vs the official pipeline.

    python -m mgpt4.bench.data [--n224 1024] [--nlarge 512] [--batches 32] [--batches-large 16] [--repeats 3]

Two corpora are generated (img2dataset layout): 224 px JPEGs at quality 95 (what img2dataset writes
for the official recipe) and 500-1000 px originals. On each, one DataLoader worker pinned to one core
produces batches of 64 while the trainer process (pinned to another core) only takes them:

  official: webdataset ResampledShards -> tarfile_to_samples -> shuffle(1000) -> decode("pilrgb")
            -> to_tuple(jpg, json) -> RandomResizedCrop(224, scale 0.5-1, bicubic) + ToTensor +
            Normalize, caption cleaning -> default collate
  mgpt4:    the stage-1 loader (reduced-scale JPEG decode, uint8 crop, fixed-length tokens)

The work mgpt4 moves off the worker (uint8 -> float and normalisation) is timed on its own per batch.
The last line is `speedup: X.XX`, the smaller of the two per-core ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader

from mgpt4.data.config import DataConfig, SourceConfig
from mgpt4.data.loader import build_loader
from mgpt4.data.synthetic import write_shards
from mgpt4.data.transforms import CLIP_MEAN, CLIP_STD, clean_caption, normalize_uint8
from mgpt4.dataclass_flags import HelpWithDefaults
from mgpt4.tokenizer import train_tiny_tokenizer

BATCH = 64


def _cores() -> tuple[int, int]:
    cores = sorted(os.sched_getaffinity(0))
    return cores[-1], cores[0]  # (worker core, trainer core); the same one on a single-core machine


def corpus(
    root: str, name: str, count: int, min_size: int, max_size: int, quality: Sequence[int]
) -> list[str]:
    folder = os.path.join(root, f"{name}-{count}-{min_size}-{max_size}-q{quality[0]}-{quality[-1]}")
    shards = 4
    paths = [os.path.join(folder, f"{s:05d}.tar") for s in range(shards)]
    if not all(os.path.exists(p) for p in paths):
        write_shards(folder, shards, -(-count // shards), min_size, max_size, quality, seed=7)
    return paths


def official_dataset(urls: list[str]):
    """The official stage-1 pipeline (MiniGPT-4 LaionDataset / CCSBUDataset) as the baseline."""
    import webdataset as wds
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    vis = transforms.Compose(
        [
            transforms.RandomResizedCrop(224, scale=(0.5, 1.0), interpolation=InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )

    def to_dict(sample):
        return {"image": sample[0], "answer": clean_caption(sample[1]["caption"])}

    return wds.DataPipeline(
        wds.ResampledShards(urls),
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(1000, handler=wds.warn_and_continue),
        wds.decode("pilrgb", handler=wds.warn_and_continue),
        wds.to_tuple("jpg", "json", handler=wds.warn_and_continue),
        wds.map_tuple(vis, handler=wds.warn_and_continue),
        wds.map(to_dict, handler=wds.warn_and_continue),
    )


def official_batches(urls: list[str], tokenizer) -> DataLoader:
    return DataLoader(
        official_dataset(urls),
        batch_size=BATCH,
        num_workers=1,
        prefetch_factor=2,
        drop_last=True,
    )


def mgpt4_batches(urls: list[str], tokenizer):
    cfg = DataConfig(
        sources=[SourceConfig(name="bench", shards=urls)],
        batch_size=BATCH,
        num_workers=1,
        prefetch=2,
        pin_memory=False,
    )
    return build_loader(cfg, tokenizer, 32, "\n")


def measure(make: Callable[[], object], batches: int, warmup: int = 2) -> float:
    """Samples per second a single worker delivers, after `warmup` (at least 1) batches (startup,
    shuffle fill).

    A worker process inherits the core of the process that starts it, and both pipelines have started
    theirs by the time the first batch arrives (DataLoader takes one thread per worker by itself): this
    process waits for that batch on the worker core, then goes back to the trainer core."""
    worker_core, trainer_core = _cores()
    os.sched_setaffinity(0, {worker_core})
    it = iter(make())
    next(it)
    os.sched_setaffinity(0, {trainer_core})
    for _ in range(warmup - 1):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * BATCH / (time.perf_counter() - start)
    del it
    return rate


def decode_only_rate(urls: list[str]) -> float:
    """Full-size libjpeg-turbo decodes per second on this core: the floor both pipelines stand on."""
    import simplejpeg

    from mgpt4.data.tar_reader import TarReader

    blobs = []
    for url in urls:
        reader = TarReader(url)
        while (s := reader.next_sample()) is not None:
            blobs.append(s[1]["jpg"])
        reader.close()
    blobs = blobs[:512]
    start = time.perf_counter()
    for data in blobs:
        simplejpeg.decode_jpeg(data)
    return len(blobs) / (time.perf_counter() - start)


def device_side_ms(repeats: int = 10) -> float:
    """Per batch: the feeder's uint8 [64,3,224,224] -> CLIP-normalised fp32, on the GPU when there is one."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images = torch.randint(0, 256, (BATCH, 224, 224, 3), dtype=torch.uint8, device=device).permute(0, 3, 1, 2)
    normalize_uint8(images)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        normalize_uint8(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def gpu_decode_rate(urls: list[str]) -> float | None:
    """nvJPEG through torchvision: batched decode + crop on the GPU, when a GPU is present."""
    if not torch.cuda.is_available():
        return None
    import torchvision.io as tio

    from mgpt4.data.tar_reader import TarReader

    blobs = []
    for url in urls:
        reader = TarReader(url)
        while (s := reader.next_sample()) is not None:
            blobs.append(torch.frombuffer(bytearray(s[1]["jpg"]), dtype=torch.uint8))
        reader.close()
    blobs = (blobs * (-(-BATCH * 8 // len(blobs))))[: BATCH * 8]
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(blobs), BATCH):
        images = tio.decode_jpeg(blobs[i : i + BATCH], device="cuda")
        torch.stack(
            [
                torch.nn.functional.interpolate(
                    im[None].float(), size=(224, 224), mode="bicubic", antialias=True
                )[0]
                for im in images
            ]
        )
    torch.cuda.synchronize()
    return len(blobs) / (time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m mgpt4.bench.data",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpWithDefaults,
    )
    p.add_argument("--n224", type=int, default=1024, help="samples in the 224 px corpus")
    p.add_argument("--nlarge", type=int, default=512, help="samples in the 500-1000 px corpus")
    # Enough batches that each timed window holds at least one refill of mgpt4's 1000-sample
    # shuffle block, so that cost is in the figure.
    p.add_argument("--batches", type=int, default=32, help="timed batches of 64 per run, 224 px corpus")
    p.add_argument("--batches-large", type=int, default=16, help="timed batches of 64 per run, 500-1000 px")
    p.add_argument("--repeats", type=int, default=3, help="runs per pipeline and corpus (best is used)")
    p.add_argument(
        "--workdir",
        default=os.path.join(tempfile.gettempdir(), "mgpt4-bench-data"),
        help="where the corpora are generated (and reused by the next run)",
    )
    args = p.parse_args(argv)

    os.makedirs(args.workdir, exist_ok=True)
    worker_core, trainer_core = _cores()
    os.sched_setaffinity(0, {trainer_core})
    torch.set_num_threads(1)
    print(f"cores: worker on {worker_core}, trainer process on {trainer_core}; batch {BATCH}")

    start = time.perf_counter()
    corpora = {
        "224px": corpus(args.workdir, "c224", args.n224, 224, 224, (95, 95)),
        "500-1000px": corpus(args.workdir, "clarge", args.nlarge, 500, 1000, (80, 95)),
    }
    print(f"corpora ready in {time.perf_counter() - start:.1f} s under {args.workdir}")
    tok_dir = os.path.join(args.workdir, "tokenizer")
    tokenizer = train_tiny_tokenizer(
        ["a large red circle and a small blue square on a green and white background"] * 50, tok_dir
    )

    ratios = {}
    timed = {"224px": args.batches, "500-1000px": args.batches_large}
    for name, urls in corpora.items():
        sizes = [os.path.getsize(u) for u in urls]
        print(f"corpus {name}: {len(urls)} shards, {sum(sizes) / 2**20:.1f} MiB")
        print(f"  decode only (libjpeg-turbo, full size, this core): {decode_only_rate(urls):.0f} images/s")
        runs: dict[str, list[float]] = {"official": [], "mgpt4": []}
        for _ in range(args.repeats):
            runs["official"].append(measure(lambda u=urls: official_batches(u, tokenizer), timed[name]))
            runs["mgpt4"].append(measure(lambda u=urls: mgpt4_batches(u, tokenizer), timed[name]))
        for label, rates in runs.items():
            shown = ", ".join(f"{r:.0f}" for r in rates)
            print(f"  {label:8s} samples/s per worker core: best {max(rates):.0f} (runs: {shown})")
        ratios[name] = max(runs["mgpt4"]) / max(runs["official"])
        print(f"  per-core ratio mgpt4 / official on {name}: {ratios[name]:.2f}")

    where = "on the GPU" if torch.cuda.is_available() else "on one CPU thread (no GPU here)"
    print(
        f"device-side work moved off the workers (uint8 -> CLIP-normalised fp32), per batch of {BATCH}: "
        f"{device_side_ms():.2f} ms {where}"
    )
    try:
        gpu = gpu_decode_rate(corpora["500-1000px"])
    except Exception as e:  # an optional figure must not hide the others
        print(f"GPU decoding (nvJPEG through torchvision): failed: {type(e).__name__}: {e}")
    else:
        if gpu is None:
            print("GPU decoding (nvJPEG through torchvision): not measured, no CUDA device")
        else:
            print(
                f"GPU decoding (nvJPEG through torchvision) 500-1000px, decode + resize: {gpu:.0f} samples/s"
            )
    print(f"speedup: {min(ratios.values()):.2f}")


if __name__ == "__main__":
    main()
