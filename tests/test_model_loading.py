"""Loading tiny files in the official layouts reproduces their weights; every bad key is a clear error."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
import torch

from mgpt4.model import WeightsError, apply_freeze, build_model, from_config, load_weights
from mgpt4.model.loading import rename_blip2
from tests.official_files import blip2_state, eva_vit_state, proj_state, write_official_files


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer):
    from mgpt4.model.presets import tiny

    return write_official_files(str(tmp_path_factory.mktemp("official")), tiny(), tokenizer)


def _with_weights(cfg, **weights):
    return dataclasses.replace(cfg, weights=dataclasses.replace(cfg.weights, **weights))


def test_official_files_load_exactly(files, tiny_cfg, tokenizer):
    cfg = _with_weights(
        tiny_cfg, eva_vit=files["eva_vit"], blip2=files["blip2"], llm=files["llm"], proj=files["proj"]
    )
    model = from_config(cfg)
    sd = model.state_dict()
    vit = torch.load(files["eva_vit"])
    for k, v in vit.items():
        if int(k.split(".")[1]) < 3 if k.startswith("blocks.") else True:
            assert torch.equal(sd[f"visual_encoder.{k}"], v), k
    blip2 = torch.load(files["blip2"])["model"]
    used = 0
    for k, v in blip2.items():
        target = rename_blip2(k)
        if target in sd:
            assert torch.equal(sd[target], v), k
            used += 1
    assert used == len([k for k in sd if k.startswith(("qformer.", "ln_vision.", "query_tokens"))])
    proj = torch.load(files["proj"], weights_only=False)["model"]
    assert torch.equal(sd["llama_proj.weight"], proj["llama_proj.weight"])
    assert torch.equal(sd["llama_proj.bias"], proj["llama_proj.bias"])
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(files["llm"])
    for k, v in ref.state_dict().items():
        assert torch.equal(sd[f"llm.{k}"], v), k
    # The tokenizer came from the LLM folder and the model runs end to end.
    assert model.tokenizer is not None and model.tokenizer.pad_token_id == model.tokenizer.eos_token_id
    loss = model.loss(torch.randn(2, 3, 56, 56), ["a red circle", "two green squares"])
    assert torch.isfinite(loss)


def test_released_40_block_file_ignores_the_extra_block(files, tiny_cfg):
    model = build_model(_with_weights(tiny_cfg, eva_vit=files["eva_vit"]))
    ignored = load_weights(model)[files["eva_vit"]]
    assert ignored and all(k.startswith("blocks.3.") for k in ignored)


def test_blip2_extra_keys_are_ignored_by_name(files, tiny_cfg):
    model = build_model(_with_weights(tiny_cfg, blip2=files["blip2"]))
    ignored = set(load_weights(model)[files["blip2"]])
    assert "Qformer.cls.predictions.bias" in ignored
    assert "Qformer.bert.encoder.layer.0.intermediate.dense.weight" in ignored
    assert "Qformer.bert.encoder.layer.0.intermediate_query.dense.weight" not in ignored
    assert {
        "temp",
        "itm_head.weight",
        "vision_proj.weight",
        "Qformer.bert.embeddings.position_ids",
    } <= ignored


def _expect_error(cfg, *fragments):
    model = build_model(cfg)
    with pytest.raises(WeightsError) as err:
        load_weights(model)
    for frag in fragments:
        assert frag in str(err.value), (frag, str(err.value))
    return str(err.value)


def test_misshaped_vit_key_names_file_key_and_shapes(tmp_path, tiny_cfg):
    sd = eva_vit_state(tiny_cfg)
    sd["blocks.1.mlp.fc1.weight"] = torch.zeros(100, 64)
    path = str(tmp_path / "eva_vit_g.pth")
    torch.save(sd, path)
    _expect_error(
        _with_weights(tiny_cfg, eva_vit=path), path, "blocks.1.mlp.fc1.weight", "[279, 64]", "[100, 64]"
    )


def test_missing_qformer_key_is_named(tmp_path, tiny_cfg):
    sd = blip2_state(tiny_cfg)
    del sd["Qformer.bert.encoder.layer.1.output_query.dense.bias"]
    path = str(tmp_path / "blip2.pth")
    torch.save({"model": sd}, path)
    _expect_error(
        _with_weights(tiny_cfg, blip2=path),
        path,
        "missing key",
        "qformer.encoder.layer.1.output_query.dense.bias",
    )


def test_unexpected_key_is_an_error_not_ignored(tmp_path, tiny_cfg):
    sd = blip2_state(tiny_cfg)
    sd["Qformer.bert.encoder.layer.0.adapter.weight"] = torch.zeros(3)
    sd["some_new_head.weight"] = torch.zeros(3)
    path = str(tmp_path / "blip2.pth")
    torch.save({"model": sd}, path)
    _expect_error(
        _with_weights(tiny_cfg, blip2=path),
        "unexpected key",
        "layer.0.adapter.weight",
        "some_new_head.weight",
    )


def test_projection_for_the_wrong_llm_size_says_which(tmp_path):
    from mgpt4.model.presets import tiny

    cfg = tiny()
    cfg.llm.hidden_size = 5120
    cfg.llm.intermediate_size = 64
    cfg.llm.num_layers = 1
    cfg.llm.num_heads = 40
    cfg.llm.vocab_size = 8
    path = str(tmp_path / "pretrained_minigpt4_7b.pth")
    torch.save({"model": proj_state(cfg, hidden=4096)}, path)
    msg = _expect_error(_with_weights(cfg, proj=path), path, "[4096, 64]", "[5120, 64]", "7B", "13B")
    assert "llama_proj.weight" in msg


def test_checkpoint_without_model_key_is_explained(tmp_path, tiny_cfg):
    path = str(tmp_path / "proj.pth")
    torch.save(proj_state(tiny_cfg), path)
    _expect_error(_with_weights(tiny_cfg, proj=path), path, "{'model':")


def test_missing_file_is_named(tiny_cfg):
    model = build_model(_with_weights(tiny_cfg, eva_vit="/nonexistent/eva_vit_g.pth"))
    with pytest.raises(FileNotFoundError, match=r"/nonexistent/eva_vit_g\.pth"):
        load_weights(model)


def test_llm_folder_with_other_sizes_names_the_field(files, tmp_path, tiny_cfg, tokenizer):
    folder = tmp_path / "llm"
    folder.mkdir()
    for name in os.listdir(files["llm"]):
        shutil.copy(os.path.join(files["llm"], name), folder / name)
    conf = json.loads((folder / "config.json").read_text())
    conf["hidden_size"] = 128
    (folder / "config.json").write_text(json.dumps(conf))
    # Checked when the model is built, before any part is: the loader trusts the built model.
    with pytest.raises(WeightsError, match=r"model.llm.hidden_size: config says 64, config.json has 128"):
        build_model(_with_weights(tiny_cfg, llm=str(folder)), tokenizer=tokenizer)


def test_pos_embed_is_interpolated_for_another_image_size(files, tiny_cfg):
    cfg = _with_weights(tiny_cfg, eva_vit=files["eva_vit"])
    cfg.vision.image_size = 84  # 6x6 patches instead of 4x4
    model = build_model(cfg)
    load_weights(model)
    src = torch.load(files["eva_vit"])["pos_embed"]
    got = model.visual_encoder.pos_embed
    assert got.shape == (1, 37, 64)
    assert torch.equal(got[:, 0], src[:, 0])  # CLS position kept
    # The grid's mean is preserved by bicubic resampling up to edge effects.
    assert torch.allclose(got[:, 1:].mean(), src[:, 1:].mean(), atol=0.02)
    assert torch.isfinite(model.encode_img(torch.randn(1, 3, 84, 84))).all()


def test_hf_blip2_folder_matches_transformers_outputs(tmp_path, tiny_cfg):
    """A Hugging Face BLIP-2 folder maps onto our ViT/Q-Former and reproduces transformers' outputs."""
    from transformers import Blip2Config, Blip2Model, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

    v, q = tiny_cfg.vision, tiny_cfg.qformer
    hf_cfg = Blip2Config(
        vision_config=Blip2VisionConfig(
            hidden_size=v.width,
            intermediate_size=v.resolved_mlp_dim(),
            num_hidden_layers=v.depth,
            num_attention_heads=v.heads,
            image_size=v.image_size,
            patch_size=v.patch_size,
            layer_norm_eps=1e-6,
            qkv_bias=True,
        ).to_dict(),
        qformer_config=Blip2QFormerConfig(
            hidden_size=q.width,
            num_hidden_layers=q.depth,
            num_attention_heads=q.heads,
            intermediate_size=q.ffn_dim,
            encoder_hidden_size=v.width,
            cross_attention_frequency=q.cross_attention_freq,
        ).to_dict(),
        text_config=OPTConfig(
            hidden_size=32,
            num_hidden_layers=1,
            ffn_dim=32,
            num_attention_heads=2,
            vocab_size=50,
            word_embed_proj_dim=32,
        ).to_dict(),
        num_query_tokens=q.num_query_tokens,
    )
    torch.manual_seed(0)
    hf = Blip2Model(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.vision_model.named_parameters():
            if name.endswith("qkv.bias"):
                p[v.width : 2 * v.width] = 0  # the EVA ViT has no key bias
            elif "bias" in name or "class_embedding" in name or "position" in name:
                p.normal_(std=0.05)
    hf.save_pretrained(tmp_path / "blip2-hf")
    cfg = _with_weights(tiny_cfg, blip2_hf=str(tmp_path / "blip2-hf"))
    cfg.vision.ln_vision_eps = 1e-6  # HF's post_layernorm uses the vision layer_norm_eps
    model = build_model(cfg)
    load_weights(model)
    apply_freeze(model)
    image = torch.randn(2, 3, v.image_size, v.image_size)
    with torch.no_grad():
        ref_vis = hf.vision_model(pixel_values=image).last_hidden_state
        ours_vis = model.ln_vision(model.visual_encoder.forward_features(image))
        assert torch.allclose(ours_vis, ref_vis, atol=1e-5), (ours_vis - ref_vis).abs().max()
        ref_q = hf.qformer(query_embeds=hf.query_tokens.expand(2, -1, -1), encoder_hidden_states=ref_vis)
        ours_q = model.qformer(
            query_embeds=model.query_tokens.expand(2, -1, -1), encoder_hidden_states=ours_vis
        )
        assert torch.allclose(ours_q.last_hidden_state, ref_q.last_hidden_state, atol=1e-5)


def test_official_export_round_trips_through_the_strict_loaders(tmp_path, tiny_cfg, tokenizer):
    from mgpt4.model.export import save_official_files, save_projection

    torch.manual_seed(5)
    source = build_model(tiny_cfg, tokenizer)
    weights = save_official_files(source, str(tmp_path / "official"))
    weights.proj = str(tmp_path / "proj.pth")
    save_projection(
        {k: v for k, v in source.state_dict().items() if k.startswith("llama_proj.")}, weights.proj
    )
    loaded = from_config(dataclasses.replace(tiny_cfg, weights=weights))
    ref = source.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ref[k]), k
