"""A CLIP or SigLIP tower with the `mlp2x_gelu` projector and no connector as transformers' own
`LlavaForConditionalGeneration` (which vLLM also serves natively).

That model is LLaVA-1.5's layout (Liu et al. 2023, "Improved Baselines with Visual Instruction Tuning"),
and mgpt4's tower path computes the same thing:

- `visual_encoder.model` (transformers' `CLIPVisionModel` / `SiglipVisionModel`, built by `AutoModel`
  from the tower folder's vision config) -> `model.vision_tower`, names unchanged;
- hidden state `model.vision.feature_layer` -> `vision_feature_layer`; the class token dropped
  (CLIP, `keep_cls` unset) -> `vision_feature_select_strategy: default`, kept (CLIP with `keep_cls`
  true, or SigLIP, which has none) -> `full`;
- `llama_proj.0` / `llama_proj.2` (Linear, exact GELU, Linear) -> `model.multi_modal_projector.linear_1`
  / `linear_2` (`projector_hidden_act: gelu`, with biases);
- the LLM's base model -> `model.language_model`, its head -> `lm_head`.

Pixels: mgpt4 feeds CLIP-normalised pixels and re-maps them to the tower's mean and std inside
`HFVisionTower`; the export's image processor normalises with the tower's own mean and std directly,
after mgpt4's resize (bicubic, to the tower's square size, no crop).
"""

from __future__ import annotations

import os

import torch

from mgpt4.config import ModelConfig
from mgpt4.export.weights import language_state, meta_built, text_config, vocab_with_image_token
from mgpt4.model import MiniGPT4
from mgpt4.tower_folder import read_tower_folder

LLAVA_TOWERS = ("clip_vision_model", "siglip_vision_model")


def llava_layout(cfg: ModelConfig) -> bool:
    """Whether the vision path is LLaVA's: a transformers tower, connector none, mlp2x_gelu."""
    return cfg.vision.kind == "hf" and cfg.connector_kind() == "none" and cfg.projector == "mlp2x_gelu"


def is_llava(cfg: ModelConfig) -> bool:
    """Whether the model is exactly `LlavaForConditionalGeneration`: LLaVA's layout on a CLIP or SigLIP
    tower whose folder is here (DINOv2 is not one of the towers LLaVA is served with)."""
    folder = cfg.vision.folder
    if not llava_layout(cfg) or not folder or not os.path.isdir(folder):
        return False
    return read_tower_folder(folder).model_type in LLAVA_TOWERS


def select_strategy(cfg: ModelConfig) -> str:
    """LLaVA's `vision_feature_select_strategy`: `default` drops the first token (the class token mgpt4
    drops), `full` keeps every token (a kept class token, or SigLIP's patches, where there is none)."""
    return "default" if cfg.vision.has_cls() and not cfg.keeps_cls() else "full"


def llava_config(model: MiniGPT4, image_token_id: int):
    """The export's `LlavaConfig`; ValueError when its image-token count is not the model's."""
    from transformers import LlavaConfig

    cfg = model.cfg
    vision = model.visual_encoder.model.config.to_dict()
    text = text_config(model, vocab_with_image_token(model, image_token_id))
    out = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=model.num_image_tokens,
        vision_feature_layer=cfg.vision.feature_layer,
        vision_feature_select_strategy=select_strategy(cfg),
        projector_hidden_act="gelu",  # exact (erf) GELU, as torch's nn.GELU() in mlp2x_gelu
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(model.llm.config.tie_word_embeddings),
    )
    patches = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
    tokens = patches + int(cfg.vision.has_cls()) - int(out.vision_feature_select_strategy == "default")
    if tokens != model.num_image_tokens:
        raise ValueError(f"the export gives {tokens} image tokens, the model {model.num_image_tokens}")
    out.architectures = ["LlavaForConditionalGeneration"]
    # Every part's dtype written as loading it sets them, so a loaded export saves the same config.json.
    out.dtype = out.text_config.dtype = model.llm.get_input_embeddings().weight.dtype
    out.vision_config.dtype = next(model.visual_encoder.parameters()).dtype
    return out


def llava_state(model: MiniGPT4, image_token_id: int) -> dict[str, torch.Tensor]:
    """Every weight of the export under `LlavaForConditionalGeneration`'s names, sharing the model's
    tensors. ValueError for an LLM whose weights lie outside its base model and `lm_head`."""
    state = {f"model.vision_tower.{k}": v for k, v in model.visual_encoder.model.state_dict().items()}
    for ours, theirs in (("0", "linear_1"), ("2", "linear_2")):
        for p in ("weight", "bias"):
            state[f"model.multi_modal_projector.{theirs}.{p}"] = model.llama_proj.get_parameter(f"{ours}.{p}")
    base = model.llm.base_model_prefix + "."
    for key, value in language_state(model, vocab_with_image_token(model, image_token_id), prefix="").items():
        if key.startswith(base):
            state["model.language_model." + key[len(base) :]] = value
        elif key == "lm_head.weight":
            state[key] = value
        else:
            raise ValueError(f"the LLM's weight {key!r} has no place in LlavaForConditionalGeneration")
    return state


def to_llava(model: MiniGPT4, image_token_id: int):
    """The model as a `LlavaForConditionalGeneration` sharing its tensors (`meta_built`), in eval mode."""
    from transformers import LlavaForConditionalGeneration

    if not is_llava(model.cfg):
        raise ValueError("to_llava needs a CLIP or SigLIP tower, model.connector none and mlp2x_gelu")
    return meta_built(
        LlavaForConditionalGeneration, llava_config(model, image_token_id), llava_state(model, image_token_id)
    )


def llava_image_processor(model: MiniGPT4):
    """The tower folder's own image processor (its mean and std) resizing as mgpt4 does
    (`mgpt4.images.eval_transform`): RGB, PIL bicubic to image_size x image_size, no crop."""
    from transformers import AutoImageProcessor

    side = model.cfg.vision.image_size
    square = {"height": side, "width": side}
    return AutoImageProcessor.from_pretrained(
        model.cfg.vision.folder,
        local_files_only=True,
        size=square,
        crop_size=square,
        do_center_crop=False,
        resample=3,  # PIL's BICUBIC
        do_convert_rgb=True,
    )


def llava_processor(model: MiniGPT4, tokenizer):
    """transformers' `LlavaProcessor`: it expands each `<image>` of the text into the image's tokens."""
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=llava_image_processor(model),
        tokenizer=tokenizer,
        patch_size=model.cfg.vision.patch_size,
        vision_feature_select_strategy=select_strategy(model.cfg),
        num_additional_image_tokens=int(model.cfg.vision.has_cls()),
    )


def llava_note(model: MiniGPT4) -> str:
    """The model card's note on what the export feeds the tower."""
    cfg = model.cfg
    return (
        f"images: resized whole, bicubic, to {cfg.vision.image_size} x {cfg.vision.image_size} (mgpt4's resize; "
        "no center crop) and normalised with the tower's own mean and std, as mgpt4's model sees them; "
        f"hidden state {cfg.vision.feature_layer}, vision_feature_select_strategy {select_strategy(cfg)}"
    )
