"""Stage-1 shards: batch contract, mixing ratios, split coverage, resampling, bad samples and shards."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading

import numpy as np
import pytest
import torch

from mgpt4.data import DataConfig, SourceConfig, build_loader
from mgpt4.data.batches import BatchText
from mgpt4.data.samples import MAX_SKIP_RUN
from mgpt4.data.shard_stream import DataSourceError, ShardBatches, sample_id, source_urls
from mgpt4.data.tar_reader import TarReader
from mgpt4.data.transforms import clean_caption
from mgpt4.tokenizer import encode_answers
from tests.data_fixtures import (
    HTTP_ERROR_BODY,
    bad_shard,
    gzip_bytes,
    numbered_shards,
    sample_files,
    tiny_tokenizer,
    write_tar,
)

SIZE = 16
L = 12


def _cfg(sources, **kw) -> DataConfig:
    base = {"batch_size": 4, "num_workers": 0, "image_size": SIZE, "shuffle_buffer": 8}
    base.update(kw)
    return DataConfig(sources=sources, **base)


def _reader(cfg, rank=0, world=1, worker=0, workers=None) -> ShardBatches:
    workers = cfg.num_workers if workers is None else workers
    urls = source_urls(cfg, world, workers)
    return ShardBatches(cfg, urls, BatchText(tiny_tokenizer(), L, "\n"), rank, world, worker, workers)


def _captions(paths) -> dict[int, str]:
    out = {}
    for path in paths:
        reader = TarReader(path)
        while (s := reader.next_sample()) is not None:
            out[sample_id(path, s[0])] = s[1]["txt"].decode()
    return out


def test_batches_follow_the_contract(tmp_path):
    paths = numbered_shards(str(tmp_path), 2, 5)
    captions = _captions(paths)
    loader = build_loader(_cfg([SourceConfig(name="laion", shards=paths)]), tiny_tokenizer(), L, "\n")
    it = iter(loader)
    for _ in range(4):
        batch = next(it)
        assert batch["image"].shape == (4, 3, SIZE, SIZE) and batch["image"].dtype == torch.uint8
        assert batch["text_ids"].shape == (4, L) and batch["text_ids"].dtype == torch.int64
        assert batch["text_mask"].shape == (4, L) and batch["text_mask"].dtype == torch.int64
        assert batch["source"].tolist() == [0, 0, 0, 0]
        # Tokens are exactly what the model's encode_answers makes of the cleaned captions.
        texts = [clean_caption(captions[i]) for i in batch["sample_id"].tolist()]
        ids, mask = encode_answers(tiny_tokenizer(), texts, "\n", L)
        assert torch.equal(batch["text_ids"], ids) and torch.equal(batch["text_mask"], mask)
        assert batch["image"].float().std() > 5  # real pixels, not an empty buffer


def test_captions_are_kept_raw_when_cleaning_is_off(tmp_path):
    path = write_tar(
        str(tmp_path / "a.tar"), [(f"k{i}", sample_files(f"k{i}", "Hello, World!")) for i in range(4)]
    )
    cfg = _cfg([SourceConfig(shards=path)], clean_captions=False)
    batch = _reader(cfg).next_batch()
    ids, _ = encode_answers(tiny_tokenizer(), ["Hello, World!"] * 4, "\n", L)
    assert torch.equal(batch["text_ids"], ids)


@pytest.mark.parametrize("mix", ["batch", "sample"])
def test_mixing_ratios_hold(tmp_path, mix):
    a = numbered_shards(str(tmp_path / "a"), 2, 4)
    b = numbered_shards(str(tmp_path / "b"), 2, 4)
    cfg = _cfg(
        [SourceConfig(name="laion", shards=a, ratio=115), SourceConfig(name="ccsbu", shards=b, ratio=38.3)],
        mix=mix,
        batch_size=2,
    )
    expected = 115 / (115 + 38.3)  # 0.75
    counts = []
    for worker in range(2):  # two readers, as two DataLoader workers would be
        reader = _reader(cfg, worker=worker, workers=2)
        for _ in range(200):
            src = reader.next_batch()["source"]
            if mix == "batch":
                assert src[0] == src[1], "batch mode draws one source per batch"
                counts.append(int(src[0] == 0))
            else:
                counts.extend((src == 0).int().tolist())
    frac = np.mean(counts)
    assert abs(frac - expected) < 4 * np.sqrt(expected * (1 - expected) / len(counts)), frac


def test_split_mode_gives_disjoint_complete_coverage(tmp_path):
    paths = numbered_shards(str(tmp_path), 8, 3)
    everything = set(_captions(paths))
    cfg = _cfg([SourceConfig(shards=paths)], resampled=False, batch_size=3, shuffle_buffer=6, num_workers=2)
    seen = {}
    for rank in range(2):
        for worker in range(2):
            reader = _reader(cfg, rank, 2, worker)
            ids = [
                i for _ in range(2) for i in reader.next_batch()["sample_id"].tolist()
            ]  # one epoch: 2 shards
            assert len(set(ids)) == 6
            seen[(rank, worker)] = set(ids)
    readers = list(seen.values())
    assert set().union(*readers) == everything
    assert sum(len(r) for r in readers) == len(everything)  # pairwise disjoint


def test_split_mode_through_real_workers(tmp_path):
    paths = numbered_shards(str(tmp_path), 4, 2)
    cfg = _cfg([SourceConfig(shards=paths)], resampled=False, batch_size=2, num_workers=2, shuffle_buffer=2)
    per_rank = []
    for rank in range(2):
        loader = build_loader(cfg, tiny_tokenizer(), L, "\n", rank=rank, world_size=2)
        it = iter(loader)
        per_rank.append([i for _ in range(2) for i in next(it)["sample_id"].tolist()])
        loader.close()
    assert set(per_rank[0]).isdisjoint(per_rank[1])
    assert set(per_rank[0]) | set(per_rank[1]) == set(_captions(paths))


def test_split_mode_needs_a_shard_per_reader(tmp_path):
    paths = numbered_shards(str(tmp_path), 3, 1)
    cfg = _cfg([SourceConfig(name="ccsbu", shards=paths)], resampled=False, num_workers=2)
    with pytest.raises(
        ValueError, match=r"'ccsbu' has 3 shard\(s\), fewer than 2 rank\(s\) x 2 worker\(s\) = 4"
    ):
        build_loader(cfg, tiny_tokenizer(), L, "\n", rank=0, world_size=2)


def test_resampled_streams_are_seeded_per_rank_and_worker(tmp_path):
    paths = numbered_shards(str(tmp_path), 6, 2)
    cfg = _cfg([SourceConfig(shards=paths)], batch_size=6)

    def ids(rank, worker, seed=0):
        reader = _reader(DataConfig(**{**cfg.__dict__, "seed": seed}), rank, 2, worker, 2)
        return [reader.next_batch()["sample_id"].tolist() for _ in range(3)]

    assert ids(0, 0) == ids(0, 0)
    assert ids(0, 0) != ids(0, 1) and ids(0, 0) != ids(1, 0) and ids(0, 1) != ids(1, 0)
    assert ids(0, 0) != ids(0, 0, seed=1)


def test_bad_samples_are_skipped_and_counted(tmp_path, caplog):
    path = bad_shard(str(tmp_path / "damaged.tar"))
    cfg = _cfg([SourceConfig(shards=[path])], resampled=False, shuffle_buffer=1)
    loader = build_loader(cfg, tiny_tokenizer(), L, "\n")
    it = iter(loader)
    with caplog.at_level(logging.WARNING, logger="mgpt4.data"):
        next(it)
        next(it)  # exactly the 8 good samples of the first pass
    stats = loader.stats()
    expected = {"corrupt_image": 1, "truncated_image": 1, "no_caption": 1, "bad_json": 1, "no_image": 1}
    assert {k: v for k, v in stats.items() if v} == expected
    assert "truncated in " in caplog.text and "damaged.tar" in caplog.text
    next(it)
    next(it)
    assert {k: v for k, v in loader.stats().items() if v} == {k: 2 for k in expected}


def test_unusable_shards_are_reported_by_name(tmp_path, caplog):
    good = numbered_shards(str(tmp_path), 2, 4)
    missing = str(tmp_path / "laion-missing-00007.tar")
    cut = str(tmp_path / "cut-00003.tar")
    with open(good[1], "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(os.path.getsize(good[1]) // 3))
    cfg = _cfg(
        [SourceConfig(name="laion", shards=[good[0], missing, cut])], resampled=False, shuffle_buffer=1
    )
    loader = build_loader(cfg, tiny_tokenizer(), L, "\n")
    it = iter(loader)
    with caplog.at_level(logging.WARNING, logger="mgpt4.data"):
        for _ in range(4):
            next(it)
    stats = loader.stats()
    assert stats["shard_open_failed"] >= 1 and stats["truncated_shard"] >= 1
    assert missing in loader.failed_shards() and cut in loader.failed_shards()
    assert "laion-missing-00007.tar" in caplog.text and "cannot open" in caplog.text


def test_a_source_without_any_readable_shard_fails_clearly(tmp_path):
    # Local shards that all miss are a wrong path: refused when the loader is built...
    cfg = _cfg([SourceConfig(name="ccsbu", shards=[str(tmp_path / "a.tar"), str(tmp_path / "b.tar")])])
    with pytest.raises(ValueError, match=r"none of the 2 shard\(s\) of source 'ccsbu' exist"):
        build_loader(cfg, tiny_tokenizer(), L, "\n")
    # ...and sources that cannot be checked up front stop the first batch with their names.
    cfg = _cfg(
        [
            SourceConfig(
                name="ccsbu", shards=[f"pipe:cat {tmp_path / 'a.tar'}", f"pipe:cat {tmp_path / 'b.tar'}"]
            )
        ]
    )
    loader = build_loader(cfg, tiny_tokenizer(), L, "\n")
    with pytest.raises(RuntimeError, match=r"source 'ccsbu': .* gave no samples .*a\.tar"):
        next(iter(loader))


def test_pipe_sources_work(tmp_path):
    paths = numbered_shards(str(tmp_path), 2, 4)
    cfg = _cfg([SourceConfig(shards=[f"pipe:cat {p}" for p in paths])])
    batch = next(iter(build_loader(cfg, tiny_tokenizer(), L, "\n")))
    assert batch["image"].shape == (4, 3, SIZE, SIZE)


def test_a_shard_that_is_not_a_tar_is_counted_named_and_skipped(tmp_path, caplog):
    """A failed download saved as a shard costs that shard only: counted, named, and the worker goes on."""
    good = numbered_shards(str(tmp_path), 2, 4)
    junk = tmp_path / "laion-00001.tar"
    junk.write_bytes(HTTP_ERROR_BODY)
    everything = set(_captions(good))
    for workers in (1, 0):  # a real worker process, then in-process to see the log line
        cfg = _cfg(
            [SourceConfig(name="laion", shards=[good[0], str(junk), good[1]])],
            resampled=False,
            shuffle_buffer=1,
            num_workers=workers,
        )
        loader = build_loader(cfg, tiny_tokenizer(), L, "\n")
        it = iter(loader)
        with caplog.at_level(logging.WARNING, logger="mgpt4.data"):
            ids = [i for _ in range(4) for i in next(it)["sample_id"].tolist()]  # two passes
        loader.close()
        assert set(ids) == everything
        assert loader.stats()["corrupt_shard"] >= 1
        assert str(junk) in loader.failed_shards()
    assert "laion-00001.tar (corrupt_shard)" in caplog.text and "not a tar archive" in caplog.text


def test_missing_shards_are_announced_at_start_then_skipped_and_counted(tmp_path, caplog):
    good = numbered_shards(str(tmp_path), 3, 2)
    gone = [str(tmp_path / "laion-gone-00001.tar"), str(tmp_path / "laion-gone-00003.tar")]
    shards = [good[0], gone[0], good[1], gone[1], good[2]]
    cfg = _cfg([SourceConfig(name="laion", shards=shards)], resampled=False, shuffle_buffer=1, batch_size=2)
    with caplog.at_level(logging.INFO, logger="mgpt4"):
        build_loader(cfg, tiny_tokenizer(), L, "\n", rank=1, world_size=2)
    assert "missing" not in caplog.text  # said once, by rank 0
    with caplog.at_level(logging.WARNING, logger="mgpt4"):
        loader = build_loader(cfg, tiny_tokenizer(), L, "\n")
    warning = [r.getMessage() for r in caplog.records if "missing" in r.getMessage()]
    assert len(warning) == 1, warning
    assert "data.sources[0].shards: 2 of 5 shard(s) of source 'laion' are missing" in warning[0]
    assert "laion-gone-00001.tar" in warning[0] and "laion-gone-00003.tar" in warning[0]
    it = iter(loader)
    ids = [i for _ in range(6) for i in next(it)["sample_id"].tolist()]  # two passes over the 6 samples
    assert set(ids) == set(_captions(good))
    assert loader.stats()["shard_open_failed"] >= 2
    assert set(gone) <= set(loader.failed_shards())


def test_a_source_whose_shards_are_all_damaged_stops_with_one_line(tmp_path):
    """Not a traceback from the worker: one ValueError line, which the launchers print as
    `mgpt4: error: ...`."""
    paths = [tmp_path / "laion-00000.tar", tmp_path / "laion-00001.tar.gz"]
    paths[0].write_bytes(HTTP_ERROR_BODY)
    paths[1].write_bytes(gzip_bytes(HTTP_ERROR_BODY))
    cfg = _cfg([SourceConfig(name="laion", shards=[str(p) for p in paths])], num_workers=1)
    loader = build_loader(cfg, tiny_tokenizer(), L, "\n")
    with pytest.raises(DataSourceError) as e:
        next(iter(loader))
    message = str(e.value)
    assert isinstance(e.value, ValueError)
    assert "\n" not in message and "Traceback" not in message and "worker" not in message, message
    assert message.startswith("source 'laion': ") and "laion-00000.tar" in message
    assert "not a tar archive" in message


def test_gzip_shards_feed_batches_and_caption_less_samples_are_counted(tmp_path):
    plain = numbered_shards(str(tmp_path / "plain"), 1, 4)[0]
    bare = write_tar(
        str(tmp_path / "bare.tar"), [(f"nocap{i}", sample_files(f"nocap{i}", None)) for i in range(4)]
    )
    shards = []
    for src, name in ((plain, "laion-00000.tar.gz"), (bare, "laion-00001.tgz")):
        with open(src, "rb") as f:
            (tmp_path / name).write_bytes(gzip_bytes(f.read()))
        shards.append(str(tmp_path / name))
    cfg = _cfg([SourceConfig(name="laion", shards=shards)], resampled=False, shuffle_buffer=1)
    loader = build_loader(cfg, tiny_tokenizer(), L, "\n")
    it = iter(loader)
    batches = [next(it) for _ in range(3)]  # three passes: 4 captioned samples each
    reader = TarReader(plain)
    captions = {}  # by the id of the sample in the compressed shard
    while (s := reader.next_sample()) is not None:
        captions[sample_id(shards[0], s[0])] = s[1]["txt"].decode()
    for batch in batches:
        assert set(batch["sample_id"].tolist()) == set(captions)
        texts = [clean_caption(captions[i]) for i in batch["sample_id"].tolist()]
        ids, _ = encode_answers(tiny_tokenizer(), texts, "\n", L)
        assert torch.equal(batch["text_ids"], ids)
    stats = loader.stats()
    assert stats["no_caption"] >= 8 and stats["corrupt_shard"] == stats["truncated_shard"] == 0


def test_shards_are_checked_once_at_config_time_and_trusted_by_the_loader(tmp_path, monkeypatch):
    from mgpt4.config import Config
    from mgpt4.data import shard_stream
    from mgpt4.train.resolve import find_missing_inputs

    paths = numbered_shards(str(tmp_path), 2, 4)
    checked = []
    real = shard_stream.check_local_shards
    monkeypatch.setattr(
        shard_stream, "check_local_shards", lambda urls, *a: (checked.append(list(urls)), real(urls, *a))[1]
    )
    # The Python API: the loader checks the shards nobody checked, once.
    cfg = _cfg([SourceConfig(name="api", shards=paths)])
    build_loader(cfg, tiny_tokenizer(), L, "\n").close()
    assert checked == [paths]
    # The trainer: the config check (train/resolve.py) checks them, and the loader it builds trusts that.
    checked.clear()
    cfg = _cfg([SourceConfig(name="run", shards=paths)])
    assert find_missing_inputs(Config(data=cfg), 1, set()) == []
    build_loader(cfg, tiny_tokenizer(), L, "\n").close()
    assert checked == [paths]
    # Other readers (ranks x workers) are other checks: split mode needs a shard for each.
    with pytest.raises(ValueError, match=r"'run' has 2 shard\(s\), fewer than 3 rank\(s\)"):
        build_loader(
            dataclasses.replace(cfg, resampled=False), tiny_tokenizer(), L, "\n", rank=0, world_size=3
        )


def _first_batch_or_error(loader) -> BaseException | None:
    """The error the loader's first batch raises. The loader runs in a thread only as a hang guard (a
    source that spins forever must fail this test, not stall the session): what is asserted is the
    error, which comes after a bounded number of skipped samples (MAX_SKIP_RUN)."""
    out: list = []

    def first():
        try:
            next(iter(loader))
            out.append(None)
        except BaseException as e:  # handed to the test
            out.append(e)

    thread = threading.Thread(target=first, daemon=True)
    thread.start()
    thread.join(600)
    assert out, "the loader neither gave a batch nor stopped: a source of skipped samples spins forever"
    return out[0]


def _dotted_shard(path: str) -> str:
    # Files named like 'img0.v2.jpg': as in webdataset the key is 'img0' and the extensions 'v2.jpg',
    # 'v2.txt', so there is no .jpg and no .txt.
    samples = [(f"img{i}", {"v2.jpg": sample_files("x")["jpg"], "v2.txt": b"a red circle"}) for i in range(5)]
    return write_tar(path, samples)


def _captionless_shard(path: str) -> str:
    # What img2dataset writes without a caption column: the image and a .json without "caption".
    samples = [
        (f"{i:05d}", {"jpg": sample_files("x")["jpg"], "json": json.dumps({"key": f"{i:05d}"}).encode()})
        for i in range(5)
    ]
    return write_tar(path, samples)


@pytest.mark.parametrize(
    ("make", "kind", "reason", "why"),
    [
        (_dotted_shard, "webdataset", "no_caption", "found only .v2.jpg and .v2.txt (as in webdataset"),
        (_captionless_shard, "webdataset", "no_caption", "no caption: found only .jpg and .json"),
        (numbered_shards, "features", "no_features", "no features: found only .jpg, .json and .txt"),
    ],
    ids=["dotted-names", "no-captions", "features-without-npy"],
)
def test_a_source_whose_samples_are_all_skipped_stops_with_one_line(tmp_path, make, kind, reason, why):
    """Readable shards whose every sample is skipped used to keep the worker spinning with no step and
    no error; the source now stops after MAX_SKIP_RUN skips in a row, saying what was skipped and why."""
    if make is numbered_shards:
        paths = make(str(tmp_path), 2, 5, prefix="laion-")
    else:
        paths = [make(str(tmp_path / f"laion-{i:05d}.tar")) for i in range(2)]
    extra = {"crops": "stream"} if kind == "features" else {}
    cfg = _cfg([SourceConfig(name="laion", shards=paths)], kind=kind, **extra)
    loader = build_loader(
        cfg, tiny_tokenizer(), L, "\n", feature_shape=(4, 8) if kind == "features" else None
    )
    error = _first_batch_or_error(loader)
    assert isinstance(error, DataSourceError), error
    message = str(error)
    assert "\n" not in message
    assert message.startswith(f"source 'laion': {MAX_SKIP_RUN} samples in a row gave no samples"), message
    assert f"({reason} {MAX_SKIP_RUN})" in message and why in message and "laion-0000" in message


def test_a_good_sample_now_and_then_keeps_a_source_going(tmp_path):
    """The bound is on skips in a row: a source with mostly skipped samples trains on the rest."""
    samples = [(f"bad{i:04d}", sample_files(f"bad{i:04d}", None)) for i in range(MAX_SKIP_RUN - 1)]
    samples.append(("good", sample_files("good", "a red circle")))
    path = write_tar(str(tmp_path / "sparse.tar"), samples)
    cfg = _cfg([SourceConfig(name="sparse", shards=[path])], resampled=False, shuffle_buffer=1, batch_size=2)
    loader = build_loader(cfg, tiny_tokenizer(), L, "\n")
    batch = next(iter(loader))
    assert batch["sample_id"].tolist() == [sample_id(path, "good")] * 2


def test_captions_that_are_not_utf8_are_skipped_and_counted(tmp_path):
    """A cp1252 or UTF-16 .txt and a .json caption with replacement characters are never trained on
    (they used to reach the tokenizer as 'the dog\\ufffds ball' or with NULs between the letters)."""
    jpg = sample_files("x")["jpg"]
    bad = {
        "cp1252": {"jpg": jpg, "txt": "the dog\u2019s ball".encode("cp1252")},
        "utf16bom": {"jpg": jpg, "txt": "a red circle".encode("utf-16")},
        "utf16le": {"jpg": jpg, "txt": "a red circle".encode("utf-16-le")},
        "jsonfffd": {"jpg": jpg, "json": json.dumps({"caption": "the dog\ufffds ball"}).encode()},
        "jsonnul": {"jpg": jpg, "json": json.dumps({"caption": "a\x00 r\x00e\x00d"}).encode()},
    }
    good = [(f"good{i}", sample_files(f"good{i}", f"sample number {i}")) for i in range(3)]
    good.append(("bom", {"jpg": jpg, "txt": "\ufeffsample number 3".encode()}))  # a UTF-8 BOM is dropped
    path = write_tar(str(tmp_path / "mixed.tar"), list(bad.items()) + good)
    cfg = _cfg(
        [SourceConfig(shards=[path])], resampled=False, shuffle_buffer=1, batch_size=4, clean_captions=False
    )
    loader = build_loader(cfg, tiny_tokenizer(), L, "\n")
    batch = next(iter(loader))
    keys = ["good0", "good1", "good2", "bom"]
    assert batch["sample_id"].tolist() == [sample_id(path, k) for k in keys]
    captions = [f"sample number {i}" for i in range(4)]
    assert torch.equal(batch["text_ids"], encode_answers(tiny_tokenizer(), captions, "\n", L)[0])
    stats = loader.stats()
    assert stats["bad_caption"] == len(bad)
    assert {k for k, v in stats.items() if v} == {"bad_caption"}
