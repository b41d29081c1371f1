"""`python -m mgpt4.data.convert`: any format -> webdataset shards, parallel, resumable, skips counted."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
from PIL import Image

from mgpt4.data import SourceConfig, build_loader
from mgpt4.data.convert import convert, main
from mgpt4.data.formats.annotations import build_index, load_index
from mgpt4.data.shard_lists import expand_shards
from tests.data_fixtures import tiny_tokenizer
from tests.format_fixtures import llava_entries, llava_set, write_images, write_json
from tests.test_data_formats import _captions, _cfg
from tests.test_data_resume import _take


def _members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def test_llava_to_shards_in_parallel_with_skips_counted(tmp_path):
    images = write_images(str(tmp_path), 8)
    entries = llava_entries(images, turns=2)
    entries[1]["image"] = "https://example.com/x.jpg"
    with open(tmp_path / images[2], "wb") as f:
        f.write(b"")  # unreadable as an image, but a file: kept as is unless re-encoded
    os.remove(tmp_path / images[3])  # went away after the check: skipped as no_image
    path = write_json(str(tmp_path / "a.json"), entries)
    index = build_index(path, "llava", check_images=False)
    summary = convert(index, str(tmp_path / "out"), per_shard=3, workers=2, progress=False)
    assert summary["shards"] == 3 and summary["samples"] == 6
    assert summary["skipped"] == {"image_url": 1, "no_image": 1}
    assert json.loads((tmp_path / "out" / "convert.json").read_text()) == summary
    members = _members(str(tmp_path / "out" / "00000.tar"))
    assert sorted(members) == ["000000000.jpg", "000000000.json", "000000000.txt", "000000002.jpg",
                               "000000002.json", "000000002.txt"]  # fmt: skip
    meta = json.loads(members["000000000.json"])
    assert meta["caption"] == "sample number 0 of shard 0" and len(meta["messages"]) == 4
    # Stage 1 reads the shards as it reads LAION's: every converted caption once per epoch.
    shards = expand_shards(summary["pattern"])
    cfg = _cfg(
        [SourceConfig(shards=shards)], resampled=False, shuffle_buffer=6, batch_size=2, clean_captions=False
    )
    loader = build_loader(cfg, tiny_tokenizer(), 12, "\n")
    captions = _captions(_take(loader, 3))
    # The empty image went into its shard as it was (no --reencode): training skips it as corrupt.
    assert set(captions) == {f"sample number {i} of shard 0" for i in (0, 4, 5, 6, 7)}
    assert loader.stats()["corrupt_image"] >= 1


def test_a_killed_conversion_writes_only_what_is_missing(tmp_path):
    path = llava_set(str(tmp_path / "in"), 7)
    index = load_index(path, "llava")
    out = tmp_path / "out"
    first = convert(index, str(out), per_shard=2, workers=0, progress=False)
    done = {n: os.stat(out / n).st_mtime_ns for n in ("00000.tar", "00001.tar", "00003.tar")}
    os.remove(out / "00002.tar")  # as if the run was killed while writing it:
    (out / "00002.tar.tmp").write_bytes(b"half a tar")  # its temporary file is all that is left
    again = convert(index, str(out), per_shard=2, workers=0, progress=False)
    assert again == first and not (out / "00002.tar.tmp").exists()
    assert {n: os.stat(out / n).st_mtime_ns for n in done} == done
    assert sorted(_members(str(out / "00002.tar"))) == [
        f"00000000{i}.{e}" for i in (4, 5) for e in ("jpg", "json", "txt")
    ]


def test_reencode_writes_jpeg(tmp_path):
    write_images(str(tmp_path), 2)
    png = io.BytesIO()
    Image.new("RGB", (300, 200), (200, 10, 10)).save(png, "PNG")
    (tmp_path / "img" / "00001.jpg").write_bytes(png.getvalue())  # a PNG under a .jpg name
    path = write_json(str(tmp_path / "a.json"), llava_entries(["img/00000.jpg", "img/00001.jpg"]))
    plain = convert(load_index(path, "llava"), str(tmp_path / "plain"), workers=0, progress=False)
    assert plain["samples"] == 2 and "000000001.png" in _members(str(tmp_path / "plain" / "00000.tar"))
    convert(
        load_index(path, "llava"), str(tmp_path / "jpeg"), workers=0, quality=90, max_side=100, progress=False
    )
    members = _members(str(tmp_path / "jpeg" / "00000.tar"))
    with Image.open(io.BytesIO(members["000000001.jpg"])) as img:
        assert img.format == "JPEG" and max(img.size) == 100


class DyingIndex:
    """An index whose worker dies (as if killed for memory) at entry `die_at`: every time, or only until
    `marker` exists. Module level, so that a spawned worker can unpickle it."""

    def __init__(self, inner, die_at: int, marker: str = ""):
        self.inner, self.die_at, self.marker = inner, die_at, marker
        self.fmt = inner.fmt

    def __len__(self):
        return len(self.inner)

    def sample(self, i):
        if i == self.die_at and not (self.marker and os.path.exists(self.marker)):
            if self.marker:
                open(self.marker, "w").close()
            os._exit(9)
        return self.inner.sample(i)


def test_a_worker_that_dies_is_replaced_once_then_named(tmp_path):
    # multiprocessing.Pool waited forever for the task of a killed worker (a CI run hung here).
    index = load_index(llava_set(str(tmp_path / "in"), 6), "llava")
    once = convert(DyingIndex(index, 3, str(tmp_path / "died")), str(tmp_path / "a"), 2, 2, progress=False)
    assert once["samples"] == 6 and os.path.exists(tmp_path / "died")
    assert once == {**convert(index, str(tmp_path / "b"), 2, 0, progress=False), "pattern": once["pattern"]}
    with pytest.raises(RuntimeError, match=r"a conversion worker died twice while writing .*00001\.tar"):
        convert(DyingIndex(index, 3), str(tmp_path / "c"), 2, 2, progress=False)
    assert not os.path.exists(tmp_path / "c" / "00001.tar")
    again = convert(index, str(tmp_path / "c"), 2, 2, progress=False)  # only what is missing
    assert again["samples"] == 6


def test_the_command_line(tmp_path, capsys):
    path = llava_set(str(tmp_path / "in"), 3, jsonl=True)
    proc = subprocess.run(
        [sys.executable, "-m", "mgpt4.data.convert", "--format", "llava", "--annotations", path, "--out",
         str(tmp_path / "out"), "--per-shard", "2", "--workers", "2"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": os.getcwd()},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "3 samples in 2 shards" in proc.stdout and "skipped: none" in proc.stdout
    assert "convert: 100%" in proc.stderr  # tqdm's bar
    bad = write_json(str(tmp_path / "bad.json"), [{"image": "nope.jpg", "conversations": []}])
    assert main(["--format", "llava", "--annotations", bad, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("mgpt4.data.convert: error: ")
        and "entry 0: 'conversations': expected a non-empty list" in err
    )
    assert not os.path.exists(tmp_path / "x")


def test_features_extract_reads_the_converted_shards(tmp_path, monkeypatch):
    from mgpt4.config import Config, WeightsConfig
    from mgpt4.data import DataConfig
    from mgpt4.dist import RankInfo
    from mgpt4.features.extract import ExtractOptions, extract
    from mgpt4.model.presets import stage1_text, tiny
    from mgpt4.train.assets import ensure_tiny_weights

    monkeypatch.setenv("MGPT4_CACHE", str(tmp_path / "cache"))
    path = llava_set(str(tmp_path / "in"), 6)
    model = tiny()
    model.text = stage1_text()
    w = ensure_tiny_weights(tiny(), [f"sample number {i} of shard 0" for i in range(6)] * 5)
    model.weights = WeightsConfig(eva_vit=w.eva_vit, blip2=w.blip2, llm=w.llm)
    data = DataConfig(
        sources=[SourceConfig(name="llava", format="llava", annotations=path)], num_workers=0, image_size=56
    )
    cfg = Config(recipe="test", model=model, data=data)
    opts = ExtractOptions(out=str(tmp_path / "features"), batch_size=4, num_workers=0, device="cpu")
    summary = convert(
        load_index(path, "llava"), str(tmp_path / "shards"), per_shard=4, workers=0, progress=False
    )
    cfg.data.sources = [SourceConfig(name="llava", shards=summary["pattern"])]
    cfg.data.crops = "sample"
    reports = extract(cfg, opts, RankInfo())
    assert sum(r.samples for r in reports) == 6 and sum(r.shards_written for r in reports) == 2
