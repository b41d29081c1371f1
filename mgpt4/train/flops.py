"""Model FLOPs per training sample, counted from the config, and device peaks for MFU.

The LLM's sizes are those of the model that trains: its folder's config.json when `model.weights.llm`
names one (any Hugging Face decoder, grouped-query attention included), else the config's.

Counted: the forward of every part; the backward of the LLM, which computes activation gradients
only (its weights are frozen, so no weight gradients), to carry the gradient back to the
projection; and the projection's weight gradient. Recomputation from gradient checkpointing is not
counted (model FLOPs, not hardware FLOPs). A matmul of [m,k]x[k,n] is 2mkn FLOPs.

Unpacked batches count every position the LLM computes (the answer padded to max_txt_len, as the
official layout computes it). Packed rows count each sample's own tokens and attention, not the row's
padding; batches from a feature cache count no ViT or Q-Former (their cost is extraction's).
"""

from __future__ import annotations

import time

import torch

from mgpt4.config import ModelConfig
from mgpt4.model.llm import LLMSizes, llm_sizes, resolve_llm_config

# Dense bf16/fp16 tensor-core peaks in TFLOP/s, matched against torch.cuda.get_device_name().
DEVICE_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "A10G": 70.0,
    "A10": 125.0,
    "L4": 121.0,
    "V100": 125.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
}


def vit_flops(m: ModelConfig) -> float:
    v = m.vision
    n, w, f = v.num_tokens, v.width, v.resolved_mlp_dim()
    patch = 2 * (v.image_size // v.patch_size) ** 2 * w * 3 * v.patch_size**2
    per_layer = 2 * n * (4 * w * w + 2 * w * f) + 4 * n * n * w
    return patch + v.depth * per_layer


def qformer_flops(m: ModelConfig) -> float:
    q, v = m.qformer, m.vision
    if q is None:  # the LLaMA-2 variant only concatenates ViT tokens
        return 0.0
    nq, w, n = q.num_query_tokens, q.width, v.num_tokens
    total = 0.0
    for layer in range(q.depth):
        total += 2 * nq * 4 * w * w + 4 * nq * nq * w  # self-attention
        if layer % q.cross_attention_freq == 0:
            total += 2 * nq * 2 * w * w + 2 * n * 2 * v.width * w + 4 * nq * n * w  # cross-attention
        total += 2 * nq * 2 * w * q.ffn_dim  # query FFN
    return total


def llm_forward_flops(c: LLMSizes, seq_len: int) -> float:
    return llm_tokens_forward_flops(c, seq_len, seq_len * seq_len)


def llm_tokens_forward_flops(c: LLMSizes, tokens: float, square_tokens: float) -> float:
    """LLM forward FLOPs over sequences of `tokens` tokens in all, `square_tokens` being the sum of each
    sequence's length squared: attention is counted per sequence (QK^T and AV over the full square), so
    samples packed into one row count only their own attention, not the row's."""
    h, attn_width = c.hidden_size, c.num_heads * c.head_dim
    kv = c.num_kv_heads * c.head_dim
    per_token_layer = 2 * (2 * h * attn_width + 2 * h * kv + 3 * h * c.intermediate_size)
    return (
        c.num_layers * (tokens * per_token_layer + 4 * square_tokens * attn_width)
        + 2 * tokens * h * c.vocab_size
    )


def frozen_vision_flops(m: ModelConfig) -> float:
    """ViT and Q-Former forward per sample: the work a feature cache does once, outside the step."""
    return vit_flops(m) + qformer_flops(m)


def projection_flops(m: ModelConfig, llm: LLMSizes) -> float:
    """The projection's forward and weight gradient per sample."""
    n_img, width = m.image_token_shape()
    h = llm.hidden_size
    # mlp2x_gelu: a second Linear(h, h) after the first (LLaVA-1.5).
    macs = width * h + (h * h if m.projector == "mlp2x_gelu" else 0)
    return 2 * (2 * n_img * macs)


def train_flops_per_sample(
    m: ModelConfig, seq_len: int, llm: LLMSizes | None = None, cached: bool = False
) -> float:
    """FLOPs of one training sample of `seq_len` LLM tokens; `cached`: from a feature cache, without the
    vision path. `llm` defaults to the sizes of `resolve_llm_config(m)` (the folder's config.json when
    there is a folder)."""
    return train_flops(m, 1, seq_len, seq_len * seq_len, cached, llm)


def train_flops(
    m: ModelConfig,
    samples: float,
    tokens: float,
    square_tokens: float,
    cached: bool,
    llm: LLMSizes | None = None,
) -> float:
    """A step's model FLOPs from its exact counts (see `llm_tokens_forward_flops`)."""
    llm = llm or llm_sizes(resolve_llm_config(m))
    vision = 0.0 if cached else frozen_vision_flops(m)
    return samples * (vision + projection_flops(m, llm)) + 2 * llm_tokens_forward_flops(
        llm, tokens, square_tokens
    )


def device_peak_tflops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The table's peak for a CUDA device; for the CPU, a measured matmul peak with the calling thread's
    torch threads (the training step's: call it from the thread that runs the steps); None if unknown."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in DEVICE_PEAK_TFLOPS.items():
            if key in name:
                return peak if dtype != torch.float32 else peak / 2  # TF32 runs at half the bf16 rate
        return None
    return measure_matmul_tflops(dtype)


# Square matmul sizes the CPU peak is the best of: a 7B step's GEMMs are larger than the small size's,
# and a size cache-blocks and threads best at its own; the best of them bounds what a step's matmuls get.
PEAK_SIZES = (512, 1024, 2048)


def measure_matmul_tflops(
    dtype: torch.dtype = torch.float32,
    threads: int | None = None,
    sizes: tuple[int, ...] = PEAK_SIZES,
    seconds: float = 0.3,
) -> float:
    """Sustained square-matmul TFLOP/s of this CPU, the MFU denominator on CPU: the best over `sizes`,
    each timed for about `seconds`, in `dtype` with `threads` torch threads (default: the caller's
    `torch.get_num_threads()`). Measure the way the step runs, its dtype and its thread count: with
    fewer threads than the step the peak is too low, and MFU above 100%. The caller's thread count is
    restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    # A generator of its own: measuring leaves the global RNG (dropout's, restored on resume) untouched.
    g = torch.Generator().manual_seed(0)
    try:
        best = 0.0
        for size in sizes:
            a = torch.randn(size, size, dtype=dtype, generator=g)
            b = torch.randn(size, size, dtype=dtype, generator=g)
            torch.mm(a, b)  # warm: thread pool up, kernels chosen
            count, start = 0, time.perf_counter()
            while not count or time.perf_counter() - start < seconds:
                torch.mm(a, b)
                count += 1
            elapsed = time.perf_counter() - start
            best = max(best, 2 * size**3 * count / elapsed / 1e12)
            if elapsed / count > seconds / 4:  # a larger size would take seconds per matmul (slow dtypes)
                break
        return best
    finally:
        torch.set_num_threads(before)
