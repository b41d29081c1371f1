"""The bytes one training forward keeps for backward: what autograd saves, per micro-batch, from the config.

Only the LLM and the projection keep activations: the frozen vision path runs without autograd
(`MiniGPT4.image_features`), and a frozen Linear keeps only its own weight (the gradient it passes on
needs the weight, not its input). Per token of every decoder layer of a LLaMA-style LLM (transformers'
`LlamaDecoderLayer` under SDPA, the layout the HF decoders share) autograd keeps, in the LLM's dtype
unless said:

    two RMSNorm inputs, cast to fp32 (2 x hidden x 4 bytes) and their fp32 1/rms (2 x 4 bytes)
    the attention's query, key, value and output (4 x heads x head_dim; key and value repeated to all
        heads when a mask is present, which transformers does for SDPA with a mask)
    the attention's fp32 log-sum-exp (heads x 4 bytes)
    the MLP's gate, act(gate) and up projections (3 x intermediate)

plus, per layer, the SDPA attention mask of padded rows (rows x L x L) or, under eager
attention, the query, key and value, and the softmax output in fp32 and in the LLM's dtype (rows x heads
x L x L each), and no mask; FlashAttention-2 takes no mask and keeps key and value at their own heads.
Packed rows under SDPA keep the attention's tensors in the per-sample layout (samples x their length, key
and value at their own heads) and no mask, as `mgpt4.model.packing.packed_sdpa_attention` runs it. With
gradient checkpointing each layer keeps its input only (hidden, in the LLM's dtype) and recomputes the
rest in the backward. Once per forward: the final norm's fp32 input and 1/rms, the rotary cos and sin
(rows x L x head_dim each, one row for padded batches: the positions are shared), the loss's fp32
log-softmax (tokens x vocab) and int64 labels, the projection's input (samples x image tokens x width),
and for packed rows the int64 gather index (tokens). Checked against `saved_tensors_hooks` on the tiny and
small configs (`tests/test_plan.py`); the measured structure is transformers 5's.
"""

from __future__ import annotations

from dataclasses import dataclass

FP32 = 4
INT64 = 8


@dataclass(frozen=True)
class LLMShape:
    """What the activation count needs of the LLM (from its Hugging Face config)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, hf) -> LLMShape:
        heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
        return cls(
            hidden=hf.hidden_size,
            intermediate=hf.intermediate_size,
            layers=hf.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            vocab=hf.vocab_size,
        )


@dataclass(frozen=True)
class Batch:
    """One micro-batch as the LLM sees it: `rows` rows of `length` tokens (padded: one sample a row;
    packed: `samples` samples laid side by side), and the projection's input per sample."""

    rows: int
    length: int
    samples: int
    packed: bool
    image_tokens: int
    image_width: int
    # A packed sample's length in the per-sample layout (context + max_txt_len): where SDPA computes
    # each sample's own attention block (`mgpt4.model.packing.packed_sdpa_attention`).
    sample_length: int = 0


def layer_bytes(s: LLMShape, b: Batch, dtype_bytes: int, attn: str, checkpointing: bool) -> int:
    """Bytes one decoder layer keeps for backward."""
    tokens = b.rows * b.length
    if checkpointing:
        return tokens * s.hidden * dtype_bytes
    q = s.heads * s.head_dim
    kv = (s.kv_heads if attn == "flash_attention_2" else s.heads) * s.head_dim
    norms = 2 * (s.hidden * FP32 + FP32)
    mlp = 3 * s.intermediate * dtype_bytes
    square = b.rows * b.length * b.length
    if attn == "eager":
        # The fp32 softmax and its copy in the LLM's dtype (the same tensor when that is fp32).
        probs = square * s.heads * (FP32 + (dtype_bytes if dtype_bytes != FP32 else 0))
        return tokens * (norms + mlp) + (q + 2 * kv) * dtype_bytes * tokens + probs
    if b.packed and attn == "sdpa":
        # Per sample, without a mask: SDPA keeps the gathered query, key and value (key and value at
        # their own heads: no mask, so SDPA takes the groups itself), its output and log-sum-exp.
        per_sample = b.samples * b.sample_length
        attention = per_sample * ((2 * q + 2 * s.kv_heads * s.head_dim) * dtype_bytes + s.heads * FP32)
        return tokens * (norms + mlp) + attention
    attention = tokens * ((2 * q + 2 * kv) * dtype_bytes + s.heads * FP32)
    mask = 0 if attn == "flash_attention_2" else square * dtype_bytes
    return tokens * (norms + mlp) + attention + mask


def activation_bytes(
    s: LLMShape, b: Batch, dtype_bytes: int, proj_bytes: int, attn: str = "sdpa", checkpointing: bool = False
) -> int:
    """Bytes one training forward of micro-batch `b` keeps for backward: the LLM computing in
    `dtype_bytes`-wide floats, the projection in `proj_bytes` (the engine's dtype in training)."""
    tokens = b.rows * b.length
    once = tokens * (s.hidden * FP32 + FP32)  # the final norm
    once += tokens * (s.vocab * FP32 + INT64) + FP32  # fp32 log-softmax, labels, the loss's total weight
    once += b.samples * b.image_tokens * b.image_width * proj_bytes
    if not checkpointing:  # the rotary tables live inside the checkpointed layers otherwise
        once += 2 * (b.rows if b.packed else 1) * b.length * s.head_dim * dtype_bytes
    if b.packed:
        once += tokens * INT64  # the rows' gather index
        if attn == "sdpa":
            once += b.samples * b.sample_length * INT64  # and the per-sample attention's
    return once + s.layers * layer_bytes(s, b, dtype_bytes, attn, checkpointing)
