"""`python -m mgpt4.export hf` for a CLIP or SigLIP tower with mlp2x_gelu and no connector (issue 24):
transformers' own `LlavaForConditionalGeneration`, loaded in a process that cannot import mgpt4.

Two tiny fp32 models: CLIP at feature layer -2 (class token dropped: `default`) and SigLIP at -1 (no
class token: `full`). The loader (tests/export_hf_loader.py) gets mgpt4's pixels in the tower's own
normalisation and returns LLaVA's image embeddings and greedy tokens on them; it also runs the exported
processor on a PNG, whose pixels and prompt ids are compared with mgpt4's eval transform and layout.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from mgpt4.export.hf import export_hf, export_refusal
from mgpt4.images import CLIP_MEAN, CLIP_STD, eval_transform
from mgpt4.tower_folder import read_tower_folder
from mgpt4.train.assets import write_tiny_tower
from tests.chat_fixtures import write_image
from tests.test_export_hf import NEW_TOKENS, QUESTIONS, _messages, _readable, greedy_reply, run_loader
from tests.test_vision_towers import built, tower_cfg

# The tower's normalisation reached two ways: mgpt4's CLIP normalisation then its exact affine map to the
# tower's (fp32, `HFVisionTower`), or the processor's one step. Float rounding only (measured 1.2e-7).
PIXEL_TOL = 1e-6
CASES = {"clip": -2, "siglip": -1}  # family -> model.vision.feature_layer
TURNS = QUESTIONS["vicuna_v0"]


def _model(folder: str, layer: int, tokenizer):
    model = _readable(
        built(tower_cfg(folder, "mlp2x_gelu", connector="none", feature_layer=layer), tokenizer)
    )
    with torch.no_grad():  # a trained-looking projector, not the init's
        for p in model.llama_proj.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _tower_pixels(clip_normalised: torch.Tensor, folder: str) -> torch.Tensor:
    """CLIP-normalised pixels [B,3,S,S] in the tower folder's own mean and std."""
    t = read_tower_folder(folder)
    x = clip_normalised * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    return (x - torch.tensor(t.mean).view(1, 3, 1, 1)) / torch.tensor(t.std).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizer):
    """family -> (export folder, mgpt4's reference, the loader's results)."""
    from PIL import Image

    from mgpt4.export.processor import mgpt4_prompt_ids

    root = tmp_path_factory.mktemp("llava")
    image = write_image(str(root / "image.png"), size=(90, 70))
    jobs, cases = [], {}
    for family, layer in CASES.items():
        case = root / family
        folder = write_tiny_tower(str(case / "tower"), family)
        torch.manual_seed(0)
        model = _model(folder, layer, tokenizer)
        conv = model.new_conversation()
        conv.add_image()
        conv.ask(TURNS[0][0])
        prompt = conv.prompt_for_reply()
        pixels = torch.rand(1, 3, 56, 56, generator=torch.Generator().manual_seed(1)) * 4 - 2
        eval_pixels = eval_transform(Image.open(image), model.cfg.vision.image_size).unsqueeze(0)
        out = str(case / "hf")
        export_hf(model, out)
        with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
            image_id = json.load(f)["image_token_index"]
        with torch.no_grad():
            ref = {
                "image_embeds": model.encode_img(pixels),
                "tokens": greedy_reply(model, pixels, prompt)[1],
                "eval_tokens": greedy_reply(model, eval_pixels, prompt)[1],
                "eval_pixels": _tower_pixels(eval_pixels, folder),
                "input_ids": mgpt4_prompt_ids(model, prompt, image_id),
            }
        torch.save(_tower_pixels(pixels, folder), case / "pixels.pt")
        job = {
            "folder": out,
            "image": image,
            "messages": _messages(TURNS),
            "remote": False,
            "llava": True,
            "pixels": str(case / "pixels.pt"),
            "new_tokens": NEW_TOKENS,
            "result": str(case / "result.pt"),
            "resaved": str(case / "resaved"),
        }
        jobs.append(job)
        cases[family] = (out, ref, job)
    run_loader(jobs, root)
    return {
        f: (out, ref, torch.load(job["result"], weights_only=True)) for f, (out, ref, job) in cases.items()
    }


@pytest.mark.parametrize("family", list(CASES))
def test_llava_export_gives_mgpt4s_image_embeddings_and_greedy_tokens(exports, family):
    _, ref, got = exports[family]
    assert got["mgpt4_importable"] is False
    assert (got["model_class"], got["processor_class"]) == ("LlavaForConditionalGeneration", "LlavaProcessor")
    # The same pixels (each model's own normalisation): the image embeddings and greedy tokens.
    torch.testing.assert_close(got["direct_image_embeds"], ref["image_embeds"], atol=1e-5, rtol=1e-5)
    assert got["direct_tokens"] == ref["tokens"] and len(ref["tokens"]) == NEW_TOKENS
    # Through the exported processor on a PNG: mgpt4's eval transform, its prompt ids, its tokens.
    torch.testing.assert_close(got["pixel_values"], ref["eval_pixels"], atol=PIXEL_TOL, rtol=0)
    assert got["input_ids"] == ref["input_ids"]
    assert got["tokens"] == ref["eval_tokens"]
    assert got["image_token_suppressed"] is True
    assert got["resaved_differences"] == []


def test_the_llava_config_follows_the_tower_settings(exports):
    expected = {"clip": (-2, "default", 16, 1), "siglip": (-1, "full", 16, 0)}
    for family, (out, _, _) in exports.items():
        with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        with open(os.path.join(out, "processor_config.json"), encoding="utf-8") as f:
            processor = json.load(f)
        layer, strategy, tokens, extra = expected[family]
        assert config["vision_feature_layer"] == layer
        assert (
            config["vision_feature_select_strategy"]
            == processor["vision_feature_select_strategy"]
            == strategy
        )
        assert config["image_seq_length"] == tokens
        assert processor["num_additional_image_tokens"] == extra
        assert config["vision_config"]["model_type"] == f"{family}_vision_model"
        with open(os.path.join(out, "chat_template.jinja"), encoding="utf-8") as f:
            assert '"<Img>" + "<image>" * 1 + "</Img>"' in f.read()
        with open(os.path.join(out, "README.md"), encoding="utf-8") as f:
            card = f.read()
        assert "LlavaForConditionalGeneration.from_pretrained" in card and "ln_vision" not in card
        assert "vision_feature_select_strategy " + strategy in card


def test_a_kept_clip_class_token_exports_as_full(tmp_path, tokenizer):
    """keep_cls on CLIP: every token, the class token too (`full`, 17 image tokens)."""
    from mgpt4.export.hf_llava import llava_config, select_strategy

    folder = write_tiny_tower(str(tmp_path / "clip"), "clip")
    cfg = tower_cfg(folder, "mlp2x_gelu", connector="none", keep_cls=True)
    model = built(cfg, tokenizer)
    assert select_strategy(cfg) == "full"
    config = llava_config(model, image_token_id=400)
    assert (config.vision_feature_select_strategy, config.image_seq_length) == ("full", 17)


@pytest.mark.parametrize(
    ("projector", "connector"), [("linear", "none"), ("mlp2x_gelu", "concat"), ("linear", "concat")]
)
def test_other_tower_combinations_are_refused_naming_the_llava_case(tmp_path, projector, connector):
    folder = write_tiny_tower(str(tmp_path / "siglip"), "siglip")
    message = export_refusal(tower_cfg(folder, projector, connector=connector))
    assert message is not None and "\n" not in message
    assert f"model.projector={projector}" in message and "connector none and mlp2x_gelu" in message
