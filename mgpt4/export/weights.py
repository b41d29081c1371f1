"""What both exports share: timm's EVA ViT -> transformers' `Blip2VisionModel` (by the rename table of
`mgpt4.model.hf_names`, which the loaders read an export back with), and the LLM with room for the
`<image>` token.

EVA (`mgpt4.model.vision.build_eva_vit`) and BLIP-2's vision tower are the same network: CLS token,
absolute position embedding (the one mgpt4 holds, already interpolated to its image size), pre-norm
blocks with a fused qkv Linear whose bias is `cat(q_bias, 0, v_bias)` (EVA has no k bias; transformers
keeps the concatenation as one `qkv.bias`), exact GELU, and `ln_vision` as the final LayerNorm.
"""

from __future__ import annotations

import torch
from torch import nn

from mgpt4.model import MiniGPT4
from mgpt4.model.hf_names import join_qkv_bias, to_hf_name


def vision_config(model: MiniGPT4, post_layernorm_eps: float | None = None) -> dict:
    """`Blip2VisionConfig` fields for the model's EVA ViT (eps: the blocks' own, see `hf_blip2`)."""
    v = model.cfg.vision
    return dict(
        hidden_size=v.width,
        intermediate_size=v.resolved_mlp_dim(),
        num_hidden_layers=v.depth,
        num_attention_heads=v.heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        hidden_act="gelu",
        layer_norm_eps=v.ln_eps,
        qkv_bias=True,
        attention_dropout=0.0,
    )


def vision_state(model: MiniGPT4) -> dict[str, torch.Tensor]:
    """The EVA ViT and `ln_vision` under `Blip2VisionModel`'s names (`mgpt4.model.hf_names`), sharing
    the model's tensors; each block's q and v biases joined into transformers' one qkv bias."""
    out = {}
    for part in ("visual_encoder", "ln_vision"):
        for key, value in getattr(model, part).state_dict(keep_vars=True).items():
            if key.endswith(".attn.v_bias"):
                continue  # joined with its q_bias below
            if key.endswith(".attn.q_bias"):
                v_bias = getattr(model, part).get_parameter(key[: -len("q_bias")] + "v_bias")
                key, value = key[: -len("q_bias")] + "qkv.bias", join_qkv_bias(value, v_bias)
            out[to_hf_name(f"{part}.{key}")] = value
    return out


def text_config(model: MiniGPT4, vocab_size: int) -> dict:
    """The LLM's own config (any causal LM), `architectures` set and the vocabulary `vocab_size` long."""
    cfg = model.llm.config.to_dict()
    cfg["architectures"] = [type(model.llm).__name__]
    cfg["vocab_size"] = vocab_size
    return cfg


def language_state(
    model: MiniGPT4, vocab_size: int, prefix: str = "language_model."
) -> dict[str, torch.Tensor]:
    """The LLM's weights, the input and output embeddings grown to `vocab_size` rows with zeros.

    The `<image>` row of the input embedding is never read (image embeddings replace it) and its logit,
    0 from a zero output row, is suppressed by the generation config."""
    state = dict(model.llm.state_dict())
    # The embedding tables by storage: state_dict() hands out new (detached) tensor objects.
    tables = [model.llm.get_input_embeddings(), model.llm.get_output_embeddings()]
    grow = {t.weight.data_ptr() for t in tables if t is not None}
    out = {}
    for key, value in state.items():
        if value.data_ptr() in grow and value.shape[0] < vocab_size:
            pad = value.new_zeros(vocab_size - value.shape[0], *value.shape[1:])
            value = torch.cat([value, pad])
        out[prefix + key] = value
    return out


def vocab_with_image_token(model: MiniGPT4, image_token_id: int) -> int:
    """The LLM vocabulary size the export needs: the LLM's, or one more row when `<image>` lies past it."""
    return max(model.llm.get_input_embeddings().weight.shape[0], image_token_id + 1)


def load_exact(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Fill a module built on the meta device with `state` (every key, no extra), taking the tensors."""
    missing, unexpected = module.load_state_dict(
        {k: v.detach() for k, v in state.items()}, strict=False, assign=True
    )
    tied = set(getattr(module, "all_tied_weights_keys", {}) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"export weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    module.tie_weights()


def meta_built(model_class, config, state: dict[str, torch.Tensor]) -> nn.Module:
    """`model_class(config)` built on the meta device and filled with `state` (`load_exact`: the tensors
    are shared, so a 13B model is not held twice), in eval mode."""
    with torch.device("meta"):
        module = model_class(config)
    load_exact(module, state)
    return module.eval()
