"""A MiniGPT-4 with a Q-Former as transformers' own `Blip2ForConditionalGeneration`.

The names map one to one: `visual_encoder` -> `vision_model` (`mgpt4.export.weights.vision_state`),
`ln_vision` -> `vision_model.post_layernorm`, `qformer` and `query_tokens` by name (mgpt4 builds the
Q-Former as transformers' `Blip2QFormerModel` already), `llama_proj` -> `language_projection`, the LLM
-> `language_model` with its own config as `text_config`. transformers' forward and `generate` put the
image embeddings at every `<image>` token, wherever the prompt has them, as mgpt4 splices them in.

One difference remains: the official `ln_vision` uses eps 1e-5, and transformers gives
`post_layernorm` the vision config's one `layer_norm_eps`, which the ViT's own LayerNorms need at
1e-6. The effect is measured by `measure_ln_eps` and stated in the README.
"""

from __future__ import annotations

import torch

from mgpt4.export.weights import (
    language_state,
    load_exact,
    text_config,
    vision_config,
    vision_state,
    vocab_with_image_token,
)
from mgpt4.model import MiniGPT4


def blip2_config(model: MiniGPT4, image_token_id: int):
    """The `Blip2Config` of the export."""
    from transformers import Blip2Config

    vocab = vocab_with_image_token(model, image_token_id)
    qformer = model.qformer.config.to_dict()
    cfg = Blip2Config(
        vision_config=vision_config(model),
        qformer_config=qformer,
        text_config=text_config(model, vocab),
        num_query_tokens=model.num_image_tokens,
        image_token_index=image_token_id,
    )
    cfg.architectures = ["Blip2ForConditionalGeneration"]
    # Every part's dtype written as loading it sets them, so a loaded export saves the same config.json.
    cfg.dtype = cfg.text_config.dtype = model.llm.get_input_embeddings().weight.dtype
    cfg.vision_config.dtype = model.visual_encoder.patch_embed.proj.weight.dtype
    cfg.qformer_config.dtype = model.query_tokens.dtype
    return cfg


def blip2_state(model: MiniGPT4, image_token_id: int) -> dict[str, torch.Tensor]:
    """Every weight of the export under `Blip2ForConditionalGeneration`'s names."""
    state = vision_state(model)
    state["query_tokens"] = model.query_tokens
    state.update({f"qformer.{k}": v for k, v in model.qformer.state_dict().items()})
    state["language_projection.weight"] = model.llama_proj.weight
    state["language_projection.bias"] = model.llama_proj.bias
    state.update(language_state(model, vocab_with_image_token(model, image_token_id)))
    return state


def to_blip2(model: MiniGPT4, image_token_id: int):
    """The model as a `Blip2ForConditionalGeneration` sharing its tensors (built on the meta device, so
    a 13B model is not held twice), in eval mode."""
    from transformers import Blip2ForConditionalGeneration

    if model.qformer is None:
        raise ValueError("to_blip2 needs a model with a Q-Former; the LLaMA-2 variant is hf_llama2's")
    cfg = blip2_config(model, image_token_id)
    with torch.device("meta"):
        hf = Blip2ForConditionalGeneration(cfg)
    load_exact(hf, blip2_state(model, image_token_id))
    return hf.eval()


@torch.no_grad()
def measure_ln_eps(model: MiniGPT4, images: torch.Tensor, eps: float) -> dict[str, float]:
    """What `ln_vision` at `eps` instead of the model's own changes, on normalised images [B,3,S,S]:
    the largest absolute change of the image embeddings (the LLM's inputs) and of `ln_vision`'s output,
    and the embeddings' largest absolute value for scale."""
    ln = model.ln_vision
    own = model.encode_img(images)
    feats = model.visual_encoder.forward_features(images.to(model.visual_encoder.patch_embed.proj.weight))
    before = ln(feats)
    saved = ln.eps
    try:
        ln.eps = eps
        after = ln(feats)
        changed = model.encode_img(images)
    finally:
        ln.eps = saved
    return {
        "embeddings_max_abs_diff": float((changed.float() - own.float()).abs().max()),
        "embeddings_max_abs": float(own.float().abs().max()),
        "ln_vision_max_abs_diff": float((after.float() - before.float()).abs().max()),
    }
