"""The config tree is strict: unknown keys and wrong types fail with the dotted path."""

from __future__ import annotations

import pytest

from mgpt4.config import ModelConfig
from mgpt4.model.presets import model_preset, tiny, vicuna7b
from mgpt4.strict_config import ConfigError, apply_overrides, from_dict, to_dict


def test_round_trip():
    cfg = tiny()
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg


def test_unknown_key_fails_with_path():
    with pytest.raises(ConfigError, match=r"vision: unknown key\(s\) \['widht'\]"):
        from_dict(ModelConfig, {"vision": {"widht": 3}})


def test_wrong_type_fails_with_path():
    with pytest.raises(ConfigError, match=r"llm.hidden_size: expected an integer"):
        from_dict(ModelConfig, {"llm": {"hidden_size": "big"}})


def test_overrides():
    cfg = apply_overrides(
        vicuna7b(), ["text.max_txt_len=64", "weights.llm=/models/vicuna", "precision.vit=fp16"]
    )
    assert cfg.text.max_txt_len == 64 and cfg.weights.llm == "/models/vicuna" and cfg.precision.vit == "fp16"
    with pytest.raises(ConfigError, match=r"unknown key 'text\.max_len'"):
        apply_overrides(cfg, ["text.max_len=3"])


def test_validation_names_the_field():
    cfg = tiny()
    cfg.precision.llm = "fp8"
    with pytest.raises(ConfigError, match=r"model.precision.llm"):
        cfg.validate()
    cfg = tiny()
    cfg.text.instructions = ["no placeholder"]
    with pytest.raises(ConfigError, match=r"instructions\[0\]"):
        cfg.validate()


def test_presets():
    assert model_preset("vicuna13b").llm.hidden_size == 5120
    assert model_preset("vicuna7b").llm.hidden_size == 4096
    assert vicuna7b().vision.resolved_mlp_dim() == 6144
    with pytest.raises(ValueError, match="unknown model preset"):
        model_preset("vicuna70b")
