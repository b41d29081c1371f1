"""An export folder (`python -m mgpt4.export hf`) -> mgpt4's own MiniGPT4, the model the export was made from.

`--checkpoint EXPORT_DIR` takes such a folder wherever a run folder goes (chat, eval, serve, a re-export).
The sizes come from its config.json (`vision_config`, `qformer_config` and `num_query_tokens`, or the
LLaMA-2 variant's `patches_per_token`; the LLM's own `text_config`), the text settings, precision,
`ln_vision`'s eps and the LLM's own vocabulary size from the field mgpt4 adds to it
(`mgpt4.model.hf_names.EXPORT_RECORD`), the tokenizer from the folder, the weights by the one rename
table (`mgpt4.model.hf_names`) read back, strictly: every key of the folder fills a parameter and every
parameter is filled. `ln_vision` gets its own eps back (the official 1e-5; a BLIP-2 export stores
transformers' 1e-6 for `post_layernorm`), so the loaded model is the official network again.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os

import torch

from mgpt4.checkpoints import find_checkpoint
from mgpt4.config import (
    DTYPES,
    OFFICIAL_VIT_MLP_RATIO,
    PATCHES_PER_IMAGE_TOKEN,
    LLMConfig,
    ModelConfig,
    PrecisionConfig,
    QFormerConfig,
    TextConfig,
    VisionConfig,
)
from mgpt4.model import MiniGPT4, apply_freeze
from mgpt4.model.hf_names import EXPORT_RECORD, from_hf_name
from mgpt4.model.llm import hf_value
from mgpt4.model.loading import (
    PROJ_PREFIXES,
    QFORMER_PREFIXES,
    VIT_PREFIXES,
    WeightsError,
    load_mapped,
    read_hf_state,
    split_hf_qkv_bias,
)
from mgpt4.strict_config import ConfigError, apply_overrides, from_dict
from mgpt4.tokenizer import load_tokenizer

# config.json's model_type of the two exports: transformers' BLIP-2, and the LLaMA-2 variant's own code.
EXPORT_TYPES = {"blip-2": "Blip2ForConditionalGeneration", "minigpt4_llama2": "the LLaMA-2 variant"}
# The non-LLM weights of an export; the LLM's are under `language_model.`.
_PARTS = ("vision_model.", "qformer.", "query_tokens", "language_projection.")


def is_hf_folder(path: str) -> bool:
    """A folder whose config.json is a Hugging Face model's (it names a `model_type`; a run folder's
    config.json is mgpt4's config tree)."""
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    try:
        with open(config, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "model_type" in data


def export_folder(checkpoint: str | None) -> str | None:
    """`checkpoint` when it names an export (or another Hugging Face folder, which `export_model_config`
    then refuses in one line) rather than a run or checkpoint folder; else None."""
    if checkpoint and find_checkpoint(checkpoint) is None and is_hf_folder(checkpoint):
        return checkpoint
    return None


def export_source_config(folder: str, source) -> ModelConfig:
    """The model config of `--checkpoint EXPORT_DIR` with the source's `--set` and `--llm-dtype` applied
    (`source` is a `ModelSource`); the weight-file flags and `--llm-8bit` are refused in one line."""
    given = [name for name in ("eva_vit", "blip2", "blip2_hf", "llm", "proj") if getattr(source, name)]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise SystemExit(f"--checkpoint {folder} is an export, which holds every weight; drop {flags}")
    if source.llm_8bit:
        raise SystemExit(
            f"--llm-8bit: not available for an export folder (--checkpoint {folder}); use --llm-dtype"
        )
    cfg = export_model_config(folder)
    try:
        cfg = apply_overrides(cfg, source.overrides) if source.overrides else cfg
    except ConfigError as e:
        raise SystemExit(f"--set: {e}") from None
    if source.llm_dtype:
        cfg.precision.llm = source.llm_dtype
    return cfg


def _read_export(folder: str) -> dict:
    """The folder's config.json, checked to be an mgpt4 export; SystemExit naming the file and field."""
    path = os.path.join(folder, "config.json")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    kind = data.get("model_type")
    if kind not in EXPORT_TYPES:
        hint = " (an LLM folder goes to --llm, with --preset)" if "text_config" not in data else ""
        raise SystemExit(
            f"--checkpoint {path}: model_type {kind!r} is not a MiniGPT-4 export (expected one of "
            f"{', '.join(EXPORT_TYPES)}, as `python -m mgpt4.export hf` writes){hint}"
        )
    if not isinstance(data.get(EXPORT_RECORD), dict):
        raise SystemExit(
            f"--checkpoint {path}: no {EXPORT_RECORD!r} field: a {kind} folder not written by "
            f"`python -m mgpt4.export hf`, so its template and text settings are unknown"
        )
    for part in ("vision_config", "text_config") + (("qformer_config",) if kind == "blip-2" else ()):
        if not isinstance(data.get(part), dict):
            raise SystemExit(
                f"--checkpoint {path}: field {part!r} is missing; expected the {part} of the export"
            )
    return data


def _text_config(data: dict):
    """The LLM's transformers config, with its own vocabulary size (without the export's `<image>` rows)."""
    from transformers import AutoConfig

    text = dict(data["text_config"])
    kind = text.pop("model_type", "llama")
    return AutoConfig.for_model(kind, **text)


def export_model_config(folder: str) -> ModelConfig:
    """The ModelConfig of the export at `folder` (no weight files: the folder holds them all).

    Raises SystemExit with one line naming config.json and the field for a folder that is not an export."""
    from transformers import Blip2QFormerConfig, Blip2VisionConfig

    data = _read_export(folder)
    path = os.path.join(folder, "config.json")
    record = data[EXPORT_RECORD]
    v = Blip2VisionConfig(**data["vision_config"])
    vision = VisionConfig(
        image_size=v.image_size,
        patch_size=v.patch_size,
        width=v.hidden_size,
        depth=v.num_hidden_layers,
        heads=v.num_attention_heads,
        # None where it is the official builder's width, as the presets say it.
        mlp_dim=None
        if v.intermediate_size == int(v.hidden_size * OFFICIAL_VIT_MLP_RATIO)
        else v.intermediate_size,
        ln_eps=v.layer_norm_eps,
        ln_vision_eps=record.get("ln_vision_eps", data.get("ln_vision_eps", 1e-5)),
    )
    qformer = None
    if data["model_type"] == "blip-2":
        q = Blip2QFormerConfig(**data["qformer_config"])
        qformer = QFormerConfig(
            num_query_tokens=data.get("num_query_tokens", 32),
            width=q.hidden_size,
            depth=q.num_hidden_layers,
            heads=q.num_attention_heads,
            ffn_dim=q.intermediate_size,
            cross_attention_freq=q.cross_attention_frequency,
            ln_eps=q.layer_norm_eps,
        )
    elif data.get("patches_per_token", PATCHES_PER_IMAGE_TOKEN) != PATCHES_PER_IMAGE_TOKEN:
        raise SystemExit(
            f"--checkpoint {path}: patches_per_token is {data['patches_per_token']}; mgpt4's LLaMA-2 "
            f"variant concatenates {PATCHES_PER_IMAGE_TOKEN}"
        )
    text_cfg = _text_config(data)
    llm = LLMConfig(**{f.name: hf_value(text_cfg, f.name) for f in dataclasses.fields(LLMConfig)})
    llm.vocab_size = record.get("llm_vocab_size", text_cfg.vocab_size)
    try:
        cfg = ModelConfig(
            vision=vision,
            qformer=qformer,
            llm=llm,
            precision=from_dict(PrecisionConfig, record.get("precision", {}), "precision"),
            text=from_dict(TextConfig, record.get("text", {}), "text"),
        )
        cfg.validate()
    except ConfigError as e:
        raise SystemExit(f"--checkpoint {path}: field {EXPORT_RECORD!r}: {e}") from None
    return cfg


def _check_projection(folder: str, state: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """One line naming the file and field when `language_projection` does not fit config.json's sizes."""
    weight = state.get("language_projection.weight")
    width = cfg.image_token_shape()[1]
    want = [cfg.llm.hidden_size, width]
    if weight is None or list(weight.shape) != want:
        found = "no language_projection.weight" if weight is None else f"shape {list(weight.shape)}"
        source = "qformer_config.hidden_size" if cfg.qformer is not None else "vision_config.hidden_size x 4"
        raise SystemExit(
            f"--checkpoint {_weight_file(folder, 'language_projection.weight')}: language_projection.weight: "
            f"expected shape {want} (config.json's text_config.hidden_size, {source}), found {found}"
        )


def _weight_file(folder: str, key: str) -> str:
    """The safetensors file of `folder` that holds `key` (the folder when none does)."""
    from safetensors import safe_open

    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        with safe_open(path, framework="pt") as f:
            if key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                return path
    return folder


def _drop_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in str(record.msg)


def load_export_llm(folder: str, data: dict, cfg: ModelConfig):
    """The LLM from the export's `language_model.*` weights, cut back to its own vocabulary (the export
    appends zero rows for `<image>`), with the LLM's generation defaults (not the export's decoding ones)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    text_cfg = _text_config(data)
    # transformers warns with a table of every key it did not expect: here the vision, Q-Former and
    # projection weights, which are the other parts' and are checked below; that one warning is dropped.
    report = logging.getLogger("transformers.modeling_utils")
    report.addFilter(_drop_load_report)
    try:
        llm, info = AutoModelForCausalLM.from_pretrained(
            folder,
            config=text_cfg,
            key_mapping={r"^language_model\.": ""},
            dtype=DTYPES[cfg.precision.llm],
            attn_implementation=cfg.attn_implementation,
            local_files_only=True,
            output_loading_info=True,
        )
    finally:
        report.removeFilter(_drop_load_report)
    foreign = [k for k in info.get("unexpected_keys", []) if not k.startswith(_PARTS)]
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if foreign:
        bad["unexpected_keys"] = foreign
    if bad:
        raise WeightsError(f"{folder}: the language_model weights do not fit {type(llm).__name__}: {bad}")
    if cfg.llm.vocab_size != text_cfg.vocab_size:
        llm.resize_token_embeddings(cfg.llm.vocab_size)
    generation = GenerationConfig.from_model_config(llm.config)
    exported = GenerationConfig.from_pretrained(folder, local_files_only=True)
    generation.eos_token_id = exported.eos_token_id  # every id mgpt4 stops on, as the export wrote them
    llm.generation_config = generation
    return llm


def load_export(folder: str, cfg: ModelConfig) -> MiniGPT4:
    """The MiniGPT4 of the export at `folder` with `cfg` (`export_model_config`, overrides applied), frozen.

    Raises WeightsError naming the folder and keys for weights that do not fit, SystemExit (one line) for
    a projection of the wrong shape."""
    import tempfile

    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        data = json.load(f)
    # The LLM's config stands in for config.json, which for the LLaMA-2 variant names remote code.
    tokenizer = load_tokenizer(folder, config=_text_config(data))
    # The model's LLM is built as a skeleton from a config.json: the LLM's own, without the `<image>` rows.
    with tempfile.TemporaryDirectory() as tmp:
        text_cfg = _text_config(data)
        text_cfg.vocab_size = cfg.llm.vocab_size
        text_cfg.save_pretrained(tmp)
        cfg.weights.llm = tmp
        try:
            model = MiniGPT4(cfg, tokenizer=tokenizer)
        finally:
            cfg.weights.llm = None
    state = read_hf_state(folder, _PARTS, cfg.weights.allow_pickle)
    _check_projection(folder, state, cfg)
    state = split_hf_qkv_bias(state, cfg.vision.width, folder)
    # Without a Q-Former (the LLaMA-2 variant) ln_vision is the only one of QFORMER_PREFIXES' parts.
    vision = QFORMER_PREFIXES if cfg.qformer is not None else ("ln_vision.",)
    prefixes = (*VIT_PREFIXES, *vision, *PROJ_PREFIXES)
    load_mapped(model, prefixes, state, folder, from_hf_name)
    model.llm = load_export_llm(folder, data, cfg)
    apply_freeze(model)
    return model
