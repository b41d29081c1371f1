"""Named model configs: the official Vicuna-13B and Vicuna-7B MiniGPT-4, and a tiny one for CPU."""

from __future__ import annotations

from mgpt4.config import LLMConfig, ModelConfig, PrecisionConfig, QFormerConfig, TextConfig, VisionConfig
from mgpt4.model.prompts import STAGE2_INSTRUCTIONS, STAGE2_TEMPLATE


def vicuna13b() -> ModelConfig:
    return ModelConfig(llm=LLMConfig(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40))


def vicuna7b() -> ModelConfig:
    return ModelConfig(llm=LLMConfig(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32))


def tiny() -> ModelConfig:
    """Every part at toy size (the parity sizes of the official-format test files); builds in well under a second."""
    return ModelConfig(
        vision=VisionConfig(image_size=56, patch_size=14, width=64, depth=3, heads=4),
        qformer=QFormerConfig(
            num_query_tokens=8, width=64, depth=2, heads=4, ffn_dim=128, cross_attention_freq=2
        ),
        llm=LLMConfig(
            vocab_size=400,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            max_position_embeddings=512,
        ),
        precision=PrecisionConfig(vit="fp32", qformer="fp32", proj="fp32", llm="fp32"),
    )


def stage1_text() -> TextConfig:
    return TextConfig(max_txt_len=32, end_sym="\n", instructions=[])


def stage2_text() -> TextConfig:
    return TextConfig(
        max_txt_len=160,
        end_sym="###",
        prompt_template=STAGE2_TEMPLATE,
        instructions=list(STAGE2_INSTRUCTIONS),
    )


MODEL_PRESETS = {"vicuna13b": vicuna13b, "vicuna7b": vicuna7b, "tiny": tiny}


def model_preset(name: str) -> ModelConfig:
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
    return MODEL_PRESETS[name]()
