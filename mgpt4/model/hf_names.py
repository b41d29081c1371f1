"""MiniGPT4's weight names <-> transformers' BLIP-2 layout, both ways: the one rename table that the
export (`mgpt4.export.weights`) writes with and the loaders (a Hugging Face BLIP-2 folder,
`mgpt4.model.loading`; an export folder, `mgpt4.inference.from_export`) read back with.

EVA (`mgpt4.model.vision.build_eva_vit`) and `Blip2VisionModel` are the same network; only names differ,
and EVA's separate `q_bias` / `v_bias` are transformers' one `qkv.bias` = cat(q_bias, 0, v_bias)
(`join_qkv_bias` / `split_qkv_bias`). `ln_vision` is the vision tower's `post_layernorm`, `llama_proj`
is `language_projection`, the LLM is `language_model`; the Q-Former and query tokens keep their names
(mgpt4 builds the Q-Former as transformers' `Blip2QFormerModel`).
"""

from __future__ import annotations

import dataclasses

import torch

# Inside the ViT: timm Eva's names -> Blip2VisionModel's, applied in this order.
VIT_NAMES = (
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.", "embeddings.patch_embedding."),
    ("blocks.", "encoder.layers."),
    (".norm1.", ".layer_norm1."),
    (".norm2.", ".layer_norm2."),
    (".attn.proj.", ".self_attn.projection."),
    (".attn.qkv.", ".self_attn.qkv."),
    (".attn.q_bias", ".self_attn.q_bias"),
    (".attn.v_bias", ".self_attn.v_bias"),
)

# MiniGPT4's parts -> the export's, most specific first (post_layernorm lies inside vision_model).
PART_NAMES = (
    ("ln_vision.", "vision_model.post_layernorm."),
    ("visual_encoder.", "vision_model."),
    ("qformer.", "qformer."),
    ("query_tokens", "query_tokens"),
    ("llama_proj.", "language_projection."),
    ("llm.", "language_model."),
)


def to_hf_name(key: str) -> str:
    """A MiniGPT4 state-dict key -> its name in the export (`visual_encoder.blocks.0.attn.proj.weight` ->
    `vision_model.encoder.layers.0.self_attn.projection.weight`). Raises KeyError for a key of no part."""
    for ours, theirs in PART_NAMES:
        if key.startswith(ours):
            rest = key[len(ours) :]
            if ours == "visual_encoder.":
                for old, new in VIT_NAMES:
                    rest = rest.replace(old, new)
            return theirs + rest
    raise KeyError(f"{key!r} belongs to no part of MiniGPT4")


def from_hf_name(key: str) -> str | None:
    """An export's (or a BLIP-2 folder's) key -> the MiniGPT4 key it fills; None for a key of no part."""
    for ours, theirs in PART_NAMES:
        if key.startswith(theirs):
            rest = key[len(theirs) :]
            if ours == "visual_encoder.":
                for old, new in VIT_NAMES:
                    rest = rest.replace(new, old)
            return ours + rest
    return None


def join_qkv_bias(q_bias: torch.Tensor, v_bias: torch.Tensor) -> torch.Tensor:
    """EVA's q and v biases as transformers' one qkv bias: cat(q_bias, 0, v_bias) (EVA has no k bias)."""
    return torch.cat([q_bias, torch.zeros_like(v_bias), v_bias])


def split_qkv_bias(bias: torch.Tensor, width: int, key: str, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' qkv bias [3 * width] -> EVA's (q_bias, v_bias); ValueError naming the file and key
    when the k part is not zero (EVA has no k bias, so such a tower is not an EVA ViT)."""
    if bias[width : 2 * width].abs().max() > 0:
        raise ValueError(f"{path}: key {key!r} has a non-zero key bias; the EVA ViT has none")
    return bias[:width], bias[2 * width :]


# The field of an export's config.json that holds what transformers' configs cannot say: MiniGPT4's
# text settings (template, end_sym, prompts), ln_vision's eps, the parts' precision and the LLM's own
# vocabulary size (the export grows it by the `<image>` row).
EXPORT_RECORD = "mgpt4"


def export_record(model) -> dict:
    """The `EXPORT_RECORD` of a MiniGPT4 (`mgpt4.inference.from_export` reads it back)."""
    cfg = model.cfg
    return {
        "llm_vocab_size": int(model.llm.get_input_embeddings().weight.shape[0]),
        "ln_vision_eps": float(model.ln_vision.eps),
        "precision": dataclasses.asdict(cfg.precision),
        "text": dataclasses.asdict(cfg.text),
    }
