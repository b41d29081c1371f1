"""Hugging Face datasets on disk (parquet files, save_to_disk folders) as stage-1 pairs and stage-2
conversations: embedded {bytes, path} images, paths, lists; caption or conversation columns; names settable."""

from __future__ import annotations

import os

import datasets
import pytest

from mgpt4.data import SourceConfig, build_loader
from mgpt4.data.formats.annotations import AnnotationError
from mgpt4.data.formats.hf import load_hf
from tests.data_fixtures import jpeg, tiny_tokenizer
from tests.format_fixtures import llava_set, write_images
from tests.test_data_formats import _captions, _cfg
from tests.test_data_formats_conversations import _conv_cfg, _loader, data_model  # noqa: F401 (a fixture)
from tests.test_data_resume import _take

L = 12


def _parquet(folder, count, **columns) -> str:
    os.makedirs(folder, exist_ok=True)
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    rows = {
        "image": [{"bytes": jpeg(40, 32, seed=i % 4), "path": f"{i}.jpg"} for i in range(count)],
        "caption": [f"sample number {i} of shard 2" for i in range(count)],
    }
    ds = datasets.Dataset.from_dict(rows, features=features)
    if columns:
        ds = ds.rename_columns(columns)
    path = os.path.join(folder, "train-00000.parquet")
    ds.to_parquet(path)
    return path


def test_parquet_with_embedded_images_trains_as_pairs(tmp_path):
    path = _parquet(str(tmp_path / "p"), 6)
    cfg = _cfg(
        [SourceConfig(format="huggingface", annotations=path)],
        resampled=False,
        shuffle_buffer=6,
        batch_size=2,
    )
    captions = _captions(_take(build_loader(cfg, tiny_tokenizer(), L, "\n"), 3))
    assert sorted(captions) == sorted(f"sample number {i} of shard 2" for i in range(6))


def test_a_folder_of_parquet_files_with_renamed_columns_mixes_and_resumes(tmp_path):
    from tests.test_data_resume import _resume_matches

    _parquet(str(tmp_path / "p"), 7, image="jpg", caption="text")
    llava = llava_set(str(tmp_path / "l"), 5)
    cfg = _cfg(
        [SourceConfig(name="hf", format="huggingface", annotations=str(tmp_path / "p"), image_column="jpg",
                      text_column="text"),
         SourceConfig(name="llava", format="llava", annotations=llava)],
        mix="sample", num_workers=2,
    )  # fmt: skip
    _resume_matches(cfg, first=3, then=3)


def test_save_to_disk_with_paths_and_conversations(tmp_path, data_model):  # noqa: F811
    folder = str(tmp_path / "imgs")
    images = write_images(folder, 4)
    conv = [
        [{"role": "user", "content": "<image>What is this?"}, {"role": "assistant", "content": f"sample {i}"},
         {"role": "user", "content": "and?"}, {"role": "assistant", "content": "a red circle"}]
        for i in range(4)
    ]  # fmt: skip
    ds = datasets.Dataset.from_dict({"images": [[p] for p in images], "messages": conv})
    ds.save_to_disk(str(tmp_path / "disk"))
    src = SourceConfig(
        format="huggingface", annotations=str(tmp_path / "disk"), image_column="images", text_column="messages",
        image_root=folder,
    )  # fmt: skip
    loader = _loader(_conv_cfg([src], batch_size=2), data_model)
    batch = _take(loader, 1)[0]
    loader.close()
    tok = data_model.tokenizer
    answers = tok.decode(batch["text_ids"][0][batch["text_labels"][0].bool()].tolist())
    assert answers.count("###") == 2 and "circle" in answers.replace(" ", "")
    assert batch["image"].float().std() > 0


def test_every_bad_row_in_one_error(tmp_path):
    folder = str(tmp_path / "imgs")
    images = write_images(folder, 2)
    rows = {
        "image": [[images[0]], [], ["img/absent.jpg"], [images[1]], [images[0], images[1]]],
        "caption": ["good", "no image", "missing file", "", "two images"],
    }
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(AnnotationError) as e:
        load_hf(str(tmp_path / "bad.parquet"), image_root=folder)
    text = str(e.value)
    assert "4 problem(s) among 5 rows" in text
    for expected in ("row 1: 'image': expected an image", "row 2: image file", "row 3: 'caption': an empty caption",
                     "row 4: 2 images"):  # fmt: skip
        assert expected in text, expected
    with pytest.raises(AnnotationError, match=r"no column 'text'; the columns are \['image', 'caption'\]"):
        load_hf(str(tmp_path / "bad.parquet"), text_column="text")


def test_a_missing_dataset_is_a_missing_input(tmp_path):
    from mgpt4.data.shard_stream import check_sources

    cfg = _cfg([SourceConfig(format="huggingface", annotations=str(tmp_path / "nothing"))])
    (msg,) = check_sources(cfg, 1, 0)
    assert msg.startswith("data.sources[0].annotations:") and "no such dataset" in msg


def test_column_settings_only_for_huggingface():
    from mgpt4.strict_config import ConfigError

    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.text_column: only for format huggingface"):
        _cfg([SourceConfig(format="llava", annotations="a.json", text_column="x")]).validate()
    with pytest.raises(ConfigError, match="needs the parquet file"):
        _cfg([SourceConfig(format="huggingface")]).validate()
