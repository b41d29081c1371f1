"""A saved data position belongs to its inputs: a changed shard list (or align set) is refused with what
changed, and a fresh data pass starts a new seeded order that itself resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch

from mgpt4.data import DataConfig, SourceConfig, build_loader
from mgpt4.data.loader import DataStateMismatch, describe_list_change
from tests.data_fixtures import make_align, numbered_shards, tiny_tokenizer

L = 12


def _take(loader, n):
    it = iter(loader)
    out = [next(it) for _ in range(n)]
    return out


def _ids(batches) -> list[list[int]]:
    return [b["sample_id"].tolist() for b in batches]


def _cfg(shards, **kw) -> DataConfig:
    kw = {"batch_size": 2, "num_workers": 0, "image_size": 16, "shuffle_buffer": 5, **kw}
    return DataConfig(sources=[SourceConfig(name="laion", shards=shards)], **kw)


def _saved_state(cfg: DataConfig, batches: int = 3) -> dict:
    loader = build_loader(cfg, tiny_tokenizer(), L, "\n")
    _take(loader, batches)
    state = json.loads(json.dumps(loader.state_dict()))  # what a checkpoint keeps: plain values
    loader.close()
    return state


@pytest.mark.parametrize("resampled", [True, False])
@pytest.mark.parametrize(
    "change,expected",
    [
        ("append", r"source 'laion': 2 shard\(s\) appended \(.*00004\.tar, .*00005\.tar\)"),
        ("remove", r"source 'laion': 4 shard\(s\) at the checkpoint, 3 now; 1 removed \(.*00001\.tar\)"),
        ("reorder", r"source 'laion': the same 4 shard\(s\) in another order"),
    ],
)
def test_a_changed_shard_list_refuses_the_saved_position(tmp_path, resampled, change, expected):
    paths = numbered_shards(str(tmp_path), 6, 5)
    before = paths[:4]
    after = {"append": paths, "remove": [p for p in before if not p.endswith("00001.tar")],
             "reorder": list(reversed(before))}[change]  # fmt: skip
    state = _saved_state(_cfg(before, resampled=resampled))
    resumed = build_loader(_cfg(after, resampled=resampled), tiny_tokenizer(), L, "\n")
    with pytest.raises(DataStateMismatch, match=expected):
        resumed.load_state_dict(state)
    # The same list resumes.
    build_loader(_cfg(before, resampled=resampled), tiny_tokenizer(), L, "\n").load_state_dict(state)


def test_a_changed_align_set_refuses_the_saved_position(tmp_path):
    root = make_align(tmp_path / "a", 10)
    cfg = DataConfig(kind="align", align_root=root, batch_size=3, num_workers=0, image_size=16)
    state = _saved_state(cfg, 2)
    with open(f"{root}/filter_cap.json") as f:
        anns = json.load(f)
    anns["annotations"] = anns["annotations"][:8]
    with open(f"{root}/filter_cap.json", "w") as f:
        json.dump(anns, f)
    with pytest.raises(
        DataStateMismatch, match=r"filter_cap\.json: 10 pair\(s\) at the checkpoint, 8 now; 2 removed"
    ):
        build_loader(cfg, tiny_tokenizer(), L, "\n").load_state_dict(state)


def test_every_change_is_listed_at_once(tmp_path):
    paths = numbered_shards(str(tmp_path), 5, 5)
    state = _saved_state(_cfg(paths[:4]))
    other = _cfg(paths, batch_size=3)
    with pytest.raises(DataStateMismatch) as err:
        build_loader(other, tiny_tokenizer(), L, "\n").load_state_dict(state)
    assert "batch_size: saved 2, now 3" in str(err.value) and "1 shard(s) appended" in str(err.value)


def test_describe_list_change_names_the_kind():
    assert describe_list_change("shard", ["a", "b"], ["a", "b", "c"]) == "1 shard(s) appended (c)"
    assert (
        describe_list_change("shard", ["a", "b", "c"], ["c", "a", "b"])
        == "the same 3 shard(s) in another order"
    )
    assert describe_list_change("pair", ["1", "2", "3"], ["1", "4", "3"]) == (
        "3 pair(s) at the checkpoint, 3 now; 1 removed (2); 1 added (4)"
    )


@pytest.mark.parametrize("kind", ["webdataset", "align"])
def test_a_fresh_pass_draws_a_new_order_that_resumes_exactly(tmp_path, kind):
    if kind == "align":
        cfg = DataConfig(kind="align", align_root=make_align(tmp_path / "a", 12), batch_size=2,
                         num_workers=2, image_size=16)  # fmt: skip
    else:
        cfg = _cfg(numbered_shards(str(tmp_path), 4, 5), num_workers=2)
    tok = tiny_tokenizer()
    first_pass = _ids(_take(build_loader(cfg, tok, L, "\n"), 4))

    loader = build_loader(cfg, tok, L, "\n")
    loader.start_pass(1)
    fresh = _take(loader, 6)
    assert _ids(fresh) != first_pass[: len(fresh)] and _ids(fresh[:4]) != first_pass
    again = build_loader(cfg, tok, L, "\n")
    again.start_pass(1)
    head = _take(again, 3)
    assert _ids(head) == _ids(fresh[:3])  # position-seeded: the same pass is the same stream
    state = json.loads(json.dumps(again.state_dict()))
    again.close()
    assert state["data_pass"] == 1 and state["batches"] == 3

    resumed = build_loader(cfg, tok, L, "\n")
    resumed.load_state_dict(state)  # continues pass 1, not pass 0
    tail = _take(resumed, 3)
    for a, b in zip(head + tail, fresh):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    resumed.close()
    loader.close()
