"""The LLaMA-2 variant (no Q-Former: 4 adjacent ViT tokens concatenated) as a transformers folder with
its own modeling code, `modeling_minigpt4_llama2.py`, which `save_pretrained` copies into the folder
(`register_for_auto_class`), so it loads with `trust_remote_code=True` and no mgpt4.

Names: `visual_encoder` -> `vision_model` (`mgpt4.export.weights.vision_state`), `ln_vision` ->
`vision_model.post_layernorm` at its own eps, `llama_proj` -> `language_projection`, the LLM ->
`language_model`.
"""

from __future__ import annotations

import torch

from mgpt4.config import PATCHES_PER_IMAGE_TOKEN
from mgpt4.export.modeling_minigpt4_llama2 import MiniGPT4Llama2Config, MiniGPT4Llama2ForConditionalGeneration
from mgpt4.export.weights import (
    language_state,
    load_exact,
    text_config,
    vision_config,
    vision_state,
    vocab_with_image_token,
)
from mgpt4.model import MiniGPT4


def llama2_config(model: MiniGPT4, image_token_id: int) -> MiniGPT4Llama2Config:
    """The export's config; its `auto_map` names the modeling file in the folder."""
    cfg = MiniGPT4Llama2Config(
        vision_config=vision_config(model),
        text_config=text_config(model, vocab_with_image_token(model, image_token_id)),
        image_token_index=image_token_id,
        patches_per_token=PATCHES_PER_IMAGE_TOKEN,
        ln_vision_eps=model.ln_vision.eps,
    )
    if cfg.num_image_tokens != model.num_image_tokens:
        raise ValueError(
            f"the export gives {cfg.num_image_tokens} image tokens, the model {model.num_image_tokens}"
        )
    cfg.architectures = [MiniGPT4Llama2ForConditionalGeneration.__name__]
    # Every part's dtype written as loading it sets them, so a loaded export saves the same config.json.
    cfg.dtype = cfg.text_config.dtype = model.llm.get_input_embeddings().weight.dtype
    cfg.vision_config.dtype = model.visual_encoder.patch_embed.proj.weight.dtype
    return cfg


def llama2_state(model: MiniGPT4, image_token_id: int) -> dict[str, torch.Tensor]:
    state = vision_state(model)
    state["language_projection.weight"] = model.llama_proj.weight
    state["language_projection.bias"] = model.llama_proj.bias
    state.update(language_state(model, vocab_with_image_token(model, image_token_id)))
    return state


def to_llama2(model: MiniGPT4, image_token_id: int) -> MiniGPT4Llama2ForConditionalGeneration:
    """The model as `MiniGPT4Llama2ForConditionalGeneration` sharing its tensors, in eval mode, its
    classes registered so `save_pretrained` writes the modeling file and the `auto_map`."""
    if model.qformer is not None:
        raise ValueError("to_llama2 is for the LLaMA-2 variant (no Q-Former); a Q-Former model is hf_blip2's")
    MiniGPT4Llama2Config.register_for_auto_class()
    MiniGPT4Llama2ForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
    cfg = llama2_config(model, image_token_id)
    with torch.device("meta"):
        hf = MiniGPT4Llama2ForConditionalGeneration(cfg)
    load_exact(hf, llama2_state(model, image_token_id))
    return hf.eval()
