"""The frozen LLM: transformers' `LlamaForCausalLM` built from mgpt4's `LLMConfig`."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from mgpt4.config import LLMConfig

# The LLMConfig fields and the names they have in a Hugging Face config.json.
HF_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
}


def llama_config(cfg: LLMConfig, attn_implementation: str = "sdpa") -> LlamaConfig:
    hf = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.eos_token_id,
        tie_word_embeddings=False,
    )
    hf._attn_implementation = attn_implementation
    return hf


def build_llm(
    cfg: LLMConfig, attn_implementation: str = "sdpa", dtype: torch.dtype | None = None
) -> LlamaForCausalLM:
    """A random LLM. Through `from_config`, so that under an active `HfDeepSpeedConfig` (ZeRO-3)
    transformers creates it already partitioned and initialises it shard by shard."""
    return AutoModelForCausalLM.from_config(llama_config(cfg, attn_implementation), dtype=dtype)


def llm_config_mismatches(cfg: LLMConfig, hf_config: dict) -> list[str]:
    """Fields where a folder's config.json disagrees with mgpt4's LLM config, as readable lines."""
    problems = []
    for ours, theirs in HF_FIELDS.items():
        if theirs in hf_config and hf_config[theirs] != getattr(cfg, ours):
            problems.append(
                f"model.llm.{ours}: config says {getattr(cfg, ours)}, config.json has {hf_config[theirs]}"
            )
    return problems
