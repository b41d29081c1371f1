"""Where a loaded model's parts live: the LLM quantised (int8 or nf4) as it is read, or the vision path on
another device than the LLM (the CPU while the LLM is on the GPU: the official low-resource mode).
"""

from __future__ import annotations

import importlib.util

import torch

from mgpt4.config import DTYPES, ModelConfig
from mgpt4.model import MiniGPT4, apply_freeze, build_model, load_weights
from mgpt4.model.loading import quantized_llm

VISION_PARTS = ("visual_encoder", "ln_vision", "qformer", "llama_proj")


def _move_vision(model: MiniGPT4, device: torch.device, dtype: torch.dtype | None = None) -> None:
    for name in VISION_PARTS:
        part = getattr(model, name)
        if part is not None:  # no Q-Former in the LLaMA-2 variant
            part.to(device=device, dtype=dtype)
    if model.query_tokens is not None:
        model.query_tokens.data = model.query_tokens.data.to(device=device, dtype=dtype)


def place_vision(model: MiniGPT4, device: str | torch.device) -> None:
    """Put the vision path (ViT, ln_vision, Q-Former, query tokens, projection) on `device`.

    encode_img runs as one block on one device, so the whole path moves, not only the ViT. On the
    CPU it runs in fp32: bf16 kernels are slow on most CPUs, and the official low-resource mode
    does the same. `MiniGPT4.encode_img` takes images to the vision path's device and returns the
    embeddings on the LLM's.
    """
    device = torch.device(device)
    _move_vision(model, device, torch.float32 if device.type == "cpu" else None)


def from_config_8bit(cfg: ModelConfig, device: str) -> MiniGPT4:
    """Like `from_config`, with the LLM quantised to int8 by bitsandbytes as it is read from its folder
    (--llm-8bit): `from_config_quantized` with `model.precision.llm` int8."""
    if not cfg.weights.llm:
        raise SystemExit(
            "--llm-8bit quantises the LLM read from its folder: give --llm (or a checkpoint naming one)"
        )
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        raise SystemExit(
            f"--llm-8bit needs a CUDA device (bitsandbytes' int8 kernels), but --device is {device!r}"
            + ("" if torch.cuda.is_available() else " and no GPU is visible")
            + "; use --llm-dtype bf16 instead"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise SystemExit("--llm-8bit needs bitsandbytes: pip install bitsandbytes")
    # int8 matmuls compute in half precision; fp32 would only cost memory.
    half = DTYPES[cfg.precision.llm] if cfg.precision.llm in ("bf16", "fp16") else torch.bfloat16
    cfg.precision.llm = "int8"
    return from_config_quantized(cfg, device, half)


def from_config_quantized(
    cfg: ModelConfig, device: str, compute_dtype: torch.dtype = torch.bfloat16
) -> MiniGPT4:
    """Like `from_config` for a config whose `model.precision.llm` is int8 or nf4 (checked by its
    validation): the vision path and projection as usual, the LLM quantised by bitsandbytes as it is
    read from its folder (`mgpt4.model.loading.quantized_llm`), all on the CUDA `device`."""
    cfg.validate_once()
    folder = cfg.weights.llm
    # The LLM stays on the meta device: its weights come from the folder below, checked by the build.
    model = build_model(cfg)
    model.llm = quantized_llm(
        folder, cfg.precision.llm, cfg.attn_implementation, torch.device(device), compute_dtype
    )
    # The other files after the LLM is in place, so a LoRA run's adapters attach to the quantised layers.
    cfg.weights.llm = None
    try:
        load_weights(model)
    finally:
        cfg.weights.llm = folder
    apply_freeze(model)
    # Not model.to(): moving a bitsandbytes model would undo its quantisation state.
    _move_vision(model, torch.device(device))
    return model
