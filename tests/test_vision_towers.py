"""Any transformers vision tower (`model.vision.kind: hf`) with a Linear or MLP projector.

Tiny random CLIP and SigLIP folders (and a DINOv2), written as transformers saves them, each with the `linear` and
`mlp2x_gelu` projectors: the tower's tokens equal transformers' own model on its own preprocessing,
forward and backward train the projector only, generation, the layout's image-token count, strict
loading, and one clear line for each bad setting. The 2-rank ZeRO-2 run goes through the real launcher.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from mgpt4.config import ModelConfig, hf_vision_config
from mgpt4.model.layout import IMAGE
from mgpt4.model.presets import stage1_text, tiny
from mgpt4.strict_config import ConfigError
from mgpt4.train.assets import write_tiny_tower

FAMILIES = ("siglip", "clip")
PROJECTORS = ("linear", "mlp2x_gelu")


@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("towers")
    return {f: write_tiny_tower(str(root / f), f) for f in FAMILIES}


def tower_cfg(folder: str, projector: str = "linear", connector: str = "concat", **vision) -> ModelConfig:
    cfg = tiny()
    cfg.vision = hf_vision_config(folder, **vision)
    cfg.qformer, cfg.connector, cfg.projector = None, connector, projector
    cfg.text = stage1_text()
    return cfg


def built(cfg: ModelConfig, tokenizer=None):
    from mgpt4.model.freeze import apply_freeze
    from mgpt4.model.loading import load_weights
    from mgpt4.model.minigpt4 import MiniGPT4

    torch.manual_seed(0)
    model = MiniGPT4(cfg, tokenizer=tokenizer)  # build
    load_weights(model)  # load
    apply_freeze(model)  # freeze
    return model


def assert_only_the_projector_learns_and_it_generates(model, cfg: ModelConfig, expected: set[str]) -> None:
    """One loss on two 56 px images: gradients reach exactly the `expected` parameters; the image takes 4
    tokens of width 128 (16 patches concatenated 4 by 4), and the model generates for a batch of two."""
    loss = model.loss(torch.randn(2, 3, 56, 56), ["a red circle", "a blue square"])
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        if name in expected:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert cfg.image_token_shape() == (4, 128)
    assert model.layout("<Img><ImageHere></Img>").count(IMAGE) == 4 == model.num_image_tokens
    model.eval()
    replies = model.generate(
        torch.randn(2, 3, 56, 56), "<Img><ImageHere></Img> What is it?", max_new_tokens=3
    )
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layer", [-1, -2])
def test_tower_tokens_equal_transformers_on_its_own_preprocessing(towers, family, layer):
    """mgpt4's one image path (CLIP mean/std) then the tower's own normalisation, applied inside it,
    give transformers' model on pixels normalised as the folder's preprocessor says (1e-5, fp32)."""
    from transformers import AutoModel

    folder = towers[family]
    model = built(tower_cfg(folder, connector="none", feature_layer=layer))
    with open(os.path.join(folder, "preprocessor_config.json")) as f:
        pre = json.load(f)
    ref = AutoModel.from_pretrained(folder).vision_model.eval()
    pixels = torch.rand(2, 3, 56, 56)
    from mgpt4.images import CLIP_MEAN, CLIP_STD

    clip_normalised = (pixels - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(
        1, 3, 1, 1
    )
    own = (pixels - torch.tensor(pre["image_mean"]).view(1, 3, 1, 1)) / torch.tensor(pre["image_std"]).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        expected = ref(pixel_values=own, output_hidden_states=True).hidden_states[layer]
        got = model.image_features(clip_normalised)
    if family == "clip":
        expected = expected[:, 1:]  # the class token is dropped unless kept
    assert got.shape == (2, 16, 32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # Pre-layer-norm hidden states differ from layer to layer: the layer setting is honoured.
    other = ref(pixel_values=own, output_hidden_states=True).hidden_states[-1 if layer == -2 else -2]
    assert not torch.allclose(expected, other[:, 1:] if family == "clip" else other)


@pytest.mark.parametrize("projector", PROJECTORS)
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_backward_trains_only_the_projector_and_generates(towers, tokenizer, family, projector):
    cfg = tower_cfg(towers[family], projector)
    model = built(cfg, tokenizer).train()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("llama_proj.") for n in trainable)
    expected = {"linear": {"llama_proj.weight", "llama_proj.bias"}}.get(
        projector, {f"llama_proj.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    )
    assert set(trainable) == expected
    # 16 patches (CLIP's class token dropped) concatenated 4 by 4: 4 image tokens of width 128.
    assert_only_the_projector_learns_and_it_generates(model, cfg, expected)


@pytest.mark.parametrize(
    ("family", "connector", "keep_cls", "count", "width"),
    [
        ("siglip", "none", None, 16, 32),
        ("clip", "none", None, 16, 32),
        ("clip", "none", True, 17, 32),
        ("siglip", "concat", None, 4, 128),
    ],
)
def test_image_token_count_follows_tower_connector_and_class_token(
    towers, tokenizer, family, connector, keep_cls, count, width
):
    cfg = tower_cfg(towers[family], "mlp2x_gelu", connector, keep_cls=keep_cls)
    assert cfg.image_token_shape() == (count, width)
    model = built(cfg, tokenizer)
    assert model.encode_img(torch.randn(1, 3, 56, 56)).shape == (1, count, model.llm.config.hidden_size)
    assert model.layout("<Img><ImageHere></Img> hi").count(IMAGE) == count
    assert model.sample_layouts()[0].count(IMAGE) == count


def test_official_configs_resolve_to_their_parts():
    from mgpt4.model.presets import llama2_7b, vicuna13b

    v = vicuna13b()
    assert (v.vision.kind, v.connector_kind(), v.projector, v.image_token_shape()) == (
        "eva_vit_g",
        "qformer",
        "linear",
        (32, 768),
    )
    l2 = llama2_7b()
    assert (l2.connector_kind(), l2.concat_tokens, l2.image_token_shape()) == ("concat", 4, (64, 5632))


def test_tower_loading_is_strict(towers, tmp_path):
    from safetensors.torch import load_file, save_file

    from mgpt4.model.errors import WeightsError

    folder = tmp_path / "broken"
    folder.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        with open(os.path.join(towers["siglip"], name)) as f:
            (folder / name).write_text(f.read())
    state = load_file(os.path.join(towers["siglip"], "model.safetensors"))
    missing = "vision_model.encoder.layers.1.mlp.fc2.weight"
    save_file({k: v for k, v in state.items() if k != missing}, str(folder / "model.safetensors"))
    with pytest.raises(
        WeightsError,
        match=r"broken: the weights do not fit its SiglipVisionModel: missing key encoder\.layers\.1\.mlp\.fc2\.weight$",
    ):
        built(tower_cfg(str(folder)))
    state["vision_model.encoder.layers.0.mlp.fc1.weight"] = torch.zeros(7, 32)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(
        WeightsError,
        match=r"SiglipVisionModel: key encoder\.layers\.0\.mlp\.fc1\.weight: found \[7, 32\], expected \[64, 32\]$",
    ):
        built(tower_cfg(str(folder)))


@pytest.mark.parametrize("projector", PROJECTORS)
def test_projector_checkpoint_of_another_kind_or_width_is_refused_in_one_line(towers, tmp_path, projector):
    from mgpt4.model.errors import WeightsError
    from mgpt4.model.export import save_projection

    cfg = tower_cfg(towers["siglip"], projector)
    model = built(cfg)
    path = str(tmp_path / "proj.pth")
    save_projection({f"llama_proj.{k}": v for k, v in model.llama_proj.state_dict().items()}, path)
    cfg.weights.proj = path
    reloaded = built(cfg)  # its own checkpoint loads back, equal
    for a, b in zip(model.llama_proj.parameters(), reloaded.llama_proj.parameters(), strict=True):
        assert torch.equal(a, b)
    other = "mlp2x_gelu" if projector == "linear" else "linear"
    wrong_kind = tower_cfg(towers["siglip"], other)
    wrong_kind.weights.proj = path
    with pytest.raises(WeightsError, match=f"a {projector} projector .* but model.projector is {other}") as e:
        built(wrong_kind)
    assert "\n" not in str(e.value)
    wider = tower_cfg(towers["siglip"], projector, connector="none")  # 16 tokens of width 32, not 128
    wider.weights.proj = path
    with pytest.raises(WeightsError, match=r"made for image tokens of width 128.*give width 32") as e:
        built(wider)
    assert "\n" not in str(e.value)


def refusal(cfg: ModelConfig) -> str:
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_settings_fail_at_config_time_naming_the_key(towers, tmp_path):
    siglip, clip = towers["siglip"], towers["clip"]
    cfg = tower_cfg(siglip, connector="qformer")
    assert refusal(cfg).startswith("model.connector is qformer, but model.qformer is null")
    cfg = tower_cfg(siglip)
    cfg.connector = "qformer"
    cfg.qformer = tiny().qformer
    assert refusal(cfg).startswith("model.connector: qformer (BLIP-2's Q-Former) reads EVA ViT-g tokens")
    cfg = tower_cfg(clip, keep_cls=True)  # 17 tokens: 4 does not divide them
    assert refusal(cfg).startswith(
        "model.concat_tokens: 4 adjacent tokens make one image token, which does not divide the tower's 17"
    )
    cfg = tower_cfg(siglip)
    cfg.concat_tokens = 3
    assert refusal(cfg).startswith("model.concat_tokens: 3")
    cfg = tower_cfg(siglip, connector="none")
    cfg.concat_tokens = 2
    assert refusal(cfg).startswith("model.concat_tokens is set (2), but model.connector is none")
    assert refusal(tower_cfg(siglip, keep_cls=True)).startswith(
        "model.vision.keep_cls: the siglip_vision_model tower"
    )
    assert refusal(tower_cfg(siglip, feature_layer=3)).startswith(
        "model.vision.feature_layer: 3 is outside the tower's 2 layers"
    )
    assert refusal(tower_cfg(siglip, feature_layer=0)).startswith("model.vision.feature_layer: 0")
    cfg = tower_cfg(siglip)
    cfg.projector = "mlp3x"
    assert refusal(cfg).startswith("model.projector: expected one of ('linear', 'mlp2x_gelu')")
    cfg = tower_cfg(siglip)
    cfg.connector = "resampler"
    assert refusal(cfg).startswith("model.connector: expected one of")
    cfg = tower_cfg(siglip)
    cfg.vision.kind = "nope"
    assert refusal(cfg).startswith("model.vision.kind: expected one of ('eva_vit_g', 'hf', 'timm')")
    cfg = tower_cfg(siglip)
    cfg.vision.width = 48
    assert refusal(cfg).startswith("model.vision.width: 48, but the tower folder")
    cfg = tower_cfg(siglip)
    cfg.vision.mlp_dim = 100
    assert refusal(cfg).startswith("model.vision.mlp_dim is an EVA ViT-g setting")
    cfg = tower_cfg(siglip)
    cfg.weights.eva_vit = "weights/eva_vit_g.pth"
    assert refusal(cfg).startswith("model.weights.eva_vit is set, but model.vision.kind is hf")
    cfg = tower_cfg(siglip)
    cfg.vision.folder = None
    assert refusal(cfg).startswith("model.vision.folder: model.vision.kind is hf")
    # A folder that is not a vision tower, or has none of the files.
    llm = tmp_path / "llm"
    llm.mkdir()
    (llm / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (llm / "preprocessor_config.json").write_text("{}")
    cfg = tower_cfg(siglip)
    cfg.vision.folder = str(llm)
    assert refusal(cfg).startswith(
        f"model.vision.folder: {llm / 'config.json'}: model_type 'llama' is not a vision tower"
    )
    cfg.vision.folder = str(tmp_path)
    assert refusal(cfg).startswith(f"model.vision.folder: {tmp_path}: no config.json")
    # EVA ViT-g (official) takes none of the tower settings.
    official = tiny()
    official.vision.feature_layer = -2
    assert refusal(official).startswith("model.vision.feature_layer: eva_vit_g feeds its last block")
    official = tiny()
    official.vision.folder = siglip
    assert refusal(official).startswith("model.vision.folder is set, but model.vision.kind is eva_vit_g")
    official = tiny()
    official.vision.keep_cls = False
    assert refusal(official).startswith(
        "model.vision.keep_cls: false, but the Q-Former reads every tower token"
    )
    official = tiny()
    official.connector = "concat"
    assert refusal(official).startswith("model.connector is concat, but model.qformer holds Q-Former sizes")


def test_jobs_without_a_tower_path_refuse_at_config_time(towers, tmp_path, monkeypatch):
    """ZeRO-3 and the feature cache take a tower (tests/test_vision_towers_zero3.py,
    tests/test_features_towers.py); the hf export refuses a tower path other than LLaVA's in one line."""
    from mgpt4.export.hf import export_refusal
    from mgpt4.train.recipes import tiny_tower_stage1
    from mgpt4.train.resolve import check_precision

    monkeypatch.setenv("MGPT4_CACHE", str(tmp_path))  # the recipe writes its tiny SigLIP there
    from mgpt4.train.assets import fill_demo_paths

    run = tiny_tower_stage1()
    fill_demo_paths(run)  # paths only: nothing is generated but the recipe's tower
    run.validate()
    check_precision(run, 3)
    check_precision(run, 2)
    # LLaVA's layout exports (tests/test_export_llava.py) once its tower folder is here; another is refused.
    why = export_refusal(run.model)  # the recipe's tower folder is not generated here
    assert why and why.startswith(f"model.vision.folder: {run.model.vision.folder} is no folder here")
    assert export_refusal(tower_cfg(towers["siglip"], "mlp2x_gelu", connector="none")) is None
    why = export_refusal(tower_cfg(towers["siglip"], "linear", connector="none"))
    assert why and why.startswith("model.vision.kind=hf, model.connector=none, model.projector=linear")
    assert "\n" not in why
    assert export_refusal(tiny()) is None


def test_tower_recipes_read_sizes_from_the_folder(towers):
    from mgpt4.train.recipes import stage1_tower, stage2_tower

    for recipe in (stage1_tower, stage2_tower):
        cfg = recipe()
        assert cfg.model.weights.eva_vit is None and cfg.model.vision.kind == "hf"
        cfg.model.vision.folder = towers["clip"]
        cfg.model.weights.llm = None
        cfg.model.llm = tiny().llm
        cfg.model.text.template = "vicuna_v0"
        cfg.model.text.prompt_template = cfg.model.text.prompt_template and "###Human: {} ###Assistant: "
        cfg.validate()
        assert (cfg.model.vision.image_size, cfg.model.vision.width, cfg.data.image_size) == (56, 32, 56)
        assert cfg.model.image_token_shape() == (16, 32)  # layer -2, every patch, class token dropped


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize("projector", PROJECTORS)
def test_tiny_tower_trains_on_two_ranks_packed_under_zero2_then_generates(tmp_path, projector):
    """tiny_tower_stage1 (its SigLIP and Qwen2 generated into a fresh cache) through the real launcher:
    two steps on 2 ranks under ZeRO-2 with packed rows; the checkpoint's config and projection give
    the trained model back, and it generates."""
    from mgpt4.model import from_config
    from mgpt4.strict_config import from_dict
    from tests.launch import deepspeed_cmd, read_jsonl, run

    out, cache = tmp_path / "run", str(tmp_path / "cache")
    sets = [
        f"train.output_dir={out}",
        "train.steps=2",
        "train.log_every=1",
        "train.eval_every=0",
        "data.val.samples=0",
        f"model.projector={projector}",
        "data.pack_length=160",
        "data.pack_rows=2",
    ]
    cmd = deepspeed_cmd(
        "launchers/pretrain.py",
        2,
        "--recipe",
        "tiny_tower_stage1",
        "--deepspeed",
        "ds_configs/z2.json",
        *(a for s in sets for a in ("--set", s)),
    )
    proc = run(cmd, cache)
    assert proc.returncode == 0, proc.stdout[-4000:]
    rows = read_jsonl(str(out / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2] and all(r["train/loss"] > 0 for r in rows)
    report = json.loads((out / "engine.json").read_text())
    assert report["zero_stage"] == 2 and report["world_size"] == 2
    ckpt = out / "checkpoints" / "step_00000002"
    cfg = from_dict(ModelConfig, json.loads((ckpt / "config.json").read_text())["model"], "model")
    assert (cfg.vision.kind, cfg.connector, cfg.projector) == ("hf", "none", projector)
    cfg.weights.proj = str(ckpt / "llama_proj.pth")
    model = from_config(cfg).eval()
    saved = torch.load(ckpt / "llama_proj.pth", weights_only=True)["model"]
    assert set(saved) == {f"llama_proj.{k}" for k in model.llama_proj.state_dict()}
    for k, v in model.llama_proj.state_dict().items():
        assert torch.equal(v, saved[f"llama_proj.{k}"])
    conv = model.new_conversation()
    conv.add_image()
    conv.ask("What is it?")
    [reply] = model.generate(torch.randn(1, 3, 56, 56), conv.prompt_for_reply(), max_new_tokens=4)
    assert isinstance(reply, str)
    # mlp2x_gelu with no connector is LLaVA's layout (tests/test_export_llava.py); a linear projector has
    # no transformers format: one line, before any weight loads, nothing written.
    from mgpt4.export.__main__ import main as export_main

    exported = tmp_path / "export"
    args = ["hf", "--checkpoint", str(out), "--out", str(exported), "--device", "cpu"]
    if projector == "mlp2x_gelu":
        export_main(args)
        assert json.loads((exported / "config.json").read_text())["architectures"] == [
            "LlavaForConditionalGeneration"
        ]
        return
    with pytest.raises(SystemExit) as e:
        export_main(args)
    assert str(e.value).startswith(
        f"export: model.vision.kind=hf, model.connector=none, model.projector={projector}"
    )
    assert "\n" not in str(e.value) and not exported.exists()


def test_dinov2_tower_interpolates_to_its_preprocessor_size(tmp_path):
    """A DINOv2 folder (a vision model alone, no prefix; made at 112 px, served at 56 by its crop):
    its tokens are transformers' own, the class token first, position embeddings interpolated."""
    from transformers import AutoModel, BitImageProcessor, Dinov2Config, Dinov2Model

    folder = str(tmp_path / "dinov2")
    torch.manual_seed(0)
    Dinov2Model(
        Dinov2Config(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=112,
            patch_size=14,
        )
    ).save_pretrained(folder)
    BitImageProcessor(
        size={"shortest_edge": 64},
        crop_size={"height": 56, "width": 56},
        do_center_crop=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(folder)
    cfg = tower_cfg(folder, "mlp2x_gelu", "none", keep_cls=True)
    assert cfg.image_token_shape() == (17, 32)
    model = built(cfg)
    from mgpt4.images import CLIP_MEAN, CLIP_STD

    pixels = torch.rand(2, 3, 56, 56)
    clip_normalised = (pixels - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(
        1, 3, 1, 1
    )
    own = (pixels - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]
    ).view(1, 3, 1, 1)
    ref = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = ref(pixel_values=own, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(model.image_features(clip_normalised), expected, atol=1e-5, rtol=1e-5)
