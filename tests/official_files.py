"""Tiny weight files in the official layouts, made from the manifests' key patterns.

Each full-size shape in `tests/manifests/*.tsv` is shrunk through a dimension map to the parity
sizes of the tiny preset, and layer indices past the tiny depths are dropped, so the files have the
official key names and structure at toy size.
"""

from __future__ import annotations

import csv
import json
import os
import re

import torch

from mgpt4.config import ModelConfig

MANIFESTS = os.path.join(os.path.dirname(__file__), "manifests")


def read_manifest(name: str, variant: str | None = None) -> list[tuple[str, list[int]]]:
    with open(os.path.join(MANIFESTS, f"manifest_{name}.tsv"), encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [
        (r["key"], json.loads(r["shape"])) for r in rows if variant is None or r.get("variant") == variant
    ]


def dim_map(cfg: ModelConfig) -> dict[int, int]:
    v, q = cfg.vision, cfg.qformer
    dims = {1408: v.width, 6144: v.resolved_mlp_dim(), 4224: 3 * v.width, 257: v.num_tokens}
    if q is not None:  # the LLaMA-2 variant has no Q-Former
        dims.update({768: q.width, 3072: q.ffn_dim, 32: q.num_query_tokens})
    return dims


def _layer_ok(key: str, pattern: str, depth: int) -> bool:
    m = re.search(pattern, key)
    return m is None or int(m.group(1)) < depth


def _rand(shape: list[int], gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    if dtype == torch.int64:
        return torch.arange(shape[-1]).expand(*shape).clone()
    return torch.randn(*shape, generator=gen) * 0.05


def eva_vit_state(cfg: ModelConfig, extra_blocks: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """`eva_vit_g.pth` at tiny size, with `extra_blocks` blocks past the depth as in the released file."""
    gen = torch.Generator().manual_seed(seed)
    dims = dim_map(cfg)
    depth = cfg.vision.depth
    sd = {}
    for key, shape in read_manifest("eva_vit_g"):
        m = re.match(r"blocks\.(\d+)\.(.*)", key)
        if m is None:
            sd[key] = _rand([dims.get(d, d) for d in shape], gen)
        elif int(m.group(1)) == 0:
            for i in range(depth + extra_blocks):
                sd[f"blocks.{i}.{m.group(2)}"] = _rand([dims.get(d, d) for d in shape], gen)
    return sd


# Keys the released BLIP-2 checkpoint holds and MiniGPT-4 drops (a representative set).
def blip2_extras(cfg: ModelConfig, gen: torch.Generator) -> dict[str, torch.Tensor]:
    w, ffn = cfg.qformer.width, cfg.qformer.ffn_dim
    extras = {
        "Qformer.cls.predictions.bias": [30523],
        "Qformer.cls.predictions.transform.dense.weight": [w, w],
        "Qformer.bert.embeddings.word_embeddings.weight": [30523, w],
        "Qformer.bert.embeddings.position_embeddings.weight": [512, w],
        "vision_proj.weight": [256, w],
        "text_proj.weight": [256, w],
        "itm_head.weight": [2, w],
        "temp": [],
    }
    for i in range(cfg.qformer.depth):
        extras[f"Qformer.bert.encoder.layer.{i}.intermediate.dense.weight"] = [ffn, w]
        extras[f"Qformer.bert.encoder.layer.{i}.output.dense.weight"] = [w, ffn]
        extras[f"Qformer.bert.encoder.layer.{i}.output.LayerNorm.weight"] = [w]
    return {k: torch.randn(s, generator=gen) for k, s in extras.items()}


def blip2_state(cfg: ModelConfig, seed: int = 1, with_extras: bool = True) -> dict[str, torch.Tensor]:
    """The `model` dict of `blip2_pretrained_flant5xxl.pth` at tiny size."""
    gen = torch.Generator().manual_seed(seed)
    dims = dim_map(cfg)
    sd = {}
    for key, shape in read_manifest("qformer_minigpt4"):
        if not _layer_ok(key, r"encoder\.layer\.(\d+)\.", cfg.qformer.depth):
            continue
        dtype = torch.int64 if key.endswith("position_ids") else torch.float32
        sd[key] = _rand([dims.get(d, d) for d in shape], gen, dtype)
    if with_extras:
        sd.update(blip2_extras(cfg, gen))
    return sd


def proj_state(cfg: ModelConfig, hidden: int | None = None, seed: int = 2) -> dict[str, torch.Tensor]:
    """The `model` dict of a MiniGPT-4 checkpoint: llama_proj plus buffers the official one carries."""
    gen = torch.Generator().manual_seed(seed)
    h = hidden or cfg.llm.hidden_size
    return {
        "llama_proj.weight": torch.randn(h, cfg.qformer.width, generator=gen) * 0.05,
        "llama_proj.bias": torch.randn(h, generator=gen) * 0.05,
        "Qformer.bert.embeddings.position_ids": torch.arange(512).unsqueeze(0),
        "llama_model.model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8),
    }


def write_official_files(root: str, cfg: ModelConfig, tokenizer) -> dict[str, str]:
    """eva_vit_g.pth, blip2 .pth, MiniGPT-4 .pth and an HF LLaMA folder under `root`; returns their paths."""
    from mgpt4.model.llm import build_llm

    os.makedirs(root, exist_ok=True)
    paths = {
        "eva_vit": os.path.join(root, "eva_vit_g.pth"),
        "blip2": os.path.join(root, "blip2_pretrained_flant5xxl.pth"),
        "proj": os.path.join(root, "pretrained_minigpt4.pth"),
        "llm": os.path.join(root, "vicuna"),
    }
    torch.save(eva_vit_state(cfg), paths["eva_vit"])
    torch.save({"model": blip2_state(cfg)}, paths["blip2"])
    torch.save({"model": proj_state(cfg), "optimizer": None, "epoch": 3}, paths["proj"])
    torch.manual_seed(3)
    build_llm(cfg.llm).save_pretrained(paths["llm"])
    tokenizer.save_pretrained(paths["llm"])
    return paths


def write_tiny_vision_files(root: str) -> dict[str, str]:
    """Random official-format EVA ViT and BLIP-2 files at the tiny preset's sizes, written into `root`:
    the `model.weights` paths of the vision side (`eva_vit`, `blip2`)."""
    from mgpt4.model.presets import tiny

    paths = {"eva_vit": os.path.join(root, "eva_vit_g.pth"), "blip2": os.path.join(root, "blip2.pth")}
    torch.save(eva_vit_state(tiny()), paths["eva_vit"])
    torch.save({"model": blip2_state(tiny())}, paths["blip2"])
    return paths
