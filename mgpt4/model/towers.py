"""The general vision path's parts: a transformers vision tower (`model.vision.kind: hf`), the
token connectors other than the Q-Former, and the projectors (`model.projector`).

- `HFVisionTower`: CLIP / SigLIP / SigLIP2 / DINOv2 vision models (transformers `AutoModel` on the vision
  config of the folder), returning one hidden state (`model.vision.feature_layer`, LLaVA's
  `mm_vision_select_layer`). Its weights come from the folder in the load step
  (`mgpt4.model.loading.load_hf_tower`).
- `TimmVisionTower`: any timm ViT (`model.vision.kind: timm`, `timm.create_model` by name), returning
  the class token (where it has one) and the patch tokens of one block's output; its weights come
  from one file in the load step (`mgpt4.model.loading.load_timm_tower`).
- `connect_tokens`: drop the class token or not, then concatenate N adjacent tokens (the official
  LLaMA-2 variant's `encode_img`, N = 4) or keep every token.
- `build_projector`: `linear` (official `llama_proj`) or `mlp2x_gelu` (LLaVA-1.5's
  `mm_projector`: Linear, GELU, Linear; Liu et al. 2023, "Improved Baselines with Visual
  Instruction Tuning").
"""

from __future__ import annotations

import torch
from torch import nn

from mgpt4.config import ModelConfig, VisionConfig, timm_tower, tower_folder
from mgpt4.images import CLIP_MEAN, CLIP_STD
from mgpt4.tower_folder import NAFLEX
from mgpt4.tower_timm import create_timm_model


def naflex_inputs(x: torch.Tensor, patch: int) -> dict[str, torch.Tensor]:
    """Normalised images [B, C, S, S] -> SigLIP2's inputs: `pixel_values` [B, N, P*P*C], each patch's
    pixels row by row, channels last (the order of transformers' `convert_image_to_patches`),
    `pixel_attention_mask` [B, N] all ones (one square grid: no padding) and `spatial_shapes` [B, 2]."""
    bsz, ch, side, _ = x.shape
    g = side // patch
    patches = x.reshape(bsz, ch, g, patch, g, patch).permute(0, 2, 4, 3, 5, 1).reshape(bsz, g * g, -1)
    return {
        "pixel_values": patches,
        "pixel_attention_mask": torch.ones(bsz, g * g, dtype=torch.long, device=x.device),
        "spatial_shapes": torch.tensor([[g, g]] * bsz, dtype=torch.long, device=x.device),
    }


def renormalise(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) [1, 3, 1, 1], fp32, of the exact per-channel affine map from CLIP-normalised pixels
    (mgpt4's one image path) to pixels normalised with `mean` and `std`:
    x_tower = (x_clip * std_clip + mean_clip - mean) / std = x_clip * scale + shift.
    Constants, not buffers: no state-dict entry (loading stays strict on the tower's keys), and they
    survive a meta-device build."""
    clip_mean, clip_std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    mean_t, std_t = torch.tensor(mean), torch.tensor(std)
    return (clip_std / std_t).view(1, 3, 1, 1), ((clip_mean - mean_t) / std_t).view(1, 3, 1, 1)


class HFVisionTower(nn.Module):
    """A transformers vision model built from a tower folder's config (random weights until loaded).

    Its input is what mgpt4's one image path gives every model: RGB resized to the folder's image
    size and normalised with CLIP's mean and std (`mgpt4.images`, `mgpt4.data.transforms`). The
    tower's own mean and std (preprocessor_config.json) are applied here, in fp32, as the exact
    per-channel affine map from one normalisation to the other:
    x_tower = (x_clip * std_clip + mean_clip - mean) / std.
    SigLIP2 (NaFlex) gets the square as its processor would give it: flattened patches, the grid
    and a mask without padding (`naflex_inputs`).
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        from transformers import AutoModel

        t = tower_folder(cfg.folder, "model.vision.folder")
        # Its random init is overwritten by the load step; drawn aside so that the parts built after it
        # (the projector) start equal under ZeRO-2 and ZeRO-3, where transformers initialises the
        # tower under zero.Init and draws a different amount from the global generator.
        with torch.random.fork_rng(devices=[]):
            self.model = AutoModel.from_config(t.vision_config, attn_implementation="sdpa")
        self.feature_layer = cfg.feature_layer
        self.naflex, self.patch_size = t.model_type in NAFLEX, t.patch_size
        self._scale, self._shift = renormalise(t.mean, t.std)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised images [B, 3, S, S] -> hidden state `feature_layer`, [B, tokens, width]
        (`tokens` counts the class token where the tower has one)."""
        w = next(self.model.parameters())
        x = image.to(device=w.device, dtype=torch.float32)
        x = x * self._scale.to(x.device) + self._shift.to(x.device)
        x = x.to(w.dtype)
        if self.naflex:
            out = self.model(**naflex_inputs(x, self.patch_size), output_hidden_states=True)
        else:
            out = self.model(pixel_values=x, output_hidden_states=True)
        # hidden_states[0] is the embedding output; [k] is the k-th layer's output, [-1] the last's.
        return out.hidden_states[self.feature_layer]


class TimmVisionTower(nn.Module):
    """A timm ViT built by name (`timm.create_model(timm_name, pretrained=False, num_classes=0,
    **timm_kwargs)`; random weights until loaded from `model.weights.timm`).

    Its input is mgpt4's one image path (CLIP mean and std, the model's image size); the mean and std
    of timm's data config for the model (`resolve_model_data_config`) are applied here in fp32, as
    `HFVisionTower` applies a folder's. Its output is the class token (where the model has one) then
    the patch tokens; registers are dropped (no image content, and no connector expects them).
    `feature_layer` -1 (or the depth) is timm's `forward_features`: the last block's output through the
    model's final norm; another layer k is the k-th block's raw output (`forward_intermediates`, as
    LLaVA's penultimate layer `mm_vision_select_layer: -2`).
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        t = timm_tower(cfg)
        self.model = create_timm_model(cfg.timm_name, cfg.timm_kwargs)
        self.depth, self.has_cls, self.num_prefix = t.depth, t.has_cls, t.num_prefix_tokens
        # The block whose output is taken, counted from 0.
        self.block = cfg.feature_layer - 1 if cfg.feature_layer > 0 else t.depth + cfg.feature_layer
        self._scale, self._shift = renormalise(t.mean, t.std)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised images [B, 3, S, S] -> [B, tokens, width]: the class token (where the model
        has one), then the (S / patch)^2 patch tokens in row-major order."""
        w = next(self.model.parameters())
        x = image.to(device=w.device, dtype=torch.float32)
        x = (x * self._scale.to(x.device) + self._shift.to(x.device)).to(w.dtype)
        if self.block == self.depth - 1:
            tokens = self.model.forward_features(x)  # [B, prefix + patches, width], final norm applied
            prefix, patches = tokens[:, : self.num_prefix], tokens[:, self.num_prefix :]
        else:
            [out] = self.model.forward_intermediates(
                x,
                indices=[self.block],
                return_prefix_tokens=self.num_prefix > 0,  # (patches, prefix) then, else the patches
                norm=False,
                stop_early=True,
                output_fmt="NLC",
                intermediates_only=True,
            )
            patches, prefix = out if self.num_prefix > 0 else (out, None)
        # timm puts the class token first among the prefix tokens, registers after it.
        return torch.cat([prefix[:, :1], patches], dim=1) if self.has_cls else patches


def connect_tokens(cfg: ModelConfig, feats: torch.Tensor) -> torch.Tensor:
    """Tower tokens [B, T, C] -> image tokens for the projector (connectors concat and none): the class
    token dropped unless kept, then `concat_tokens` adjacent tokens (row-major, as the official LLaMA-2
    MiniGPT-4) concatenated into one: [B, T', C * N]."""
    if cfg.vision.has_cls() and not cfg.keeps_cls():
        feats = feats[:, 1:, :]
    if cfg.connector_kind() != "concat":
        return feats
    n = cfg.concat_tokens
    bsz, tokens, width = feats.shape
    return feats.reshape(bsz, tokens // n, width * n)


def build_projector(kind: str, in_width: int, out_width: int) -> nn.Module:
    """`linear`: Linear(in, out), the official `llama_proj`. `mlp2x_gelu`: Linear(in, out), GELU,
    Linear(out, out), LLaVA-1.5's projector (its weights `.0.*` and `.2.*`, as LLaVA names them)."""
    if kind == "linear":
        return nn.Linear(in_width, out_width)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(in_width, out_width), nn.GELU(), nn.Linear(out_width, out_width))
    raise ValueError(f"model.projector: unknown projector {kind!r}")


def projector_linears(proj: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    """The projector's first and last Linear (one and the same for `linear`): its in and out widths."""
    linears = [m for m in proj.modules() if isinstance(m, nn.Linear)]
    return linears[0], linears[-1]
