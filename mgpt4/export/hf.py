"""`export_hf`: a loaded MiniGPT-4 -> a folder that transformers loads on its own.

The folder holds the weights (safetensors), config.json, the processor (tokenizer with `<image>`,
image processor, chat template), generation_config.json and a model card (README.md); the LLaMA-2
variant adds its modeling code (`trust_remote_code=True`). It is written into a temporary sibling and
renamed into place at the end, so a failed export leaves no half-written folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch

from mgpt4.config import PATCHES_PER_IMAGE_TOKEN, ModelConfig
from mgpt4.export.hf_blip2 import measure_ln_eps
from mgpt4.export.hf_llava import is_llava, llava_layout, llava_note, llava_processor, to_llava
from mgpt4.export.model_card import ExportFacts, write_model_card
from mgpt4.export.processor import ExportError, build_processor, generation_config
from mgpt4.images import CLIP_MEAN, CLIP_STD
from mgpt4.logs import get_logger
from mgpt4.model import MiniGPT4
from mgpt4.model.hf_names import EXPORT_RECORD, export_record

log = get_logger(__name__)


def export_refusal(cfg: ModelConfig) -> str | None:
    """Why this model has no transformers format here, or None: the export writes the two official
    vision paths (EVA ViT-g with the Q-Former, or 4 tokens concatenated without the class token) and a
    Linear projection, and LLaVA's layout (a CLIP or SigLIP tower, no connector, mlp2x_gelu); another
    tower, connector or projector is refused before any weight loads."""
    official = cfg.vision.kind == "eva_vit_g" and cfg.projector == "linear" and cfg.vision.keep_cls is None
    concat = cfg.connector_kind() == "concat" and cfg.concat_tokens == PATCHES_PER_IMAGE_TOKEN
    if official and (cfg.connector_kind() == "qformer" or concat):
        return None
    if llava_layout(cfg):
        if not os.path.isdir(cfg.vision.folder or ""):
            return (
                f"model.vision.folder: {cfg.vision.folder} is no folder here; the LLaVA export reads the "
                "tower's config.json and preprocessor_config.json from it"
            )
        if is_llava(cfg):
            return None
    return (
        f"model.vision.kind={cfg.vision.kind}, model.connector={cfg.connector_kind()}, model.projector="
        f"{cfg.projector}: the hf export writes the official MiniGPT-4 vision paths (eva_vit_g with "
        "qformer, or concat 4, and a linear projector) and LLaVA's (a CLIP or SigLIP tower with connector "
        "none and mlp2x_gelu) only; load this model from its checkpoint instead"
    )


def check_out_dir(out_dir: str) -> None:
    """SystemExit with one line when `out_dir` is a file or a folder that is not empty."""
    if os.path.isfile(out_dir):
        raise SystemExit(f"--out {out_dir}: is a file; give a new or empty folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise SystemExit(
            f"--out {out_dir}: the folder exists and is not empty; give a new folder (an export never "
            "overwrites files)"
        )


def to_transformers(model: MiniGPT4, image_token_id: int):
    """The transformers model of the export: `Blip2ForConditionalGeneration`, for the LLaMA-2 variant
    (no Q-Former) the remote-code `MiniGPT4Llama2ForConditionalGeneration`, for a CLIP or SigLIP tower
    with mlp2x_gelu `LlavaForConditionalGeneration`."""
    if is_llava(model.cfg):
        return to_llava(model, image_token_id)
    if model.qformer is not None:
        from mgpt4.export.hf_blip2 import to_blip2

        return to_blip2(model, image_token_id)
    from mgpt4.export.hf_llama2 import to_llama2

    return to_llama2(model, image_token_id)


def probe_images(model: MiniGPT4, count: int = 4, seed: int = 0) -> torch.Tensor:
    """`count` random images, normalised as the eval transform does: [count, 3, S, S] in the vision dtype."""
    size = model.cfg.vision.image_size
    pixels = torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    w = model.visual_encoder.patch_embed.proj.weight
    return ((pixels - mean) / std).to(device=w.device, dtype=w.dtype)


def ln_vision_note(model: MiniGPT4) -> str | None:
    """What the export changes about ln_vision, measured on probe images for a BLIP-2 export (None for
    a transformers tower, which has no ln_vision)."""
    if model.ln_vision is None:
        return None
    own = model.ln_vision.eps
    if model.qformer is None:
        return f"ln_vision keeps its eps {own:g} (the folder's modeling code sets it)"
    hf_eps = model.cfg.vision.ln_eps
    if hf_eps == own:
        return f"ln_vision keeps its eps {own:g}"
    m = measure_ln_eps(model, probe_images(model), hf_eps)
    return (
        f"ln_vision runs at eps {hf_eps:g} instead of {own:g} (transformers' BLIP-2 has one layer_norm_eps "
        f"for the whole vision tower): on 4 random images the image embeddings change by at most "
        f"{m['embeddings_max_abs_diff']:.3g} (their largest magnitude is {m['embeddings_max_abs']:.3g})"
    )


def merge_adapters(model: MiniGPT4) -> str | None:
    """Fold a LoRA run's adapters (`model.lora`) into the LLM's weights, in place, so the export is a plain
    transformers LLM computing what the adapted one computed; `model.cfg.lora` is switched off to match.
    Returns the model card's note, or None for a model without adapters."""
    from mgpt4.model.lora import has_lora, merge_lora

    if not has_lora(model.llm):
        return None
    lora = model.cfg.lora
    merge_lora(model.llm)
    note = (
        f"the LoRA adapters (rank {lora.rank}, alpha {lora.alpha:g}, on {', '.join(lora.target_modules)}) "
        "are merged into the LLM's weights (W + alpha / rank * B A)"
    )
    model.cfg.lora = type(lora)()
    return note


def export_hf(model: MiniGPT4, out_dir: str, facts: ExportFacts | None = None) -> str:
    """Write `model` (eval mode, from `mgpt4.inference.load_model`) as a transformers folder at `out_dir`.

    A LoRA run's adapters are merged into the LLM first (`merge_adapters`: the model is changed in place).
    Raises SystemExit for an output folder that is a file or not empty, ExportError for a model without a
    transformers format (`export_refusal`) or when the exported
    tokenizer cannot reproduce mgpt4's prompt tokens. Returns `out_dir`.
    """
    refusal = export_refusal(model.cfg)
    if refusal:
        raise ExportError(refusal)
    check_out_dir(out_dir)
    merged = merge_adapters(model)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        llava = is_llava(model.cfg)
        if llava:  # LlavaProcessor expands each image's one `<image>` into its tokens
            processor, image_token_id = build_processor(model, tmp, llava_processor, image_tokens=1)
        else:
            processor, image_token_id = build_processor(model, tmp)
        hf = to_transformers(model, image_token_id)
        if not llava:
            # What transformers' configs cannot say, for loading the folder back into mgpt4 (--checkpoint).
            setattr(hf.config, EXPORT_RECORD, export_record(model))
        hf.generation_config = generation_config(
            model, processor.tokenizer, image_token_id, model.text_spec.bos_id
        )
        hf.save_pretrained(tmp)
        notes = [n for n in (ln_vision_note(model), llava_note(model) if llava else None, merged) if n]
        for note in notes:
            log.info(note)
        write_model_card(tmp, model, facts or ExportFacts(), type(hf).__name__, notes)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty, checked above
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(f"exported {type(hf).__name__} to {out_dir}")
    return out_dir


__all__ = ["ExportError", "check_out_dir", "export_hf", "merge_adapters", "to_transformers"]
