"""The typed config tree: the single source of truth for sizes, files, precision, data and training.

Configs are plain dataclasses, one per component; `Config` nests them all (the data part is
`mgpt4.data.config.DataConfig`). They are built from dicts and overridden with `--set a.b.c=value` by
`mgpt4.strict_config`, which fails on any unknown or mistyped key with its dotted path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mgpt4.data.config import DataConfig
from mgpt4.strict_config import ConfigError

# Precision names used across the config, and the torch dtypes they stand for.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")

# The official EVA ViT-g builder hard-codes this ratio and takes int(width * ratio) as the MLP width.
OFFICIAL_VIT_MLP_RATIO = 4.3637


@dataclass
class VisionConfig:
    """EVA ViT (timm `Eva`) followed by `ln_vision`."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1408
    depth: int = 39
    heads: int = 16
    # None reproduces the official builder: int(width * 4.3637), which is 6144 for ViT-g.
    mlp_dim: int | None = None
    ln_eps: float = 1e-6
    ln_vision_eps: float = 1e-5

    def resolved_mlp_dim(self) -> int:
        return self.mlp_dim if self.mlp_dim is not None else int(self.width * OFFICIAL_VIT_MLP_RATIO)

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass
class QFormerConfig:
    """BLIP-2 Q-Former (transformers `Blip2QFormerModel`, queries only)."""

    num_query_tokens: int = 32
    width: int = 768
    depth: int = 12
    heads: int = 12
    ffn_dim: int = 3072
    cross_attention_freq: int = 2
    ln_eps: float = 1e-12


@dataclass
class LLMConfig:
    """LLaMA-family decoder (transformers `LlamaForCausalLM`).

    When `WeightsConfig.llm` names a folder, its `config.json` must agree with these sizes; the
    loader says which field differs.
    """

    vocab_size: int = 32000
    hidden_size: int = 5120
    intermediate_size: int = 13824
    num_layers: int = 40
    num_heads: int = 40
    num_kv_heads: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    bos_token_id: int = 1
    eos_token_id: int = 2


@dataclass
class PrecisionConfig:
    """Parameter dtype of each part: fp32, bf16 or fp16."""

    vit: str = "bf16"
    qformer: str = "bf16"
    proj: str = "fp32"
    llm: str = "bf16"


@dataclass
class TextConfig:
    """How captions and instructions become token sequences (see the reference's forward pass)."""

    max_txt_len: int = 32
    end_sym: str = "\n"
    # Stage 2 wraps each instruction into this template; an empty list means stage 1 (no prompt).
    prompt_template: str = "###Human: {} ###Assistant: "
    instructions: list[str] = field(default_factory=list)
    # Pad every answer to max_txt_len so that every batch has the same shapes (CUDA-graph friendly).
    pad_to_max_len: bool = True


@dataclass
class WeightsConfig:
    """Local paths of the weight files; None leaves that part randomly initialised."""

    eva_vit: str | None = None  # eva_vit_g.pth
    blip2: str | None = None  # blip2_pretrained_flant5xxl.pth: ln_vision, Q-Former, query tokens
    blip2_hf: str | None = None  # a Hugging Face BLIP-2 folder, instead of the two above
    llm: str | None = None  # a Hugging Face LLaMA/Vicuna folder (weights and tokenizer)
    tokenizer: str | None = None  # defaults to `llm`
    proj: str | None = None  # a MiniGPT-4 checkpoint holding llama_proj.*


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    # "sdpa", "eager" or "flash_attention_2" (CUDA, flash-attn installed): the LLM's attention. Packed
    # rows use transformers' packed-sequence path under each: a block mask, or FlashAttention's varlen.
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        for name in ("vit", "qformer", "proj", "llm"):
            value = getattr(self.precision, name)
            if value not in DTYPES:
                raise ConfigError(f"model.precision.{name}: expected one of {tuple(DTYPES)}, got {value!r}")
        v = self.vision
        if v.image_size % v.patch_size:
            raise ConfigError(
                f"model.vision.image_size: {v.image_size} is not a multiple of patch_size {v.patch_size}"
            )
        if v.width % v.heads:
            raise ConfigError(f"model.vision.width: {v.width} is not divisible by heads {v.heads}")
        if self.qformer.width % self.qformer.heads:
            raise ConfigError(
                f"model.qformer.width: {self.qformer.width} is not divisible by heads {self.qformer.heads}"
            )
        if self.llm.hidden_size % self.llm.num_heads:
            raise ConfigError(
                f"model.llm.hidden_size: {self.llm.hidden_size} is not divisible by num_heads {self.llm.num_heads}"
            )
        if self.text.instructions and "{}" not in self.text.prompt_template:
            raise ConfigError("model.text.prompt_template: must contain '{}' where the instruction goes")
        for i, ins in enumerate(self.text.instructions):
            if ins.count("<ImageHere>") != 1:
                raise ConfigError(
                    f"model.text.instructions[{i}]: must contain '<ImageHere>' exactly once, got {ins!r}"
                )
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ConfigError(
                f"model.attn_implementation: expected one of {ATTN_IMPLEMENTATIONS}, got {self.attn_implementation!r}"
            )


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class OptimConfig:
    """AdamW on the trainable set; linear warmup from warmup_lr, then cosine from lr to min_lr over the run."""

    lr: float = 1e-4
    min_lr: float = 8e-5
    warmup_lr: float = 1e-6
    warmup_steps: int = 5000
    weight_decay: float = 0.05  # on weights only; biases and norms get none, as the official
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 0.0  # 0: no clipping (the official recipe clips nothing)


@dataclass
class TrainConfig:
    steps: int = 20000  # optimizer steps
    # The batch over all ranks and accumulation steps. When set, the per-rank micro batch
    # (data.batch_size) is derived from it and the world size; None keeps data.batch_size.
    global_batch_size: int | None = None
    grad_accum: int = 1
    precision: str = "bf16"  # the engine's mixed precision: bf16, fp16 (GPU only) or fp32
    seed: int = 42
    output_dir: str = "outputs/run"
    save_every: int = 1000  # steps; a checkpoint is also written at the end
    keep_last: int = 2  # complete checkpoints kept; older ones are deleted after a newer one is complete
    log_every: int = 10
    sample_every: int = 0  # steps between generated captions in TensorBoard; 0 = only at the end
    num_sample_images: int = 4
    # A device's dense peak TFLOP/s for MFU; None looks the device up (or measures the CPU).
    peak_tflops: float | None = None
    # Minutes before a hung collective becomes an error: a long limit while weights load and data
    # workers start, a short one from the first step on, so a dead rank ends the job in minutes.
    startup_timeout_min: float = 60.0
    comm_timeout_min: float = 10.0
    # End this run after this step with a checkpoint; the schedule still spans `steps` (for tests
    # and planned interruptions). None runs to `steps`.
    stop_at: int | None = None
    # Generate the tiny weights and the synthetic data into the cache when missing (the demo recipes).
    demo_assets: bool = False


@dataclass
class Config:
    """The whole tree: what a recipe returns, what --dry-run prints and what a checkpoint stores."""

    recipe: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        self.model.validate()
        self.data.validate("data")
        t = self.train
        if t.precision not in DTYPES:
            raise ConfigError(f"train.precision: expected one of {tuple(DTYPES)}, got {t.precision!r}")
        for name in ("steps", "grad_accum", "save_every", "log_every", "keep_last"):
            if getattr(t, name) < 1:
                raise ConfigError(f"train.{name}: expected a positive integer, got {getattr(t, name)!r}")
        if self.data.image_size != self.model.vision.image_size:
            raise ConfigError(
                f"data.image_size ({self.data.image_size}) must equal model.vision.image_size "
                f"({self.model.vision.image_size})"
            )
        shortest = 1 + self.model.qformer.num_query_tokens + self.model.text.max_txt_len
        if self.data.packs() and self.data.pack_length < shortest:
            raise ConfigError(
                f"data.pack_length: {self.data.pack_length} tokens cannot hold a sample of BOS + "
                f"{self.model.qformer.num_query_tokens} queries + max_txt_len {self.model.text.max_txt_len} = {shortest}"
            )
        o = self.optim
        if not 0 <= o.min_lr <= o.lr:
            raise ConfigError(f"optim.min_lr: expected 0 <= min_lr <= lr ({o.lr}), got {o.min_lr}")
