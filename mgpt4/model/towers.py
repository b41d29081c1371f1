"""The general vision path's parts: a transformers vision tower (`model.vision.kind: hf`), the
token connectors other than the Q-Former, and the projectors (`model.projector`).

- `HFVisionTower`: CLIP / SigLIP / DINOv2 vision models (transformers `AutoModel` on the vision
  config of the folder), returning one hidden state (`model.vision.feature_layer`, LLaVA's
  `mm_vision_select_layer`). Its weights come from the folder in the load step
  (`mgpt4.model.loading.load_hf_tower`).
- `connect_tokens`: drop the class token or not, then concatenate N adjacent tokens (the official
  LLaMA-2 variant's `encode_img`, N = 4) or keep every token.
- `build_projector`: `linear` (official `llama_proj`) or `mlp2x_gelu` (LLaVA-1.5's
  `mm_projector`: Linear, GELU, Linear; Liu et al. 2023, "Improved Baselines with Visual
  Instruction Tuning").
"""

from __future__ import annotations

import torch
from torch import nn

from mgpt4.config import ModelConfig, VisionConfig, tower_folder
from mgpt4.images import CLIP_MEAN, CLIP_STD


class HFVisionTower(nn.Module):
    """A transformers vision model built from a tower folder's config (random weights until loaded).

    Its input is what mgpt4's one image path gives every model: RGB resized to the folder's image
    size and normalised with CLIP's mean and std (`mgpt4.images`, `mgpt4.data.transforms`). The
    tower's own mean and std (preprocessor_config.json) are applied here, in fp32, as the exact
    per-channel affine map from one normalisation to the other:
    x_tower = (x_clip * std_clip + mean_clip - mean) / std.
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
        clip_mean, clip_std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
        mean, std = torch.tensor(t.mean), torch.tensor(t.std)
        # Constants, not buffers: no state-dict entry (loading stays strict on the folder's keys), and
        # they survive a meta-device build.
        self._scale = (clip_std / std).view(1, 3, 1, 1)
        self._shift = ((clip_mean - mean) / std).view(1, 3, 1, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised images [B, 3, S, S] -> hidden state `feature_layer`, [B, tokens, width]
        (`tokens` counts the class token where the tower has one)."""
        w = next(self.model.parameters())
        x = image.to(device=w.device, dtype=torch.float32)
        x = x * self._scale.to(x.device) + self._shift.to(x.device)
        out = self.model(pixel_values=x.to(w.dtype), output_hidden_states=True)
        # hidden_states[0] is the embedding output; [k] is the k-th layer's output, [-1] the last's.
        return out.hidden_states[self.feature_layer]


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
