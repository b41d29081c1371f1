"""Packed rows: the per-sample sequences of a batch laid side by side into fixed rows for the LLM.

The loader decides where each sample goes (`mgpt4.data.packing`: `pack_slot`, `pack_pos`, int64
[rows, length]); here the model only gathers its per-sample sequences into that layout. The LLM then
gets `position_ids` that restart at 0 for each sample and no attention mask, which is transformers'
packed-sequence format: under SDPA or eager attention it builds a block-diagonal causal mask from the
position ids (`masking_utils.find_packed_sequence_indices`), and under FlashAttention-2 it runs the
varlen kernel on the same boundaries, so attention never crosses samples. Labels never cross either:
every sample starts with its context (BOS, prompt, image tokens: `mgpt4.model.layout`), whose labels
are ignored, so the shifted loss never asks one sample's last token to predict the next sample. The loss is the mean over the answer tokens of all packed samples,
the same mean the unpacked batch takes (the official loss).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def pack_sequences(
    inputs: torch.Tensor, labels: torch.Tensor, pack_slot: torch.Tensor, pack_pos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather per-sample sequences into packed rows.

    inputs [N, T, H] and labels [N, T]: the unpacked batch (`MiniGPT4.build_inputs`), sample n in row n.
    pack_slot / pack_pos [R, L]: the sample and the position in it of each packed position (-1 / 0 for
    padding). Returns (inputs_embeds [R, L, H], position_ids [R, L], labels [R, L]); padding gets zero
    embeddings, position 0 and the ignored label. Static shapes; the gradient flows back to `inputs`.
    """
    n, t, h = inputs.shape
    if pack_slot.shape != pack_pos.shape or pack_slot.dim() != 2:
        raise ValueError(
            f"pack_slot and pack_pos must both be [rows, length], got {list(pack_slot.shape)}, {list(pack_pos.shape)}"
        )
    pack_slot = pack_slot.to(inputs.device)
    pack_pos = pack_pos.to(inputs.device)
    pad = pack_slot < 0
    # One extra row at index n * t stands for padding: zeros, label ignored.
    index = torch.where(pad, n * t, pack_slot * t + pack_pos)
    flat = torch.cat([inputs.reshape(n * t, h), inputs.new_zeros(1, h)])
    flat_labels = torch.cat([labels.reshape(n * t), labels.new_full((1,), IGNORE_INDEX)])
    positions = pack_pos.masked_fill(pad, 0)
    return flat[index], positions, flat_labels[index]
