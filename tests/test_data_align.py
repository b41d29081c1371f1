"""Stage-2 cc_sbu_align: checks up front, distributed epoch order, damaged images."""

from __future__ import annotations

import itertools
import os
import threading
from collections import Counter

import pytest
import torch

from mgpt4.data import DataConfig, build_loader
from mgpt4.data.samples import MAX_SKIP_RUN
from mgpt4.data.workers import DataSourceError
from mgpt4.tokenizer import encode_answers
from tests.data_fixtures import make_align, tiny_tokenizer

SIZE = 16
L = 24


def _cfg(root, **kw) -> DataConfig:
    base = {"kind": "align", "align_root": root, "batch_size": 3, "num_workers": 0, "image_size": SIZE}
    base.update(kw)
    return DataConfig(**base)


def test_missing_images_are_listed_in_one_error(tmp_path):
    root = make_align(tmp_path / "cc_sbu_align", 6)
    os.remove(os.path.join(root, "image", "1.jpg"))
    os.remove(os.path.join(root, "image", "4.jpg"))
    with pytest.raises(FileNotFoundError) as e:
        build_loader(_cfg(root), tiny_tokenizer(), L, "###")
    msg = str(e.value)
    assert "2 of 6 images" in msg and "1.jpg" in msg and "4.jpg" in msg


@pytest.mark.parametrize(
    "content,match",
    [
        ("{not json", "not valid JSON"),
        ('{"images": []}', 'expected {"annotations"'),
        ('{"annotations": [{"image_id": "0"}]}', r"annotations\[0\].caption"),
        ('{"annotations": [{"caption": "x"}]}', r"annotations\[0\].image_id"),
    ],
)
def test_bad_annotation_files_are_named(tmp_path, content, match):
    root = make_align(tmp_path / "a", 2)
    with open(os.path.join(root, "filter_cap.json"), "w") as f:
        f.write(content)
    with pytest.raises(ValueError, match=match):
        build_loader(_cfg(root), tiny_tokenizer(), L, "###")


def test_no_annotation_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"filter_cap\.json: missing"):
        build_loader(_cfg(str(tmp_path)), tiny_tokenizer(), L, "###")


def test_epochs_cover_every_pair_once_with_the_partial_batch_dropped(tmp_path):
    root = make_align(tmp_path / "a", 10)
    loader = build_loader(_cfg(root), tiny_tokenizer(), L, "###")
    it = iter(loader)
    batches = [next(it) for _ in range(6)]  # 10 pairs, batches of 3: 3 full batches per epoch
    for epoch in range(2):
        chunk = batches[3 * epoch : 3 * epoch + 3]
        assert all(b["epoch"].tolist() == [epoch] * 3 for b in chunk)
        ids = [i for b in chunk for i in b["sample_id"].tolist()]
        assert len(set(ids)) == 9
    first = [i for b in batches[:3] for i in b["sample_id"].tolist()]
    second = [i for b in batches[3:] for i in b["sample_id"].tolist()]
    assert first != second  # a new order every epoch


def test_captions_are_raw_in_stage_2(tmp_path):
    root = make_align(tmp_path / "a", 3)
    batch = next(iter(build_loader(_cfg(root), tiny_tokenizer(), L, "###")))
    texts = [f"Sample number {i}. It shows a red circle!" for i in batch["sample_id"].tolist()]
    ids, mask = encode_answers(tiny_tokenizer(), texts, "###", L)
    assert torch.equal(batch["text_ids"], ids) and torch.equal(batch["text_mask"], mask)


def test_ranks_get_disjoint_shares(tmp_path):
    root = make_align(tmp_path / "a", 13)
    shares = []
    for rank in range(2):
        loader = build_loader(_cfg(root), tiny_tokenizer(), L, "###", rank=rank, world_size=2)
        it = iter(loader)
        shares.append({i for _ in range(2) for i in next(it)["sample_id"].tolist()})  # 6 per rank
    assert len(shares[0]) == len(shares[1]) == 6
    assert shares[0].isdisjoint(shares[1])


def test_too_few_pairs_for_one_batch(tmp_path):
    root = make_align(tmp_path / "a", 5)
    with pytest.raises(ValueError, match="no full batch per epoch"):
        build_loader(_cfg(root), tiny_tokenizer(), L, "###", rank=0, world_size=2)


def test_damaged_image_is_counted_and_replaced_within_the_batch(tmp_path):
    root = make_align(tmp_path / "a", 3)
    with open(os.path.join(root, "image", "2.jpg"), "wb") as f:
        f.write(b"not a jpeg")
    loader = build_loader(_cfg(root), tiny_tokenizer(), L, "###")
    batch = next(iter(loader))
    assert batch["image"].shape == (3, 3, SIZE, SIZE)
    assert 2 not in batch["sample_id"].tolist()
    assert loader.stats()["corrupt_image"] == 1


def test_the_loader_draws_each_batch_instruction_uniformly(tmp_path):
    """Stage 2 draws one instruction per batch, uniformly, as the official `random.choice` does; the
    loader draws it from the batch position, so a rebuilt loader draws the same ones."""
    root = make_align(tmp_path / "a", 8)
    cfg = _cfg(root, batch_size=2)

    def draws(n: int) -> list[int]:
        loader = build_loader(cfg, tiny_tokenizer(), L, "###", num_instructions=4)
        batches = list(itertools.islice(iter(loader), n))
        loader.close()
        for b in batches:
            assert b["instruction"].shape == (2,) and b["instruction"].dtype == torch.int64
            assert torch.all(b["instruction"] == b["instruction"][0])  # one instruction per batch
        return [int(b["instruction"][0]) for b in batches]

    first = draws(400)
    counts = Counter(first)
    assert sorted(counts) == [0, 1, 2, 3]
    chi2 = sum((c - 100) ** 2 / 100 for c in counts.values())
    assert chi2 < 16.27, counts  # uniform at p = 0.001 with 3 degrees of freedom
    assert draws(50) == first[:50]
    no_instructions = next(iter(build_loader(cfg, tiny_tokenizer(), L, "###")))
    assert "instruction" not in no_instructions


def test_every_problem_of_filter_cap_is_listed_in_one_error(tmp_path):
    """Missing images, empty or non-string captions, bad and duplicate ids: one error with all of them,
    so one fix-up pass over the file is enough."""
    import json

    root = make_align(tmp_path / "a", 8)
    with open(os.path.join(root, "filter_cap.json")) as f:
        anns = json.load(f)["annotations"]
    anns[1]["caption"] = ""
    anns[2]["caption"] = None
    anns[3]["caption"] = ["a", "list"]
    anns[5]["image_id"] = "4"  # a second annotation for image 4
    anns.append({"image_id": None, "caption": "no id"})
    anns.append("not an object")
    os.remove(os.path.join(root, "image", "6.jpg"))
    os.remove(os.path.join(root, "image", "7.jpg"))
    with open(os.path.join(root, "filter_cap.json"), "w") as f:
        json.dump({"annotations": anns}, f)
    with pytest.raises(ValueError) as e:
        build_loader(_cfg(root), tiny_tokenizer(), L, "###")
    msg = str(e.value)
    assert "filter_cap.json" in msg
    for part in (
        "annotations[1].caption",
        "annotations[2].caption",
        "annotations[3].caption",
        "'4' appears 2 times (annotations[4], annotations[5])",
        "annotations[8].image_id",
        "annotations[9]",
        "2 of 8 images",
        "6.jpg",
        "7.jpg",
    ):
        assert part in msg, (part, msg)


def test_a_folder_whose_images_are_all_unreadable_stops_with_one_line(tmp_path):
    """HTML pages saved as .jpg (a scrape that got error pages) used to keep the worker spinning over
    empty batches; the source now stops after MAX_SKIP_RUN unreadable pairs in a row, saying why."""
    root = make_align(tmp_path / "a", 4)
    for i in range(4):
        with open(os.path.join(root, "image", f"{i}.jpg"), "wb") as f:
            f.write(b"<!DOCTYPE html><html><body>403 Forbidden</body></html>\n")
    loader = build_loader(_cfg(root, batch_size=2), tiny_tokenizer(), L, "###")
    out: list = []

    def first():  # in a thread only as a hang guard; the assertion is on the error
        try:
            next(iter(loader))
            out.append(None)
        except BaseException as e:
            out.append(e)

    thread = threading.Thread(target=first, daemon=True)
    thread.start()
    thread.join(600)
    assert out, "the loader neither gave a batch nor stopped"
    assert isinstance(out[0], DataSourceError), out[0]
    message = str(out[0])
    assert message.startswith(f"source {root!r}: {MAX_SKIP_RUN} samples in a row gave no samples"), message
    assert f"(corrupt_image {MAX_SKIP_RUN})" in message and ".jpg" in message and "\n" not in message


def test_captions_with_replacement_or_nul_characters_are_listed(tmp_path):
    """Mojibake in filter_cap.json is a problem of the file, listed with the others, never trained on."""
    import json

    root = make_align(tmp_path / "a", 4)
    with open(os.path.join(root, "filter_cap.json")) as f:
        anns = json.load(f)["annotations"]
    anns[1]["caption"] = "the dog\ufffds ball"
    anns[2]["caption"] = "a\x00 r\x00e\x00d"
    with open(os.path.join(root, "filter_cap.json"), "w") as f:
        json.dump({"annotations": anns}, f)
    with pytest.raises(ValueError) as e:
        build_loader(_cfg(root), tiny_tokenizer(), L, "###")
    msg = str(e.value)
    assert "annotations[1].caption" in msg and "U+FFFD" in msg
    assert "annotations[2].caption" in msg and "NUL" in msg
