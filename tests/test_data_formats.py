"""LLaVA JSON / JSONL and ShareGPT / OpenAI-messages sources in stage 1: read as image-caption pairs,
mixed with shards by ratio, resumed exactly, packed; every structural problem named before training."""

from __future__ import annotations

import json
import logging
import os
import pickle

import numpy as np
import pytest
import torch

from mgpt4.data import DataConfig, SourceConfig, build_loader
from mgpt4.data.formats.annotations import AnnotationError, build_index
from mgpt4.data.formats.records import parse_record
from mgpt4.strict_config import ConfigError
from tests.data_fixtures import numbered_shards, tiny_tokenizer
from tests.format_fixtures import (
    llava_entries,
    llava_set,
    sharegpt_entries,
    sharegpt_set,
    write_images,
    write_json,
)
from tests.test_data_resume import _resume_matches, _take

L = 12


def _cfg(sources, **kw) -> DataConfig:
    base = {"batch_size": 3, "num_workers": 0, "image_size": 16, "shuffle_buffer": 7}
    return DataConfig(sources=sources, **{**base, **kw})


def _captions(batches) -> list[str]:
    tok = tiny_tokenizer()
    out = []
    for b in batches:
        for ids, mask in zip(b["text_ids"], b["text_mask"]):
            out.append(tok.decode(ids[mask.bool()], skip_special_tokens=True).strip())
    return out


@pytest.mark.parametrize("jsonl", [False, True])
def test_llava_entries_train_as_their_caption_and_image(tmp_path, jsonl):
    path = llava_set(str(tmp_path), 6, jsonl=jsonl)
    cfg = _cfg(
        [SourceConfig(format="llava", annotations=path)], resampled=False, shuffle_buffer=6, batch_size=2
    )
    batches = _take(build_loader(cfg, tiny_tokenizer(), L, "\n"), 3)
    captions = _captions(batches)
    # Split mode, one reader: one epoch is every entry once, the caption alone (no instruction).
    assert sorted(captions) == sorted(f"sample number {i} of shard 0" for i in range(6))
    assert all(b["image"].shape == (2, 3, 16, 16) and b["image"].dtype == torch.uint8 for b in batches)
    assert all(b["image"].float().std() > 0 for b in batches)


def test_sharegpt_messages_with_a_system_message(tmp_path):
    path = sharegpt_set(str(tmp_path), 4, system="You are a careful describer.")
    cfg = _cfg(
        [SourceConfig(format="sharegpt", annotations=path)], resampled=False, shuffle_buffer=4, batch_size=2
    )
    captions = _captions(_take(build_loader(cfg, tiny_tokenizer(), L, "\n"), 2))
    assert sorted(captions) == sorted(f"sample number {i} of shard 1" for i in range(4))


def test_sharegpt_from_value_spelling_and_the_record():
    entry = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "<image>Describe."},
            {"from": "gpt", "value": "A dog."},
            {"from": "human", "value": "Colour?"},
            {"from": "gpt", "value": "Brown."},
        ],
        "images": ["a.jpg"],
    }
    record, problems = parse_record(entry, "sharegpt")
    assert problems == []
    assert record.system == "Be brief." and record.images == ("a.jpg",)
    assert record.turns == (
        ("user", "<image>Describe."),
        ("assistant", "A dog."),
        ("user", "Colour?"),
        ("assistant", "Brown."),
    )
    assert record.caption() == "A dog." and record.instruction() == "Describe."


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("resampled", [True, False])
def test_mixed_with_shards_resumes_exactly(tmp_path, workers, resampled):
    shards = numbered_shards(str(tmp_path / "s"), 4, 5)
    llava = llava_set(str(tmp_path / "l"), 9, jsonl=True)
    share = sharegpt_set(str(tmp_path / "g"), 7)
    cfg = _cfg(
        [
            SourceConfig(name="shards", shards=shards, ratio=1),
            SourceConfig(name="llava", format="llava", annotations=llava, ratio=2),
            SourceConfig(name="share", format="sharegpt", annotations=share, ratio=1),
        ],
        mix="sample",
        resampled=resampled,
        num_workers=workers,
    )
    _resume_matches(cfg, first=5, then=6)


def test_sources_mix_by_ratio(tmp_path):
    shards = numbered_shards(str(tmp_path / "s"), 2, 5)
    llava = llava_set(str(tmp_path / "l"), 5)
    cfg = _cfg(
        [
            SourceConfig(name="s", shards=shards, ratio=1),
            SourceConfig(name="l", format="llava", annotations=llava, ratio=3),
        ],
        mix="sample",
        batch_size=8,
    )
    sources = torch.cat([b["source"] for b in _take(build_loader(cfg, tiny_tokenizer(), L, "\n"), 25)])
    share = float((sources == 1).float().mean())
    assert 0.68 < share < 0.82  # 3:1 drawn over 200 samples (binomial sd 0.03)


def test_packed_annotation_source_resumes_exactly(tmp_path):
    llava = llava_set(str(tmp_path / "l"), 9)
    cfg = _cfg([SourceConfig(format="llava", annotations=llava)], pack_length=40, pack_rows=2, batch_size=6)
    tok = tiny_tokenizer()
    from tests.test_data_packing import CONTEXT

    def loader():
        return build_loader(cfg, tok, L, "\n", context_lengths=(CONTEXT,))

    full = _take(loader(), 7)
    first = loader()
    head = _take(first, 3)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = loader()
    resumed.load_state_dict(state)
    tail = _take(resumed, 4)
    for a, b in zip(head + tail, full):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(int((b["pack_slot"] >= 0).sum()) > 0 for b in full)


def test_a_changed_annotation_file_refuses_the_saved_position(tmp_path):
    path = llava_set(str(tmp_path), 6)
    cfg = _cfg([SourceConfig(name="l", format="llava", annotations=path)])
    loader = build_loader(cfg, tiny_tokenizer(), L, "\n")
    _take(loader, 2)
    state = loader.state_dict()
    images = write_images(str(tmp_path), 7)
    write_json(path, llava_entries(images))
    with pytest.raises(ValueError, match=r"source 'l': .*6 entries"):
        build_loader(cfg, tiny_tokenizer(), L, "\n").load_state_dict(state)


def test_the_index_is_arrays_and_the_file_is_mapped(tmp_path):
    path = llava_set(str(tmp_path), 5)
    index = build_index(path, "llava")
    assert index.starts.dtype == np.int64 and len(index) == 5
    copy = pickle.loads(pickle.dumps(index))  # what a worker gets: arrays and a path, no entries
    assert len(pickle.dumps(index)) < 2000
    assert copy.record(3).caption() == "sample number 3 of shard 0"


def test_non_ascii_json_list_offsets(tmp_path):
    images = write_images(str(tmp_path), 3)
    entries = llava_entries(images)
    entries[0]["conversations"][1]["value"] = "ein rotes Quadrat über dem Kreis — schön"
    path = str(tmp_path / "utf8.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(entries, f, ensure_ascii=False)
    index = build_index(path, "llava")
    assert index.record(0).caption() == "ein rotes Quadrat über dem Kreis — schön"
    assert index.record(1).caption() == "sample number 1 of shard 0"
    assert index.record(2).caption() == "sample number 2 of shard 0"


def test_read_time_problems_are_skipped_and_counted(tmp_path, caplog):
    images = write_images(str(tmp_path), 6)
    entries = llava_entries(images)
    entries[1]["image"] = "http://example.com/a.jpg"
    path = write_json(str(tmp_path / "a.json"), entries)
    with open(tmp_path / images[2], "wb") as f:
        f.write(b"not an image at all" * 10)
    cfg = _cfg(
        [SourceConfig(format="llava", annotations=path)], resampled=False, shuffle_buffer=6, batch_size=2
    )
    loader = build_loader(cfg, tiny_tokenizer(), L, "\n")
    with caplog.at_level(logging.WARNING, logger="mgpt4.data"):
        captions = _captions(_take(loader, 2))
    assert sorted(captions) == sorted(f"sample number {i} of shard 0" for i in (0, 3, 4, 5))
    stats = loader.stats()
    assert stats["image_url"] == 1 and stats["corrupt_image"] == 1
    # The skip line names the entry and the image file that did not decode, so the user can find it.
    (corrupt,) = [r.getMessage() for r in caplog.records if "corrupt_image" in r.getMessage()]
    assert f"{path} entry 2 (image {tmp_path / images[2]})" in corrupt
    assert "UnidentifiedImageError" in corrupt and "BytesIO" not in corrupt  # PIL's in-memory file is noise


def _problems(tmp_path, entries_or_text, fmt="llava", name="bad.json") -> str:
    path = str(tmp_path / name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(
            entries_or_text if isinstance(entries_or_text, str) else json.dumps(entries_or_text, indent=1)
        )
    with pytest.raises(AnnotationError) as e:
        build_index(path, fmt)
    return str(e.value)


def test_every_structural_problem_in_one_error(tmp_path):
    images = write_images(str(tmp_path), 8)
    e = llava_entries(images)
    del e[0]["image"]  # no images
    del e[1]["conversations"]  # no conversation
    e[2]["conversations"] = e[2]["conversations"][::-1]  # roles out of order
    e[3]["conversations"] = e[3]["conversations"][:1]  # no assistant turn
    e[4]["conversations"][0]["value"] = "<image> <image> two tags"  # <image> count != images
    e[5]["conversations"][1]["value"] = ["not", "a", "string"]  # non-string content
    e[6]["image"] = "img/absent.jpg"  # missing image file
    text = _problems(tmp_path, e)
    assert text.startswith(f"{tmp_path / 'bad.json'}: 7 problem(s) among 8 llava entries:")
    for expected in (
        "entry 0: no images",
        "entry 1: no conversation",
        "entry 2: conversations: roles out of order: turn 0 is assistant, expected user",
        "entry 3: conversations: no assistant turn",
        "entry 4: 2 <image> tag(s) in the conversation, 1 image(s) listed",
        "entry 5: conversations[1].value: expected a string",
        "entry 6: image file",
    ):
        assert expected in text, expected
    assert "entry 7" not in text


def test_broken_json_names_the_line(tmp_path):
    images = write_images(str(tmp_path), 2)
    good = json.dumps(llava_entries(images), indent=1)
    broken = good.replace('"gpt"', '"gpt",,', 1)
    line = broken[: broken.index(",,")].count("\n") + 1
    assert f"broken JSON at line {line} " in _problems(tmp_path, broken)
    jsonl = "\n".join(json.dumps(x) for x in sharegpt_entries(images)) + "\n{not json\n"
    text = _problems(tmp_path, jsonl, "sharegpt", "bad.jsonl")
    assert "line 3: broken JSON" in text and "1 problem(s) among 3 sharegpt entries" in text


def test_stage1_reads_one_image_per_entry(tmp_path):
    images = write_images(str(tmp_path), 2)
    entries = sharegpt_entries(images[:1])
    entries[0]["images"] = images
    entries[0]["messages"][0]["content"] = "<image><image>Compare."
    path = write_json(str(tmp_path / "two.jsonl"), entries, jsonl=True)
    cfg = _cfg([SourceConfig(format="sharegpt", annotations=path)])
    with pytest.raises(AnnotationError, match="line 1: 2 images; a training sample holds one image"):
        build_loader(cfg, tiny_tokenizer(), L, "\n")


def test_source_settings_are_checked():
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.annotations: format 'llava' needs"):
        _cfg([SourceConfig(format="llava")]).validate()
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.shards: a llava source reads"):
        _cfg([SourceConfig(format="llava", annotations="a.json", shards="x.tar")]).validate()
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.format: expected one of"):
        _cfg([SourceConfig(format="parquet!", annotations="a.json")]).validate()
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.image_root: not for format webdataset"):
        _cfg([SourceConfig(shards="x.tar", image_root="/x")]).validate()
    with pytest.raises(
        ConfigError,
        match=r"data\.sources\[0\]\.format: kind 'features' reads a llava source's features from .*set data\.features_root",
    ):
        _cfg([SourceConfig(format="llava", annotations="a.json")], kind="features").validate()


def test_a_missing_annotation_file_is_a_missing_input(tmp_path):
    from mgpt4.data.shard_stream import check_sources

    cfg = _cfg([SourceConfig(format="llava", annotations=str(tmp_path / "nope.json"))])
    (msg,) = check_sources(cfg, 1, 0)
    assert msg.startswith("data.sources[0].annotations:") and "does not exist" in msg


def test_image_root_is_honoured(tmp_path):
    images = write_images(str(tmp_path / "pics"), 3)
    os.makedirs(tmp_path / "ann")
    path = write_json(str(tmp_path / "ann" / "a.json"), llava_entries(images))
    with pytest.raises(AnnotationError, match="image file"):
        build_index(path, "llava")
    assert len(build_index(path, "llava", str(tmp_path / "pics"))) == 3


def test_the_checked_index_is_kept_for_the_next_run(tmp_path, monkeypatch):
    from mgpt4.data.formats import annotations

    monkeypatch.setenv("MGPT4_CACHE", str(tmp_path / "cache"))
    path = llava_set(str(tmp_path / "l"), 5, jsonl=True)
    first = annotations.load_index(path, "llava", pairs=True)
    monkeypatch.setattr(annotations, "_INDEXES", {})  # a new run: nothing in this process

    def fail(*args, **kwargs):
        raise AssertionError("indexed again")

    monkeypatch.setattr(annotations, "build_index", fail)
    again = annotations.load_index(path, "llava", pairs=True)
    assert again is not first and np.array_equal(again.starts, first.starts) and again.jsonl
    assert again.record(4).caption() == "sample number 4 of shard 0"
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n")  # a changed file (size, mtime) is indexed and checked again
    with pytest.raises(AssertionError, match="indexed again"):
        annotations.load_index(path, "llava", pairs=True)
