"""Command-line flags shared by chat, the web demo, curation and evaluation: the model (official files
or an mgpt4 checkpoint), where its parts live (low-memory options), and decoding, derived from
`GenerationSettings` so that every tool spells and documents them the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import torch

from mgpt4.chat.session import ImageLimits
from mgpt4.config import DTYPES, ModelConfig
from mgpt4.model.generation import GenerationError, GenerationSettings
from mgpt4.model.presets import MODEL_PRESETS, model_preset
from mgpt4.strict_config import apply_overrides, from_dict
from mgpt4.train.checkpoints import PROJ_FILE, find_checkpoint, read_checkpoint_config


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument(
        "--checkpoint",
        help="an mgpt4 checkpoint folder, or a training output folder (its newest checkpoint is used); "
        "its saved config gives the model and its llama_proj.pth the projection",
    )
    g.add_argument(
        "--preset", choices=sorted(MODEL_PRESETS), help="model sizes when no --checkpoint is given"
    )
    g.add_argument("--eva-vit", help="eva_vit_g.pth")
    g.add_argument("--blip2", help="blip2_pretrained_flant5xxl.pth (ln_vision, Q-Former, query tokens)")
    g.add_argument("--blip2-hf", help="a Hugging Face BLIP-2 folder instead of --eva-vit/--blip2")
    g.add_argument(
        "--llm",
        help="a Hugging Face decoder folder (Vicuna, Llama 2/3, Mistral, Qwen2, ...; sizes from its config.json)",
    )
    g.add_argument("--proj", help="a MiniGPT-4 checkpoint holding llama_proj (e.g. pretrained_minigpt4.pth)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model config override")
    g.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device of the model (default: cuda when a GPU is visible, else cpu)",
    )
    low = parser.add_argument_group("low memory")
    low.add_argument(
        "--llm-dtype",
        choices=sorted(DTYPES),
        help="dtype of the LLM weights (default: the config's model.precision.llm; bf16 halves fp32's memory)",
    )
    low.add_argument(
        "--llm-8bit",
        action="store_true",
        help="load the LLM from --llm in 8-bit with bitsandbytes (needs a CUDA --device and "
        "`pip install bitsandbytes`); about half of bf16's memory",
    )
    low.add_argument(
        "--vision-device",
        help="device of the vision path (EVA ViT, Q-Former, projection), e.g. `cpu` to keep only the LLM "
        "on the GPU; it then runs in fp32 and hands its image embeddings to the LLM's device "
        "(default: --device)",
    )


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
        raise SystemExit(
            "give --checkpoint, or --preset with the weight files (--eva-vit, --blip2, --llm, --proj)"
        )
    for flag, field in (
        ("eva_vit", "eva_vit"),
        ("blip2", "blip2"),
        ("blip2_hf", "blip2_hf"),
        ("llm", "llm"),
        ("proj", "proj"),
    ):
        value = getattr(args, flag)
        if value:
            setattr(cfg.weights, field, value)
    cfg = apply_overrides(cfg, args.set) if args.set else cfg
    # getattr: callers that build their Namespace by hand may not have the low-memory flags.
    if getattr(args, "llm_dtype", None):
        cfg.precision.llm = args.llm_dtype
    return cfg


def add_decoding_args(
    parser: argparse.ArgumentParser, defaults: GenerationSettings, title: str = "decoding"
) -> None:
    """One flag per `GenerationSettings` field (`--max-new-tokens`, `--top-p`, ...; the yes/no field
    `sample` is `--do-sample` / `--greedy`), with `defaults` as the defaults --help shows."""
    g = parser.add_argument_group(title)
    for f in dataclasses.fields(GenerationSettings):
        value = getattr(defaults, f.name)
        help_text = f.metadata.get("help", "")
        if f.type in (bool, "bool"):
            yes, no = f.metadata["flags"]
            g.add_argument(
                yes,
                dest=f.name,
                action="store_true",
                default=value,
                help=f"{help_text} (default: {yes if value else no})",
            )
            g.add_argument(no, dest=f.name, action="store_false", help=argparse.SUPPRESS)
        else:
            kind = int if f.type in (int, "int") else float
            flag = "--" + f.name.replace("_", "-")
            g.add_argument(
                flag, dest=f.name, type=kind, default=value, help=f"{help_text} (default: %(default)s)"
            )


def settings_from_args(args: argparse.Namespace) -> GenerationSettings:
    """The decoding settings the flags give, checked; bad values exit with the problems named."""
    settings = GenerationSettings(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(GenerationSettings)}
    )
    try:
        settings.validate()
    except GenerationError as e:
        raise SystemExit(f"decoding flags: {e}") from None
    return settings


def add_session_args(parser: argparse.ArgumentParser) -> None:
    """What a chat session accepts: image limits, and a seed for replies that can be reproduced."""
    g = parser.add_argument_group("session")
    g.add_argument("--seed", type=int, help="seed the sampler, for replies that can be reproduced")
    g.add_argument(
        "--max-image-mb",
        type=float,
        default=ImageLimits.max_bytes / 2**20,
        help="largest image file accepted",
    )
    g.add_argument(
        "--max-image-megapixels",
        type=float,
        default=ImageLimits.max_pixels / 1e6,
        help="largest image accepted, in millions of pixels",
    )


def limits_from_args(args: argparse.Namespace) -> ImageLimits:
    return ImageLimits(
        max_bytes=int(args.max_image_mb * 2**20), max_pixels=int(args.max_image_megapixels * 1e6)
    )
