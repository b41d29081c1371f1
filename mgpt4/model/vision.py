"""The frozen vision path's first half: EVA ViT-g (timm `Eva`) and `ln_vision`."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.models.eva import Eva
from torch import nn

from mgpt4.config import VisionConfig


def build_eva_vit(cfg: VisionConfig) -> Eva:
    """timm's EVA with the official ViT-g layout: abs pos emb, q/v bias only, no final norm, no head.

    Its state dict keys are exactly those of the released `eva_vit_g.pth`.
    """
    mlp_dim = cfg.resolved_mlp_dim()
    # timm takes a ratio and truncates width * ratio; the half keeps float error from losing one unit.
    mlp_ratio = (mlp_dim + 0.5) / cfg.width
    vit = Eva(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.width,
        depth=cfg.depth,
        num_heads=cfg.heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=True,
        qkv_fused=True,
        num_classes=0,
        global_pool="",
        use_abs_pos_emb=True,
        use_rot_pos_emb=False,
        norm_layer=partial(nn.LayerNorm, eps=cfg.ln_eps),
        use_post_transformer_norm=False,
        use_fc_norm=False,
    )
    if cfg.depth and vit.blocks[0].mlp.fc1.out_features != mlp_dim:
        raise AssertionError(f"timm built MLP width {vit.blocks[0].mlp.fc1.out_features}, expected {mlp_dim}")
    return vit


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back, as the official `ln_vision` does under fp16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def interpolate_pos_embed(pos_embed: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Resize a [1, 1 + n*n, C] position embedding to `num_patches` patches (bicubic, CLS kept)."""
    cls_pos, grid = pos_embed[:, :1], pos_embed[:, 1:]
    old = round(grid.shape[1] ** 0.5)
    new = round(num_patches**0.5)
    if old * old != grid.shape[1] or new * new != num_patches:
        raise ValueError(f"pos_embed grid {grid.shape[1]} or target {num_patches} is not a square")
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)
    return torch.cat([cls_pos, grid], dim=1)
