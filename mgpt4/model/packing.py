"""Packed rows: the per-sample sequences of a batch laid side by side into fixed rows for the LLM.

The loader decides where each sample goes (`mgpt4.data.packing`: `pack_slot`, `pack_pos`, int64
[rows, length]); here the model gathers its per-sample sequences into that layout. The LLM gets
`position_ids` that restart at 0 for each sample and no attention mask (transformers' packed-sequence
format), and attention never crosses samples on any backend:

- SDPA (the default, CPU and CUDA): the LLM's attention runs `packed_sdpa_attention`, which computes each
  sample's own causal block only. Every attention layer gathers the row's queries, keys and values back
  into the per-sample layout [samples, length] (the unpacked batch's), runs SDPA with `is_causal` on it
  and scatters the result back into the rows: the linear layers see no padding, and attention costs its
  samples' blocks, not the row's square. Causality alone keeps a sample's queries off the positions
  past its end, so those positions may hold anything and no mask is built.
- FlashAttention-2 (`model.attn_implementation=flash_attention_2`): transformers runs the varlen kernel
  on the boundaries it finds in the position ids, which again computes the samples' blocks only.
- eager (the reference implementation): transformers builds a block-diagonal causal mask from the
  position ids (`masking_utils.find_packed_sequence_indices`) and computes the whole row, masked.

Labels never cross either: every sample starts with its context (BOS, prompt, image tokens:
`mgpt4.model.layout`), whose labels are ignored, so the shifted loss never asks one sample's last token to
predict the next sample. The loss is the mean over the answer tokens of all packed samples, the same mean
the unpacked batch takes (the official loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

IGNORE_INDEX = -100
# The LLM's attention implementation while it trains on packed rows: SDPA, plus the per-sample path when
# the call carries a packing (`PackedRows.attention_kwargs`); registered with transformers below.
PACKED_SDPA = "mgpt4_packed_sdpa"


@dataclass(frozen=True)
class PackedRows:
    """A packed batch for the LLM, from `pack_sequences`.

    inputs_embeds [R, L, H], position_ids [R, L], labels [R, L]: the rows. to_samples int64 [N, T]: for
    position t of sample n, its flat index in the rows (r * L + l); positions past the sample's end
    point at index 0 (their outputs are dropped, and causality keeps them out of every kept query).
    to_rows int64 [R, L]: for each row position, its flat index n * T + t in the per-sample layout, or
    N * T for row padding (a zero output).
    """

    inputs_embeds: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    to_samples: torch.Tensor
    to_rows: torch.Tensor

    def attention_kwargs(self) -> dict[str, torch.Tensor]:
        """What `packed_sdpa_attention` reads; transformers passes a model call's extra keyword arguments
        down to every attention layer."""
        return {"packed_to_samples": self.to_samples, "packed_to_rows": self.to_rows}


def pack_sequences(
    inputs: torch.Tensor, labels: torch.Tensor, pack_slot: torch.Tensor, pack_pos: torch.Tensor
) -> PackedRows:
    """Gather per-sample sequences into packed rows.

    inputs [N, T, H] and labels [N, T]: the unpacked batch (`MiniGPT4.build_inputs`), sample n in row n.
    pack_slot / pack_pos [R, L]: the sample and the position in it of each packed position (-1 / 0 for
    padding). Padding gets zero embeddings, position 0 and the ignored label. Static shapes; the gradient
    flows back to `inputs`. ValueError for layouts of other shapes.
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
    to_rows = torch.where(pad, n * t, pack_slot * t + pack_pos)
    flat = torch.cat([inputs.reshape(n * t, h), inputs.new_zeros(1, h)])
    flat_labels = torch.cat([labels.reshape(n * t), labels.new_full((1,), IGNORE_INDEX)])
    # The inverse map; a slot position that is in no row (past its sample's end, or an empty slot) keeps 0.
    to_samples = torch.zeros(n * t + 1, dtype=torch.long, device=inputs.device)
    to_samples[to_rows.reshape(-1)] = torch.arange(to_rows.numel(), device=inputs.device)
    return PackedRows(
        inputs_embeds=flat[to_rows],
        position_ids=pack_pos.masked_fill(pad, 0),
        labels=flat_labels[to_rows],
        to_samples=to_samples[: n * t].reshape(n, t),
        to_rows=to_rows,
    )


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    packed_to_samples: torch.Tensor | None = None,
    packed_to_rows: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention; on packed rows (`PackedRows.attention_kwargs` given), each sample's
    own causal block only.

    query [R, Hq, L, D], key / value [R, Hkv, L, D] (the rows) -> [R, L, Hq, D], as every transformers
    attention function returns; grouped-query heads, scaling and dropout as transformers' SDPA does them
    (`sdpa_attention_forward` runs on the per-sample layout [N, H, T, D]). The mask that transformers
    built from the packed position ids is not needed here and is not read.
    """
    if packed_to_samples is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows, heads, length, _ = query.shape
    n, t = packed_to_samples.shape
    where = packed_to_samples.reshape(-1)

    def per_sample(x: torch.Tensor) -> torch.Tensor:  # [R, h, L, d] -> [N, h, T, d]
        flat = x.transpose(1, 2).reshape(rows * length, x.shape[1], x.shape[3])
        return flat[where].reshape(n, t, x.shape[1], x.shape[3]).transpose(1, 2)

    out, _ = sdpa_attention_forward(
        module, per_sample(query), per_sample(key), per_sample(value), None, is_causal=True, **kwargs
    )  # [N, T, Hq, D]
    flat = out.reshape(n * t, heads, out.shape[-1])
    flat = torch.cat([flat, flat.new_zeros(1, heads, flat.shape[-1])])
    return flat[packed_to_rows.reshape(-1)].reshape(rows, length, heads, out.shape[-1]), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
# Unpacked batches (validation, generation) get exactly SDPA's masks.
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)


def use_packed_attention(llm: torch.nn.Module) -> bool:
    """Switch an SDPA LLM to `PACKED_SDPA` (for good: without a packing it is SDPA) and say whether packed
    calls should pass `PackedRows.attention_kwargs`: yes under SDPA; no under FlashAttention-2 (its varlen
    kernel finds the samples in the position ids) or eager (a block-diagonal mask). Called before every
    training call, packed or not, so that all of a run's calls see one implementation (a compiled LLM
    then compiles once)."""
    config = llm.config
    if config._attn_implementation == "sdpa":
        llm.set_attn_implementation(PACKED_SDPA)
    return config._attn_implementation == PACKED_SDPA
