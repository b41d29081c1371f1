"""Packed stage-1 batches: static shapes, every sample once and in stream order, exact layout, exact resume."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from mgpt4.data import DataConfig, SourceConfig, build_loader
from mgpt4.data.packing import RowPacker, suggest_rows
from mgpt4.model.layout import IMAGE_ONLY, layout
from tests.data_fixtures import bad_shard, sample_files, tiny_tokenizer, write_tar

L = 12  # max_txt_len
# A stage-1 sample of the tiny model before its answer: BOS and 8 image tokens (no text to tokenize).
CONTEXT = layout(IMAGE_ONLY, tokenize=list, bos_id=1, image_tokens=8).context_length
WORDS = [
    "red",
    "green",
    "blue",
    "circle",
    "square",
    "triangle",
    "top",
    "bottom",
    "left",
    "right",
    "large",
    "small",
]


def varied_shards(folder: str, shards: int, per_shard: int, seed: int = 0) -> list[str]:
    """Shards whose captions are 1 to 11 words long, so samples pack unevenly."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for s in range(shards):
        samples = []
        for i in range(per_shard):
            key = f"{s:05d}{i:04d}"
            caption = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 12))))
            samples.append((key, sample_files(key, caption, seed=i)))
        paths.append(write_tar(os.path.join(folder, f"{s:05d}.tar"), samples))
    return paths


def _cfg(sources, **kw) -> DataConfig:
    base = {
        "batch_size": 6,
        "num_workers": 0,
        "image_size": 16,
        "shuffle_buffer": 7,
        "pack_length": 64,
        "pack_rows": 2,
    }
    base.update(kw)
    return DataConfig(sources=sources, **base)


def _loader(cfg, contexts=(CONTEXT,), instructions=0):
    return build_loader(
        cfg, tiny_tokenizer(), L, "\n", num_instructions=instructions, context_lengths=contexts
    )


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _used_ids(batches) -> list[int]:
    return [i for b in batches for i in b["sample_id"].tolist() if i >= 0]


def test_packed_batches_keep_static_shapes_and_an_exact_layout(tmp_path):
    cfg = _cfg([SourceConfig(shards=varied_shards(str(tmp_path), 3, 9))])
    for batch in _take(_loader(cfg), 8):
        assert batch["image"].shape == (6, 3, 16, 16) and batch["text_ids"].shape == (6, L)
        slot, pos = batch["pack_slot"], batch["pack_pos"]
        assert slot.shape == pos.shape == (2, 64) and slot.dtype == pos.dtype == torch.int64
        used = int((batch["sample_id"] >= 0).sum())
        assert (
            used >= 1 and (batch["sample_id"][:used] >= 0).all() and (batch["sample_id"][used:] == -1).all()
        )
        assert (batch["text_mask"][used:] == 0).all() and (batch["source"][used:] == -1).all()
        for n in range(used):
            rows, cols = torch.nonzero(slot == n, as_tuple=True)
            length = CONTEXT + int(batch["text_mask"][n].sum())
            # One run of positions 0..length-1 in a single row: a sample is never split.
            assert len(set(rows.tolist())) == 1 and len(cols) == length
            assert torch.equal(cols, torch.arange(cols[0], cols[0] + length))
            assert pos[slot == n].tolist() == list(range(length))
        assert set(slot.unique().tolist()) <= set(range(-1, used))
        assert (pos[slot < 0] == 0).all()
        # The batch ended because the next sample fit in no row, or because every slot was used.
        if used < 6:
            free = (slot < 0).sum(1).max()
            assert free < CONTEXT + L


def test_every_sample_is_packed_once_in_stream_order(tmp_path):
    """Packing changes how many samples a batch holds, never which samples come or in what order."""
    paths = varied_shards(str(tmp_path), 3, 9)
    plain = build_loader(
        DataConfig(
            sources=[SourceConfig(shards=paths)], batch_size=6, num_workers=0, image_size=16, shuffle_buffer=7
        ),
        tiny_tokenizer(),
        L,
        "\n",
    )
    expected = _used_ids(_take(plain, 12))
    packed = _used_ids(_take(_loader(_cfg([SourceConfig(shards=paths)])), 12))
    assert len(packed) > 40 and packed == expected[: len(packed)]


@pytest.mark.parametrize("mix", ["batch", "sample"])
def test_sources_mix_as_unpacked_and_no_sample_is_lost(tmp_path, mix):
    a = varied_shards(str(tmp_path / "a"), 2, 8, seed=1)
    b = varied_shards(str(tmp_path / "b"), 2, 8, seed=2)
    sources = [SourceConfig(name="a", shards=a, ratio=2), SourceConfig(name="b", shards=b, ratio=1)]
    batches = _take(_loader(_cfg(sources, mix=mix)), 20)
    if mix == "batch":  # one source per batch, as the official MultiIterLoader
        for batch in batches:
            used = batch["source"][batch["source"] >= 0]
            assert len(set(used.tolist())) == 1
    # Per source, the samples are that source's stream in order: a sample that did not fit waited for
    # the next batch of its source instead of being dropped.
    plain = _take(
        build_loader(_cfg(sources, mix=mix, pack_length=0, pack_rows=0), tiny_tokenizer(), L, "\n"), 40
    )
    for s in (0, 1):
        got = [
            i for bt in batches for i, src in zip(bt["sample_id"].tolist(), bt["source"].tolist()) if src == s
        ]
        want = [
            i for bt in plain for i, src in zip(bt["sample_id"].tolist(), bt["source"].tolist()) if src == s
        ]
        assert got == want[: len(got)]


def test_instructions_lengthen_the_context_they_are_packed_with(tmp_path):
    cfg = _cfg([SourceConfig(shards=varied_shards(str(tmp_path), 2, 8))], pack_length=80)
    contexts = (CONTEXT + 5, CONTEXT + 20)
    for batch in _take(_loader(cfg, contexts, instructions=2), 6):
        ins = int(batch["instruction"][0])
        assert (batch["instruction"] == ins).all()
        for n in range(int((batch["sample_id"] >= 0).sum())):
            assert int((batch["pack_slot"] == n).sum()) == contexts[ins] + int(batch["text_mask"][n].sum())


@pytest.mark.parametrize("workers", [0, 2])
def test_packed_resume_is_exact_with_a_sample_waiting(tmp_path, workers):
    a = varied_shards(str(tmp_path / "a"), 3, 6, seed=3)
    b = [*varied_shards(str(tmp_path / "b"), 2, 5, seed=4), bad_shard(str(tmp_path / "damaged.tar"))]
    sources = [SourceConfig(name="a", shards=a, ratio=2), SourceConfig(name="b", shards=b, ratio=1)]
    # Split shards reach the damaged one early; 40-token rows fill before the 6 slots do.
    cfg = _cfg(sources, mix="sample", num_workers=workers, pack_length=40, resampled=False)
    first, then = 5, 7
    full_loader = _loader(cfg)
    full = _take(full_loader, first + then)
    full_stats = full_loader.stats()
    loader = _loader(cfg)
    head = _take(loader, first)
    state = json.loads(json.dumps(loader.state_dict()))
    resumed = _loader(cfg)
    resumed.load_state_dict(state)
    tail = _take(resumed, then)
    for i, (x, y) in enumerate(zip(head + tail, full)):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), f"batch {i}, {key}"
    assert resumed.stats() == full_stats and full_stats["corrupt_image"] + full_stats["truncated_image"] > 0
    # The resume really started with samples waiting: some batch ended with its rows full.
    assert any(int((bt["sample_id"] >= 0).sum()) < 6 for bt in full)


def test_packing_settings_are_checked():
    from mgpt4.strict_config import ConfigError

    with pytest.raises(ConfigError, match=r"data\.pack_rows: packing needs the number of rows"):
        DataConfig(sources=[SourceConfig(shards="x.tar")], pack_length=64).validate()
    with pytest.raises(ConfigError, match="packing is for the stage-1 kinds"):
        DataConfig(kind="align", align_root="x", pack_length=64, pack_rows=1).validate()
    cfg = _cfg([SourceConfig(shards="x.tar")], pack_length=20)
    with pytest.raises(
        ValueError, match="cannot hold the longest sample, 9 context \\+ 12 answer tokens = 21"
    ):
        _loader(cfg)


def test_row_suggestion_and_first_fit():
    assert suggest_rows(256, 48.0, 1024) == 12 and suggest_rows(8, 46, 1024) == 1
    packer = RowPacker(rows=2, length=10, slots=5)
    assert packer.place(6) and packer.place(6) and packer.place(4) and not packer.place(5)
    assert packer.placed == [(0, 0, 6), (1, 0, 6), (0, 6, 4)]
