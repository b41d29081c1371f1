"""The frozen LLM: any decoder-only Hugging Face causal LM (Vicuna, Llama 2 and 3, Mistral, Qwen2, ...).

With a folder (`model.weights.llm`), transformers' Auto classes pick the architecture from its
config.json, and every size is read from there: `model.llm` fields left None take the folder's values,
and fields that are set must agree (the official presets set theirs, so a folder of another size is
caught before any weight is read). Without a folder, `model.llm` describes a random model (tests,
benchmarks): its sizes are required and the other fields default to LLaMA's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

import torch
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModelForCausalLM, PretrainedConfig

from mgpt4.config import LLMConfig, ModelConfig
from mgpt4.model.errors import WeightsError
from mgpt4.strict_config import ConfigError

# LLMConfig fields a random model cannot do without.
SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads")
# What a random model takes where LLMConfig leaves a field None: LLaMA-1/Vicuna v0's values.
RANDOM_DEFAULTS = {
    "model_type": "llama",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def hf_value(hf: PretrainedConfig | dict[str, Any], name: str) -> Any:
    """The value of LLMConfig field `name` in a Hugging Face config (object or config.json dict)."""
    get = hf.get if isinstance(hf, dict) else lambda k, d=None: getattr(hf, k, d)
    if name == "num_layers":
        return get("num_hidden_layers")
    if name == "num_heads":
        return get("num_attention_heads")
    if name == "num_kv_heads":
        return get("num_key_value_heads") or get("num_attention_heads")
    if name == "rope_theta":
        # transformers 5 keeps it in rope_parameters; older config.json files have it at the top.
        return (get("rope_parameters") or {}).get("rope_theta", get("rope_theta"))
    return get(name)


def llm_config_mismatches(cfg: LLMConfig, hf_config: PretrainedConfig | dict[str, Any]) -> list[str]:
    """Fields set in mgpt4's LLM config that a folder's config disagrees with, as readable lines."""
    problems = []
    for f in fields(LLMConfig):
        ours = getattr(cfg, f.name)
        theirs = hf_value(hf_config, f.name)
        if ours is not None and theirs is not None and theirs != ours:
            problems.append(f"model.llm.{f.name}: config says {ours}, config.json has {theirs}")
    return problems


class LLMFolderMismatch(WeightsError):
    """The LLM folder's config.json disagrees with fields set in `model.llm` (`problems`, one line each)."""

    def __init__(self, folder: str, problems: list[str]):
        super().__init__(f"{folder}: the LLM does not match the config:\n  " + "\n  ".join(problems))
        self.folder = folder
        self.problems = problems


def read_llm_folder_config(folder: str) -> PretrainedConfig:
    """The Hugging Face config of an LLM folder (its config.json), read locally."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(
            f"LLM folder {folder!r} has no config.json (expected a Hugging Face decoder folder)"
        )
    return AutoConfig.from_pretrained(folder, local_files_only=True)


def random_llm_config(cfg: LLMConfig, attn_implementation: str = "sdpa") -> PretrainedConfig:
    """The Hugging Face config of a random LLM of `cfg`'s sizes (no folder)."""
    unset = [name for name in SIZE_FIELDS if getattr(cfg, name) is None]
    if unset:
        raise ConfigError(
            f"model.llm.{unset[0]}: a random LLM (no model.weights.llm) needs "
            f"{', '.join(SIZE_FIELDS)}; unset: {', '.join(unset)}. Or give model.weights.llm, a Hugging "
            f"Face folder whose config.json has the sizes"
        )
    value = {f.name: getattr(cfg, f.name) for f in fields(LLMConfig)}
    value.update({k: v for k, v in RANDOM_DEFAULTS.items() if value[k] is None})
    try:
        hf = AutoConfig.for_model(
            value["model_type"],
            vocab_size=value["vocab_size"],
            hidden_size=value["hidden_size"],
            intermediate_size=value["intermediate_size"],
            num_hidden_layers=value["num_layers"],
            num_attention_heads=value["num_heads"],
            num_key_value_heads=value["num_kv_heads"] or value["num_heads"],
            max_position_embeddings=value["max_position_embeddings"],
            rms_norm_eps=value["rms_norm_eps"],
            rope_parameters={"rope_type": "default", "rope_theta": value["rope_theta"]},
            bos_token_id=value["bos_token_id"],
            eos_token_id=value["eos_token_id"],
            pad_token_id=value["eos_token_id"],
            tie_word_embeddings=False,
        )
    except ValueError as e:
        raise ConfigError(f"model.llm.model_type: {e}") from None
    hf._attn_implementation = attn_implementation
    return hf


def resolve_llm_config(cfg: ModelConfig, check: bool = False) -> PretrainedConfig:
    """The LLM's Hugging Face config: the folder's (`model.weights.llm`), or a random one's.

    With `check`, raises LLMFolderMismatch naming every `model.llm` field the folder's config.json
    disagrees with. The model build checks (`MiniGPT4`, before any part is built); everything after it,
    the LLM loader included, trusts the built model's config and reads the folder's sizes unchecked.
    """
    folder = cfg.weights.llm
    if folder is None:
        return random_llm_config(cfg.llm, cfg.attn_implementation)
    hf = read_llm_folder_config(folder)
    problems = llm_config_mismatches(cfg.llm, hf) if check else []
    if problems:
        raise LLMFolderMismatch(folder, problems)
    hf._attn_implementation = cfg.attn_implementation
    return hf


def llm_class(hf_config: PretrainedConfig) -> type:
    """The causal-LM class transformers builds for this config (LlamaForCausalLM, Qwen2ForCausalLM, ...)."""
    cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(hf_config), None)
    if cls is None:
        raise WeightsError(
            f"model_type {hf_config.model_type!r} has no causal-LM class in transformers "
            f"(mgpt4 takes decoder-only LLMs that AutoModelForCausalLM builds)"
        )
    return cls


def build_llm(
    cfg: LLMConfig | PretrainedConfig, attn_implementation: str = "sdpa", dtype: torch.dtype | None = None
):
    """A random LLM. Through `from_config`, so that under an active `HfDeepSpeedConfig` (ZeRO-3)
    transformers creates it already partitioned and initialises it shard by shard."""
    hf = cfg if isinstance(cfg, PretrainedConfig) else random_llm_config(cfg, attn_implementation)
    llm_class(hf)
    return AutoModelForCausalLM.from_config(hf, dtype=dtype)


@dataclass(frozen=True)
class LLMSizes:
    """The sizes FLOP counting needs, read from a Hugging Face config (the folder's, when there is one)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


def llm_sizes(hf_config: PretrainedConfig) -> LLMSizes:
    heads = hf_value(hf_config, "num_heads")
    hidden = hf_config.hidden_size
    return LLMSizes(
        vocab_size=hf_config.vocab_size,
        hidden_size=hidden,
        intermediate_size=hf_config.intermediate_size,
        num_layers=hf_value(hf_config, "num_layers"),
        num_heads=heads,
        num_kv_heads=hf_value(hf_config, "num_kv_heads"),
        head_dim=getattr(hf_config, "head_dim", None) or hidden // heads,
    )
