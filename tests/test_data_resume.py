"""The data position: consume N batches, save, rebuild, continue == the uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch

from mgpt4.data import DataConfig, SourceConfig, build_loader
from tests.data_fixtures import bad_shard, make_align, numbered_shards, tiny_tokenizer

L = 12


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _same(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), f"batch {i}, {key}"


def _resume_matches(
    cfg: DataConfig, first: int, then: int, end_sym: str = "\n", max_len: int = L, instructions: int = 0
) -> None:
    tok = tiny_tokenizer()
    full_loader = build_loader(cfg, tok, max_len, end_sym, num_instructions=instructions)
    full = _take(full_loader, first + then)
    full_stats = full_loader.stats()
    full_loader.close()

    loader = build_loader(cfg, tok, max_len, end_sym, num_instructions=instructions)
    head = _take(loader, first)
    state = json.loads(json.dumps(loader.state_dict()))  # what a checkpoint stores: plain values
    loader.close()

    resumed = build_loader(cfg, tok, max_len, end_sym, num_instructions=instructions)
    resumed.load_state_dict(state)
    assert resumed.batches_consumed == first
    tail = _take(resumed, then)
    _same(head + tail, full)
    assert resumed.stats() == full_stats
    resumed.close()


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("resampled", [True, False])
def test_webdataset_resume_is_exact(tmp_path, workers, resampled):
    a = numbered_shards(str(tmp_path / "a"), 4, 5)
    b = [*numbered_shards(str(tmp_path / "b"), 3, 4), bad_shard(str(tmp_path / "damaged.tar"))]
    cfg = DataConfig(
        sources=[SourceConfig(name="a", shards=a, ratio=2), SourceConfig(name="b", shards=b, ratio=1)],
        mix="sample",
        resampled=resampled,
        shuffle_buffer=7,  # blocks end inside batches and shards
        batch_size=3,
        num_workers=workers,
        image_size=16,
    )
    _resume_matches(cfg, first=5, then=6)


def test_webdataset_resume_at_block_boundaries(tmp_path):
    paths = numbered_shards(str(tmp_path), 3, 4)
    cfg = DataConfig(
        sources=[SourceConfig(shards=paths)], shuffle_buffer=3, batch_size=3, num_workers=0, image_size=16
    )
    _resume_matches(cfg, first=2, then=3)  # every batch ends exactly at the end of a block


def test_align_resume_is_exact_across_epochs(tmp_path):
    root = make_align(tmp_path / "a", 10)
    cfg = DataConfig(kind="align", align_root=root, batch_size=3, num_workers=2, image_size=16)
    # 3 batches per epoch; stopping after 5 also leaves worker 1 next in the round robin.
    _resume_matches(cfg, first=5, then=4, end_sym="###", max_len=24)


def test_align_resume_replays_the_instructions(tmp_path):
    root = make_align(tmp_path / "a", 10)
    cfg = DataConfig(kind="align", align_root=root, batch_size=3, num_workers=2, image_size=16)
    _resume_matches(cfg, first=5, then=4, end_sym="###", max_len=24, instructions=4)


def test_position_counts_only_acknowledged_batches(tmp_path):
    """A prefetching consumer (the device feeder) takes batches early; the position follows its acks."""
    paths = numbered_shards(str(tmp_path), 2, 6)
    cfg = DataConfig(
        sources=[SourceConfig(shards=paths)], batch_size=2, num_workers=0, image_size=16, shuffle_buffer=5
    )
    full = _take(build_loader(cfg, tiny_tokenizer(), L, "\n"), 6)

    loader = build_loader(cfg, tiny_tokenizer(), L, "\n")
    loader.hold_until_ack()
    it = iter(loader)
    taken = [next(it) for _ in range(4)]  # two of them only prefetched
    loader.ack()
    loader.ack()
    state = loader.state_dict()
    assert state["batches"] == 2
    resumed = build_loader(cfg, tiny_tokenizer(), L, "\n")
    resumed.load_state_dict(state)
    _same(taken[:2] + _take(resumed, 4), full)


def test_changed_settings_refuse_the_saved_position(tmp_path):
    paths = numbered_shards(str(tmp_path), 2, 3)
    cfg = DataConfig(sources=[SourceConfig(shards=paths)], batch_size=2, num_workers=0, image_size=16)
    loader = build_loader(cfg, tiny_tokenizer(), L, "\n")
    _take(loader, 1)
    state = loader.state_dict()
    other = DataConfig(sources=[SourceConfig(shards=paths)], batch_size=4, num_workers=0, image_size=16)
    with pytest.raises(ValueError, match="batch_size: saved 2, now 4"):
        build_loader(other, tiny_tokenizer(), L, "\n").load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        loader.load_state_dict({"batches": 3})


def test_loading_a_position_restarts_a_running_iteration(tmp_path):
    paths = numbered_shards(str(tmp_path), 2, 4)
    cfg = DataConfig(sources=[SourceConfig(shards=paths)], batch_size=2, num_workers=0, image_size=16)
    loader = build_loader(cfg, tiny_tokenizer(), L, "\n")
    first = _take(loader, 3)
    start = build_loader(cfg, tiny_tokenizer(), L, "\n").state_dict()
    loader.load_state_dict(start)
    _same(_take(loader, 3), first)
