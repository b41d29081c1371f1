"""DataConfig: strict construction from dicts and validation messages that name the field."""

from __future__ import annotations

import pytest

from mgpt4.data import DataConfig
from mgpt4.strict_config import ConfigError, from_dict


def test_from_dict_builds_sources():
    cfg = from_dict(
        DataConfig,
        {
            "sources": [
                {"name": "laion", "shards": "/d/laion/{00000..10488}.tar", "ratio": 115},
                {"name": "ccsbu", "shards": ["/d/cc/a.tar", "/d/cc/b.tar"], "ratio": 14},
            ],
            "batch_size": 64,
        },
        "data",
    )
    assert cfg.sources[0].ratio == 115.0 and cfg.sources[1].shards == ["/d/cc/a.tar", "/d/cc/b.tar"]
    cfg.validate()
    assert cfg.cleans_captions() and not DataConfig(kind="align", align_root="x").cleans_captions()


def test_unknown_keys_name_the_dotted_path():
    with pytest.raises(ConfigError, match=r"data.sources\[0\]: unknown key\(s\) \['ratoi'\]"):
        from_dict(DataConfig, {"sources": [{"shards": "a.tar", "ratoi": 1}]}, "data")
    with pytest.raises(ConfigError, match=r"data.batch_size: expected an integer"):
        from_dict(DataConfig, {"batch_size": "64"}, "data")


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"kind": "laion"}, "data.kind: expected one of"),
        ({"sources": []}, "data.sources: kind 'webdataset' needs at least one source"),
        (
            {"sources": [{"shards": "a.tar", "ratio": 0}]},
            r"data.sources\[0\].ratio: expected a positive number",
        ),
        ({"sources": [{"shards": []}]}, r"data.sources\[0\].shards: empty"),
        ({"sources": [{"shards": "a"}, {"shards": "b"}], "mix": "token"}, "data.mix"),
        (
            {"sources": [{"name": "x", "shards": "a"}, {"name": "x", "shards": "b"}]},
            "is used by another source",
        ),
        ({"kind": "align"}, "data.align_root: kind 'align' needs"),
        ({"kind": "align", "align_root": "r", "crop_scale": [0.6, 0.5]}, "data.crop_scale"),
        ({"kind": "align", "align_root": "r", "batch_size": 0}, "data.batch_size: expected a positive"),
        ({"kind": "align", "align_root": "r", "transform": "test"}, "data.transform"),
        ({"kind": "align", "align_root": "r", "dct_margin": 0.5}, "data.dct_margin"),
    ],
)
def test_validate_names_the_field(overrides, match):
    cfg = from_dict(DataConfig, overrides, "data")
    with pytest.raises(ConfigError, match=match):
        cfg.validate()
