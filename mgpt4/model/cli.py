"""Command-line model flags shared by chat, the web demo and curation: official files or an mgpt4 checkpoint.

Besides the files, three low-memory options decide where the parts live: the LLM in bf16/fp16,
the LLM in 8-bit (bitsandbytes, CUDA only), and the vision path on the CPU while the LLM is on
the GPU (8-bit LLM plus CPU vision is the official low-resource mode).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from mgpt4.config import DTYPES, ModelConfig, apply_overrides, from_dict
from mgpt4.model import MiniGPT4, apply_freeze, build_model, from_config, load_weights
from mgpt4.model.llm import llm_config_mismatches
from mgpt4.model.loading import WeightsError
from mgpt4.model.presets import MODEL_PRESETS, model_preset
from mgpt4.paths import PROJ_FILE, find_checkpoint, read_checkpoint_config


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
    g.add_argument("--llm", help="a Hugging Face LLaMA/Vicuna folder")
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


def model_from_args(args: argparse.Namespace) -> MiniGPT4:
    """Build, load and freeze the model the flags describe, in eval mode on `--device`.

    With `--vision-device` the vision path sits on that device instead, and `encode_img` returns
    its embeddings on the LLM's device, so `generate` and the chat work unchanged.
    """
    cfg = model_config_from_args(args)
    if getattr(args, "llm_8bit", False):
        model = _from_config_8bit(cfg, args.device)
    else:
        model = from_config(cfg).to(args.device)
    vision_device = getattr(args, "vision_device", None)
    if vision_device and torch.device(vision_device) != torch.device(args.device):
        place_vision(model, vision_device)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Low-memory placements

VISION_PARTS = ("visual_encoder", "ln_vision", "qformer", "llama_proj")


def _move_vision(model: MiniGPT4, device: torch.device, dtype: torch.dtype | None = None) -> None:
    for name in VISION_PARTS:
        getattr(model, name).to(device=device, dtype=dtype)
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


def _from_config_8bit(cfg: ModelConfig, device: str) -> MiniGPT4:
    """Like `from_config`, with the LLM quantised to int8 by bitsandbytes as it is read from its folder."""
    folder = cfg.weights.llm
    if not folder:
        raise SystemExit(
            "--llm-8bit quantises the LLM read from its folder: give --llm (or a checkpoint naming one)"
        )
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        raise SystemExit(
            f"--llm-8bit needs a CUDA device (bitsandbytes' int8 kernels), but --device is {device!r}"
            + ("" if torch.cuda.is_available() else " and no GPU is visible")
            + "; use --llm-dtype bf16 instead"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise SystemExit("--llm-8bit needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        problems = llm_config_mismatches(cfg.llm, json.load(f))
    if problems:
        raise WeightsError(f"{folder}: the LLM does not match the config:\n  " + "\n  ".join(problems))
    model = build_model(cfg)  # the LLM stays on the meta device: its weights come from the folder below
    cfg.weights.llm = None
    try:
        load_weights(model)
    finally:
        cfg.weights.llm = folder
    # int8 matmuls compute in half precision; fp32 would only cost memory.
    half = DTYPES[cfg.precision.llm] if cfg.precision.llm != "fp32" else torch.float16
    model.llm = LlamaForCausalLM.from_pretrained(
        folder,
        quantization_config=BitsAndBytesConfig(load_in_8bit=True),
        dtype=half,
        device_map={"": torch.device(device)},
        attn_implementation=cfg.attn_implementation,
        local_files_only=True,
    )
    apply_freeze(model)
    # Not model.to(): moving a bitsandbytes model would undo its quantisation state.
    _move_vision(model, torch.device(device))
    return model
