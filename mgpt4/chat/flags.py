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
from mgpt4.logs import get_logger
from mgpt4.model.generation import GenerationError, GenerationSettings
from mgpt4.model.presets import MODEL_PRESETS, model_preset
from mgpt4.strict_config import ConfigError, apply_overrides, from_dict
from mgpt4.train.checkpoints import PROJ_FILE, find_checkpoint, read_checkpoint_config

log = get_logger(__name__)


class OneLineErrors(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (what is wrong, and where to look), not the usage block."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class HelpWithDefaults(argparse.HelpFormatter):
    """--help shows each option's default, unless its help already says it or there is none to say."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        nothing = default is None or default is False or default == [] or default == argparse.SUPPRESS
        if "default" in text or nothing or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


# The weight file flags, by the part of the model they fill.
WEIGHT_FLAGS = {"eva_vit": "--eva-vit", "blip2": "--blip2", "llm": "--llm", "proj": "--proj"}


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
        "--allow-random-weights",
        action="store_true",
        help="build the parts that no weight file names with random weights (tests and benchmarks); "
        "without it a missing --eva-vit, --blip2, --llm or --proj is an error",
    )
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


def model_config_from_args(args: argparse.Namespace, warn: bool = True) -> ModelConfig:
    """The model config the flags describe; exits naming the flags when a part would be random."""
    _check_flags_alone(args)
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
    try:
        cfg = apply_overrides(cfg, args.set) if args.set else cfg
    except ConfigError as e:
        raise SystemExit(f"--set: {e}") from None
    # getattr: callers that build their Namespace by hand may not have the low-memory flags.
    if getattr(args, "llm_dtype", None):
        cfg.precision.llm = args.llm_dtype
    why = "the checkpoint's config names no file for it" if args.checkpoint else ""
    _refuse_random_parts(cfg, args, why, warn)
    _check_weight_paths(cfg, args)
    return cfg


def missing_weight_flags(cfg: ModelConfig) -> list[str]:
    """The flags of the parts that no weight file fills (`cfg.weights`), in model order.

    The LLaMA-2 variant (`cfg.qformer` None) has no Q-Former, so it needs no --blip2."""
    weights, missing = cfg.weights, []
    vision = ("eva_vit", "blip2") if cfg.qformer is not None else ("eva_vit",)
    if not weights.blip2_hf:
        missing += [WEIGHT_FLAGS[k] for k in vision if not getattr(weights, k)]
    missing += [WEIGHT_FLAGS[k] for k in ("llm", "proj") if not getattr(weights, k)]
    return missing


def _check_weight_paths(cfg: ModelConfig, args: argparse.Namespace) -> None:
    """Each weight path is there and of the right kind (a file, or the folder --llm and --blip2-hf
    name), said before anything loads, with where the path came from when no flag gave it."""
    for field, flag, folder in (
        ("eva_vit", "--eva-vit", False),
        ("blip2", "--blip2", False),
        ("proj", "--proj", False),
        ("llm", "--llm", True),
        ("blip2_hf", "--blip2-hf", True),
    ):
        path = getattr(cfg.weights, field)
        if not path:
            continue
        given = getattr(args, field, None) == path or field == "proj"
        origin = (
            "" if given else f" (named by the {'checkpoint' if args.checkpoint else 'preset'}; give {flag})"
        )
        if not os.path.exists(path):
            raise SystemExit(f"{flag} {path}: no such file or folder{origin}")
        if folder and not os.path.isdir(path):
            raise SystemExit(f"{flag} {path}: expected a Hugging Face model folder, got a file{origin}")
        if not folder and os.path.isdir(path):
            hint = " (for a run folder, use --checkpoint)" if flag == "--proj" else origin
            raise SystemExit(f"{flag} {path}: expected a weight file, got a folder{hint}")


def _refuse_random_parts(cfg: ModelConfig, args: argparse.Namespace, why: str, warn: bool) -> None:
    missing = missing_weight_flags(cfg)
    if not missing:
        return
    if not getattr(args, "allow_random_weights", False):
        raise SystemExit(
            f"no weight file for {', '.join(missing)}"
            + (f" ({why})" if why else "")
            + ": those parts would have random weights and write nonsense. Give "
            + " and ".join(missing)
            + (
                " (or --blip2-hf for the vision part)"
                if "--blip2" in missing or "--eva-vit" in missing
                else ""
            )
            + ", or --allow-random-weights if random is what you want"
        )
    if "--llm" in missing and not cfg.weights.tokenizer:
        raise SystemExit(
            "--allow-random-weights without --llm: the random LLM still needs a tokenizer; "
            "give --set weights.tokenizer=DIR (a LLaMA tokenizer folder)"
        )
    if warn:
        log.warning(f"random weights for {', '.join(missing)} (--allow-random-weights)")


def check_device_flags(args: argparse.Namespace) -> None:
    """Exit with one line when --device or --vision-device names a device this machine does not have."""
    for flag, value in (
        ("--device", getattr(args, "device", None)),
        ("--vision-device", getattr(args, "vision_device", None)),
    ):
        if not value:
            continue
        try:
            device = torch.device(value)
        except (RuntimeError, ValueError):
            raise SystemExit(f"{flag} {value}: not a device name (cpu, cuda, cuda:N, mps)") from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise SystemExit(f"{flag} {value}: no CUDA GPU is visible to PyTorch here; use {flag} cpu")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise SystemExit(f"{flag} {value}: this machine has {torch.cuda.device_count()} GPU(s)")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise SystemExit(f"{flag} {value}: Apple's MPS is not available here; use {flag} cpu")


def _check_flags_alone(args: argparse.Namespace) -> None:
    """What the flags say by themselves: devices this machine has, and one source of the model."""
    check_device_flags(args)
    if args.checkpoint and args.preset:
        raise SystemExit(
            f"--checkpoint and --preset {args.preset}: give one; a checkpoint's config already names its model"
        )


def check_model_flags(args: argparse.Namespace) -> None:
    """The checks that need no model: devices, with --preset the weight flags given, and --set.

    Tools call it before any slow step (listing images, binding a port, loading the model); a
    --checkpoint's own config is checked when it is read (`model_config_from_args`), which a tool
    that may have nothing to do (describe) does only when it has.
    """
    _check_flags_alone(args)
    # --set needs the config it changes: a checkpoint's is read for it (a small JSON file).
    if (args.preset and not args.checkpoint) or getattr(args, "set", None):
        model_config_from_args(args, warn=False)


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
