"""The typed config tree: the single source of truth for sizes, files, precision, data and training.

Configs are plain dataclasses, one per component; `Config` nests them all (the data part is
`mgpt4.data.config.DataConfig`). They are built from dicts and overridden with `--set a.b.c=value` by
`mgpt4.strict_config`, which fails on any unknown or mistyped key with its dotted path.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from mgpt4.data.config import DataConfig
from mgpt4.strict_config import ConfigError
from mgpt4.tower_folder import TowerFolder, read_tower_folder
from mgpt4.tower_timm import TimmTower, read_timm_tower

# Precision names used across the config, and the torch dtypes they stand for.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# What `model.precision.llm` may name besides DTYPES: the frozen LLM quantised by bitsandbytes as it is
# read from its folder (LLM.int8() or 4-bit NormalFloat, as QLoRA), computing in bf16. CUDA only.
QUANTIZED = ("int8", "nf4")

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")

# The official EVA ViT-g builder hard-codes this ratio and takes int(width * ratio) as the MLP width.
OFFICIAL_VIT_MLP_RATIO = 4.3637

# Without a Q-Former (the official LLaMA-2 MiniGPT-4) this many adjacent ViT patch tokens are
# concatenated into one image token.
PATCHES_PER_IMAGE_TOKEN = 4

# The conversation templates `model.text.template` may name (`mgpt4.model.templates` defines them).
TEMPLATE_NAMES = ("vicuna_v0", "llama2_chat", "chat_template")


# `model.vision.kind`: the official EVA ViT-g (timm `Eva` + `ln_vision`), a transformers vision model
# (CLIP, SigLIP, DINOv2) read from a local folder (`mgpt4.tower_folder`), or any timm ViT by its name,
# its weights a local file (`mgpt4.tower_timm`, `model.weights.timm`).
VISION_KINDS = ("eva_vit_g", "hf", "timm")
# `model.connector`: the BLIP-2 Q-Former (official), N adjacent tokens concatenated (the official
# LLaMA-2 variant, N = 4), or every token as it is.
CONNECTORS = ("qformer", "concat", "none")
# `model.projector`: one Linear (official `llama_proj`), or Linear-GELU-Linear as LLaVA-1.5's
# `mlp2x_gelu` (`llama_proj.0` and `llama_proj.2`).
PROJECTORS = ("linear", "mlp2x_gelu")
# The VisionConfig fields that describe EVA ViT-g only; with kind hf the folder gives the sizes.
EVA_ONLY = ("mlp_dim", "ln_eps", "ln_vision_eps")
# The VisionConfig sizes that a kind hf tower's folder (or a kind timm tower's built model) gives (left
# all at their defaults: read from it).
TOWER_SIZES = ("image_size", "patch_size", "width", "depth", "heads")


@dataclass
class VisionConfig:
    """The vision tower: EVA ViT (timm `Eva`) followed by `ln_vision`, or a transformers vision model.

    With `kind: hf` the sizes (image_size, patch_size, width, depth, heads) mirror the folder's
    config.json and preprocessor_config.json: left all at their defaults they are read from it when
    the config is validated, set they must agree with it (`hf_vision_config` writes them); mlp_dim,
    ln_eps and ln_vision_eps belong to EVA and stay unset. With `kind: timm` they mirror the model
    that `timm.create_model(timm_name, **timm_kwargs)` builds, the same way.
    """

    kind: str = "eva_vit_g"
    # kind hf: a local folder with config.json (a CLIP or SigLIP model, whose vision half is taken, or a
    # vision model such as DINOv2), preprocessor_config.json and the weights.
    folder: str | None = None
    # kind timm: the timm architecture (`vit_base_patch16_clip_224.openai`, `vit_so400m_patch14_siglip_384`;
    # the tag picks timm's data config, mean and std); built without its classifier head, weights from
    # model.weights.timm.
    timm_name: str | None = None
    # kind timm: keyword arguments of `timm.create_model` that change the architecture (img_size,
    # depth, ...), as a JSON object; they must match the weight file.
    timm_kwargs: dict[str, object] = field(default_factory=dict)
    # kind hf and timm: the hidden state the image tokens come from: -1 the last layer's output, -2
    # the one before (LLaVA), k > 0 the k-th layer's output. kind timm: the last block's output goes
    # through the model's final norm (timm's `forward_features`), the others are the blocks' raw
    # outputs (`forward_intermediates`). EVA ViT-g uses its last block (official).
    feature_layer: int = -1
    # Keep the class token (CLIP, DINOv2) among the image tokens; None: the Q-Former reads every token
    # (official), the other connectors drop it (the official LLaMA-2 variant, LLaVA).
    keep_cls: bool | None = None
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
        if self.kind == "hf" and self.folder:  # the tower folder's MLP width (FLOPs count it)
            return tower_folder(self.folder, "model.vision.folder").mlp_dim
        if self.kind == "timm" and self.timm_name:
            return timm_tower(self).mlp_dim
        return self.mlp_dim if self.mlp_dim is not None else int(self.width * OFFICIAL_VIT_MLP_RATIO)

    @property
    def num_tokens(self) -> int:
        """Tokens per image out of the tower: the patches and, for EVA, CLIP and DINOv2, a class token."""
        return (self.image_size // self.patch_size) ** 2 + int(self.has_cls())

    def has_cls(self) -> bool:
        """Whether the tower's tokens start with a class token (EVA, CLIP, DINOv2: yes; SigLIP: no). A
        hf folder not on this machine yet (a dry run) is taken to have one. A timm model: its own
        (registers, where it has them, are no image tokens: the tower drops them)."""
        if self.kind == "hf" and self.folder and os.path.isdir(self.folder):
            return tower_folder(self.folder, "model.vision.folder").has_cls
        if self.kind == "timm" and self.timm_name:
            return timm_tower(self).has_cls
        return True


def tower_folder(folder: str, key: str) -> TowerFolder:
    """`read_tower_folder`, its ValueError as a ConfigError naming `key`."""
    try:
        return read_tower_folder(folder)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None


def timm_tower(v: VisionConfig) -> TimmTower:
    """`read_timm_tower` of `model.vision.timm_name` and `timm_kwargs`, its ValueError as a ConfigError."""
    try:
        return read_timm_tower(v.timm_name or "", v.timm_kwargs)
    except ValueError as e:
        raise ConfigError(f"model.vision.{e}") from None


def timm_vision_config(
    name: str, kwargs: dict | None = None, feature_layer: int = -1, keep_cls: bool | None = None
) -> VisionConfig:
    """The `model.vision` of timm's `name` (built with `kwargs`): kind timm, its sizes read from the model."""
    v = VisionConfig(kind="timm", timm_name=name, timm_kwargs=dict(kwargs or {}))
    t = timm_tower(v)
    v.feature_layer, v.keep_cls = feature_layer, keep_cls
    v.image_size, v.patch_size, v.width, v.depth, v.heads = (
        t.image_size,
        t.patch_size,
        t.width,
        t.depth,
        t.heads,
    )
    return v


def hf_vision_config(folder: str, feature_layer: int = -1, keep_cls: bool | None = None) -> VisionConfig:
    """The `model.vision` of a transformers tower folder: kind hf, its sizes read from the folder."""
    t = tower_folder(folder, "model.vision.folder")
    return VisionConfig(
        kind="hf",
        folder=folder,
        feature_layer=feature_layer,
        keep_cls=keep_cls,
        image_size=t.image_size,
        patch_size=t.patch_size,
        width=t.width,
        depth=t.depth,
        heads=t.heads,
    )


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
    """The frozen decoder: any decoder-only Hugging Face causal LM (`mgpt4.model.llm`).

    With `model.weights.llm` set, the architecture and every size come from the folder's config.json:
    a field left None is read from there, and a field set here must agree with it (the loader names
    the one that differs; the official presets set their sizes, so a folder of another size is caught).
    Without a folder (random weights: tests, benchmarks) these fields build a `model_type` model; the
    sizes are then required, the rest default to LLaMA's values.
    """

    model_type: str | None = None  # config.json's model_type: llama, mistral, qwen2, ... (random: llama)
    vocab_size: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    max_position_embeddings: int | None = None
    rms_norm_eps: float | None = None
    rope_theta: float | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None


@dataclass
class PrecisionConfig:
    """Parameter dtype of each part: fp32, bf16 or fp16; the LLM also int8 or nf4 (`QUANTIZED`)."""

    vit: str = "bf16"
    qformer: str = "bf16"
    proj: str = "fp32"
    llm: str = "bf16"

    def llm_dtype(self) -> torch.dtype:
        """The LLM's floating dtype: its parameters', or for a quantised LLM the dtype it computes in
        and keeps its unquantised parts (embeddings, norms, output head) in: bf16."""
        return torch.bfloat16 if self.llm in QUANTIZED else DTYPES[self.llm]


def quantized_llm_refusal(cfg: ModelConfig) -> str | None:
    """Why `model.precision.llm` (int8 or nf4) cannot be honoured here, or None when it can."""
    name = cfg.precision.llm
    where = f"model.precision.llm={name}: quantises the frozen LLM with bitsandbytes,"
    if not cfg.weights.llm:
        return f"{where} as it is read from its folder; set model.weights.llm (random LLMs are not quantised)"
    if not torch.cuda.is_available():
        return f"{where} whose kernels need a CUDA GPU, and none is visible here; use bf16 (or fp32)"
    if importlib.util.find_spec("bitsandbytes") is None:
        return f"{where} which is not installed; pip install bitsandbytes (or mgpt4[lowmem]), or use bf16"
    return None


@dataclass
class TextConfig:
    """How captions and instructions become token sequences (see the reference's forward pass), and
    how the model is talked to (`mgpt4.model.templates`)."""

    max_txt_len: int = 32
    # Appended to every answer; None: the end of a reply in `template` ("###" for vicuna_v0, "</s>"
    # for llama2_chat, the tokenizer's EOS token for chat_template).
    end_sym: str | None = "\n"
    # Stage 2 wraps each instruction into this ("...{}..."); None: the instruction form of `template`.
    prompt_template: str | None = None
    # An empty list means stage 1 (no prompt).
    instructions: list[str] = field(default_factory=list)
    # Pad every answer to max_txt_len so that every batch has the same shapes (CUDA-graph friendly).
    pad_to_max_len: bool = True
    # The conversation of chat, the demo and generated samples: vicuna_v0, llama2_chat, or
    # chat_template (the chat template the LLM folder's tokenizer brings).
    template: str = "vicuna_v0"
    # BOS before the first text: true needs one, false never adds it, None adds the tokenizer's when
    # it has one (Qwen2's has none).
    add_bos: bool | None = None
    # Text that ends a reply besides EOS; None: the template's (`###` for the official two, as in the
    # official demo; none for chat_template).
    stop: list[str] | None = None


@dataclass
class WeightsConfig:
    """Local paths of the weight files; None leaves that part randomly initialised."""

    eva_vit: str | None = None  # eva_vit_g.pth
    blip2: str | None = None  # blip2_pretrained_flant5xxl.pth: ln_vision, Q-Former, query tokens
    blip2_hf: str | None = None  # a Hugging Face BLIP-2 folder, instead of the two above
    llm: str | None = None  # a Hugging Face decoder folder (config.json, weights and tokenizer)
    tokenizer: str | None = None  # defaults to `llm`
    proj: str | None = None  # a MiniGPT-4 checkpoint holding llama_proj.*
    # model.vision.kind timm: the tower's state dict in timm's names (.safetensors, or a torch file),
    # as timm saves it (a hub download's model.safetensors); its `head.*` keys are passed over.
    timm: str | None = None
    # A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) for model.lora:
    # what an mgpt4 LoRA checkpoint holds next to llama_proj.pth. None: fresh adapters (B = 0).
    lora: str | None = None
    # Files are read with torch.load(weights_only=True): tensors, numbers, strings and plain containers,
    # nothing that can run code. True also loads files that need full unpickling: only files you trust.
    allow_pickle: bool = False


# The LLaMA attention projections: the choice of LoRA's paper (q and v) that LLaVA's recipe widens.
LORA_TARGETS_DEFAULT = ("q_proj", "v_proj")


@dataclass
class LoraConfig:
    """LoRA adapters (PEFT) on the frozen LLM's linear layers, trained with the projection (stage 2).

    rank 0 is off: the official recipe, where only the projection trains. The update of a target
    layer is `(alpha / rank) * B @ A @ x` (Hu et al. 2021, "LoRA"; `peft.LoraConfig`); B starts at
    zero, so a run starts from the frozen LLM's outputs. Their learning rate is `optim.lora_lr`.
    """

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.05
    # Module names as PEFT matches them: a name ends with one of these (q_proj matches
    # model.layers.3.self_attn.q_proj). LLaMA: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj.
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS_DEFAULT))

    def enabled(self) -> bool:
        return self.rank > 0

    def validate(self, path: str = "model.lora") -> None:
        """ConfigError naming the field; a setting given while LoRA is off (rank 0) is refused, not ignored."""
        if self.rank < 0:
            raise ConfigError(f"{path}.rank: expected 0 (off) or a positive integer, got {self.rank!r}")
        if not self.enabled():
            default = LoraConfig()
            for f in ("alpha", "dropout", "target_modules"):
                if getattr(self, f) != getattr(default, f):
                    raise ConfigError(
                        f"{path}.{f} is set, but {path}.rank is 0 (LoRA off): set {path}.rank to enable "
                        "LoRA, or leave it out"
                    )
            return
        if not self.alpha > 0:
            raise ConfigError(f"{path}.alpha: expected a positive number, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{path}.dropout: expected 0 <= dropout < 1, got {self.dropout!r}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ConfigError(
                f'{path}.target_modules: expected a list of module names (e.g. ["q_proj", "v_proj"]), '
                f"got {self.target_modules!r}"
            )


def _check_tower(
    v: VisionConfig,
    t: Any,
    kind: str,
    source: str,
    owner: str,
    helper: str,
    giver: str,
    layers_of: str,
    unit: str,
    cls_owner: str,
) -> None:
    """A tower's `model.vision` against what its folder or built model `t` says (sizes, depth, class
    token): sizes left at their defaults are filled in from `t`; the rest fail in one line, worded with
    `source` ("the tower folder X"), `giver` ("tower folder") and `cls_owner`."""
    default = VisionConfig()
    if all(getattr(v, n) == getattr(default, n) for n in TOWER_SIZES):
        for name in TOWER_SIZES:
            setattr(v, name, getattr(t, name))
    for name in TOWER_SIZES:
        if getattr(v, name) != getattr(t, name):
            raise ConfigError(
                f"model.vision.{name}: {getattr(v, name)}, but {source} has "
                f"{getattr(t, name)}; leave the sizes to the {owner} (`{helper}`)"
            )
    for name in EVA_ONLY:
        if getattr(v, name) != getattr(default, name):
            raise ConfigError(
                f"model.vision.{name} is an EVA ViT-g setting; with model.vision.kind {kind} the {giver} "
                "gives the architecture: leave it out"
            )
    if not 1 <= abs(v.feature_layer) <= t.depth:
        raise ConfigError(
            f"model.vision.feature_layer: {v.feature_layer} is outside {layers_of} {t.depth} {unit} "
            f"(-{t.depth}..-1 from the last, 1..{t.depth} from the first)"
        )
    if v.keep_cls and not t.has_cls:
        raise ConfigError(f"model.vision.keep_cls: {cls_owner} has no class token")


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    # None: no Q-Former, as the official LLaMA-2 MiniGPT-4. The ViT tokens (CLS dropped) are then
    # concatenated 4 by 4 into the image tokens: 256 x 1408 -> 64 x 5632 at 224 px.
    qformer: QFormerConfig | None = field(default_factory=QFormerConfig)
    # How the tower's tokens become image tokens (CONNECTORS): qformer, concat or none. None: the
    # official choice, qformer when model.qformer is set, concat (4 by 4) when it is null.
    connector: str | None = None
    # connector concat: this many adjacent tower tokens make one image token (official LLaMA-2: 4).
    concat_tokens: int = PATCHES_PER_IMAGE_TOKEN
    # The trainable projection into the LLM (PROJECTORS): linear (official) or mlp2x_gelu (LLaVA-1.5).
    projector: str = "linear"
    llm: LLMConfig = field(default_factory=LLMConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    # "sdpa", "eager" or "flash_attention_2" (CUDA, flash-attn installed): the LLM's attention. Packed
    # rows use transformers' packed-sequence path under each: a block mask, or FlashAttention's varlen.
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    # LoRA adapters on the LLM (off by default: only the projection trains).
    lora: LoraConfig = field(default_factory=LoraConfig)

    def vision_files(self) -> dict[str, str]:
        """The files the image tokens depend on, by name (`eva_vit`, `blip2`, `blip2_hf`, `timm`, or
        `tower`: a transformers tower's folder), those the config names: what a feature cache records
        and checks."""
        w = self.weights
        files = {"eva_vit": w.eva_vit, "blip2": w.blip2, "blip2_hf": w.blip2_hf, "timm": w.timm}
        if self.vision.folder:
            files = {"tower": self.vision.folder}
        return {k: v for k, v in files.items() if v}

    def connector_kind(self) -> str:
        """`connector`, or the official one for `qformer`: qformer when it is set, else concat."""
        if self.connector is not None:
            return self.connector
        return "qformer" if self.qformer is not None else "concat"

    def keeps_cls(self) -> bool:
        """Whether the tower's class token (if it has one) goes on into the connector."""
        if self.vision.keep_cls is not None:
            return self.vision.keep_cls
        return self.connector_kind() == "qformer"

    def tower_tokens(self) -> int:
        """Tokens per image that enter the connector: the tower's, less a class token it drops."""
        n = self.vision.num_tokens
        return n - 1 if self.vision.has_cls() and not self.keeps_cls() else n

    def image_token_shape(self) -> tuple[int, int]:
        """(count, width) of the image tokens that enter `llama_proj`: the Q-Former's queries, or the
        tower's tokens concatenated `concat_tokens` by `concat_tokens` (official LLaMA-2 MiniGPT-4:
        256 x 1408 -> 64 x 5632), or the tower's tokens as they are (connector none)."""
        connector = self.connector_kind()
        if connector == "qformer" and self.qformer is not None:
            return self.qformer.num_query_tokens, self.qformer.width
        n, width = self.tower_tokens(), self.vision.width
        if connector == "concat":
            return n // self.concat_tokens, width * self.concat_tokens
        return n, width

    def _validate_vision_path(self) -> None:
        """Tower, connector and projector: known names, consistent with each other and the tower folder."""
        v, w = self.vision, self.weights
        if v.kind not in VISION_KINDS:
            raise ConfigError(f"model.vision.kind: expected one of {VISION_KINDS}, got {v.kind!r}")
        if self.connector is not None and self.connector not in CONNECTORS:
            raise ConfigError(f"model.connector: expected one of {CONNECTORS}, got {self.connector!r}")
        if self.projector not in PROJECTORS:
            raise ConfigError(f"model.projector: expected one of {PROJECTORS}, got {self.projector!r}")
        connector = self.connector_kind()
        if connector == "qformer" and self.qformer is None:
            raise ConfigError(
                "model.connector is qformer, but model.qformer is null: give model.qformer sizes"
            )
        if connector != "qformer" and self.qformer is not None:
            raise ConfigError(
                f"model.connector is {connector}, but model.qformer holds Q-Former sizes: set model.qformer "
                "to null (a model without a Q-Former)"
            )
        if v.kind == "hf":
            if not v.folder:
                raise ConfigError(
                    "model.vision.folder: model.vision.kind is hf, which reads a transformers vision model "
                    "(CLIP, SigLIP, DINOv2) from a local folder; set model.vision.folder"
                )
            for name in ("eva_vit", "blip2", "blip2_hf", "timm"):
                if getattr(w, name):
                    raise ConfigError(
                        f"model.weights.{name} is set, but model.vision.kind is hf: the tower's weights come "
                        "from model.vision.folder, and there is no EVA ViT-g or BLIP-2 part to load"
                    )
            if connector == "qformer":
                raise ConfigError(
                    "model.connector: qformer (BLIP-2's Q-Former) reads EVA ViT-g tokens; with "
                    "model.vision.kind hf use concat or none"
                )
            # A folder not on this machine (a dry run on a login node) is listed by the run's input check
            # (`mgpt4.train.resolve`); the checks that read it wait for it.
            if os.path.isdir(v.folder):
                t = tower_folder(v.folder, "model.vision.folder")
                # Left unset (the recipes' stage1_tower, a --set folder): the folder's sizes.
                _check_tower(
                    v, t, "hf", f"the tower folder {v.folder}", "folder", "hf_vision_config",
                    "tower folder", "the tower's", "layers", f"the {t.model_type} tower in {v.folder}",
                )  # fmt: skip
            if v.timm_name or v.timm_kwargs:
                raise ConfigError(
                    f"model.vision.{'timm_name' if v.timm_name else 'timm_kwargs'} is set, but "
                    "model.vision.kind is hf (a transformers folder): set model.vision.kind=timm, or leave it out"
                )
        elif v.kind == "timm":
            self._validate_timm_tower(connector)
        else:
            if w.timm:
                raise ConfigError(
                    "model.weights.timm is set, but model.vision.kind is eva_vit_g (whose weights are "
                    "model.weights.eva_vit): set model.vision.kind=timm, or leave it out"
                )
            if v.timm_name or v.timm_kwargs:
                raise ConfigError(
                    f"model.vision.{'timm_name' if v.timm_name else 'timm_kwargs'} is set, but "
                    "model.vision.kind is eva_vit_g: set model.vision.kind=timm, or leave it out"
                )
            if v.folder:
                raise ConfigError(
                    "model.vision.folder is set, but model.vision.kind is eva_vit_g (whose weights are "
                    "model.weights.eva_vit): set model.vision.kind=hf, or leave the folder out"
                )
            if v.feature_layer != -1:
                raise ConfigError(
                    "model.vision.feature_layer: eva_vit_g feeds its last block, as the official model; "
                    "another layer needs model.vision.kind hf or timm"
                )
        if connector == "qformer" and v.keep_cls is False:
            raise ConfigError(
                "model.vision.keep_cls: false, but the Q-Former reads every tower token, the class token "
                "included (official); leave it out"
            )
        if connector != "concat" and self.concat_tokens != PATCHES_PER_IMAGE_TOKEN:
            raise ConfigError(
                f"model.concat_tokens is set ({self.concat_tokens}), but model.connector is {connector}: "
                "set model.connector=concat, or leave it out"
            )
        if connector == "concat":
            n = self.tower_tokens()
            if self.concat_tokens < 1 or n % self.concat_tokens:
                raise ConfigError(
                    f"model.concat_tokens: {self.concat_tokens} adjacent tokens make one image token, "
                    f"which does not divide the tower's {n} tokens per image"
                )

    def _validate_timm_tower(self, connector: str) -> None:
        """kind timm: a timm ViT by name (built on the meta device to read its sizes), no EVA / BLIP-2
        file, no folder, no Q-Former, a feature layer among its blocks."""
        v, w = self.vision, self.weights
        if not v.timm_name:
            raise ConfigError(
                "model.vision.timm_name: model.vision.kind is timm, which builds a timm ViT by its name "
                "(e.g. vit_base_patch16_clip_224.openai); set model.vision.timm_name"
            )
        if v.folder:
            raise ConfigError(
                "model.vision.folder is set, but model.vision.kind is timm, whose weights are one file: "
                "set model.weights.timm=FILE, or model.vision.kind=hf for a transformers folder"
            )
        for name in ("eva_vit", "blip2", "blip2_hf"):
            if getattr(w, name):
                raise ConfigError(
                    f"model.weights.{name} is set, but model.vision.kind is timm: the tower's weights come "
                    "from model.weights.timm, and there is no EVA ViT-g or BLIP-2 part to load"
                )
        if connector == "qformer":
            raise ConfigError(
                "model.connector: qformer (BLIP-2's Q-Former) reads EVA ViT-g tokens; with "
                "model.vision.kind timm use concat or none"
            )
        t = timm_tower(v)
        # Left unset: the built model's sizes.
        _check_tower(
            v, t, "timm", f"the timm model {v.timm_name}", "model", "timm_vision_config",
            "timm model", "the timm model's", "blocks", f"the timm model {v.timm_name}",
        )  # fmt: skip

    def validate(self) -> None:
        """Every check of the model settings (ConfigError naming the field). A config that passes is
        remembered as validated as it is now, so that `validate_once` (building the model, loading its
        files) trusts it instead of checking it again; any later change makes it unchecked again."""
        for part in ("vision", "qformer", "llm"):
            sizes = getattr(self, part)
            for f in dataclasses.fields(sizes) if sizes is not None else ():
                value = getattr(sizes, f.name)
                size = f.type in (int, "int", "int | None") and not f.name.endswith("_id")
                size = size and f.name != "feature_layer"  # counts from the last layer when negative
                if size and isinstance(value, int) and value < 1:
                    raise ConfigError(f"model.{part}.{f.name}: expected a positive integer, got {value!r}")
        if self.text.max_txt_len < 1:
            raise ConfigError(
                f"model.text.max_txt_len: expected a positive integer, got {self.text.max_txt_len!r}"
            )
        for name in ("vit", "qformer", "proj", "llm"):
            value = getattr(self.precision, name)
            allowed = (*DTYPES, *QUANTIZED) if name == "llm" else tuple(DTYPES)
            if value not in allowed:
                raise ConfigError(f"model.precision.{name}: expected one of {allowed}, got {value!r}")
        if self.precision.llm in QUANTIZED:
            # Said at config time (a dry run says it too), not by bitsandbytes once the weights load.
            refusal = quantized_llm_refusal(self)
            if refusal:
                raise ConfigError(refusal)
        v = self.vision
        if v.image_size % v.patch_size:
            raise ConfigError(
                f"model.vision.image_size: {v.image_size} is not a multiple of patch_size {v.patch_size}"
            )
        if v.width % v.heads:
            raise ConfigError(f"model.vision.width: {v.width} is not divisible by heads {v.heads}")
        q = self.qformer
        if q is not None and q.width % q.heads:
            raise ConfigError(f"model.qformer.width: {q.width} is not divisible by heads {q.heads}")
        w = self.weights
        if w.blip2_hf and (w.eva_vit or w.blip2):
            raise ConfigError("model.weights: give either blip2_hf or eva_vit + blip2, not both")
        for field_name in ("blip2", "blip2_hf"):
            if q is None and getattr(w, field_name):
                raise ConfigError(
                    f"model.weights.{field_name} is set, but model.qformer is null: this model has no Q-Former "
                    f"(the LLaMA-2 variant) and reads no BLIP-2 file. Unset model.weights.{field_name}, or give "
                    "model.qformer sizes."
                )
        self._validate_vision_path()
        m = self.llm
        if m.hidden_size is not None and m.num_heads is not None and m.hidden_size % m.num_heads:
            raise ConfigError(
                f"model.llm.hidden_size: {m.hidden_size} is not divisible by num_heads {m.num_heads}"
            )
        t = self.text
        if t.template not in TEMPLATE_NAMES:
            raise ConfigError(f"model.text.template: expected one of {TEMPLATE_NAMES}, got {t.template!r}")
        if t.instructions and t.prompt_template is not None and "{}" not in t.prompt_template:
            raise ConfigError("model.text.prompt_template: must contain '{}' where the instruction goes")
        for i, ins in enumerate(self.text.instructions):
            if ins.count("<ImageHere>") != 1:
                raise ConfigError(
                    f"model.text.instructions[{i}]: must contain '<ImageHere>' exactly once, got {ins!r}"
                )
        self.lora.validate()
        if w.lora and not self.lora.enabled():
            raise ConfigError(
                f"model.weights.lora names {w.lora!r}, but model.lora.rank is 0 (LoRA off): set model.lora "
                "to the adapters' settings"
            )
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ConfigError(
                f"model.attn_implementation: expected one of {ATTN_IMPLEMENTATIONS}, got {self.attn_implementation!r}"
            )
        if self.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            # Said here, so that a dry run says it too, not transformers' traceback when the LLM is built.
            raise ConfigError(
                "model.attn_implementation: flash_attention_2 needs the flash-attn package (and a CUDA GPU), "
                "which is not installed here; `pip install flash-attn`, or use sdpa"
            )
        # Not a field: dataclasses.replace and the config files leave it out. repr covers every field.
        self._validated_as = repr(self)

    def validate_once(self) -> None:
        """`validate`, unless this config passed it as it is now (a config checked by `Config.validate`
        at config time is not checked again when the model is built and loaded)."""
        if getattr(self, "_validated_as", None) != repr(self):
            self.validate()


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
    # The LoRA adapters' peak learning rate (model.lora), on the same warmup + cosine shape as the
    # projection's (scaled by lora_lr / lr); None: lr. Refused when LoRA is off.
    lora_lr: float | None = None


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
    # Steps between validation losses on data.val (a multiple of log_every: val/loss joins that row);
    # 0 = only at the end. Needs data.val.samples > 0.
    eval_every: int = 0
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
    # How a resume treats the data. "exact": continue the checkpoint's data position; a changed shard
    # list, data setting or number of ranks stops the run with what changed. "fresh": keep the
    # projection, its optimizer moments, the schedule, step and samples seen, and start a fresh data
    # pass (a new seeded order, for the current ranks and inputs).
    resume_data: str = "exact"
    # torch.compile the step's frozen vision forward and its LLM (forward and backward), once, on the first
    # step (`mgpt4.train.compiled`): inductor kernels on the CPU, CUDA graphs on a GPU. Not under ZeRO-3.
    compile: bool = False


def check_eval_schedule(t: TrainConfig, data: DataConfig) -> None:
    if t.eval_every < 0:
        raise ConfigError(f"train.eval_every: expected 0 (only at the end) or more, got {t.eval_every!r}")
    if t.eval_every and not data.val.enabled():
        raise ConfigError(
            f"train.eval_every: {t.eval_every}, but there is nothing to validate on; set data.val, "
            "or train.eval_every=0 when there is none"
        )
    if t.eval_every % t.log_every:
        raise ConfigError(
            f"train.eval_every ({t.eval_every}) must be a multiple of train.log_every ({t.log_every}): "
            "val/loss is written with that step's metrics"
        )


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
        if t.resume_data not in ("exact", "fresh"):
            raise ConfigError(f"train.resume_data: expected 'exact' or 'fresh', got {t.resume_data!r}")
        for name in ("steps", "grad_accum", "save_every", "log_every", "keep_last"):
            if getattr(t, name) < 1:
                raise ConfigError(f"train.{name}: expected a positive integer, got {getattr(t, name)!r}")
        check_eval_schedule(t, self.data)
        if self.model.vision.kind in ("hf", "timm") and self.data.image_size == DataConfig().image_size:
            self.data.image_size = self.model.vision.image_size  # left unset: the tower's size
        if self.data.image_size != self.model.vision.image_size:
            raise ConfigError(
                f"data.image_size ({self.data.image_size}) must equal model.vision.image_size "
                f"({self.model.vision.image_size})"
            )
        # The exact bound (BOS, the wrapped prompt) needs the tokenizer: the loader checks it against the
        # sample layout (`mgpt4.data.loader.check_packing`). This one needs none, so the dry run says it.
        n_img, _ = self.model.image_token_shape()
        least = n_img + self.model.text.max_txt_len
        if self.data.packs() and self.data.pack_length < least:
            raise ConfigError(
                f"data.pack_length: {self.data.pack_length} tokens cannot hold a sample of {n_img} image "
                f"tokens + max_txt_len {self.model.text.max_txt_len} = {least}, before its prompt"
            )
        if not t.output_dir.strip():
            raise ConfigError("train.output_dir: empty; give the run's folder (default outputs/<recipe>)")
        o = self.optim
        if not o.lr > 0:
            raise ConfigError(f"optim.lr: expected a positive learning rate, got {o.lr!r}")
        if not 0 <= o.min_lr <= o.lr:
            raise ConfigError(f"optim.min_lr: expected 0 <= min_lr <= lr ({o.lr}), got {o.min_lr}")
        if o.lora_lr is not None and not self.model.lora.enabled():
            raise ConfigError(
                f"optim.lora_lr is set ({o.lora_lr}), but model.lora.rank is 0 (LoRA off): there are no "
                "adapters to train; set model.lora.rank, or leave optim.lora_lr out"
            )
        if o.lora_lr is not None and not o.lora_lr > 0:
            raise ConfigError(f"optim.lora_lr: expected a positive learning rate, got {o.lora_lr!r}")
