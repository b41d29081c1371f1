"""Any timm ViT as the vision tower (`model.vision.kind: timm`), and SigLIP2 through kind hf.

A tiny random timm ViT (the `vit_tiny_patch16_224` architecture at 56 px, patch 14, 32 wide, 2 blocks)
saved to a file by the test: its tokens equal timm's own model on timm's own normalisation at the last
layer (`forward_features`) and the penultimate block (blocks run by hand), class token kept or
dropped, registers dropped; the linear and mlp2x_gelu projectors train alone and generate; strict
loading; one line per bad setting; the jobs that take no tower refuse it; 2 ranks under ZeRO-2
through the real launcher, an exact resume, generation from the checkpoint. SigLIP2 (NaFlex) runs
as one square grid and equals transformers' own processor and model.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from mgpt4.config import ModelConfig, timm_vision_config
from mgpt4.images import CLIP_MEAN, CLIP_STD
from mgpt4.model.errors import WeightsError
from mgpt4.model.presets import stage1_text, tiny
from mgpt4.strict_config import ConfigError
from tests.test_vision_towers import assert_only_the_projector_learns_and_it_generates

NAME = "vit_tiny_patch16_224.augreg_in21k"  # timm's data config: mean and std 0.5 (not CLIP's)
KWARGS = {"img_size": 56, "patch_size": 14, "embed_dim": 32, "depth": 2, "num_heads": 4}
# DINOv2 with 4 registers: a class token, then registers, then patches.
REG_NAME = "vit_small_patch14_reg4_dinov2.lvd142m"
# timm's fixed-resolution SigLIP2: no class token, an attention-pool head.
SIGLIP2_NAME = "vit_base_patch16_siglip_224.v2_webli"
PROJECTORS = ("linear", "mlp2x_gelu")


def timm_model(name: str = NAME, **kwargs):
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **{**KWARGS, **kwargs}).eval()


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """The tiny ViT's state dict as a hub download has it: model.safetensors, its classifier head included."""
    from safetensors.torch import save_file

    path = str(tmp_path_factory.mktemp("timm") / "model.safetensors")
    save_file(timm_model().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def launch_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("mgpt4-cache"))


def tower_cfg(
    path: str | None, projector: str = "linear", connector: str = "concat", **vision
) -> ModelConfig:
    cfg = tiny()
    name, kwargs = vision.pop("name", NAME), vision.pop("kwargs", KWARGS)
    cfg.vision = timm_vision_config(name, kwargs, **vision)
    cfg.qformer, cfg.connector, cfg.projector = None, connector, projector
    cfg.text = stage1_text()
    cfg.weights.timm = path
    return cfg


def built(cfg: ModelConfig, tokenizer=None):
    from mgpt4.model.freeze import apply_freeze
    from mgpt4.model.loading import load_weights
    from mgpt4.model.minigpt4 import MiniGPT4

    torch.manual_seed(1)
    model = MiniGPT4(cfg, tokenizer=tokenizer)  # build
    load_weights(model)  # load
    apply_freeze(model)  # freeze
    return model


def normalised(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def by_hand(ref, x: torch.Tensor, blocks: int) -> torch.Tensor:
    """timm's ViT forward run step by step through its first `blocks` blocks: [B, prefix + patches, C]."""
    x = ref.norm_pre(ref.patch_drop(ref._pos_embed(ref.patch_embed(x))))
    for blk in ref.blocks[:blocks]:
        x = blk(x)
    return x


@pytest.mark.parametrize("layer", [-1, -2])
@pytest.mark.parametrize("keep_cls", [None, True])
def test_tower_tokens_equal_timm_on_its_own_preprocessing(weights, layer, keep_cls):
    """mgpt4's one image path (CLIP mean/std) then timm's data config, applied inside the tower, give
    timm's model on pixels normalised as timm says (1e-5, fp32): layer -1 is `forward_features` (the
    final norm applied), -2 the first block's raw output; the class token dropped unless kept."""
    from timm.data import resolve_model_data_config

    model = built(tower_cfg(weights, connector="none", feature_layer=layer, keep_cls=keep_cls))
    ref = timm_model()
    data = resolve_model_data_config(ref)
    assert data["mean"] == (0.5, 0.5, 0.5) and data["mean"] != CLIP_MEAN
    pixels = torch.rand(2, 3, 56, 56)
    own = normalised(pixels, data["mean"], data["std"])
    with torch.no_grad():
        expected = ref.forward_features(own) if layer == -1 else by_hand(ref, own, 1)
        got = model.image_features(normalised(pixels, CLIP_MEAN, CLIP_STD))
        other = by_hand(ref, own, 2)  # the last block, before the final norm
    if not keep_cls:
        expected, other = expected[:, 1:], other[:, 1:]
    assert got.shape == (2, 17 if keep_cls else 16, 32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, other, atol=1e-3)  # the layer (and the final norm) are honoured


def test_registers_are_dropped_and_the_class_token_kept(tmp_path):
    """A ViT with 4 registers (DINOv2-reg): the tower gives the class token and the patches, no register."""
    from safetensors.torch import save_file

    ref = timm_model(REG_NAME)
    assert ref.num_prefix_tokens == 5
    path = str(tmp_path / "reg.safetensors")
    save_file(ref.state_dict(), path)
    cfg = tower_cfg(path, connector="none", name=REG_NAME, keep_cls=True)
    assert cfg.image_token_shape() == (17, 32)
    model = built(cfg)
    from timm.data import resolve_model_data_config

    data = resolve_model_data_config(ref)
    pixels = torch.rand(1, 3, 56, 56)
    with torch.no_grad():
        full = ref.forward_features(normalised(pixels, data["mean"], data["std"]))
        got = model.image_features(normalised(pixels, CLIP_MEAN, CLIP_STD))
    torch.testing.assert_close(got, torch.cat([full[:, :1], full[:, 5:]], dim=1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer", [-1, -2])
def test_timm_siglip2_has_no_class_token_and_every_patch_is_a_token(tmp_path, layer):
    """timm's fixed-resolution SigLIP2 (`.v2_webli`): no prefix token at all, 16 patch tokens out."""
    ref = timm_model(SIGLIP2_NAME)
    assert ref.num_prefix_tokens == 0 and ref.cls_token is None
    path = str(tmp_path / "siglip2.pth")
    torch.save(ref.state_dict(), path)  # a torch file loads as a safetensors one does
    cfg = tower_cfg(path, connector="none", name=SIGLIP2_NAME, feature_layer=layer)
    assert cfg.image_token_shape() == (16, 32)
    model = built(cfg)
    pixels = torch.rand(2, 3, 56, 56)
    own = normalised(pixels, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    with torch.no_grad():
        expected = ref.forward_features(own) if layer == -1 else by_hand(ref, own, 1)
        got = model.image_features(normalised(pixels, CLIP_MEAN, CLIP_STD))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("projector", PROJECTORS)
def test_forward_backward_trains_only_the_projector_and_generates(weights, tokenizer, projector):
    cfg = tower_cfg(weights, projector)
    model = built(cfg, tokenizer).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {"linear": {"llama_proj.weight", "llama_proj.bias"}}.get(
        projector, {f"llama_proj.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    )
    assert trainable == expected
    assert not model.visual_encoder.training  # frozen children stay in eval
    # 16 patches (the class token dropped) concatenated 4 by 4: 4 image tokens of width 128.
    assert_only_the_projector_learns_and_it_generates(model, cfg, expected)


def test_tower_loading_is_strict(weights, tmp_path):
    """Every key of the built model, each of its shape; only the classifier head is passed over."""
    from safetensors.torch import load_file, save_file

    from mgpt4.model.loading import load_weights
    from mgpt4.model.minigpt4 import MiniGPT4

    cfg = tower_cfg(weights)
    assert sorted(load_weights(MiniGPT4(cfg))[weights]) == ["head.bias", "head.weight"]
    sd = load_file(weights)
    cases = {
        "extra": (
            {**sd, "blocks.7.attn.qkv.weight": torch.zeros(1)},
            "unexpected key 'blocks.7.attn.qkv.weight'",
        ),
        "missing": (
            {k: v for k, v in sd.items() if k != "norm.weight"},
            "missing key for visual_encoder.model.norm",
        ),
        "shape": ({**sd, "pos_embed": torch.zeros(1, 10, 32)}, "key 'pos_embed': expected shape [1, 17, 32]"),
    }
    for name, (state, message) in cases.items():
        path = str(tmp_path / f"{name}.safetensors")
        save_file(state, path)
        cfg.weights.timm = path
        with pytest.raises(
            WeightsError, match=rf"^{re.escape(path)}: \d problem\(s\):\n  {re.escape(message)}"
        ):
            load_weights(MiniGPT4(cfg))
    cfg.weights.timm = str(tmp_path / "absent.safetensors")
    with pytest.raises(FileNotFoundError, match=r"absent\.safetensors' does not exist"):
        load_weights(MiniGPT4(cfg))
    (tmp_path / "junk.safetensors").write_text("not tensors")
    cfg.weights.timm = str(tmp_path / "junk.safetensors")
    with pytest.raises(WeightsError, match=r"junk.safetensors: not a readable safetensors file"):
        load_weights(MiniGPT4(cfg))


def refusal(cfg: ModelConfig) -> str:
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_settings_fail_at_config_time_naming_the_key(weights):
    cfg = tower_cfg(weights)
    cfg.vision.timm_name = "vit_nonexistent_patch16"
    assert refusal(cfg).startswith(
        "model.vision.timm_name: 'vit_nonexistent_patch16' is not a timm architecture"
    )
    cfg = tower_cfg(weights)
    cfg.vision.timm_name = None
    assert refusal(cfg).startswith("model.vision.timm_name: model.vision.kind is timm")
    cfg = tower_cfg(weights)
    cfg.vision.timm_name, cfg.vision.timm_kwargs = "resnet18", {}
    assert refusal(cfg).startswith("model.vision.timm_name: the timm model resnet18 (ResNet) is not a ViT")
    cfg = tower_cfg(weights)
    cfg.vision.timm_kwargs = {**KWARGS, "no_such_kwarg": 1}
    assert refusal(cfg).startswith(f"model.vision.timm_kwargs: timm.create_model('{NAME}'")
    cfg = tower_cfg(weights)
    cfg.vision.timm_kwargs = {**KWARGS, "num_classes": 10}
    assert refusal(cfg).startswith("model.vision.timm_kwargs.num_classes: a tower is built without its")
    assert refusal(tower_cfg(weights, feature_layer=3)).startswith(
        "model.vision.feature_layer: 3 is outside the timm model's 2 blocks"
    )
    assert refusal(tower_cfg(weights, feature_layer=-3)).startswith("model.vision.feature_layer: -3")
    no_cls = {**KWARGS, "class_token": False, "global_pool": "avg"}
    assert refusal(tower_cfg(weights, kwargs=no_cls, keep_cls=True)).startswith(
        f"model.vision.keep_cls: the timm model {NAME} has no class token"
    )
    cfg = tower_cfg(weights, keep_cls=True)  # 17 tokens: 4 does not divide them
    assert refusal(cfg).startswith("model.concat_tokens: 4 adjacent tokens make one image token")
    cfg = tower_cfg(weights)
    cfg.vision.width = 48
    assert refusal(cfg).startswith(f"model.vision.width: 48, but the timm model {NAME} has 32")
    cfg = tower_cfg(weights)
    cfg.vision.ln_vision_eps = 1e-6
    assert refusal(cfg).startswith("model.vision.ln_vision_eps is an EVA ViT-g setting")
    cfg = tower_cfg(weights)
    cfg.weights.eva_vit = "weights/eva_vit_g.pth"
    assert refusal(cfg).startswith("model.weights.eva_vit is set, but model.vision.kind is timm")
    cfg = tower_cfg(weights)
    cfg.vision.folder = "weights/vision_tower"
    assert refusal(cfg).startswith("model.vision.folder is set, but model.vision.kind is timm")
    cfg = tower_cfg(weights)
    cfg.connector, cfg.qformer = "qformer", tiny().qformer
    assert refusal(cfg).startswith("model.connector: qformer (BLIP-2's Q-Former) reads EVA ViT-g tokens")
    cfg = tower_cfg(weights)
    cfg.vision.kind = "nope"
    assert refusal(cfg).startswith("model.vision.kind: expected one of ('eva_vit_g', 'hf', 'timm')")
    # The other kinds take none of the timm settings.
    official = tiny()
    official.weights.timm = weights
    assert refusal(official).startswith("model.weights.timm is set, but model.vision.kind is eva_vit_g")
    official = tiny()
    official.vision.timm_name = NAME
    assert refusal(official).startswith("model.vision.timm_name is set, but model.vision.kind is eva_vit_g")


def test_jobs_without_a_timm_path_refuse_it_in_one_line(weights, tmp_path):
    """The hf export refuses a timm tower in one line (ZeRO-3 and the feature cache take it: the 2-rank
    test below, tests/test_features_towers.py); a weight file that is not there is listed by the run's
    input check, before anything loads."""
    from mgpt4.config import Config
    from mgpt4.data.config import DataConfig, SourceConfig
    from mgpt4.export.hf import export_refusal
    from mgpt4.train.resolve import check_precision, find_missing_inputs

    run = Config(model=tower_cfg(weights), data=DataConfig(sources=[SourceConfig(name="s", shards="a.tar")]))
    run.validate()
    assert run.data.image_size == 56  # left unset: the timm model's
    check_precision(run, 2)
    why = export_refusal(run.model)
    assert why and why.startswith("model.vision.kind=timm, model.connector=concat, model.projector=linear")
    from mgpt4.inference.loader import missing_weight_flags

    assert "--set model.weights.timm=FILE" not in missing_weight_flags(run.model)
    run.model.weights.timm = None  # a random tower is named among the parts no file fills
    assert missing_weight_flags(run.model)[0] == "--set model.weights.timm=FILE"
    run.model.weights.timm = str(tmp_path / "absent.safetensors")
    assert f"model.weights.timm: '{tmp_path}/absent.safetensors' does not exist" in find_missing_inputs(
        run, 1, set()
    )


def test_siglip2_runs_as_one_square_grid_equal_to_transformers(tmp_path):
    """A SigLIP2 (NaFlex) folder through kind hf: its 56 px square is the 4 x 4 grid its processor makes of
    a square image (max_num_patches 16), and the tokens equal transformers' processor then model."""
    import numpy as np
    from transformers import AutoImageProcessor, AutoModel

    from mgpt4.config import hf_vision_config
    from mgpt4.train.assets import write_tiny_tower

    folder = write_tiny_tower(str(tmp_path / "siglip2"), "siglip2")
    cfg = tower_cfg(None, "mlp2x_gelu", "none")
    cfg.weights.timm = None
    cfg.vision = hf_vision_config(folder, feature_layer=-2)
    assert (cfg.vision.image_size, cfg.image_token_shape()) == (56, (16, 32))
    model = built(cfg)
    ref = AutoModel.from_pretrained(folder).vision_model.eval()
    image = (np.random.RandomState(0).rand(56, 56, 3) * 255).astype(np.uint8)
    inputs = AutoImageProcessor.from_pretrained(folder)(images=[image], return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 16, 14 * 14 * 3) and bool(inputs["pixel_attention_mask"].all())
    pixels = torch.tensor(image).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        expected = ref(**inputs, output_hidden_states=True).hidden_states[-2]
        got = model.image_features(normalised(pixels, CLIP_MEAN, CLIP_STD))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.multirank
# One projector through the launcher (each costs three 2-rank runs); both train in one process above.
@pytest.mark.parametrize("projector", ["mlp2x_gelu"])
def test_timm_tower_trains_on_two_ranks_under_zero2_and_zero3_resumes_exactly_then_generates(
    weights, launch_cache, tmp_path, projector
):
    """tiny_tower_stage1 with the tiny timm ViT for its tower, through the real launcher: two steps on 2
    ranks under ZeRO-2; the same run under ZeRO-3 (the tower partitioned), stopped after step 1 and
    resumed, gives the same losses (1e-5); the checkpoint's config and projection give the trained
    model back, and it generates."""
    from mgpt4.model import from_config
    from mgpt4.strict_config import from_dict
    from tests.launch import deepspeed_cmd, read_jsonl, run

    cache = launch_cache  # the tiny Qwen2 and the synthetic shards, made once for both projectors
    vision = {"kind": "timm", "timm_name": NAME, "timm_kwargs": KWARGS, "feature_layer": -2}
    common = ["--recipe", "tiny_tower_stage1"]
    sets = [
        f"model.vision={json.dumps(vision)}",
        f"model.weights.timm={weights}",
        f"model.projector={projector}",
        "train.steps=2",
        "train.save_every=1",
        "train.log_every=1",
        "train.eval_every=0",
        "data.val.samples=0",
    ]
    common += [a for s in sets for a in ("--set", s)]

    def launch(out, ds: str, *extra: str):
        cmd = deepspeed_cmd(
            "launchers/pretrain.py", 2, *common, "--deepspeed", ds, "--set", f"train.output_dir={out}", *extra
        )
        proc = run(cmd, cache)
        assert proc.returncode == 0, proc.stdout[-4000:]
        return proc

    full, parts = tmp_path / "full", tmp_path / "parts"
    launch(full, "ds_configs/z2.json")
    launch(parts, "ds_configs/z3.json", "--set", "train.stop_at=1")
    assert "resumed from step 1" in launch(parts, "ds_configs/z3.json").stdout
    a, b = read_jsonl(str(full / "metrics.jsonl")), read_jsonl(str(parts / "metrics.jsonl"))
    assert [r["step"] for r in a] == [1, 2] == [r["step"] for r in b]
    assert all(r["train/loss"] > 0 for r in a)
    np.testing.assert_allclose([r["train/loss"] for r in b], [r["train/loss"] for r in a], rtol=1e-5)
    report = json.loads((full / "engine.json").read_text())
    assert report["zero_stage"] == 2 and report["world_size"] == 2
    report = json.loads((parts / "engine.json").read_text())
    shards = report["params_per_rank"]["visual_encoder"]
    assert report["zero_stage"] == 3 and shards[0] > 0 and shards[0] == shards[1]  # the tower is split
    ckpt = full / "checkpoints" / "step_00000002"
    cfg = from_dict(ModelConfig, json.loads((ckpt / "config.json").read_text())["model"], "model")
    assert (cfg.vision.kind, cfg.vision.timm_name, cfg.weights.timm, cfg.projector) == (
        "timm",
        NAME,
        weights,
        projector,
    )
    cfg.weights.proj = str(ckpt / "llama_proj.pth")
    model = from_config(cfg).eval()
    saved = torch.load(ckpt / "llama_proj.pth", weights_only=True)["model"]
    for k, v in model.llama_proj.state_dict().items():
        assert torch.equal(v, saved[f"llama_proj.{k}"])
    conv = model.new_conversation()
    conv.add_image()
    conv.ask("What is it?")
    [reply] = model.generate(torch.randn(1, 3, 56, 56), conv.prompt_for_reply(), max_new_tokens=4)
    assert isinstance(reply, str)
