"""Random weight files in the official layouts, made from the manifests' key patterns.

Each full-size shape in `tests/manifests/*.tsv` is mapped through a dimension map to the sizes of a
model config (shrunk to the tiny preset's parity sizes, or kept at a real preset's), and layer indices
past the config's depths are dropped, so the files have the official key names and structure at any
size. The LLM is a Hugging Face folder of per-layer safetensors shards with an index, written one
layer at a time, so that a 7B-shaped folder never sits in memory whole (`write_llm_folder`).
"""

from __future__ import annotations

import csv
import json
import os
import re

import torch

from mgpt4.config import LLMConfig, ModelConfig

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


def eva_vit_state(
    cfg: ModelConfig, extra_blocks: int = 1, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """`eva_vit_g.pth` at `cfg`'s size, with `extra_blocks` blocks past the depth as in the released file,
    every tensor stored in `dtype` (the released file is fp16; drawn in fp32 one tensor at a time)."""
    gen = torch.Generator().manual_seed(seed)
    dims = dim_map(cfg)
    depth = cfg.vision.depth
    sd = {}
    for key, shape in read_manifest("eva_vit_g"):
        m = re.match(r"blocks\.(\d+)\.(.*)", key)
        if m is None:
            sd[key] = _rand([dims.get(d, d) for d in shape], gen).to(dtype)
        elif int(m.group(1)) == 0:
            for i in range(depth + extra_blocks):
                sd[f"blocks.{i}.{m.group(2)}"] = _rand([dims.get(d, d) for d in shape], gen).to(dtype)
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


def blip2_state(
    cfg: ModelConfig, seed: int = 1, with_extras: bool = True, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """The `model` dict of `blip2_pretrained_flant5xxl.pth` at `cfg`'s size, floating tensors in `dtype`."""
    gen = torch.Generator().manual_seed(seed)
    dims = dim_map(cfg)
    sd = {}
    for key, shape in read_manifest("qformer_minigpt4"):
        if not _layer_ok(key, r"encoder\.layer\.(\d+)\.", cfg.qformer.depth):
            continue
        kind = torch.int64 if key.endswith("position_ids") else torch.float32
        sd[key] = _rand([dims.get(d, d) for d in shape], gen, kind)
    if with_extras:
        sd.update(blip2_extras(cfg, gen))
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


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

    return write_vision_files(root, tiny(), blip2_name="blip2.pth")


def write_vision_files(
    root: str,
    cfg: ModelConfig,
    dtype: torch.dtype = torch.float32,
    blip2_name: str = "blip2_pretrained_flant5xxl.pth",
) -> dict[str, str]:
    """Random `eva_vit_g.pth` and BLIP-2 file of `cfg`'s vision sizes in `dtype`, written into `root` (at
    the vicuna7b preset's sizes and fp16: 2.0 GB and 0.37 GB, 40 ViT blocks as released); returns the `model.weights`
    paths (`eva_vit`, `blip2`). Each file is one dict in memory while it is written."""
    os.makedirs(root, exist_ok=True)
    paths = {"eva_vit": os.path.join(root, "eva_vit_g.pth"), "blip2": os.path.join(root, blip2_name)}
    torch.save(eva_vit_state(cfg, dtype=dtype), paths["eva_vit"])
    torch.save({"model": blip2_state(cfg, dtype=dtype)}, paths["blip2"])
    return paths


def write_llm_folder(
    folder: str, llm: LLMConfig, tokenizer, dtype: torch.dtype = torch.bfloat16, seed: int = 3
) -> int:
    """A random LLaMA-family Hugging Face folder of `llm`'s sizes: config.json, the tokenizer, and one
    safetensors shard per decoder layer (plus one for the embeddings, final norm and output head) with
    `model.safetensors.index.json`, as `save_pretrained` splits large models. Written one shard at a
    time: memory holds one layer (0.4 GB at 7B in bf16), never the model. The key names and shapes are
    read from a meta-device build of the transformers model, so they are what `from_pretrained` expects.
    Weights ~ N(0, 0.02), norms 1; the output head's rows past the tokenizer's pieces are zero, so a
    random model never picks an id the (small) tokenizer cannot write. Returns the bytes written."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from mgpt4.model.llm import random_llm_config

    hf = random_llm_config(llm)
    hf.dtype = dtype
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(hf).state_dict().items()}
    shards: dict[str, list[str]] = {}
    for key in shapes:
        m = re.match(r"model\.layers\.(\d+)\.", key)
        shards.setdefault(f"layer{int(m.group(1)):03d}" if m else "outer", []).append(key)
    os.makedirs(folder, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, keys in enumerate(shards[name] for name in sorted(shards)):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for key in keys:
            if key.endswith("norm.weight"):
                tensors[key] = torch.ones(shapes[key], dtype=dtype)
            else:
                tensors[key] = (torch.randn(shapes[key], generator=gen) * 0.02).to(dtype)
            if key == "lm_head.weight":
                tensors[key][len(tokenizer) :] = 0
            weight_map[key] = file
            total += tensors[key].numel() * tensors[key].element_size()
        save_file(tensors, os.path.join(folder, file), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
    hf.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return total
