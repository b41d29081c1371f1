"""The BLIP-2 Q-Former on transformers' `Blip2QFormerModel`, queries only (no text branch)."""

from __future__ import annotations

from transformers import Blip2QFormerConfig, Blip2QFormerModel

from mgpt4.config import QFormerConfig


def build_qformer(cfg: QFormerConfig, encoder_width: int) -> Blip2QFormerModel:
    hf_cfg = Blip2QFormerConfig(
        hidden_size=cfg.width,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.heads,
        intermediate_size=cfg.ffn_dim,
        cross_attention_frequency=cfg.cross_attention_freq,
        encoder_hidden_size=encoder_width,
        layer_norm_eps=cfg.ln_eps,
        # MiniGPT-4 drops the text FFNs and embeddings; without them every parameter comes from the file.
        use_qformer_text_input=False,
    )
    return Blip2QFormerModel(hf_cfg)
