"""The one way to load a model for inference: a run folder, a checkpoint folder, an export folder
(`from_export.py`) or the official weight files (+ overrides) -> a built, loaded, frozen, eval-mode
MiniGPT4 with its parts on their devices.

    model = load_model(ModelSource(checkpoint="runs/stage2", device="cuda"))
    model.tokenizer, model.text_spec().template    # its tokenizer and conversation template

Chat, the web demo, describe and caption evaluation all call `load_model`; their model flags are
`ModelSource`'s fields (`mgpt4.inference.flags`), so every tool spells, checks and loads a model the
same way. Problems with the source (no checkpoint there, a missing weight file, a bad override, a
device this machine lacks) end in SystemExit with one line naming the flag, before anything loads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from mgpt4.checkpoints import PROJ_FILE, find_checkpoint, read_checkpoint_config
from mgpt4.config import DTYPES, QUANTIZED, ModelConfig
from mgpt4.inference.from_export import export_folder, export_source_config, load_export
from mgpt4.inference.placement import from_config_8bit, from_config_quantized, place_vision
from mgpt4.logs import get_logger
from mgpt4.model import MiniGPT4, from_config
from mgpt4.model.lora import LORA_DIR
from mgpt4.model.presets import MODEL_PRESETS, model_preset
from mgpt4.strict_config import ConfigError, apply_overrides, from_dict

log = get_logger(__name__)

_MODEL = "model"
_LOW = "low memory"


@dataclass
class ModelSource:
    """Where a model comes from (a checkpoint, or a preset with weight files) and where its parts go.

    Each field is a command-line flag of every tool that loads a model (the metadata gives its help).
    """

    checkpoint: str | None = field(
        default=None,
        metadata={
            "group": _MODEL,
            "help": "an mgpt4 checkpoint folder, or a training output folder (its newest checkpoint is "
            "used); its saved config gives the model and its llama_proj.pth the projection. Or a folder "
            "written by `python -m mgpt4.export hf`, which gives the whole model",
        },
    )
    preset: str | None = field(
        default=None,
        metadata={
            "group": _MODEL,
            "choices": sorted(MODEL_PRESETS),
            "help": "model sizes when no --checkpoint is given",
        },
    )
    eva_vit: str | None = field(default=None, metadata={"group": _MODEL, "help": "eva_vit_g.pth"})
    blip2: str | None = field(
        default=None,
        metadata={
            "group": _MODEL,
            "help": "blip2_pretrained_flant5xxl.pth (ln_vision, Q-Former, query tokens)",
        },
    )
    blip2_hf: str | None = field(
        default=None,
        metadata={"group": _MODEL, "help": "a Hugging Face BLIP-2 folder instead of --eva-vit/--blip2"},
    )
    llm: str | None = field(
        default=None,
        metadata={
            "group": _MODEL,
            "help": "a Hugging Face decoder folder (Vicuna, Llama 2/3, Mistral, Qwen2, ...; sizes from its "
            "config.json)",
        },
    )
    proj: str | None = field(
        default=None,
        metadata={
            "group": _MODEL,
            "help": "a MiniGPT-4 checkpoint holding llama_proj (e.g. pretrained_minigpt4.pth)",
        },
    )
    overrides: list[str] = field(
        default_factory=list,
        metadata={
            "group": _MODEL,
            "flag": "--set",
            "dest": "set",
            "append": True,
            "metavar": "KEY=VALUE",
            "help": "model config override",
        },
    )
    allow_random_weights: bool = field(
        default=False,
        metadata={
            "group": _MODEL,
            "help": "build the parts that no weight file names with random weights (tests and benchmarks); "
            "without it a missing --eva-vit, --blip2, --llm or --proj is an error",
        },
    )
    device: str = field(
        default="cuda" if torch.cuda.is_available() else "cpu",
        metadata={
            "group": _MODEL,
            "help": "device of the model (default: cuda when a GPU is visible, else cpu)",
        },
    )
    llm_dtype: str | None = field(
        default=None,
        metadata={
            "group": _LOW,
            "choices": sorted(DTYPES),
            "help": "dtype of the LLM weights (default: the config's model.precision.llm; bf16 halves fp32's "
            "memory)",
        },
    )
    llm_8bit: bool = field(
        default=False,
        metadata={
            "group": _LOW,
            "help": "load the LLM from --llm in 8-bit with bitsandbytes (needs a CUDA --device and "
            "`pip install bitsandbytes`); about half of bf16's memory",
        },
    )
    vision_device: str | None = field(
        default=None,
        metadata={
            "group": _LOW,
            "help": "device of the vision path (EVA ViT, Q-Former, projection), e.g. `cpu` to keep only the "
            "LLM on the GPU; it then runs in fp32 and hands its image embeddings to the LLM's device "
            "(default: --device)",
        },
    )


# The weight file flags, by the part of the model they fill.
WEIGHT_FLAGS = {
    "eva_vit": "--eva-vit",
    "blip2": "--blip2",
    "llm": "--llm",
    "proj": "--proj",
    "timm": "--set model.weights.timm=FILE",
}


def load_model(source: ModelSource, *, announce: bool = False) -> MiniGPT4:
    """Build, load and freeze the model `source` names, in eval mode on `source.device`.

    The model carries its tokenizer (`model.tokenizer`) and conversation template
    (`model.text_spec().template`). With `vision_device` the vision path sits on that device instead,
    and `encode_img` returns its embeddings on the LLM's device, so `generate` and the chat work
    unchanged; with `llm_8bit` the LLM is quantised as it is read. `announce` prints "Loading the
    model ..." once the source has passed its checks (a command line's last word before minutes of
    loading). Raises SystemExit for a bad source (one line), WeightsError for weight files that do
    not fit the config.
    """
    cfg = model_config(source)  # the LLM folder is checked against it by the build, before any part
    if announce:
        print("Loading the model ...", flush=True)
    folder = export_folder(source.checkpoint)
    if folder:
        model = load_export(folder, cfg).to(source.device)
    elif source.llm_8bit:
        model = from_config_8bit(cfg, source.device)
    elif cfg.precision.llm in QUANTIZED:  # a run trained on a quantised LLM, or --set model.precision.llm
        model = from_config_quantized(cfg, source.device)
    else:
        model = from_config(cfg).to(source.device)
    if source.vision_device and torch.device(source.vision_device) != torch.device(source.device):
        place_vision(model, source.vision_device)
    model.requires_grad_(False)  # inference: no part is trained
    return model.eval()


def model_config(source: ModelSource, warn: bool = True) -> ModelConfig:
    """The model config `source` describes; exits naming the flags when a part would be random."""
    _check_alone(source)
    folder = export_folder(source.checkpoint)
    if folder:
        return export_source_config(folder, source)
    if source.checkpoint:
        if not os.path.exists(source.checkpoint):  # a typo, not a folder without a checkpoint: say which
            raise SystemExit(f"--checkpoint {source.checkpoint}: no such file or folder")
        ckpt = find_checkpoint(source.checkpoint)
        if ckpt is None:
            raise SystemExit(f"--checkpoint {source.checkpoint}: no mgpt4 checkpoint found there")
        cfg = from_dict(ModelConfig, read_checkpoint_config(ckpt)["model"], "model")
        cfg.weights.proj = os.path.join(ckpt, PROJ_FILE)
        if cfg.lora.enabled():  # a LoRA run: its adapters, as a PEFT folder beside the projection
            cfg.weights.lora = os.path.join(ckpt, LORA_DIR)
    elif source.preset:
        cfg = model_preset(source.preset)
    else:
        raise SystemExit(
            "give --checkpoint, or --preset with the weight files (--eva-vit, --blip2, --llm, --proj)"
        )
    for name in ("eva_vit", "blip2", "blip2_hf", "llm", "proj"):
        value = getattr(source, name)
        if value:
            setattr(cfg.weights, name, value)
    try:
        cfg = apply_overrides(cfg, source.overrides) if source.overrides else cfg
    except ConfigError as e:
        raise SystemExit(f"--set: {e}") from None
    if source.llm_dtype:
        cfg.precision.llm = source.llm_dtype
    why = "the checkpoint's config names no file for it" if source.checkpoint else ""
    _refuse_random_parts(cfg, source, why, warn)
    _check_weight_paths(cfg, source)
    return cfg


def check_source(source: ModelSource) -> None:
    """The checks that need no model: devices, with a preset the weight files given, and the overrides.

    Tools call it before any slow step (listing images, binding a port, loading the model); a
    checkpoint's own config is checked when it is read (`model_config`), which a tool that may have
    nothing to do (describe) does only when it has.
    """
    _check_alone(source)
    # An override needs the config it changes: a checkpoint's is read for it (a small JSON file).
    if (source.preset and not source.checkpoint) or source.overrides:
        model_config(source, warn=False)


def missing_weight_flags(cfg: ModelConfig) -> list[str]:
    """The flags of the parts that no weight file fills (`cfg.weights`), in model order.

    The LLaMA-2 variant (`cfg.qformer` None) has no Q-Former, so it needs no --blip2."""
    weights, missing = cfg.weights, []
    vision = ("eva_vit", "blip2") if cfg.qformer is not None else ("eva_vit",)
    if cfg.vision.kind == "hf":  # the tower's weights are in its folder (model.vision.folder)
        vision = ()
    if cfg.vision.kind == "timm":  # the tower's weights are one file (model.weights.timm)
        vision = ("timm",)
    if not weights.blip2_hf:
        missing += [WEIGHT_FLAGS[k] for k in vision if not getattr(weights, k)]
    missing += [WEIGHT_FLAGS[k] for k in ("llm", "proj") if not getattr(weights, k)]
    if cfg.lora.enabled() and not weights.lora:
        missing.append("--set weights.lora=DIR")
    return missing


def check_devices(source: ModelSource) -> None:
    """Exit with one line when `device` or `vision_device` names a device this machine does not have."""
    for flag, value in (("--device", source.device), ("--vision-device", source.vision_device)):
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


def _check_alone(source: ModelSource) -> None:
    """What the source says by itself: devices this machine has, and one source of the model."""
    check_devices(source)
    if source.checkpoint and source.preset:
        raise SystemExit(
            f"--checkpoint and --preset {source.preset}: give one; a checkpoint's config already names its model"
        )


def _check_weight_paths(cfg: ModelConfig, source: ModelSource) -> None:
    """Each weight path is there and of the right kind (a file, or the folder --llm and --blip2-hf
    name), said before anything loads, with where the path came from when no flag gave it."""
    for name, flag, folder in (
        ("eva_vit", "--eva-vit", False),
        ("blip2", "--blip2", False),
        ("proj", "--proj", False),
        ("llm", "--llm", True),
        ("blip2_hf", "--blip2-hf", True),
        ("lora", "--set weights.lora", True),
    ):
        path = getattr(cfg.weights, name)
        if not path:
            continue
        given = getattr(source, name, None) == path or name in ("proj", "lora")
        origin = (
            "" if given else f" (named by the {'checkpoint' if source.checkpoint else 'preset'}; give {flag})"
        )
        if not os.path.exists(path):
            raise SystemExit(f"{flag} {path}: no such file or folder{origin}")
        if folder and not os.path.isdir(path):
            raise SystemExit(f"{flag} {path}: expected a Hugging Face model folder, got a file{origin}")
        if not folder and os.path.isdir(path):
            hint = " (for a run folder, use --checkpoint)" if flag == "--proj" else origin
            raise SystemExit(f"{flag} {path}: expected a weight file, got a folder{hint}")


def _refuse_random_parts(cfg: ModelConfig, source: ModelSource, why: str, warn: bool) -> None:
    missing = missing_weight_flags(cfg)
    if not missing:
        return
    if not source.allow_random_weights:
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
