"""Damaged shards never end a run: seeded single-byte flips and truncations of a small valid shard, plain
and gzip-compressed. Each case either delivers samples or is skipped and counted; nothing but
ShardError leaves the reader, nothing at all leaves the worker's batch loop, and no case hangs."""

from __future__ import annotations

import contextlib
import signal

import numpy as np

from mgpt4.data import DataConfig, SourceConfig
from mgpt4.data.batches import BatchText
from mgpt4.data.shard_stream import ShardBatches, sample_id, source_urls
from mgpt4.data.tar_reader import ShardError, TarReader
from tests.data_fixtures import gzip_bytes, member_spans, numbered_shards, tiny_tokenizer

CASES = 300
SHARD_REASONS = {"corrupt_shard", "truncated_shard"}
# Far above what a case takes (milliseconds); only a loop that never ends gets near it.
CASE_LIMIT_S = 60


@contextlib.contextmanager
def time_limit(seconds: int, what: str):
    def expire(signum, frame):
        raise TimeoutError(f"{what} still running after {seconds} s: the reader hangs")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _damaged(data: bytes, rng: np.random.Generator) -> tuple[str, bytes, int]:
    """(description, bytes, offset of the damage): a flipped byte, or the file cut at an offset."""
    offset = int(rng.integers(0, len(data)))
    if rng.random() < 0.3:
        return f"cut at {offset}", data[:offset], offset
    mask = int(rng.integers(1, 256))
    out = bytearray(data)
    out[offset] ^= mask
    return f"byte {offset} ^ {mask:#x}", bytes(out), offset


def test_every_damaged_variant_is_read_or_skipped_and_counted(tmp_path):
    base = numbered_shards(str(tmp_path / "base"), 1, 6)[0]
    good = numbered_shards(str(tmp_path / "good"), 1, 3, prefix="good-")[0]
    with open(base, "rb") as f:
        plain = f.read()
    spans = member_spans(base)
    originals = {}
    reader = TarReader(base)
    while (s := reader.next_sample()) is not None:
        originals[s[0]] = s[1]
    text = BatchText(tiny_tokenizer(), 12, "\n")
    rng = np.random.default_rng(20261130)
    outcomes = {"samples": 0, "skipped": 0}
    for case in range(CASES):
        compressed = case % 4 == 3
        original = gzip_bytes(plain) if compressed else plain
        what, data, offset = _damaged(original, rng)
        path = tmp_path / ("fuzz.tar.gz" if compressed else "fuzz.tar")
        path.write_bytes(data)
        label = f"case {case} ({'gzip' if compressed else 'tar'}, {what})"
        with time_limit(CASE_LIMIT_S, label):
            # The reader: samples, then the end or a ShardError that says what kind of damage.
            reader = TarReader(str(path))
            got = []
            try:
                while (s := reader.next_sample()) is not None:
                    got.append(s)
                    assert len(got) <= len(originals), label
            except ShardError as e:
                assert e.reason in SHARD_REASONS and "fuzz.tar" in str(e), (label, e)
            if not compressed:
                # Samples that end in a block before the damaged one come out whole.
                damaged_block = offset // 512 * 512
                before = [
                    k for k in originals if all(end <= damaged_block for key, _, _, end in spans if key == k)
                ]
                assert [k for k, _ in got][: len(before)] == before, label
                for key, files in got[: len(before)]:
                    assert files == originals[key], label
            # The worker: a source of the damaged shard and a good one; the batch loop never raises,
            # and every sample of the good shard keeps coming.
            cfg = DataConfig(
                sources=[SourceConfig(name="laion", shards=[str(path), good])],
                batch_size=3, num_workers=0, image_size=16, shuffle_buffer=4, resampled=False,
            )  # fmt: skip
            batches = ShardBatches(cfg, source_urls(cfg, 1, 0), text, 0, 1, 0, 0)
            ids = set()
            for _ in range(6):
                ids.update(batches.next_batch()["sample_id"].tolist())
            good_ids = {sample_id(good, f"00000{i:04d}") for i in range(3)}
            assert good_ids <= ids, label
            counts = batches.skips.counts
            if ids - good_ids:
                outcomes["samples"] += 1
            if counts["corrupt_shard"] + counts["truncated_shard"]:
                outcomes["skipped"] += 1
                assert str(path) in batches.skips.failed_shards, label
            # Nothing vanishes: the damaged shard gave samples, or its skipped samples or itself are counted.
            assert ids - good_ids or sum(counts.values()), label
    # Both outcomes occur in these cases, so both were checked.
    assert outcomes["samples"] > CASES // 2 and outcomes["skipped"] > CASES // 10, outcomes
