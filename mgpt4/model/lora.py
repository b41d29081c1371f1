"""LoRA adapters on the frozen LLM (`model.lora`), through PEFT: attach, load, save as a PEFT folder, merge.

    attach_lora(model)                         # the load step, after the LLM's weights (load_weights)
    load_lora(model, folder)                   # adapters from a PEFT adapter folder, strictly
    save_peft_adapter(params, cfg, folder)     # a checkpoint's adapters -> a folder PEFT loads alone
    merge_lora(llm)                            # W + (alpha / r) B A into each layer; the plain HF model

The adapters are injected into `model.llm` in place (`peft.inject_adapter_in_model`), so the LLM keeps
its class and every call on it (embeddings, generate, gradient checkpointing) works as before; their
parameters are `llm.<layer>.lora_A.default.weight` and `llm.<layer>.lora_B.default.weight`. A PEFT
folder names the same tensors `base_model.model.<layer>.lora_A.weight` (PEFT's `save_pretrained`
layout), which is what `peft.PeftModel.from_pretrained(llm, folder)` reads.

Single-device model code: no DeepSpeed, no ranks. `peft` is an optional dependency (`pip install
mgpt4[lora]`); it is imported only when LoRA is on.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import torch
from torch import nn

from mgpt4.config import DTYPES, LoraConfig, ModelConfig
from mgpt4.model.errors import WeightsError
from mgpt4.strict_config import ConfigError

if TYPE_CHECKING:
    from mgpt4.model.minigpt4 import MiniGPT4

# The adapter folder written next to each checkpoint's llama_proj.pth, and PEFT's file names in it.
LORA_DIR = "lora_adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT's adapter name inside the model, and the prefix PEFT's files put before the LLM's own names.
ADAPTER_NAME = "default"
PEFT_PREFIX = "base_model.model."
LLM_PREFIX = "llm."


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError(
            "model.lora needs the peft package: pip install 'mgpt4[lora]' (or pip install peft)"
        ) from None
    return peft


def peft_config(lora: LoraConfig, base_model: str | None = None):
    """The `peft.LoraConfig` of `model.lora` (a causal LM's adapters)."""
    return _peft().LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )


def is_lora_param(name: str) -> bool:
    """A parameter of an adapter (by PEFT's module names lora_A, lora_B, lora_embedding_A/B)."""
    return ".lora_" in name


def has_lora(model: nn.Module) -> bool:
    return any(is_lora_param(n) for n, _ in model.named_parameters())


def lora_modules(model: nn.Module) -> tuple[str, ...]:
    """The dotted names of the adapter modules in `model` that hold parameters (`...q_proj.lora_A`):
    what the freeze policy declares trainable next to the projection."""
    names = []
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last.startswith("lora_") and any(True for _ in module.parameters()):
            names.append(name)
    return tuple(names)


def attach_lora(model: MiniGPT4) -> None:
    """Inject fresh adapters (B = 0: the LLM's outputs are unchanged) into `model.llm` for
    `model.cfg.lora`, in the projection's dtype (`model.precision.proj`: they train with it).

    Raises ValueError when LoRA is off or already attached, ConfigError naming model.lora.target_modules
    when a target matches no layer of the LLM."""
    lora = model.cfg.lora
    if not lora.enabled():
        raise ValueError("attach_lora: model.lora.rank is 0 (LoRA off)")
    if has_lora(model.llm):
        raise ValueError("attach_lora: the LLM already has LoRA adapters")
    peft = _peft()
    found = {name.rsplit(".", 1)[-1] for name, _ in model.llm.named_modules()}
    missing = [t for t in lora.target_modules if t not in found]
    if missing:
        linear = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.llm.named_modules() if isinstance(m, nn.Linear)}
        )
        raise ConfigError(
            f"model.lora.target_modules: {missing} name no layer of the LLM ({type(model.llm).__name__}); "
            f"its linear layers are {linear}"
        )
    peft.inject_adapter_in_model(peft_config(lora), model.llm, adapter_name=ADAPTER_NAME)
    dtype = DTYPES[model.cfg.precision.proj]
    for name, p in model.llm.named_parameters():
        if is_lora_param(name):
            p.data = p.data.to(dtype)


def peft_key(name: str) -> str:
    """Our parameter name (`llm.model.layers.0.self_attn.q_proj.lora_A.default.weight`) -> PEFT's file key
    (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`)."""
    if not name.startswith(LLM_PREFIX):
        raise ValueError(f"not an LLM parameter: {name}")
    inner = name[len(LLM_PREFIX) :].replace(f".{ADAPTER_NAME}.", ".")
    return PEFT_PREFIX + inner


def save_peft_adapter(params: dict[str, torch.Tensor], cfg: ModelConfig, folder: str) -> str:
    """Write the adapters among `params` (our names, e.g. a checkpoint's full fp32 trainable set) as a PEFT
    adapter folder that `peft.PeftModel.from_pretrained(llm, folder)` loads on its own; returns the folder.
    The base model it names is `cfg.weights.llm`. Raises ValueError when `params` holds no adapter."""
    from safetensors.torch import save_file

    adapters = {peft_key(k): v.detach().contiguous().cpu() for k, v in params.items() if is_lora_param(k)}
    if not adapters:
        raise ValueError("save_peft_adapter: no LoRA parameters among the given ones")
    os.makedirs(folder, exist_ok=True)
    peft_config(cfg.lora, cfg.weights.llm).save_pretrained(folder)
    save_file(adapters, os.path.join(folder, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return folder


def load_lora(model: MiniGPT4, folder: str) -> None:
    """Load a PEFT adapter folder into the adapters `attach_lora` made, strictly: its settings must be
    `model.lora`'s, and its tensors exactly the adapters' (each named, with both shapes, when not).
    Raises WeightsError."""
    from safetensors.torch import load_file

    config_path, weights_path = os.path.join(folder, ADAPTER_CONFIG), os.path.join(folder, ADAPTER_WEIGHTS)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise WeightsError(
                f"{folder}: not a PEFT LoRA adapter folder ({os.path.basename(path)} is missing)"
            )
    with open(config_path, encoding="utf-8") as f:
        saved = json.load(f)
    lora = model.cfg.lora
    expected = {"r": lora.rank, "lora_alpha": lora.alpha, "target_modules": sorted(lora.target_modules)}
    for key, field_name in (("r", "rank"), ("lora_alpha", "alpha"), ("target_modules", "target_modules")):
        value = saved.get(key)
        value = sorted(value) if key == "target_modules" and isinstance(value, list) else value
        if value != expected[key]:
            raise WeightsError(
                f"{config_path}: {key} is {saved.get(key)!r}, but model.lora.{field_name} is "
                f"{getattr(lora, field_name)!r}: set model.lora to the adapters' settings"
            )
    state = load_file(weights_path)
    own = {peft_key(n): p for n, p in model.named_parameters() if is_lora_param(n)}
    problems = [f"{k}: missing" for k in own if k not in state]
    problems += [f"{k}: no such adapter in this model" for k in state if k not in own]
    problems += [
        f"{k}: shape {list(state[k].shape)} in the file, {list(p.shape)} in the model"
        for k, p in own.items()
        if k in state and state[k].shape != p.shape
    ]
    if problems:
        shown = "\n  ".join(problems[:20])
        raise WeightsError(f"{weights_path}: {len(problems)} problem(s):\n  {shown}")
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(state[k].to(p.dtype))


def merge_lora(llm: nn.Module) -> nn.Module:
    """Fold each adapter into its layer's weight (W + (alpha / r) B A, PEFT's `LoraLayer.merge`) and put
    the plain layer back: the LLM without adapters, computing what it computed with them. In place;
    returns `llm` (for an export as a plain Hugging Face folder)."""
    from peft.tuners.lora import LoraLayer

    wrapped = [(n, m) for n, m in llm.named_modules() if isinstance(m, LoraLayer)]
    for name, module in wrapped:
        module.merge(safe_merge=True)
        parent_name, _, attr = name.rpartition(".")
        parent = llm.get_submodule(parent_name) if parent_name else llm
        setattr(parent, attr, module.get_base_layer())
    return llm
