"""The typed config tree: the single source of truth for sizes, files, precision and text handling.

Configs are plain dataclasses. `from_dict` builds one from nested dicts and fails on any unknown or
mistyped key with the dotted path of the field, so a typo in a recipe or an override never passes
silently.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

T = TypeVar("T")

# Precision names used across the config, and the torch dtypes they stand for.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# The official EVA ViT-g builder hard-codes this ratio and takes int(width * ratio) as the MLP width.
OFFICIAL_VIT_MLP_RATIO = 4.3637


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the dotted field path."""


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
    # "sdpa" or "eager": the LLM's attention implementation.
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
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ConfigError(
                f"model.attn_implementation: expected 'sdpa' or 'eager', got {self.attn_implementation!r}"
            )


# ---------------------------------------------------------------------------------------------
# Strict construction from dicts and dotted overrides.


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: unexpected value {value!r}")
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build dataclass `cls` from a nested dict; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = path or cls.__name__
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _parse_scalar(text: str) -> Any:
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError:
        lowered = text.lower()
        if lowered in ("none", "null"):
            return None
        if lowered in ("true", "false"):
            return lowered == "true"
        return text


def _override_dict(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.steps=100")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node: Any = data
        for i, part in enumerate(parts):
            # Lists are indexed by number: data.sources.0.shards=...
            index: Any = int(part) if isinstance(node, list) and part.isdigit() else part
            known = index in node if isinstance(node, dict) else isinstance(index, int) and index < len(node)
            if not isinstance(node, (dict, list)) or not known:
                raise ConfigError(f"override {key!r}: unknown key {'.'.join(parts[: i + 1])!r}")
            if i == len(parts) - 1:
                node[index] = _parse_scalar(raw)
            else:
                node = node[index]
    return data


def apply_overrides(cfg: T, overrides: list[str]) -> T:
    """Return a copy of `cfg` with `a.b.c=value` overrides applied (values parsed as JSON when they can be)."""
    return from_dict(type(cfg), _override_dict(to_dict(cfg), overrides))


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
    # Minutes before a hung collective becomes an error (DEEPSPEED_TIMEOUT).
    comm_timeout_min: int = 30
    # End this run after this step with a checkpoint; the schedule still spans `steps` (for tests
    # and planned interruptions). None runs to `steps`.
    stop_at: int | None = None
    # Generate the tiny weights and the synthetic data into the cache when missing (the demo recipes).
    demo_assets: bool = False


def _data_config_type():
    from mgpt4.data.config import DataConfig

    return DataConfig


@dataclass
class Config:
    """The whole tree: what a recipe returns, what --dry-run prints and what a checkpoint stores."""

    recipe: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: Any = field(default_factory=lambda: _data_config_type()())
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
        o = self.optim
        if not 0 <= o.min_lr <= o.lr:
            raise ConfigError(f"optim.min_lr: expected 0 <= min_lr <= lr ({o.lr}), got {o.min_lr}")


def config_from_dict(data: dict[str, Any]) -> Config:
    """Strictly build the whole tree (the data part is typed by mgpt4.data.config.DataConfig)."""
    data = dict(data)
    raw_data = data.pop("data", None)
    cfg = from_dict(Config, data)
    if raw_data is not None:
        cfg.data = from_dict(_data_config_type(), raw_data, "data")
    return cfg


def apply_config_overrides(cfg: Config, overrides: list[str]) -> Config:
    """`a.b.c=value` overrides on the whole tree; unknown keys fail with their dotted path."""
    return config_from_dict(_override_dict(to_dict(cfg), overrides)) if overrides else cfg
