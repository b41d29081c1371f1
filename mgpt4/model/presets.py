"""Named model configs: the official Vicuna-13B, Vicuna-7B and Llama-2-Chat-7B MiniGPT-4, any Hugging
Face decoder, and tiny ones for CPU (the parity sizes of both official variants)."""

from __future__ import annotations

from mgpt4.config import LLMConfig, ModelConfig, PrecisionConfig, QFormerConfig, TextConfig, VisionConfig
from mgpt4.model.prompts import OFFICIAL_TEMPLATES, STAGE2_INSTRUCTIONS


def _llama(hidden: int, ffn: int, layers: int, heads: int) -> LLMConfig:
    # The official sizes are set, so a folder of another size is caught by the loader.
    return LLMConfig(
        model_type="llama",
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_layers=layers,
        num_heads=heads,
    )


def vicuna13b() -> ModelConfig:
    return ModelConfig(llm=_llama(5120, 13824, 40, 40))


def vicuna7b() -> ModelConfig:
    return ModelConfig(llm=_llama(4096, 11008, 32, 32))


def llama2_7b() -> ModelConfig:
    """The official MiniGPT-4 on Llama-2-Chat-7B: no Q-Former (64 image tokens of width 5632),
    `llama_proj` Linear(5632, 4096), the Llama-2-Chat conversation."""
    return ModelConfig(qformer=None, llm=_llama(4096, 11008, 32, 32), text=TextConfig(template="llama2_chat"))


def decoder() -> ModelConfig:
    """Any decoder-only Hugging Face LLM (`model.weights.llm`): architecture and sizes from its
    config.json, the conversation from its tokenizer's chat template; the Q-Former vision path."""
    return ModelConfig(llm=LLMConfig(), text=TextConfig(template="chat_template"))


def _tiny_vision() -> VisionConfig:
    return VisionConfig(image_size=56, patch_size=14, width=64, depth=3, heads=4)


def _tiny_llm() -> LLMConfig:
    return LLMConfig(
        vocab_size=400,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        max_position_embeddings=512,
    )


def tiny() -> ModelConfig:
    """Every part at toy size (the parity sizes of the official-format test files); builds in well under a second."""
    return ModelConfig(
        vision=_tiny_vision(),
        qformer=QFormerConfig(
            num_query_tokens=8, width=64, depth=2, heads=4, ffn_dim=128, cross_attention_freq=2
        ),
        llm=_tiny_llm(),
        precision=PrecisionConfig(vit="fp32", qformer="fp32", proj="fp32", llm="fp32"),
    )


def tiny_llama2() -> ModelConfig:
    """The LLaMA-2 variant at the parity sizes: ViT 56 px / patch 14 / width 64 / depth 3 / 4 heads
    without a Q-Former (16 patch tokens -> 4 image tokens of width 256), projection 256 -> 64, LLaMA
    64 wide / 2 layers / 4 heads / FFN 128 for a 400-piece tokenizer, the Llama-2-Chat conversation."""
    return ModelConfig(
        vision=_tiny_vision(),
        qformer=None,
        llm=_tiny_llm(),
        precision=PrecisionConfig(vit="fp32", qformer="fp32", proj="fp32", llm="fp32"),
        text=TextConfig(template="llama2_chat"),
    )


def stage1_text(template: str = "vicuna_v0") -> TextConfig:
    """Stage 1 (both official variants): no instruction, answers end with a newline, 32 tokens."""
    return TextConfig(max_txt_len=32, end_sym="\n", instructions=[], template=template)


def stage2_text(template: str = "vicuna_v0") -> TextConfig:
    """Stage 2: the alignment instructions in the template's instruction form, 160 tokens, answers ending
    as the template's replies do (`###` for Vicuna v0, `</s>` for Llama-2-Chat; for a tokenizer's chat
    template both are left to it: None)."""
    official = OFFICIAL_TEMPLATES.get(template)
    return TextConfig(
        max_txt_len=160,
        end_sym=official.end_sym if official else None,
        prompt_template=official.instruction if official else None,
        instructions=list(STAGE2_INSTRUCTIONS),
        template=template,
    )


MODEL_PRESETS = {
    "vicuna13b": vicuna13b,
    "vicuna7b": vicuna7b,
    "llama2_7b": llama2_7b,
    "decoder": decoder,
    "tiny": tiny,
    "tiny_llama2": tiny_llama2,
}


def model_preset(name: str) -> ModelConfig:
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
    return MODEL_PRESETS[name]()
