"""A timm vision tower (`model.vision.kind: timm`), read without its weights.

What the config needs before any weight loads: the sizes of the model that `timm.create_model(name,
pretrained=False, num_classes=0, **kwargs)` builds (read from the built model, on the meta device, so
that a ViT-L costs no memory here), whether its tokens start with a class token, how many prefix
tokens (class token and registers) precede the patches, and the mean and std of timm's data config
for it (`timm.data.resolve_model_data_config`: the pretrained tag's, e.g. OpenAI CLIP's for
`vit_base_patch16_clip_224.openai`). Errors are one line naming the setting (ValueError; the config
turns them into ConfigError).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class TimmTower:
    """A timm tower's facts; the model itself is built again (on a real device) by `TimmVisionTower`."""

    name: str
    width: int
    depth: int
    heads: int
    mlp_dim: int
    patch_size: int
    image_size: int  # what its position embeddings are made for (square)
    has_cls: bool
    num_prefix_tokens: int  # the class token and any registers, before the patches
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def create_timm_model(name: str, kwargs: dict):
    """`timm.create_model(name, pretrained=False, num_classes=0, **kwargs)`: the architecture without its
    classifier head (a tower's tokens need none; a weight file's `head.*` keys are passed over). Nothing
    is downloaded: the weights come from `model.weights.timm` in the load step."""
    import timm

    return timm.create_model(name, pretrained=False, **{**kwargs, "num_classes": 0})


def _square(value: object, what: str, name: str) -> int:
    side = tuple(value) if isinstance(value, tuple | list) else (value, value)
    if len(side) != 2 or side[0] != side[1]:
        raise ValueError(f"timm_kwargs: the timm model {name} has {what} {value}; mgpt4 feeds square images")
    return int(side[0])


@functools.lru_cache(maxsize=16)
def _read(name: str, kwargs_json: str) -> TimmTower:
    import timm
    import torch
    from timm.data import resolve_model_data_config

    if not timm.is_model(name):
        raise ValueError(
            f"timm_name: {name!r} is not a timm architecture (timm {timm.__version__}; `timm.list_models('vit_*')` "
            "lists them)"
        )
    kwargs = json.loads(kwargs_json)
    if "num_classes" in kwargs:
        raise ValueError(
            "timm_kwargs.num_classes: a tower is built without its classifier head "
            "(num_classes=0); leave it out"
        )
    try:
        with torch.device("meta"):
            model = create_timm_model(name, kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:  # a kwarg the architecture refuses
        raise ValueError(
            f"timm_kwargs: timm.create_model({name!r}, **{kwargs}) fails: {(str(e).splitlines() or [repr(e)])[0]}"
        ) from None
    blocks = getattr(model, "blocks", None)
    patch_embed = getattr(model, "patch_embed", None)
    if not (hasattr(model, "forward_intermediates") and blocks is not None and patch_embed is not None):
        raise ValueError(
            f"timm_name: the timm model {name} ({type(model).__name__}) is not a ViT with patch tokens (blocks, "
            "patch_embed and forward_intermediates); mgpt4 reads a ViT's token sequence"
        )
    attn = getattr(blocks[0], "attn", None)
    linears = [m for m in blocks[0].mlp.modules() if isinstance(m, torch.nn.Linear)]
    data = resolve_model_data_config(model)
    return TimmTower(
        name=name,
        width=int(model.embed_dim),
        depth=len(blocks),
        heads=int(getattr(attn, "num_heads", 1)),
        mlp_dim=int(linears[0].out_features) if linears else 4 * int(model.embed_dim),
        patch_size=_square(patch_embed.patch_size, "patch size", name),
        image_size=_square(patch_embed.img_size, "image size", name),
        has_cls=getattr(model, "cls_token", None) is not None,
        num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 0)),
        mean=tuple(float(x) for x in data["mean"]),
        std=tuple(float(x) for x in data["std"]),
    )


def read_timm_tower(name: str, kwargs: dict | None = None) -> TimmTower:
    """The facts of timm's `name` built with `kwargs` (sizes, class token, data config); ValueError in
    one line, starting with the setting (`timm_name: ...`, `timm_kwargs: ...`), for an unknown name,
    kwargs it refuses, or a model that is not a ViT. Cached."""
    return _read(name, json.dumps(kwargs or {}, sort_keys=True))
