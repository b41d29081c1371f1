"""Curate item stores (merge, torn writes, resume bookkeeping) and image sources (folders, shards, lists)."""

from __future__ import annotations

import io
import os
import re
import tarfile

import pytest
from PIL import Image

from mgpt4.curate.store import (
    DONE,
    FAILED,
    PartWriter,
    StoreError,
    open_store,
    part_path,
    pending_ids,
    read_store,
    record,
    upstream_chain,
)
from mgpt4.image_sources import ImageItem, SourceError, list_images, safe_id
from tests.curate_fixtures import draw_images


def test_done_is_never_replaced_by_a_later_failure_and_last_failure_wins(tmp_path):
    root = str(tmp_path / "s")
    open_store(root, "describe", {}, None, 0)
    with PartWriter(root, 0) as w:
        w.write([record("a", DONE, text="first"), record("b", FAILED, error="one")])
    with PartWriter(root, 1) as w:
        w.write(
            [record("a", FAILED, error="late"), record("b", FAILED, error="two"), record("c", DONE, text="x")]
        )
    state = read_store(root)
    assert state.records["a"]["text"] == "first"
    assert state.records["b"]["error"] == "two"
    assert sorted(state.done()) == ["a", "c"]
    assert sorted(state.failed()) == ["b"]
    assert pending_ids(["a", "b", "c", "d"], state, retry_failed=True) == ["b", "d"]
    assert pending_ids(["a", "b", "c", "d"], state, retry_failed=False) == ["d"]


def test_torn_write_is_ignored_and_the_next_writer_starts_a_fresh_line(tmp_path):
    root = str(tmp_path / "s")
    open_store(root, "describe", {}, None, 0)
    with PartWriter(root, 0) as w:
        w.write([record("a", DONE, text="ok")])
    with open(part_path(root, 0), "ab") as f:  # a kill in the middle of a record
        f.write(b'{"id":"b","status":"do')
    state = read_store(root)
    assert sorted(state.records) == ["a"] and state.torn_lines == 1
    with PartWriter(root, 0) as w:
        w.write([record("b", DONE, text="redone")])
    state = read_store(root)
    assert state.records["b"]["text"] == "redone" and state.torn_lines == 1


def test_a_record_without_id_or_status_names_file_and_line(tmp_path):
    root = str(tmp_path / "s")
    os.makedirs(root)
    with open(part_path(root, 0), "w") as f:
        f.write('{"id": "a", "status": "done"}\n{"id": "b", "status": "maybe"}\n')
    with pytest.raises(StoreError, match=r"part-r00000.jsonl:2"):
        read_store(root)


def test_a_store_of_another_step_is_refused_and_the_chain_is_followed(tmp_path):
    d, f = str(tmp_path / "d"), str(tmp_path / "f")
    open_store(d, "describe", {"a": 1}, None, 0)
    open_store(f, "fix", {}, d, 0)
    with pytest.raises(StoreError, match="holds the output of 'describe'"):
        open_store(d, "fix", {}, None, 0)
    assert [s for s, _ in upstream_chain(f)] == ["fix", "describe"]


def _jpeg(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="JPEG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_folders_shards_and_list_files_become_unique_items(tmp_path):
    draw_images(str(tmp_path / "imgs"), 2)
    draw_images(str(tmp_path / "imgs" / "sub dir"), 1)
    shard = str(tmp_path / "00000.tar")
    with tarfile.open(shard, "w") as tar:
        for key, color in (("000000001", "red"), ("000000002", "blue")):
            _add(tar, f"{key}.jpg", _jpeg(color))
            _add(tar, f"{key}.txt", b"caption")
    (tmp_path / "list.txt").write_text("# my images\nimgs/img_00.jpg\nextra\t/nowhere/missing.jpg\n")
    items = list_images([str(tmp_path / "imgs"), str(tmp_path / "0000{0..0}.tar")])
    assert [i.id for i in items] == ["000000001", "000000002", "img_00", "img_01", "sub_dir__img_00"]
    shard_item = items[1]
    assert shard_item.member == "000000002.jpg" and shard_item.read_bytes() == _jpeg("blue")
    again = ImageItem.from_record({"id": shard_item.id, "source": shard_item.to_dict()})
    assert again == shard_item
    listed = list_images([str(tmp_path / "list.txt")])
    assert [(i.id, i.path) for i in listed] == [
        ("extra", "/nowhere/missing.jpg"),
        ("img_00", str(tmp_path / "imgs" / "img_00.jpg")),
    ]
    with pytest.raises(SourceError, match="two images get the id 'img_00'"):
        list_images([str(tmp_path / "imgs"), str(tmp_path / "list.txt")])
    with pytest.raises(SourceError, match="no such folder"):
        list_images([str(tmp_path / "nope")])


def test_a_damaged_shard_gives_what_it_can_and_a_problem(tmp_path):
    good = tmp_path / "good.tar"
    with tarfile.open(good, "w") as tar:
        for k in range(3):
            _add(tar, f"{k:05d}.jpg", _jpeg("red") + bytes(600))
    data = good.read_bytes()
    cut = tmp_path / "cut.tar"
    # Member 0 is whole; member 1's header is there but its data is cut after 100 bytes.
    cut.write_bytes(data[: 512 * 5 + 100])
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 10)
    problems: list[str] = []
    items = list_images([str(cut), str(tmp_path / "junk.tar")], problems)
    assert [i.id for i in items] == ["00000", "00001"]
    assert items[0].read_bytes().startswith(b"\xff\xd8\xff")
    with pytest.raises(OSError, match="shard is truncated"):
        items[1].read_bytes()
    assert len(problems) == 2
    assert "cut.tar: damaged shard, read 2 image(s)" in problems[0]
    assert "junk.tar: not a readable uncompressed tar shard" in problems[1]


def test_ids_are_unique_by_themselves_and_only_true_duplicates_are_errors(tmp_path):
    """Issue 16.6: names that differ only in non-ASCII letters, in extension or in case get ids of their own."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    names = [
        "犬.jpg",
        "猫.jpg",
        "IMG_0001.jpg",
        "IMG_0001.png",
        "a b.jpg",
        "a_b.jpg",
        "Cat.jpg",
        "cat.jpg",
        "solo.png",
    ]
    for n in names:
        (imgs / n).write_bytes(_jpeg("red"))
    items = list_images([str(imgs)])
    ids = {os.path.basename(i.path): i.id for i in items}
    assert len(set(ids.values())) == len(names)  # unique, also ignoring case
    assert len({i.casefold() for i in ids.values()}) == len(names)
    assert ids["犬.jpg"] == "犬" and ids["猫.jpg"] == "猫"
    assert ids["IMG_0001.jpg"] == "IMG_0001_jpg" and ids["IMG_0001.png"] == "IMG_0001_png"
    assert re.fullmatch(r"a_b-[0-9a-f]{8}", ids["a b.jpg"]) and re.fullmatch(
        r"a_b-[0-9a-f]{8}", ids["a_b.jpg"]
    )
    assert re.fullmatch(r"Cat-[0-9a-f]{8}", ids["Cat.jpg"]) and re.fullmatch(
        r"cat-[0-9a-f]{8}", ids["cat.jpg"]
    )
    assert ids["solo.png"] == "solo"  # no collision, no suffix
    assert all(safe_id(i) == i for i in ids.values())  # every id is a file name filter accepts
    # Stable: the same ids again, whatever the order the inputs are given in.
    again = list_images([str(imgs / n) for n in reversed(names)])
    assert {os.path.basename(i.path): i.id for i in again} == ids
    # True duplicates are still errors: one ID<Tab>PATH id for two files, or one file twice.
    (tmp_path / "ids.txt").write_text(f"same\t{imgs / 'solo.png'}\nsame\t{imgs / 'a b.jpg'}\n")
    with pytest.raises(SourceError, match="two images get the id 'same'"):
        list_images([str(tmp_path / "ids.txt")])
    with pytest.raises(SourceError, match=r"solo\.png is given twice"):
        list_images([str(imgs), str(imgs / "solo.png")])
