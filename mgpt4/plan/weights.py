"""Every parameter of a model config, counted from a meta-device build: no weight is read or allocated.

The parts are the model's: the ViT (EVA ViT and ln_vision), the Q-Former (with its query tokens), the
projection (`llama_proj`) and the LLM. A quantised LLM (`model.precision.llm` int8 / nf4) is counted as
bitsandbytes stores it: transformers quantises every Linear of the decoder layers (the output head and
the embeddings stay in bf16); LLM.int8() keeps one byte per weight and an fp32 scale per output row, NF4
half a byte per weight and an fp32 absmax per block of 64 (no double quantisation).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from torch import nn

from mgpt4.config import QUANTIZED, ModelConfig
from mgpt4.model import MiniGPT4, apply_freeze

# Model attributes -> the part the report names.
PARTS = {
    "visual_encoder": "ViT",
    "ln_vision": "ViT",
    "qformer": "Q-Former",
    "query_tokens": "Q-Former",
    "llama_proj": "projection",
    "llm": "LLM",
}
NF4_BLOCK = 64  # bitsandbytes' 4-bit blocksize, one fp32 absmax each


@dataclass(frozen=True)
class Param:
    """One parameter as a rank stores it: `numel` elements of `nbytes` bytes in all (quantised: the
    packed weight and its scales), `ndim` (weight decay goes to ndim >= 2), trainable or frozen."""

    name: str
    part: str
    dtype: str
    numel: int
    nbytes: int
    ndim: int
    trainable: bool
    layer: str  # the module ZeRO-3 gathers it with (a decoder layer, the output head, ...)


def _dtype_name(p: nn.Parameter) -> str:
    return str(p.dtype).removeprefix("torch.")


def _quantised_bytes(quant: str, weight: nn.Parameter) -> int:
    n = weight.numel()
    if quant == "int8":
        return n + 4 * weight.shape[0]
    return n // 2 + 4 * math.ceil(n / NF4_BLOCK)


def _layer_of(name: str) -> str:
    # "llm.model.layers.3.mlp.up_proj.weight" -> "llm.model.layers.3"; outside the layers, the module.
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or name


def build_meta(cfg: ModelConfig) -> MiniGPT4:
    """The model on the meta device, frozen by the policy (the trainer's build and freeze steps, without
    memory). A quantised LLM is built in its compute dtype (bf16) for the count; `count_params` counts its
    Linear weights as bitsandbytes stores them. A `model.weights.llm` folder that is not on this machine is
    left out: the sizes then come from `model.llm` (ConfigError naming the field when one is missing)."""
    cfg = copy.deepcopy(cfg)
    if cfg.precision.llm in QUANTIZED:
        cfg.precision.llm = "bf16"  # the layout; where a quantised LLM can run is the trainer's check
    if cfg.weights.llm and not _has_llm_config(cfg.weights.llm):
        cfg.weights.llm = None
    model = MiniGPT4(cfg, device="meta")
    apply_freeze(model)
    return model


def _has_llm_config(folder: str) -> bool:
    import os

    return os.path.isfile(os.path.join(folder, "config.json"))


def count_params(model: MiniGPT4, llm_precision: str) -> list[Param]:
    """Every parameter of `model` (from `build_meta`, or a real build) with the bytes a rank stores for
    it when `model.precision.llm` is `llm_precision`."""
    quant = llm_precision if llm_precision in QUANTIZED else None
    quantised = set()
    if quant is not None:
        decoder = model.llm.get_decoder()
        for module in decoder.modules():
            if isinstance(module, nn.Linear):
                quantised.add(id(module.weight))
    out = []
    for name, p in model.named_parameters():
        part = PARTS[name.split(".")[0]]
        if id(p) in quantised:
            dtype, nbytes = quant, _quantised_bytes(quant, p)
        else:
            dtype, nbytes = _dtype_name(p), p.numel() * p.element_size()
        out.append(Param(name, part, dtype, p.numel(), nbytes, p.dim(), p.requires_grad, _layer_of(name)))
    return out


def by_part(params: list[Param], trainable: bool) -> dict[tuple[str, str], int]:
    """Bytes by (part, dtype) of the trainable or the frozen parameters."""
    out: dict[tuple[str, str], int] = {}
    for p in params:
        if p.trainable == trainable:
            out[(p.part, p.dtype)] = out.get((p.part, p.dtype), 0) + p.nbytes
    return out
