"""Command-line model flags shared by chat, the web demo and curation: official files or an mgpt4 checkpoint."""

from __future__ import annotations

import argparse
import os

import torch

from mgpt4.config import ModelConfig, apply_overrides, from_dict
from mgpt4.model import MiniGPT4, from_config
from mgpt4.model.presets import MODEL_PRESETS, model_preset
from mgpt4.paths import PROJ_FILE, find_checkpoint, read_checkpoint_config


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument(
        "--checkpoint",
        help="an mgpt4 checkpoint folder, or a training output folder (its newest checkpoint is used); "
        "its saved config gives the model and its llama_proj.pth the projection",
    )
    g.add_argument("--preset", choices=sorted(MODEL_PRESETS), help="model sizes when no --checkpoint is given")
    g.add_argument("--eva-vit", help="eva_vit_g.pth")
    g.add_argument("--blip2", help="blip2_pretrained_flant5xxl.pth (ln_vision, Q-Former, query tokens)")
    g.add_argument("--blip2-hf", help="a Hugging Face BLIP-2 folder instead of --eva-vit/--blip2")
    g.add_argument("--llm", help="a Hugging Face LLaMA/Vicuna folder")
    g.add_argument("--proj", help="a MiniGPT-4 checkpoint holding llama_proj (e.g. pretrained_minigpt4.pth)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model config override")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def model_config_from_args(args: argparse.Namespace) -> ModelConfig:
    if args.checkpoint:
        ckpt = find_checkpoint(args.checkpoint)
        if ckpt is None:
            raise SystemExit(f"--checkpoint {args.checkpoint}: no mgpt4 checkpoint found there")
        cfg = from_dict(ModelConfig, read_checkpoint_config(ckpt)["model"], "model")
        cfg.weights.proj = os.path.join(ckpt, PROJ_FILE)
    elif args.preset:
        cfg = model_preset(args.preset)
    else:
        raise SystemExit("give --checkpoint, or --preset with the weight files (--eva-vit, --blip2, --llm, --proj)")
    for flag, field in (("eva_vit", "eva_vit"), ("blip2", "blip2"), ("blip2_hf", "blip2_hf"), ("llm", "llm"), ("proj", "proj")):
        value = getattr(args, flag)
        if value:
            setattr(cfg.weights, field, value)
    return apply_overrides(cfg, args.set) if args.set else cfg


def model_from_args(args: argparse.Namespace) -> MiniGPT4:
    """Build, load and freeze the model the flags describe, in eval mode on `--device`."""
    model = from_config(model_config_from_args(args))
    return model.to(args.device).eval()
