"""MiniGPT-4 model: build from a config, load the official files, freeze by policy.

from mgpt4.model import from_config, presets
model = from_config(cfg)          # = build_model + load_weights + apply_freeze
"""

from __future__ import annotations

from mgpt4.config import ModelConfig
from mgpt4.model.freeze import TRAINABLE_MODULES, apply_freeze
from mgpt4.model.loading import WeightsError, load_weights
from mgpt4.model.minigpt4 import MiniGPT4
from mgpt4.tokenizer import load_tokenizer

__all__ = [
    "TRAINABLE_MODULES",
    "MiniGPT4",
    "WeightsError",
    "apply_freeze",
    "build_model",
    "from_config",
    "load_weights",
]


def build_model(cfg: ModelConfig, tokenizer=None, device: str | None = None) -> MiniGPT4:
    """Step 1: every part from the config with random weights (no network access; of the files, only
    the LLM folder's config.json and tokenizer are read: they give the LLM's architecture and sizes)."""
    if tokenizer is None and (cfg.weights.tokenizer or cfg.weights.llm):
        tokenizer = load_tokenizer(cfg.weights.tokenizer or cfg.weights.llm)
    return MiniGPT4(cfg, tokenizer=tokenizer, device=device)


def from_config(cfg: ModelConfig, tokenizer=None) -> MiniGPT4:
    """Build, load the files named in `cfg.weights`, and freeze: the three steps, in order."""
    model = build_model(cfg, tokenizer)
    load_weights(model)
    apply_freeze(model)
    return model
