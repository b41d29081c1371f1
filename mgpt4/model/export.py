"""Write weights in the official layouts: the projection checkpoint, and whole tiny models for demos.

`save_projection` writes what the official code and `load_proj` read:
`{"model": {"llama_proj.weight", "llama_proj.bias"}}`. `save_official_files` writes every part of a
model as the official files (eva_vit_g.pth, the BLIP-2 checkpoint, a Hugging Face LLM folder), so a
tiny random model can be loaded back through the same strict loaders a real one goes through.
"""

from __future__ import annotations

import os

import torch

from mgpt4.config import WeightsConfig
from mgpt4.model.minigpt4 import MiniGPT4


def save_projection(state: dict[str, torch.Tensor], path: str) -> None:
    """Save `llama_proj.weight` / `llama_proj.bias` (fp32, CPU) in the official MiniGPT-4 format, atomically
    (an mlp2x_gelu projector: `llama_proj.{0,2}.{weight,bias}` in the same form)."""
    # The official Linear, or LLaVA-1.5's mlp2x_gelu (`model.projector`).
    forms = (
        {"llama_proj.weight", "llama_proj.bias"},
        {f"llama_proj.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")},
    )
    if set(state) not in forms:
        raise ValueError(
            f"projection state must hold exactly {[sorted(k) for k in forms]}, got {sorted(state)}"
        )
    tmp = path + ".tmp"
    torch.save({"model": {k: v.detach().float().cpu().clone() for k, v in state.items()}}, tmp)
    os.replace(tmp, path)


def lavis_qformer_key(key: str) -> str:
    """transformers `Blip2QFormerModel` names -> LAVIS `Qformer.bert.*` names (inverse of `rename_blip2`)."""
    k = key.replace("layernorm.", "embeddings.LayerNorm.", 1) if key.startswith("layernorm.") else key
    k = k.replace(".attention.attention.", ".attention.self.")
    k = k.replace(".crossattention.attention.", ".crossattention.self.")
    return "Qformer.bert." + k


def save_official_files(model: MiniGPT4, root: str) -> WeightsConfig:
    """Write the model's frozen parts as official files under `root`; returns the paths as a WeightsConfig."""
    os.makedirs(root, exist_ok=True)
    w = WeightsConfig(
        eva_vit=os.path.join(root, "eva_vit_g.pth"),
        # Without a Q-Former (the LLaMA-2 variant) there is no BLIP-2 file: ln_vision stays fresh.
        blip2=os.path.join(root, "blip2_pretrained.pth") if model.qformer is not None else None,
        llm=os.path.join(root, "llm"),
    )
    torch.save({k: v.detach().clone() for k, v in model.visual_encoder.state_dict().items()}, w.eva_vit)
    if w.blip2 is not None:
        blip2 = {"query_tokens": model.query_tokens.detach().clone()}
        blip2.update({f"ln_vision.{k}": v.detach().clone() for k, v in model.ln_vision.state_dict().items()})
        blip2.update(
            {lavis_qformer_key(k): v.detach().clone() for k, v in model.qformer.state_dict().items()}
        )
        torch.save({"model": blip2}, w.blip2)
    model.llm.save_pretrained(w.llm)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(w.llm)
    return w
