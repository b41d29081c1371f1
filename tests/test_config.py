"""The config tree is strict: unknown keys and wrong types fail with the dotted path."""

from __future__ import annotations

import os

import pytest

from mgpt4.config import ModelConfig
from mgpt4.model.presets import model_preset, tiny, vicuna7b
from mgpt4.strict_config import ConfigError, apply_overrides, from_dict, to_dict
from tests.launch import REPO


def test_round_trip():
    cfg = tiny()
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg


def test_unknown_key_fails_with_path():
    with pytest.raises(ConfigError, match=r"vision: unknown key\(s\) \['widht'\] \(did you mean width\?\)"):
        from_dict(ModelConfig, {"vision": {"widht": 3}})


def test_wrong_type_fails_with_path():
    with pytest.raises(ConfigError, match=r"llm.hidden_size: expected an integer"):
        from_dict(ModelConfig, {"llm": {"hidden_size": "big"}})


def test_overrides():
    cfg = apply_overrides(
        vicuna7b(), ["text.max_txt_len=64", "weights.llm=/models/vicuna", "precision.vit=fp16"]
    )
    assert cfg.text.max_txt_len == 64 and cfg.weights.llm == "/models/vicuna" and cfg.precision.vit == "fp16"
    with pytest.raises(ConfigError, match=r"unknown key 'text\.max_len'; did you mean text\.max_txt_len\?"):
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


def test_sizes_and_settings_a_run_would_crash_on_are_refused_by_the_config(monkeypatch):
    """Found by the dry run, not by a traceback at step 1 after the run folder was written."""
    for override, field in (
        (
            "qformer.num_query_tokens=0",
            r"model\.qformer\.num_query_tokens: expected a positive integer, got 0",
        ),
        ("vision.depth=-1", r"model\.vision\.depth: expected a positive integer, got -1"),
        ("llm.num_heads=0", r"model\.llm\.num_heads: expected a positive integer, got 0"),
        ("text.max_txt_len=0", r"model\.text\.max_txt_len: expected a positive integer, got 0"),
    ):
        with pytest.raises(ConfigError, match=field):
            apply_overrides(tiny(), [override]).validate()
    cfg = tiny()
    cfg.llm.bos_token_id = 0  # a token id, not a size: 0 is a valid one
    cfg.validate()
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a)
    )
    cfg.attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError, match=r"flash_attention_2 needs the flash-attn package .* use sdpa"):
        cfg.validate()


def test_presets():
    assert model_preset("vicuna13b").llm.hidden_size == 5120
    assert model_preset("vicuna7b").llm.hidden_size == 4096
    assert vicuna7b().vision.resolved_mlp_dim() == 6144
    with pytest.raises(ValueError, match="unknown model preset"):
        model_preset("vicuna70b")


# ---------------------------------------------------------------------------------------------
# The whole tree: one override path, every section typed


def _leaf_paths(node, prefix=""):
    """(dotted path, value) of every leaf of a to_dict() tree, lists indexed by number."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaf_paths(v, f"{prefix}{k}.")
    elif isinstance(node, list) and node and all(isinstance(x, dict) for x in node):
        for i, v in enumerate(node):
            yield from _leaf_paths(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], node


def _assert_typed(obj, cls, path="config"):
    """Every nested dataclass field holds an instance of its declared dataclass, never a dict."""
    import dataclasses
    import typing

    assert isinstance(obj, cls), f"{path}: {type(obj).__name__}, expected {cls.__name__}"
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, value = hints[f.name], getattr(obj, f.name)
        if dataclasses.is_dataclass(tp):
            _assert_typed(value, tp, f"{path}.{f.name}")
        elif (
            typing.get_origin(tp) is list
            and typing.get_args(tp)
            and dataclasses.is_dataclass(typing.get_args(tp)[0])
        ):
            for i, item in enumerate(value):
                _assert_typed(item, typing.get_args(tp)[0], f"{path}.{f.name}.{i}")


@pytest.mark.parametrize("recipe", sorted(__import__("mgpt4.train.recipes", fromlist=["RECIPES"]).RECIPES))
def test_overriding_any_key_of_any_recipe_keeps_every_section_typed(recipe):
    import json

    from mgpt4.config import Config
    from mgpt4.train.recipes import get_recipe

    base = get_recipe(recipe)
    paths = list(_leaf_paths(to_dict(base)))
    assert any(p.startswith("data.") for p, _ in paths) and any(p.startswith("model.") for p, _ in paths)
    for path, value in paths:
        cfg = apply_overrides(base, [f"{path}={json.dumps(value)}"])
        _assert_typed(cfg, Config)
        assert cfg == base, path
    changed = apply_overrides(base, ["data.batch_size=3", "train.steps=7", "model.text.max_txt_len=9"])
    _assert_typed(changed, Config)
    assert (changed.data.batch_size, changed.train.steps, changed.model.text.max_txt_len) == (3, 7, 9)


def test_the_tiny_run_takes_your_own_shards_and_fills_in_only_the_rest(tmp_path, monkeypatch):
    """`--set data.sources.0.shards=...` on tiny_stage1 points the demo run at your data; the demo
    assets fill in what you did not set (here the tiny model's weights), and nothing is written."""
    from mgpt4.config import Config
    from mgpt4.data.config import SourceConfig
    from mgpt4.train.assets import fill_demo_paths
    from mgpt4.train.recipes import get_recipe

    monkeypatch.setenv("MGPT4_CACHE", str(tmp_path / "cache"))
    cfg = apply_overrides(get_recipe("tiny_stage1"), ["data.sources.0.shards=/my/data/{00000..00003}.tar"])
    _assert_typed(cfg, Config)
    assert isinstance(cfg.data.sources[0], SourceConfig)
    filled = fill_demo_paths(cfg)
    assert cfg.data.sources[0].shards == "/my/data/{00000..00003}.tar"
    assert cfg.model.weights.llm and cfg.model.weights.llm in filled
    assert not any("/my/data" in p for p in filled)
    assert not (tmp_path / "cache").exists()
    cfg.validate()  # every section is a dataclass again, so validation works on the overridden tree
    untouched = get_recipe("tiny_stage1")
    fill_demo_paths(untouched)
    assert all(p.startswith(str(tmp_path / "cache")) for p in untouched.data.sources[0].shards)


@pytest.mark.parametrize(
    ("recipe", "own", "field"),
    [
        ("tiny_stage1", ["data.sources.0.shards=/my/data/{00000..00003}.tar"], "data.val.shards"),
        (
            "tiny_stage1",
            ['data.sources=[{"name": "mine", "format": "llava", "annotations": "/my/llava.json"}]'],
            "data.val.shards",
        ),
        ("tiny_stage2", ["data.align_root=/my/cc_sbu_align"], "data.val.align_root"),
    ],
)
def test_your_data_with_the_recipes_synthetic_held_out_set_is_said(
    tmp_path, monkeypatch, caplog, recipe, own, field
):
    """A tiny recipe on your data keeps validating on its synthetic held-out set unless told otherwise:
    the run says so in one warning naming the field, since that val/loss measures the synthetic data."""
    import logging

    from mgpt4.train.recipes import get_recipe
    from mgpt4.train.resolve import resolve_config

    monkeypatch.setenv("MGPT4_CACHE", str(tmp_path / "cache"))
    ds = os.path.join(REPO, "ds_configs", "z2.json")
    with caplog.at_level(logging.WARNING, logger="mgpt4"):
        resolve_config(apply_overrides(get_recipe(recipe), own), ds, 1, check_inputs=False)
    (line,) = [r.getMessage() for r in caplog.records if "synthetic held-out" in r.getMessage()]
    assert line.startswith(f"{field}: ") and "data.val.samples=0" in line
    # Not said for the recipe's own data, your own held-out set, or validation turned off.
    for quiet in ([], [*own, f"{field}=/my/held_out"], [*own, "data.val.samples=0", "train.eval_every=0"]):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mgpt4"):
            resolve_config(apply_overrides(get_recipe(recipe), quiet), ds, 1, check_inputs=False)
        assert not [r for r in caplog.records if "synthetic held-out" in r.getMessage()], quiet


def test_a_model_config_is_validated_once_where_it_is_built_and_loaded(monkeypatch, tokenizer):
    """Config time validates; the build and the loader trust a validated config, and check a changed one."""
    from mgpt4.model import build_model, load_weights

    calls = []
    real = ModelConfig.validate
    monkeypatch.setattr(ModelConfig, "validate", lambda self: (calls.append(1), real(self))[1])
    # The Python API: a config nobody validated is validated by the build, once, and not by the loader.
    cfg = tiny()
    model = build_model(cfg, tokenizer)
    load_weights(model)
    assert len(calls) == 1
    # The trainer: validated at config time, then neither the build nor the loader checks it again.
    calls.clear()
    cfg = tiny()
    cfg.validate()
    model = build_model(cfg, tokenizer)
    load_weights(model)
    assert len(calls) == 1
    # A change after the check makes it unchecked: the loader validates it before reading a file.
    cfg.weights.blip2_hf = "/nowhere/blip2"
    cfg.weights.eva_vit = "/nowhere/eva_vit_g.pth"
    with pytest.raises(
        ConfigError, match=r"model\.weights: give either blip2_hf or eva_vit \+ blip2, not both"
    ):
        load_weights(model)
    assert len(calls) == 2


def test_a_pack_length_below_any_sample_is_refused_by_the_config_check():
    """The dry run names a row too short for any sample (image tokens + max_txt_len, before the prompt);
    the exact bound, with BOS and the wrapped prompt, is the loader's (tests/test_layout.py)."""
    from mgpt4.train.assets import fill_demo_paths
    from mgpt4.train.recipes import get_recipe

    for recipe in ("tiny_stage1", "stage1_llama2_7b"):  # with a Q-Former and without
        cfg = get_recipe(recipe)
        fill_demo_paths(cfg)  # the demo data's paths (nothing is generated)
        n_img = cfg.model.image_token_shape()[0]
        least = n_img + cfg.model.text.max_txt_len
        cfg = apply_overrides(cfg, [f"data.pack_length={least - 1}", "data.pack_rows=2"])
        with pytest.raises(
            ConfigError, match=rf"data.pack_length: {least - 1} tokens cannot hold .* = {least}"
        ):
            cfg.validate()
        apply_overrides(cfg, [f"data.pack_length={least}"]).validate()
        if cfg.model.qformer is None:
            assert (n_img, least) == (64, 64 + 32)  # official LLaMA-2 stage 1: 4 ViT tokens each, 32 text
