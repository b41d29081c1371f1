"""The frozen-feature cache: extraction writes what the loader reads, resumes, counts bad samples, and
training from it equals training from the images with the same crops, for LLMs of different widths."""

from __future__ import annotations

import copy
import io
import json
import os
import pathlib
import shutil

import numpy as np
import pytest
import torch

from mgpt4.config import Config, ModelConfig, OptimConfig, TrainConfig, WeightsConfig
from mgpt4.data import DataConfig, DeviceFeeder, SourceConfig, build_loader
from mgpt4.data.batches import model_inputs
from mgpt4.data.feature_shards import MANIFEST_FILE, decode_features, read_manifest
from mgpt4.data.shard_stream import source_urls
from mgpt4.data.synthetic import write_shards
from mgpt4.data.tar_reader import TarReader
from mgpt4.data.transforms import ImageTransform, normalize_uint8, sample_crop_uniforms
from mgpt4.dist import RankInfo
from mgpt4.features.extract import ExtractOptions, FeatureShardWriter, extract
from mgpt4.model import from_config
from mgpt4.model.presets import stage1_text, tiny
from mgpt4.strict_config import ConfigError
from mgpt4.train.feature_cache import check_feature_cache
from tests.data_fixtures import bad_shard
from tests.launch import REPO

ONE_RANK = RankInfo()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Two synthetic image sources, and official-format tiny weights: one ViT + Q-Former, two LLMs
    (hidden 64 and 96) with one tokenizer."""
    from mgpt4.train.assets import ensure_tiny_weights

    root = tmp_path_factory.mktemp("features")
    laion, captions = write_shards(str(root / "laion"), 3, 10, min_size=60, max_size=110, seed=1)
    ccsbu, more = write_shards(str(root / "ccsbu"), 2, 8, min_size=60, max_size=110, seed=2)
    old = os.environ.get("MGPT4_CACHE")
    os.environ["MGPT4_CACHE"] = str(root / "cache")
    try:
        narrow = ensure_tiny_weights(tiny(), captions + more)
        wide_cfg = tiny()
        wide_cfg.llm.hidden_size, wide_cfg.llm.intermediate_size = 96, 192
        wide = ensure_tiny_weights(wide_cfg, captions + more)
    finally:
        if old is None:
            os.environ.pop("MGPT4_CACHE")
        else:
            os.environ["MGPT4_CACHE"] = old
    return {"root": root, "laion": laion, "ccsbu": ccsbu, "narrow": narrow, "wide": wide}


def _config(assets, width: int = 64, model: ModelConfig | None = None, **data) -> Config:
    """The official tiny model (LLM `width` wide) on two sources, or `model` (its own vision path) on them."""
    if model is None:
        model = tiny()
        model.text = stage1_text()
        w = assets["narrow"]
        llm = w.llm if width == 64 else assets["wide"].llm
        if width != 64:
            model.llm.hidden_size, model.llm.intermediate_size = width, 2 * width
        model.weights = WeightsConfig(eva_vit=w.eva_vit, blip2=w.blip2, llm=llm)
    base = {
        "sources": [
            SourceConfig(name="laion", shards=assets["laion"], ratio=2.0),
            SourceConfig(name="ccsbu", shards=assets["ccsbu"], ratio=1.0),
        ],
        "batch_size": 4,
        "num_workers": 0,
        "image_size": 56,
        "shuffle_buffer": 6,
        "resampled": False,
        "crops": "sample",
    }
    base.update(data)
    return Config(
        recipe="test",
        model=model,
        data=DataConfig(**base),
        optim=OptimConfig(lr=1e-2, min_lr=1e-3, warmup_lr=1e-3, warmup_steps=1),
        train=TrainConfig(steps=8, precision="fp32"),
    )


def _extract(cfg: Config, out: str, dtype: str = "fp32", **kw) -> None:
    extract(
        cfg,
        ExtractOptions(out=out, batch_size=3, num_workers=kw.pop("num_workers", 0), dtype=dtype, **kw),
        ONE_RANK,
    )


@pytest.fixture(scope="module")
def cache(assets):
    out = str(assets["root"] / "cache-fp32")
    _extract(_config(assets), out)
    return out


def _assert_training_crop_features(model, jpg: bytes, crop_name: str, key: str, npy: bytes) -> None:
    """A cached sample is the model's image tokens on the crop training draws from (crop name, key)."""
    pixels = torch.empty(3, 56, 56, dtype=torch.uint8)
    ImageTransform(56, train=True)(jpg, sample_crop_uniforms(0, crop_name, key), pixels)
    with torch.no_grad():
        expected = model.image_features(normalize_uint8(pixels[None]))[0]
    got = torch.empty(8, 64)
    decode_features(npy, (8, 64), got)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_extraction_writes_the_loader_layout_with_the_training_crop(assets, cache):
    cfg = _config(assets)
    folder = os.path.join(cache, "laion")
    assert sorted(f for f in os.listdir(folder) if f.endswith(".tar")) == [
        "00000.tar",
        "00001.tar",
        "00002.tar",
    ]
    manifest = read_manifest(folder)
    assert manifest["samples"] == 30 and manifest["shape"] == [8, 64] and manifest["dtype"] == "fp32"
    assert manifest["crops"]["draw"] == "sample" and manifest["weights"]["eva_vit"]["bytes"] > 0
    # Sample by sample: the features are the model's Q-Former output on the crop training draws.
    model = from_config(copy.deepcopy(cfg.model)).eval()
    images, cached = TarReader(assets["laion"][1]), TarReader(os.path.join(folder, "00001.tar"))
    for _ in range(10):
        key, files = images.next_sample()
        fkey, ffiles = cached.next_sample()
        assert fkey == key and ffiles["txt"] == files["txt"]
        _assert_training_crop_features(model, files["jpg"], "00001.tar", key, ffiles["npy"])
        assert json.loads(ffiles["json"]) == {
            "key": key,
            "caption": files["txt"].decode(),
            "image_shard": "00001.tar",
        }


def test_fp16_features_store_two_bytes_per_value(assets, tmp_path):
    """What the README's 48 KiB per sample (32 x 768 x 2 bytes) rests on: the stored array and nothing more."""
    out = str(tmp_path / "fp16")
    cfg = _config(assets)
    cfg.data.sources = cfg.data.sources[1:]
    _extract(cfg, out, dtype="fp16")
    reader = TarReader(os.path.join(out, "ccsbu", "00000.tar"))
    _, files = reader.next_sample()
    array = np.lib.format.read_array(io.BytesIO(files["npy"]))
    assert array.dtype == np.float16 and array.shape == (8, 64)
    assert len(files["npy"]) == 128 + 8 * 64 * 2  # the .npy header, then the values


def _train(cfg: Config, steps: int) -> list[float]:
    """The trainer's step without DeepSpeed (plain AdamW on the projection): the losses, one per step."""
    torch.manual_seed(0)
    model = from_config(copy.deepcopy(cfg.model))
    loader = build_loader(
        cfg.data,
        model.tokenizer,
        cfg.model.text.max_txt_len,
        cfg.model.text.end_sym,
        context_lengths=[lay.context_length for lay in model.sample_layouts()],
        feature_shape=cfg.model.image_token_shape() if cfg.data.kind == "features" else None,
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for batch, _ in zip(DeviceFeeder(loader, "cpu"), range(steps)):
        loss = model(**model_inputs(batch)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    loader.close()
    return losses


@pytest.mark.parametrize("width,packed", [(64, False), (96, False), (64, True), (96, True)])
def test_one_epoch_from_the_cache_equals_one_from_the_images(assets, cache, width, packed):
    """One cache serves LLMs of two widths; mixing by ratio and packing work from it."""
    pack = {"pack_length": 60, "pack_rows": 2, "batch_size": 6} if packed else {}
    from_images = _train(_config(assets, width, **pack), steps=9)  # 46 samples: about one epoch
    cached = _config(assets, width, kind="features", features_root=cache, crops="stream", **pack)
    assert check_feature_cache(cached) == []
    from_cache = _train(cached, steps=9)
    assert len(from_cache) == 9 and all(np.isfinite(from_cache))
    np.testing.assert_allclose(from_cache, from_images, rtol=1e-5, atol=1e-5)
    assert from_cache[-1] < from_cache[0]


def test_bad_samples_are_skipped_and_counted(assets, tmp_path):
    cfg = _config(assets)
    cfg.data.sources = [SourceConfig(name="damaged", shards=[bad_shard(str(tmp_path / "bad.tar"))])]
    out = str(tmp_path / "out")
    _extract(cfg, out)
    manifest = read_manifest(os.path.join(out, "damaged"))
    assert manifest["samples"] == 8
    assert {k: v for k, v in manifest["skipped"].items() if v} == {
        "corrupt_image": 1, "truncated_image": 1, "no_caption": 1, "bad_json": 1, "no_image": 1,
    }  # fmt: skip


def test_an_interrupted_extraction_resumes_where_it_stopped(assets, tmp_path, monkeypatch, caplog):
    cfg = _config(assets)
    cfg.data.sources = cfg.data.sources[:1]
    whole = str(tmp_path / "whole")
    _extract(cfg, whole)
    out = str(tmp_path / "resumed")
    finish = FeatureShardWriter.finish
    calls = []

    def crash_on_second(self, *a):
        calls.append(self.path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # a killed job
        finish(self, *a)

    monkeypatch.setattr(FeatureShardWriter, "finish", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        _extract(cfg, out)
    folder = os.path.join(out, "laion")
    assert sorted(os.listdir(folder)) == ["00000.stats.json", "00000.tar"]  # no half shard, no manifest
    monkeypatch.setattr(FeatureShardWriter, "finish", finish)
    with caplog.at_level("INFO", logger="mgpt4.features"):
        _extract(cfg, out)
    assert "1 of 3 shards were done before, 2 written now" in caplog.text
    for name in ("00000.tar", "00001.tar", "00002.tar"):
        with open(os.path.join(folder, name), "rb") as a, open(os.path.join(whole, "laion", name), "rb") as b:
            assert a.read() == b.read(), name
    assert read_manifest(folder)["samples"] == 30


def test_a_cache_of_another_vision_path_is_refused(assets, cache):
    cfg = _config(assets, kind="features", features_root=cache, crops="stream")
    cfg.model.qformer.num_query_tokens = 4
    with pytest.raises(
        ConfigError, match=r"features are \[8, 64\] per sample; the model's image tokens are \[4, 64\]"
    ):
        check_feature_cache(cfg)
    cfg = _config(assets, kind="features", features_root=cache, crops="stream")
    cfg.model.weights.eva_vit = assets["laion"][0]  # some other file
    with pytest.raises(
        ConfigError, match=r"model\.weights\.eva_vit: .* is not the file the cache was made with"
    ):
        check_feature_cache(cfg)
    # A file of the same size (the same architecture, other weights): told apart by its contents.
    cfg = _config(assets, kind="features", features_root=cache, crops="stream")
    other = assets["root"] / "other_eva_vit_g.pth"
    data = bytearray(pathlib.Path(cfg.model.weights.eva_vit).read_bytes())
    data[-100] ^= 0xFF
    other.write_bytes(bytes(data))
    cfg.model.weights.eva_vit = str(other)
    with pytest.raises(
        ConfigError,
        match=r"model\.weights\.eva_vit: .*other_eva_vit_g.pth is not the file the cache was made with",
    ):
        check_feature_cache(cfg)
    # Other image shards under the cache's file names: one with other first bytes but the same size
    # (tar sizes come in 10 KiB steps, so sets often agree there), one of another size, one the cache
    # never saw; the unchanged one passes.
    others = assets["root"] / "other_laion"
    others.mkdir()
    for path in assets["laion"]:
        shutil.copy(path, others)
    with open(others / "00000.tar", "r+b") as f:
        f.seek(600)  # inside the first image, past its tar header
        f.write(b"other pixels")
    with open(others / "00001.tar", "ab") as f:
        f.write(bytes(10240))
    shutil.copy(others / "00002.tar", others / "00099.tar")
    cfg = _config(assets, kind="features", features_root=cache, crops="stream")
    cfg.data.sources[0].shards = sorted(str(p) for p in others.iterdir())
    with pytest.raises(ConfigError) as refused:
        check_feature_cache(cfg)
    size = os.path.getsize(assets["laion"][1])
    assert [line.split("other_laion/")[1] for line in str(refused.value).splitlines()[1:]] == [
        "00000.tar begins with other bytes than the 00000.tar the cache was made from",
        f"00001.tar has {size + 10240} bytes; the cache was made from a 00001.tar of {size} bytes",
        "00099.tar: the cache holds no shard of that name",
    ]
    # The cache's own image shards pass.
    cfg.data.sources[0].shards = assets["laion"]
    assert check_feature_cache(cfg) == []
    unfinished = assets["root"] / "unfinished"
    os.makedirs(unfinished / "laion")
    os.makedirs(unfinished / "ccsbu")
    cfg = _config(assets, kind="features", features_root=str(unfinished), crops="stream")
    assert any(MANIFEST_FILE in m and "has not finished" in m for m in check_feature_cache(cfg))


def test_damaged_feature_samples_are_skipped_and_counted(assets, tmp_path):
    folder = tmp_path / "cache" / "laion"
    os.makedirs(folder)
    writer = FeatureShardWriter(str(folder / "00000.tar"), "00000.tar")
    good = np.ones((8, 64), dtype=np.float16)
    for i in range(6):
        if i == 2:
            writer._add("nofeat.txt", b"a caption without features")
        writer.add(f"k{i}", f"sample {i}", good if i != 2 else np.ones((8, 32), dtype=np.float16))
    writer.finish({}, 0.0)
    cfg = _config(assets, kind="features", features_root=str(tmp_path / "cache"), crops="stream")
    cfg.data.sources = [SourceConfig(name="laion", shards=assets["laion"][:1])]
    cfg.data.shuffle_buffer = 1
    loader = build_loader(
        cfg.data, from_config(copy.deepcopy(cfg.model)).tokenizer, 32, "\n", feature_shape=(8, 64)
    )
    batch = next(iter(loader))  # k0, k1, k3, k4: the sample without features and k2 are skipped
    assert batch["features"].shape == (4, 8, 64) and batch["features"].dtype == torch.float32
    assert (batch["features"] == 1).all() and "image" not in batch
    assert {k: v for k, v in loader.stats().items() if v} == {"bad_features": 1, "no_features": 1}
    loader.close()


@pytest.mark.parametrize("recipe", ["tiny_stage1", "stage1_vicuna13b", "stage1_vicuna7b"])
def test_every_stage1_recipe_trains_from_a_cache_root(recipe, tmp_path):
    """One override turns any stage-1 recipe to its cache: the same sources, shard names and ratios."""
    from mgpt4.strict_config import apply_overrides
    from mgpt4.train.recipes import get_recipe
    from mgpt4.train.resolve import resolve_config

    root = tmp_path / "features"
    cfg = apply_overrides(
        get_recipe(recipe),
        ["data.kind=features", f"data.features_root={root}", "data.pack_rows=3", "data.pack_length=1088"],
    )
    cfg, _, missing = resolve_config(cfg, os.path.join(REPO, "ds_configs", "z2.json"), 4, missing_ok=True)
    shards = [m for m in missing if "shard(s) of source" in m]
    assert len(shards) == len(cfg.data.sources)
    for name, line in zip(cfg.data.source_names(), shards):
        assert f"{root}/{name}/0000" in line  # the recipe's own shard names under the cache root


def test_settings_a_cache_cannot_honour_are_refused():
    with pytest.raises(ConfigError, match=r"data\.crops: a feature cache's crops were fixed at extraction"):
        DataConfig(kind="features", crops="sample", sources=[SourceConfig(shards="x.tar")]).validate()
    with pytest.raises(ConfigError, match=r"data\.features_root: only kind 'features' reads it"):
        DataConfig(features_root="/x", sources=[SourceConfig(shards="x.tar")]).validate()


def test_an_annotation_source_is_extracted_in_parts_and_trains_from_them(assets, tmp_path, caplog):
    """A LLaVA JSON source: parts of `entries_per_part` entries, the crops training from its images
    with `crops: sample` draws, a bad image counted, a re-run that writes only what is missing, and
    training from the parts; a changed file or another cut is refused."""
    from mgpt4.data.formats.annotations import load_index
    from tests.format_fixtures import llava_entries, write_images, write_json

    folder = tmp_path / "llava"
    images = write_images(str(folder), 10)
    (folder / images[6]).write_bytes(b"not a jpeg")  # read-time damage: skipped and counted
    path = write_json(str(folder / "chat.json"), llava_entries(images))
    cfg = _config(assets)
    cfg.data.sources = [SourceConfig(name="llava", format="llava", annotations=path)]
    out = str(tmp_path / "features")
    _extract(cfg, out, entries_per_part=4)
    parts = os.path.join(out, "llava")
    names = ["entries-000000.tar", "entries-000001.tar", "entries-000002.tar"]
    assert sorted(f for f in os.listdir(parts) if f.endswith(".tar")) == names
    manifest = read_manifest(parts)
    assert manifest["parts"] == names and manifest["entries_per_part"] == 4
    assert manifest["annotations"]["entries"] == 10 and manifest["annotations"]["format"] == "llava"
    assert manifest["samples"] == 9 and {k: v for k, v in manifest["skipped"].items() if v} == {
        "corrupt_image": 1
    }
    # Entry by entry: the Q-Former output on the crop a run on the images draws with crops: sample.
    model = from_config(copy.deepcopy(cfg.model)).eval()
    index = load_index(path, "llava", pairs=True)
    seen = []
    for name in names:
        reader = TarReader(os.path.join(parts, name))
        while (sample := reader.next_sample()) is not None:
            key, files = sample
            seen.append(int(key))
            _, _, _, source, _ = index.sample(int(key))
            assert files["txt"] == source["txt"]
            _assert_training_crop_features(model, source["jpg"], "chat.json", key, files["npy"])
    assert seen == [0, 1, 2, 3, 4, 5, 7, 8, 9]
    # A lost part is written again, byte for byte; the others are kept.
    with open(os.path.join(parts, names[1]), "rb") as f:
        before = f.read()
    os.remove(os.path.join(parts, names[1]))
    with caplog.at_level("INFO", logger="mgpt4.features"):
        _extract(cfg, out)  # no --entries-per-part: the folder's cut
    assert "2 of 3 shards were done before, 1 written now" in caplog.text
    with open(os.path.join(parts, names[1]), "rb") as f:
        assert f.read() == before
    with pytest.raises(
        ValueError,
        match=r"^--entries-per-part: .*entries-000000.tar holds entries 0 to 3, this run would cut 0 to 4",
    ):
        _extract(cfg, out, entries_per_part=5)
    # Training from the parts: the config names the annotation file and the cache root.
    cached = _config(assets, kind="features", features_root=out, crops="stream", batch_size=3)
    cached.data.sources = [SourceConfig(name="llava", format="llava", annotations=path)]
    cached.validate()
    assert check_feature_cache(cached) == []
    losses = _train(cached, steps=6)  # two epochs of the 9 samples
    assert len(losses) == 6 and all(np.isfinite(losses)) and losses[-1] < losses[0]
    # Refused: no features_root (nothing names the parts), and a changed annotation file.
    bare = _config(assets, kind="features", crops="stream")
    bare.data.sources = cached.data.sources
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.format: .*set data\.features_root"):
        bare.validate()
    # An edited caption beyond the first bytes, the file's size unchanged: the whole file's digest tells.
    text = pathlib.Path(path).read_text()
    pathlib.Path(path).write_text(text.replace("sample number 8 of", "sample number 9 of"))
    assert len(pathlib.Path(path).read_text()) == len(text) and pathlib.Path(path).read_text() != text
    with pytest.raises(
        ConfigError, match=r"data\.sources\[0\]\.annotations: .*chat\.json is not the annotation file"
    ):
        check_feature_cache(cached)
    with pytest.raises(ValueError, match=r"its parts were extracted from another version of source 'llava'"):
        _extract(cfg, out)
    # A part lost after extraction: the warning names the annotation source, which names no shards.
    os.remove(os.path.join(parts, names[2]))
    with caplog.at_level("WARNING", logger="mgpt4.data"):
        source_urls(cached.data, 1, 0)
    field = "data.sources[0].annotations (its feature parts under data.features_root)"
    assert f"{field}: 1 of 3 shard(s) of source 'llava' are missing" in caplog.text


@pytest.mark.parametrize("fmt", ["sharegpt", "huggingface"])
def test_sharegpt_and_parquet_sources_feed_the_cache(assets, tmp_path, fmt):
    """The other annotation formats go through the same parts: every entry once, its caption kept."""
    from tests.format_fixtures import sharegpt_set
    from tests.test_data_formats_hf import _parquet

    if fmt == "sharegpt":
        path, caption = sharegpt_set(str(tmp_path / "in"), 5), "sample number {} of shard 1"
    else:
        path, caption = _parquet(str(tmp_path / "in"), 5), "sample number {} of shard 2"
    cfg = _config(assets)
    cfg.data.sources = [SourceConfig(name="mine", format=fmt, annotations=path)]
    out = str(tmp_path / "features")
    _extract(cfg, out, entries_per_part=3)
    folder = os.path.join(out, "mine")
    assert read_manifest(folder)["parts"] == ["entries-000000.tar", "entries-000001.tar"]
    captions = []
    for name in read_manifest(folder)["parts"]:
        reader = TarReader(os.path.join(folder, name))
        while (sample := reader.next_sample()) is not None:
            captions.append(sample[1]["txt"].decode())
    assert captions == [caption.format(i) for i in range(5)]
    cached = _config(assets, kind="features", features_root=out, crops="stream", batch_size=2)
    cached.data.sources = cfg.data.sources
    assert check_feature_cache(cached) == []
    assert all(np.isfinite(_train(cached, steps=3)))
