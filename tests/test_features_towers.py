"""A feature cache for every vision path: a transformers tower (each connector it takes) and the
LLaMA-2 variant's EVA ViT without a Q-Former; the cache holds the tokens that enter the projector,
and one epoch from it equals one from the images (1e-5, fp32)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from mgpt4.config import Config
from mgpt4.data import SourceConfig
from mgpt4.data.feature_shards import read_manifest
from mgpt4.data.synthetic import write_shards
from mgpt4.strict_config import ConfigError
from mgpt4.train.feature_cache import check_feature_cache
from tests.test_features import ONE_RANK, _train, assets  # noqa: F401 (a fixture)
from tests.test_features import _config as _features_config
from tests.test_vision_towers import tower_cfg, towers  # noqa: F401 (a fixture)
from tests.test_vision_towers_timm import tower_cfg as timm_cfg
from tests.test_vision_towers_timm import weights as timm_weights  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("tower-shards")
    urls, _ = write_shards(str(root / "s"), 2, 10, min_size=60, max_size=110, seed=3)
    return urls


def _config(assets, model, shards, **data) -> Config:  # noqa: F811 (the fixture's value)
    """The tower `model` on one source of 20 samples (steps: 5 of 4 is one epoch)."""
    return _features_config(assets, model=model, sources=[SourceConfig(name="s", shards=shards)], **data)


@pytest.mark.parametrize(
    "family,connector,projector",
    [("siglip", "none", "mlp2x_gelu"), ("clip", "concat", "linear"), ("timm", "none", "linear")],
)
def test_a_tower_cache_equals_its_images(
    assets,  # noqa: F811
    towers,  # noqa: F811
    timm_weights,  # noqa: F811
    shards,
    tmp_path,
    family,
    connector,
    projector,
):
    from mgpt4.features.extract import ExtractOptions, extract

    def model_cfg(**vision):
        if family == "timm":
            m = timm_cfg(timm_weights, projector, connector, **vision)
        else:
            m = tower_cfg(towers[family], projector, connector, **vision)
        m.weights.llm = assets["narrow"].llm  # a tiny LLM and its tokenizer
        return m

    model = model_cfg()
    cfg = _config(assets, model, shards)
    cfg.validate()
    out = str(tmp_path / "features")
    extract(cfg, ExtractOptions(out=out, batch_size=3, num_workers=0, dtype="fp32"), ONE_RANK)
    manifest = read_manifest(os.path.join(out, "s"))
    assert manifest["shape"] == list(model.image_token_shape()) and manifest["samples"] == 20
    assert manifest["model"]["connector"] == connector and {"tower", "timm"} & set(manifest["weights"])
    from_images = _train(_config(assets, model, shards), steps=5)  # 20 samples: one epoch
    cached = _config(assets, model, shards, kind="features", features_root=out, crops="stream")
    cached.validate()
    assert check_feature_cache(cached) == []
    from_cache = _train(cached, steps=5)
    np.testing.assert_allclose(from_cache, from_images, rtol=1e-5, atol=1e-5)
    # Keyed by the layer and the connector: a cache of another one is refused.
    layer = -1 if model.vision.feature_layer != -1 else -2
    other = _config(
        assets, model_cfg(feature_layer=layer), shards, kind="features", features_root=out, crops="stream"
    )
    with pytest.raises(ConfigError, match=r"model\.vision\.feature_layer: the cache has"):
        check_feature_cache(other)
    # The official vision path (a Q-Former) on a tower's cache: named, not a traceback.
    official = _features_config(
        assets, sources=cfg.data.sources, kind="features", features_root=out, crops="stream"
    )
    with pytest.raises(
        ConfigError, match=r"features are \[\d+, \d+\] per sample; the model's image tokens are \[8, 64\]"
    ):
        check_feature_cache(official)
