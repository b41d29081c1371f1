"""MiniGPT-4's LLaMA-2 variant for transformers: EVA ViT -> ln_vision -> 4 adjacent patch tokens
concatenated -> Linear -> LLaMA-2 (no Q-Former), as the official `minigpt4_llama2` model.

This file is copied into every LLaMA-2-variant folder that `python -m mgpt4.export hf` writes and is
loaded from there with `trust_remote_code=True`; it needs torch and transformers only, never mgpt4.
The vision tower is transformers' `Blip2VisionModel` (the same network as EVA ViT-g: fused qkv with
bias `cat(q_bias, 0, v_bias)`, exact GELU), with its final LayerNorm taking `ln_vision`'s own eps
(the official 1e-5; BLIP-2's single `layer_norm_eps` would give it the blocks' 1e-6).

Image embeddings replace the prompt's `<image>` tokens (`image_token_index`) wherever they are, one run
of `num_image_tokens` per image, as mgpt4 splices them in.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.blip_2.configuration_blip_2 import Blip2VisionConfig
from transformers.models.blip_2.modeling_blip_2 import Blip2VisionModel


class MiniGPT4Llama2Config(PreTrainedConfig):
    """The vision tower (`Blip2VisionConfig`), the LLM (`text_config`, any causal LM), the `<image>` token,
    how many patch tokens make one image token, and ln_vision's eps."""

    model_type = "minigpt4_llama2"
    attribute_map = {"image_token_id": "image_token_index"}  # noqa: RUF012 (transformers reads it)
    sub_configs_defaults = {  # noqa: RUF012 (transformers reads it)
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "vision_config": Blip2VisionConfig,
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_index: int | None = None
    patches_per_token: int = 4
    ln_vision_eps: float = 1e-5

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per image: the ViT's patch tokens, `patches_per_token` at a time."""
        grid = self.vision_config.image_size // self.vision_config.patch_size
        return grid * grid // self.patches_per_token


class MiniGPT4Llama2PreTrainedModel(PreTrainedModel):
    config: MiniGPT4Llama2Config
    config_class = MiniGPT4Llama2Config
    base_model_prefix = ""
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    _supports_sdpa = True


class MiniGPT4Llama2ForConditionalGeneration(MiniGPT4Llama2PreTrainedModel, GenerationMixin):
    """`forward` and `generate` take `pixel_values` [B,3,S,S] and `input_ids` with `num_image_tokens`
    `<image>` tokens per image; `generate` returns the prompt ids followed by the new ones, and uses the
    folder's generation config unless given another."""

    def __init__(self, config: MiniGPT4Llama2Config):
        super().__init__(config)
        self.vision_model = Blip2VisionModel._from_config(config.vision_config)
        self.vision_model.post_layernorm.eps = config.ln_vision_eps
        width = config.vision_config.hidden_size * config.patches_per_token
        self.language_projection = nn.Linear(width, config.text_config.hidden_size)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images [B,3,S,S] -> LLM input embeddings [B, num_image_tokens, hidden]: the CLS token dropped,
        every `patches_per_token` adjacent patch tokens (row-major) concatenated, then projected."""
        w = self.vision_model.embeddings.patch_embedding.weight
        feats = self.vision_model(pixel_values=pixel_values.to(w.dtype)).last_hidden_state[:, 1:]
        bsz, n, width = feats.shape
        p = self.config.patches_per_token
        feats = feats.reshape(bsz, n // p, width * p)
        return self.language_projection(feats.to(self.language_projection.weight.dtype))

    def _inputs_embeds(self, input_ids: torch.LongTensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is None:
            return embeds
        images = self.get_image_features(pixel_values)
        mask = input_ids == self.config.image_token_index
        if int(mask.sum()) != images.shape[0] * images.shape[1]:
            raise ValueError(
                f"the prompt holds {int(mask.sum())} image tokens, the {images.shape[0]} image(s) give "
                f"{images.shape[0] * images.shape[1]} ({images.shape[1]} each)"
            )
        images = images.reshape(-1, images.shape[-1]).to(embeds.device, embeds.dtype)
        return embeds.masked_scatter(mask.unsqueeze(-1).to(embeds.device), images)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if input_ids is None:
            raise ValueError("input_ids are needed (the prompt with its <image> tokens)")
        embeds = self._inputs_embeds(input_ids, pixel_values)
        return self.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **kwargs
        )

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.LongTensor:
        if input_ids is None:
            raise ValueError("input_ids are needed (the prompt with its <image> tokens)")
        embeds = self._inputs_embeds(input_ids, pixel_values)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs.setdefault("generation_config", self.generation_config)
        return self.language_model.generate(
            input_ids=input_ids, inputs_embeds=embeds, attention_mask=attention_mask, **kwargs
        )
