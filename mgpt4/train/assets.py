"""Demo assets for the tiny recipes: synthetic data and a tiny model written as official weight files.

Generated once into the cache (MGPT4_CACHE, default ~/.cache/mgpt4) and reused. The tiny model
goes through the same strict loaders as the real files, so the default job exercises the real path.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch

from mgpt4.config import Config, ModelConfig, WeightsConfig
from mgpt4.data.config import SourceConfig
from mgpt4.data.synthetic import ensure_synthetic
from mgpt4.model.prompts import STAGE2_INSTRUCTIONS, STAGE2_TEMPLATE, VICUNA_V0_SYSTEM

ASSETS_VERSION = 1


def cache_root() -> str:
    return os.environ.get("MGPT4_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mgpt4")


def _size_tag(cfg: ModelConfig) -> str:
    v, q, m = cfg.vision, cfg.qformer, cfg.llm
    return (
        f"v{ASSETS_VERSION}-vit{v.image_size}-{v.patch_size}-{v.width}x{v.depth}-q{q.width}x{q.depth}x{q.num_query_tokens}"
        f"-llm{m.hidden_size}x{m.num_layers}-voc{m.vocab_size}"
    )


def ensure_tiny_weights(cfg: ModelConfig, captions: list[str], seed: int = 0) -> WeightsConfig:
    """Official-format files of a random model with `cfg`'s sizes and a tokenizer trained on `captions`."""
    from mgpt4.model.export import save_official_files
    from mgpt4.model.minigpt4 import MiniGPT4
    from mgpt4.tokenizer import train_tiny_tokenizer

    final = os.path.join(cache_root(), "tiny-weights", f"{_size_tag(cfg)}-seed{seed}")
    weights = WeightsConfig(
        eva_vit=os.path.join(final, "eva_vit_g.pth"),
        blip2=os.path.join(final, "blip2_pretrained.pth"),
        llm=os.path.join(final, "llm"),
    )
    if os.path.isdir(final):
        return weights
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tiny-", dir=os.path.dirname(final))
    try:
        corpus = [*captions, VICUNA_V0_SYSTEM, *(STAGE2_TEMPLATE.format(i) for i in STAGE2_INSTRUCTIONS)] * 4
        tokenizer = train_tiny_tokenizer(
            corpus, os.path.join(tmp, "tokenizer"), vocab_size=cfg.llm.vocab_size
        )
        torch.manual_seed(seed)
        bare = ModelConfig(vision=cfg.vision, qformer=cfg.qformer, llm=cfg.llm)
        save_official_files(MiniGPT4(bare, tokenizer=tokenizer), tmp)
        shutil.rmtree(os.path.join(tmp, "tokenizer"))
        try:
            os.rename(tmp, final)  # atomic: ranks racing here all end with the same complete folder
        except OSError:
            if not os.path.isdir(final):
                raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return weights


def prepare_demo_assets(cfg: Config) -> None:
    """Fill the config's missing data and weight paths with the synthetic set and the tiny model (in place).

    Paths the user set are kept, so `--set model.weights.proj=...` or real data still take effect.
    """
    synthetic = ensure_synthetic()
    if cfg.data.kind == "align":
        cfg.data.align_root = cfg.data.align_root or synthetic.align_root
    elif not cfg.data.sources:
        cfg.data.sources = [SourceConfig(name="synthetic", shards=synthetic.shards, ratio=1.0)]
    w = cfg.model.weights
    if not (w.eva_vit and w.blip2 and w.llm) and not w.blip2_hf:
        tiny = ensure_tiny_weights(cfg.model, synthetic.captions)
        w.eva_vit = w.eva_vit or tiny.eva_vit
        w.blip2 = w.blip2 or tiny.blip2
        w.llm = w.llm or tiny.llm
