"""A Hugging Face vision tower folder (`model.vision.kind: hf`), read without its weights.

What the config needs before any weight loads: the vision model's config (from config.json, the
vision half of a CLIP, SigLIP or SigLIP2 folder), its sizes, whether its tokens start with a class token,
and the preprocessing of its preprocessor_config.json (image size, mean, std). Errors name the
folder and the file (ValueError; the config turns them into ConfigError naming the setting).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

# The towers mgpt4 reads, by the model_type of their vision config, and whether the sequence they
# return starts with a class token (SigLIP and SigLIP2 have none: they pool with an attention head).
TOWER_TYPES = {
    "clip_vision_model": True,
    "siglip_vision_model": False,
    "siglip2_vision_model": False,
    "dinov2": True,
}
# Towers that resize their position embeddings to any image size (DINOv2 is trained at 518 px and
# served at 224; SigLIP2 resizes its grid to each image's patches); the others must see the size
# their position embeddings were made for.
INTERPOLATING = ("dinov2", "siglip2_vision_model")
# SigLIP2 (NaFlex) takes each image as a sequence of flattened patches with its patch grid
# (`spatial_shapes`) and a padding mask; mgpt4 feeds it one square grid (`HFVisionTower`).
NAFLEX = ("siglip2_vision_model",)


@dataclass(frozen=True)
class TowerFolder:
    """A tower folder's facts: `vision_config` is the transformers config of its vision model."""

    folder: str
    vision_config: object
    model_type: str
    width: int
    depth: int
    heads: int
    mlp_dim: int
    patch_size: int
    image_size: int  # what the preprocessor feeds it (square)
    has_cls: bool
    two_tower: bool  # a CLIP or SigLIP folder, whose vision half is the tower
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def num_tokens(self) -> int:
        """Tokens per image in its hidden states: the patches, and the class token where it has one."""
        return (self.image_size // self.patch_size) ** 2 + int(self.has_cls)


def _side(value: object, where: str) -> int:
    """A preprocessor size (an int, {height, width} or {shortest_edge}) -> the square's side."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            if value["height"] != value["width"]:
                raise ValueError(f"{where}: {value} is not square; mgpt4 feeds square images")
            return int(value["height"])
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
    raise ValueError(f"{where}: expected an int, {{height, width}} or {{shortest_edge}}, got {value!r}")


def _naflex_side(pre: dict, patch_size: int, where: str) -> int:
    """The side of the square a SigLIP2 processor makes of a square image: the largest grid of whole
    patches within its `max_num_patches` (transformers' own `get_image_size_for_max_num_patches`)."""
    from transformers.models.siglip2.image_processing_siglip2 import get_image_size_for_max_num_patches

    most = pre.get("max_num_patches")
    if not (isinstance(most, int) and most >= 1) or pre.get("patch_size", patch_size) != patch_size:
        raise ValueError(
            f"{where}: expected a SigLIP2 preprocessor (max_num_patches, patch_size {patch_size}), got "
            f"max_num_patches={most!r}, patch_size={pre.get('patch_size')!r}"
        )
    side, _ = get_image_size_for_max_num_patches(1024, 1024, patch_size, most)  # any square: the same
    return int(side)


@functools.lru_cache(maxsize=16)
def _read(folder: str, mtime: float) -> TowerFolder:
    from transformers import AutoConfig

    config_path = os.path.join(folder, "config.json")
    pre_path = os.path.join(folder, "preprocessor_config.json")
    for path in (config_path, pre_path):
        if not os.path.isfile(path):
            raise ValueError(
                f"{folder}: no {os.path.basename(path)}; expected a transformers vision model folder"
            )
    try:
        cfg = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # an unknown model_type or a broken file: transformers' first line
        raise ValueError(
            f"{config_path}: not a transformers config: {(str(e).splitlines() or [repr(e)])[0]}"
        ) from None
    vision = getattr(cfg, "vision_config", None) or cfg
    model_type = getattr(vision, "model_type", "")
    if model_type not in TOWER_TYPES:
        raise ValueError(
            f"{config_path}: model_type {cfg.model_type!r} is not a vision tower mgpt4 reads; expected a "
            f"CLIP, SigLIP, SigLIP2 or DINOv2 folder (vision model types {sorted(TOWER_TYPES)})"
        )
    with open(pre_path) as f:
        pre = json.load(f)
    if model_type in NAFLEX:
        size = _naflex_side(pre, vision.patch_size, pre_path)
    elif pre.get("do_center_crop") and "crop_size" in pre:
        size = _side(pre["crop_size"], f"{pre_path}: crop_size")
    else:
        size = _side(pre.get("size"), f"{pre_path}: size")
    mean, std = pre.get("image_mean"), pre.get("image_std")
    for name, v in (("image_mean", mean), ("image_std", std)):
        if not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, int | float) for x in v)):
            raise ValueError(f"{pre_path}: {name}: expected 3 numbers (R, G, B), got {v!r}")
    if size % vision.patch_size:
        raise ValueError(
            f"{pre_path}: image size {size} is not a multiple of the patch size {vision.patch_size}"
        )
    if model_type not in INTERPOLATING and size != vision.image_size:
        raise ValueError(
            f"{pre_path}: image size {size}, but {config_path} has image_size {vision.image_size}, which "
            f"its position embeddings are made for"
        )
    mlp = getattr(vision, "intermediate_size", None) or int(
        vision.hidden_size * getattr(vision, "mlp_ratio", 4)
    )
    return TowerFolder(
        folder=folder,
        vision_config=vision,
        model_type=model_type,
        width=vision.hidden_size,
        depth=vision.num_hidden_layers,
        heads=vision.num_attention_heads,
        mlp_dim=mlp,
        patch_size=vision.patch_size,
        image_size=size,
        has_cls=TOWER_TYPES[model_type],
        two_tower=vision is not cfg,
        mean=tuple(float(x) for x in mean),
        std=tuple(float(x) for x in std),
    )


def read_tower_folder(folder: str) -> TowerFolder:
    """The facts of a tower folder (config.json + preprocessor_config.json); ValueError naming the file
    when it is missing, no supported vision tower, or inconsistent. Cached while the files are unchanged."""
    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: no such folder")
    stamp = max(
        (
            os.path.getmtime(os.path.join(folder, n))
            for n in ("config.json", "preprocessor_config.json")
            if os.path.isfile(os.path.join(folder, n))
        ),
        default=0.0,
    )
    return _read(os.path.abspath(folder), stamp)
