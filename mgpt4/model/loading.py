"""Official weight files -> MiniGPT4 modules, strictly.

Every key of a file is either mapped onto a parameter of ours or matched by a declared ignorable
pattern; every parameter of the part being loaded must be provided; shapes must agree. Anything
else raises `WeightsError` naming the file, the key and both shapes. There is no `strict=False`.
"""

from __future__ import annotations

import glob
import os
import pickle
import re
from collections.abc import Callable

import torch
from torch import nn

from mgpt4.config import DTYPES, PATCHES_PER_IMAGE_TOKEN, QUANTIZED
from mgpt4.logs import get_logger
from mgpt4.model.errors import WeightsError
from mgpt4.model.hf_names import from_hf_name, split_qkv_bias
from mgpt4.model.lora import LORA_DIR, attach_lora, load_lora
from mgpt4.model.minigpt4 import MiniGPT4
from mgpt4.model.towers import projector_linears
from mgpt4.model.vision import interpolate_pos_embed
from mgpt4.tower_folder import read_tower_folder

__all__ = ["WeightsError", "load_weights"]

log = get_logger(__name__)

# Keys of the BLIP-2 stage-1 checkpoint that MiniGPT-4 does not use.
BLIP2_IGNORED = (
    r"Qformer\.cls\..*",  # masked-LM head
    r"Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\..*",  # text embeddings
    r"Qformer\.bert\.embeddings\.position_ids",  # buffer of the text embeddings
    r"Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\..*",  # text FFN (queries use *_query)
    r"(vision_proj|text_proj|itm_head|t5_proj|opt_proj)\..*",  # LAVIS heads
    r"temp",  # contrastive temperature
    r"visual_encoder\..*",  # mgpt4 takes the ViT from eva_vit_g.pth
)

# Keys of a Hugging Face BLIP-2 folder that MiniGPT-4 does not use.
BLIP2_HF_IGNORED = (
    r"language_model\..*",
    r"language_projection\..*",
    r"qformer\.encoder\.layer\.\d+\.(intermediate|output)\..*",
    r"qformer\.embeddings\..*",
    r"(vision_projection|text_projection|itm_head)\..*",
)

# Buffers a MiniGPT-4 checkpoint's "model" may hold besides llama_proj.
PROJ_IGNORED = (
    r".*position_ids",
    r".*rotary_emb\.inv_freq",
    r".*attn\.k_bias",
)

# The weight names of each projector (`model.projector`), first Linear first.
PROJECTOR_KEYS = {
    "linear": ("llama_proj.weight", "llama_proj.bias"),
    "mlp2x_gelu": ("llama_proj.0.weight", "llama_proj.0.bias", "llama_proj.2.weight", "llama_proj.2.bias"),
}


def _projector_of(sd: dict) -> str | None:
    """Which projector a checkpoint's `llama_proj.*` keys were written by (None: neither form)."""
    for name, keys in PROJECTOR_KEYS.items():
        if keys[0] in sd:
            return name
    return None


# LLM size by hidden width, to say which model a projection was made for.
LLM_SIZES = {4096: "LLaMA/Vicuna-7B", 5120: "LLaMA/Vicuna-13B", 6656: "LLaMA-33B", 8192: "LLaMA-65B/70B"}


def _describe_width(width: int) -> str:
    name = LLM_SIZES.get(width)
    return f"hidden size {width} ({name})" if name else f"hidden size {width}"


def read_checkpoint(path: str, allow_pickle: bool = False) -> dict:
    """torch.load on CPU with `weights_only=True`: tensors, numbers, strings and plain containers only,
    so loading a file never runs code from it. Official files need nothing more: a MiniGPT-4 checkpoint's
    `config` is a plain dict (the runner saves `OmegaConf.to_container`), its optimizer and scaler states
    are tensors and numbers.

    A file that needs full unpickling raises WeightsError naming the file and the classes it carries;
    `allow_pickle=True` (`model.weights.allow_pickle`, for files you trust) loads it anyway.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weight file {path!r} does not exist")
    return torch_load(path, allow_pickle)


def torch_load(path: str, allow_pickle: bool = False):
    """`torch.load(path, weights_only=True)` on CPU (memory-mapped where the file allows it), or the
    refusal of `read_checkpoint`."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # Files in the pre-1.6 (non-zip) format cannot be memory-mapped; they load the same way.
            return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError) as e:  # torch's zip reader or mmap: a damaged or truncated file
        raise WeightsError(
            f"{path}: not a readable torch file: {(str(e).splitlines() or [repr(e)])[0]}"
        ) from None
    except (KeyError, IndexError, ValueError, TypeError):
        # The legacy unpickler reading bytes that are no pickle (a text or HTML file): `KeyError: 101`.
        raise WeightsError(_not_torch_file(path)) from None
    except pickle.UnpicklingError as e:
        classes = _unsafe_globals(path, e)
        if not classes and not _looks_like_torch_file(path):  # text: `Unsupported operand 118`
            raise WeightsError(_not_torch_file(path)) from None
        if not classes:
            raise WeightsError(f"{path}: not a readable torch file: {_unpickler_reason(e)}") from None
        if allow_pickle:
            log.warning(
                f"{path}: unpickling {', '.join(classes)} because model.weights.allow_pickle is set; "
                f"this runs whatever code the file names"
            )
            return torch.load(path, map_location="cpu", weights_only=False)
        raise WeightsError(
            f"{path}: refused: the file carries {', '.join(classes)}, which only full unpickling can "
            f"rebuild, and full unpickling can run code from the file. Re-save it with plain dicts and "
            f"tensors, or, if you trust the file, set model.weights.allow_pickle=true"
        ) from None


def _looks_like_torch_file(path: str) -> bool:
    """A zip archive (torch.save since 1.6) or a binary pickle (the legacy format)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith((b"PK\x03\x04", b"\x80"))


def _not_torch_file(path: str) -> str:
    """The line for a file that is no torch file at all (text, HTML, a Git LFS pointer)."""
    with open(path, "rb") as f:
        head = f.read(40)
    return (
        f"{path}: not a readable torch file: expected what torch.save writes (a zip archive or a "
        f"binary pickle), but it starts with {head!r}"
    )


def _unpickler_reason(error: Exception) -> str:
    """The specific line of torch's weights_only error, without its advice paragraphs."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return " ".join(ln for ln in lines if not ln.startswith(boilerplate)) or lines[0]


def _unsafe_globals(path: str, error: Exception) -> list[str]:
    """The classes and functions a torch file names that `weights_only` does not allow."""
    try:
        found = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # a legacy or damaged file: the loader's own message names the global
        found = []
    return found or re.findall(r"GLOBAL (\S+)", str(error))


def _unwrap_model(sd: dict, path: str) -> dict:
    if "model" not in sd or not isinstance(sd["model"], dict):
        raise WeightsError(
            f"{path}: expected a checkpoint of the form {{'model': {{...}}}}, found keys {sorted(sd)[:8]}"
        )
    return sd["model"]


def _compile(patterns: tuple[str, ...]) -> re.Pattern | None:
    return re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None


def plan_mapped(
    own: dict[str, torch.Tensor],
    state: dict[str, torch.Tensor],
    path: str,
    rename: Callable[[str], str | None],
    ignored: tuple[str, ...] = (),
    convert: Callable[[str, torch.Tensor, torch.Size], torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Match file keys to the model keys in `own` (full names) through `rename` (None = unexpected).

    Returns ({model key: tensor}, ignored file keys). `convert` may resize a tensor whose shape
    legitimately differs (pos_embed interpolation). Raises WeightsError listing every problem:
    unexpected keys, missing keys and shape mismatches, each with the file's key and both shapes.
    """
    ignore_re = _compile(ignored)
    problems: list[str] = []
    skipped: list[str] = []
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if ignore_re is not None and ignore_re.fullmatch(key):
            skipped.append(key)
            continue
        target = rename(key)
        if target is None or target not in own:
            problems.append(f"unexpected key {key!r} (no parameter {target or key} in the model)")
            continue
        expected = own[target].shape
        if convert is not None and tuple(tensor.shape) != tuple(expected):
            tensor = convert(target, tensor, expected)
        if tuple(tensor.shape) != tuple(expected):
            problems.append(
                f"key {key!r}: expected shape {list(expected)} for {target}, found {list(tensor.shape)}"
            )
            continue
        mapped[target] = tensor
    for k in own:
        if k not in mapped:
            problems.append(f"missing key for {k} (shape {list(own[k].shape)})")
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise WeightsError(f"{path}: {len(problems)} problem(s):\n  {shown}{more}")
    return mapped, skipped


def model_keys(model: nn.Module, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The model's state-dict entries (parameters and persistent buffers) under the given prefixes."""
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if k.startswith(prefixes)}


def load_mapped(
    model: nn.Module,
    prefixes: tuple[str, ...],
    state: dict[str, torch.Tensor],
    path: str,
    rename: Callable[[str], str | None],
    ignored: tuple[str, ...] = (),
    convert: Callable[[str, torch.Tensor, torch.Size], torch.Tensor] | None = None,
) -> list[str]:
    """Strictly load `state` into the part of `model` under `prefixes`; returns the ignored file keys."""
    own = model_keys(model, prefixes)
    mapped, skipped = plan_mapped(own, state, path, rename, ignored, convert)
    with torch.no_grad():
        for name, tensor in mapped.items():
            target = own[name]
            if target.is_meta:
                raise WeightsError(f"{path}: {name} is on the meta device; build the model on a real device")
            target.copy_(tensor.to(target.dtype))
    return skipped


# ---------------------------------------------------------------------------------------------
# eva_vit_g.pth

VIT_PREFIXES = ("visual_encoder.",)
QFORMER_PREFIXES = ("ln_vision.", "qformer.", "query_tokens")
PROJ_PREFIXES = ("llama_proj.",)


def vit_ignored(depth: int) -> tuple[str, ...]:
    """Blocks past the configured depth: the released file has 40, MiniGPT-4 uses 39."""
    return tuple(rf"blocks\.{i}\..*" for i in range(depth, depth + 64))


def rename_eva_vit(key: str) -> str:
    return "visual_encoder." + key


def load_eva_vit(model: MiniGPT4, path: str) -> list[str]:
    sd = read_checkpoint(path, model.cfg.weights.allow_pickle)
    if "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]

    def convert(target: str, tensor: torch.Tensor, expected: torch.Size) -> torch.Tensor:
        if target == "visual_encoder.pos_embed" and tensor.shape[-1] == expected[-1]:
            return interpolate_pos_embed(tensor, expected[1] - 1)
        return tensor

    return load_mapped(
        model, VIT_PREFIXES, sd, path, rename_eva_vit, vit_ignored(model.cfg.vision.depth), convert=convert
    )


# ---------------------------------------------------------------------------------------------
# BLIP-2 (LAVIS) checkpoint


def rename_blip2(key: str) -> str | None:
    """LAVIS names -> ours: `Qformer.bert.*` becomes transformers' `Blip2QFormerModel` naming."""
    if key == "query_tokens" or key.startswith("ln_vision."):
        return key
    if not key.startswith("Qformer.bert."):
        return None
    k = key[len("Qformer.bert.") :]
    k = k.replace("embeddings.LayerNorm.", "layernorm.")
    k = k.replace(".attention.self.", ".attention.attention.")
    k = k.replace(".crossattention.self.", ".crossattention.attention.")
    return "qformer." + k


def load_blip2(model: MiniGPT4, path: str) -> list[str]:
    """ln_vision, the Q-Former and the query tokens from `blip2_pretrained_flant5xxl.pth` (a model with
    a Q-Former: `ModelConfig.validate` refuses a BLIP-2 file without one)."""
    sd = _unwrap_model(read_checkpoint(path, model.cfg.weights.allow_pickle), path)
    return load_mapped(model, QFORMER_PREFIXES, sd, path, rename_blip2, BLIP2_IGNORED)


# ---------------------------------------------------------------------------------------------
# Hugging Face BLIP-2 folder (Blip2ForConditionalGeneration / Blip2Model save_pretrained)


def rename_blip2_hf(key: str) -> str | None:
    """A BLIP-2 folder's vision tower, Q-Former and query tokens -> ours (`mgpt4.model.hf_names`)."""
    if not key.startswith(("vision_model.", "qformer.", "query_tokens")):
        return None
    return from_hf_name(key)


def split_hf_qkv_bias(sd: dict[str, torch.Tensor], width: int, path: str) -> dict[str, torch.Tensor]:
    """Some transformers versions save cat(q_bias, 0, v_bias) as one qkv bias; the EVA ViT keeps q and v apart."""
    out = {}
    for key, v in sd.items():
        if key.startswith("vision_model.") and key.endswith(".self_attn.qkv.bias"):
            try:
                q_bias, v_bias = split_qkv_bias(v, width, key, path)
            except ValueError as e:
                raise WeightsError(str(e)) from None
            base = key[: -len("qkv.bias")]
            out[base + "q_bias"] = q_bias
            out[base + "v_bias"] = v_bias
        else:
            out[key] = v
    return out


def read_hf_state(
    folder: str, prefixes: tuple[str, ...], allow_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """Tensors whose names start with one of `prefixes` from a Hugging Face folder (safetensors or .bin)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"Hugging Face folder {folder!r} does not exist")
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    out: dict[str, torch.Tensor] = {}
    if files:
        from safetensors import safe_open

        for f in files:
            with safe_open(f, framework="pt") as st:
                for k in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if k.startswith(prefixes):
                        out[k] = st.get_tensor(k)
        return out
    bins = sorted(glob.glob(os.path.join(folder, "pytorch_model*.bin")))
    if not bins:
        raise WeightsError(f"{folder}: no *.safetensors or pytorch_model*.bin weight files found")
    for f in bins:
        sd = torch_load(f, allow_pickle)
        out.update({k: v for k, v in sd.items() if k.startswith(prefixes)})
    return out


def load_blip2_hf(model: MiniGPT4, folder: str) -> list[str]:
    """ViT, ln_vision, Q-Former and query tokens from a Hugging Face BLIP-2 folder (a model with a
    Q-Former, as `load_blip2`)."""
    sd = read_hf_state(folder, ("vision_model.", "qformer.", "query_tokens"), model.cfg.weights.allow_pickle)
    sd = split_hf_qkv_bias(sd, model.cfg.vision.width, folder)
    depth = model.cfg.vision.depth
    ignored = BLIP2_HF_IGNORED + tuple(
        rf"vision_model\.encoder\.layers\.{i}\..*" for i in range(depth, depth + 64)
    )
    return load_mapped(model, VIT_PREFIXES + QFORMER_PREFIXES, sd, folder, rename_blip2_hf, ignored)


# ---------------------------------------------------------------------------------------------
# A transformers vision tower folder (model.vision.kind hf)

# A two-tower folder (CLIP, SigLIP) keeps its vision model under this prefix; its other keys (the text
# tower, the contrastive projections and scale) are not the tower's.
HF_VISION_PREFIX = "vision_model."


def load_hf_tower(model: MiniGPT4, folder: str) -> list[str]:
    """The tower's weights from its folder through transformers' `from_pretrained` (which knows each
    model's checkpoint names, old and new), strictly: no parameter missing, none of another shape, and
    no key of the vision model left over; only a two-tower folder's other half is passed over.
    Returns those ignored keys; WeightsError naming the folder otherwise."""
    import transformers

    inner = model.visual_encoder.model
    two_tower = read_tower_folder(folder).two_tower
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its table of the text half's keys: reported here instead
    try:
        loaded, info = type(inner).from_pretrained(
            folder,
            config=inner.config,
            dtype=next(inner.parameters()).dtype,
            local_files_only=True,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported below, by name and shapes, as a problem
        )
    except (RuntimeError, ValueError, OSError) as e:
        raise WeightsError(
            f"{folder}: the tower's weights do not load: {(str(e).splitlines() or [repr(e)])[0]}"
        ) from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    ignored = [k for k in info["unexpected_keys"] if two_tower and not k.startswith(HF_VISION_PREFIX)]
    problems = [f"missing key {k}" for k in sorted(info["missing_keys"])]
    problems += [
        f"key {m[0]}: found {list(m[1])}, expected {list(m[2])}"
        if isinstance(m, tuple) and len(m) == 3
        else f"key {m}"
        for m in info.get("mismatched_keys", [])
    ]
    problems += [f"unexpected key {k}" for k in sorted(set(info["unexpected_keys"]) - set(ignored))]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise WeightsError(f"{folder}: the weights do not fit its {type(inner).__name__}: {shown}")
    device = next(inner.parameters()).device
    model.visual_encoder.model = loaded.to(device)
    return sorted(ignored)


# ---------------------------------------------------------------------------------------------
# MiniGPT-4 checkpoint: llama_proj


def _describe_variants(cfg, file_width: int) -> dict[int, str]:
    """The projection input width of each MiniGPT-4 variant at this model's sizes, named."""
    vision = cfg.vision.width * PATCHES_PER_IMAGE_TOKEN
    out = {
        vision: f"the LLaMA-2 variant (no Q-Former: {PATCHES_PER_IMAGE_TOKEN} ViT tokens of width "
        f"{cfg.vision.width} concatenated, input {vision})"
    }
    # Without Q-Former sizes in the config, any other width is taken for a Q-Former's (768 in BLIP-2).
    q_width = cfg.qformer.width if cfg.qformer is not None else (file_width if file_width != vision else 768)
    out.setdefault(q_width, f"the Q-Former variant (Vicuna MiniGPT-4: Q-Former queries, input {q_width})")
    return out


def load_proj(model: MiniGPT4, path: str) -> list[str]:
    """`llama_proj.*` from a MiniGPT-4 checkpoint (`{"model": {...}}`); known buffers are tolerated."""
    sd = _unwrap_model(read_checkpoint(path, model.cfg.weights.allow_pickle), path)
    made_as = _projector_of(sd)
    if made_as is not None and made_as != model.cfg.projector:
        raise WeightsError(
            f"{path}: the projection is a {made_as} projector (keys {sorted(PROJECTOR_KEYS[made_as])}), but "
            f"model.projector is {model.cfg.projector}: set model.projector={made_as}, or use a checkpoint "
            f"made with {model.cfg.projector}"
        )
    first, last = projector_linears(model.llama_proj)
    in_key, out_key = PROJECTOR_KEYS[model.cfg.projector][0], PROJECTOR_KEYS[model.cfg.projector][-1]
    w = sd.get(in_key)
    expected = first.weight.shape
    # The official towers' widths are named by variant below; any other tower's by its settings.
    general = model.cfg.projector != "linear" or model.cfg.vision.kind != "eva_vit_g"
    if general and w is not None and w.ndim == 2 and w.shape[1] != expected[1]:
        raise WeightsError(
            f"{path}: key {in_key!r} has shape {list(w.shape)}, made for image tokens of width "
            f"{w.shape[1]}, but this model's tower and connector give width {expected[1]} "
            f"({model.cfg.vision.kind}, connector {model.cfg.connector_kind()}): use the projector "
            "checkpoint made for this tower and connector"
        )
    out_w, out_expected = sd.get(out_key), last.weight.shape
    if general and out_w is not None and out_w.ndim == 2 and out_w.shape[0] != out_expected[0]:
        raise WeightsError(
            f"{path}: key {out_key!r} has shape {list(out_w.shape)}, made for an LLM with "
            f"{_describe_width(out_w.shape[0])}, but this model's LLM has {_describe_width(out_expected[0])} "
            f"and expects {list(out_expected)}. Use the projection checkpoint made for this LLM "
            f"(or set model.llm to the LLM the checkpoint was trained with)."
        )
    if w is not None and w.ndim == 2 and w.shape[1] != expected[1]:
        variants = _describe_variants(model.cfg, w.shape[1])
        made_for = variants.get(w.shape[1], f"a model whose image tokens have width {w.shape[1]}")
        this = variants.get(expected[1], f"image tokens of width {expected[1]}")
        raise WeightsError(
            f"{path}: key 'llama_proj.weight' has shape {list(w.shape)}, made for {made_for}, but this "
            f"model is {this} and expects {list(expected)}. Set model.qformer to match the checkpoint "
            f"(null for the LLaMA-2 variant), or use the projection made for this variant."
        )
    if w is not None and w.ndim == 2 and w.shape[0] != expected[0]:
        raise WeightsError(
            f"{path}: key 'llama_proj.weight' has shape {list(w.shape)}, made for an LLM with "
            f"{_describe_width(w.shape[0])}, but this model's LLM has {_describe_width(expected[0])} "
            f"and expects {list(expected)}. Use the projection checkpoint made for this LLM "
            f"(or set model.llm to the LLM the checkpoint was trained with)."
        )
    rename = lambda k: k if k.startswith("llama_proj.") else None  # noqa: E731
    return load_mapped(model, PROJ_PREFIXES, sd, path, rename, PROJ_IGNORED)


# ---------------------------------------------------------------------------------------------
# LLM folder


def load_llm(model: MiniGPT4, folder: str) -> None:
    """Replace the (meta) LLM with the Hugging Face folder's weights, whatever decoder it holds
    (`AutoModelForCausalLM`); sizes set in `model.llm` must match its config.json. With
    `model.precision.llm` int8 or nf4 it is quantised as it is read, onto the current CUDA device
    (`quantized_llm`)."""
    from transformers import AutoModelForCausalLM

    cfg = model.cfg
    if cfg.precision.llm in QUANTIZED:
        model.llm = quantized_llm(folder, cfg.precision.llm, cfg.attn_implementation)
        return
    # The folder's sizes were checked against model.llm when the model was built (`MiniGPT4`).
    llm, info = AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=DTYPES[cfg.precision.llm],
        attn_implementation=cfg.attn_implementation,
        local_files_only=True,
        output_loading_info=True,
    )
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise WeightsError(f"{folder}: LLM weights do not fit {type(llm).__name__}: {bad}")
    model.llm = llm


def quantized_llm(
    folder: str,
    quant: str,
    attn_implementation: str,
    device: torch.device | None = None,
    compute_dtype: torch.dtype = torch.bfloat16,
) -> torch.nn.Module:
    """The folder's LLM with its decoder layers' Linear weights quantised by bitsandbytes as they are read
    (the one quantised path: training and the inference loader's --llm-8bit): `quant` "int8" is
    LLM.int8() (one byte per weight plus an fp32 scale per output row), "nf4" is 4-bit NormalFloat as in
    QLoRA (half a byte per weight plus an fp32 absmax per 64 weights). Embeddings, norms and the output
    head stay in `compute_dtype`, which the quantised matmuls compute in. On `device` (default: the
    current CUDA device); a bitsandbytes model must not be moved afterwards (`.to` would undo it).

    Source: transformers' `BitsAndBytesConfig` (bitsandbytes integration); QLoRA, Dettmers et al. 2023.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if quant == "int8":
        qc = BitsAndBytesConfig(load_in_8bit=True)
    elif quant == "nf4":
        qc = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
        )
    else:
        raise ValueError(f"quantisation: expected one of {QUANTIZED}, got {quant!r}")
    device = device if device is not None else torch.device("cuda", torch.cuda.current_device())
    return AutoModelForCausalLM.from_pretrained(
        folder,
        quantization_config=qc,
        dtype=compute_dtype,
        device_map={"": device},
        attn_implementation=attn_implementation,
        local_files_only=True,
    )


# ---------------------------------------------------------------------------------------------
# A timm tower's weight file (model.vision.kind timm, model.weights.timm)

# The classifier head (and a CLIP model's projection, which timm keeps as `head`): the tower is built
# without it (num_classes=0), as a tower's tokens need none.
TIMM_IGNORED = (r"head\..*",)


def read_timm_state(path: str, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A timm state dict from `path`: .safetensors (a hub download's model.safetensors), or a torch file
    (`torch.save(model.state_dict())`, or one holding it under "state_dict" or "model")."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weight file {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:  # safetensors' own error types: a damaged or truncated file
            raise WeightsError(
                f"{path}: not a readable safetensors file: {(str(e).splitlines() or [repr(e)])[0]}"
            ) from None
    sd = torch_load(path, allow_pickle)
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise WeightsError(f"{path}: expected a state dict (names -> tensors), found {type(sd).__name__}")
    return sd


def load_timm_tower(model: MiniGPT4, path: str) -> list[str]:
    """The timm tower's weights from one file, strictly (every key of the built model, each of its
    shape; only `head.*` passed over); returns those ignored keys. WeightsError naming the file, each
    key and both shapes otherwise."""
    sd = read_timm_state(path, model.cfg.weights.allow_pickle)
    return load_mapped(
        model, ("visual_encoder.model.",), sd, path, lambda k: f"visual_encoder.model.{k}", TIMM_IGNORED
    )


def load_weights(model: MiniGPT4) -> dict[str, list[str]]:
    """Load every file named in `model.cfg.weights`; returns the ignored keys per file.

    The config was validated when the model was built; one changed since is validated again here
    (ConfigError), so a file the model cannot take is refused before any is read."""
    model.cfg.validate_once()
    w = model.cfg.weights
    ignored: dict[str, list[str]] = {}
    if model.cfg.vision.kind == "hf":
        ignored[model.cfg.vision.folder] = load_hf_tower(model, model.cfg.vision.folder)
    if w.timm:
        ignored[w.timm] = load_timm_tower(model, w.timm)
    if w.eva_vit:
        ignored[w.eva_vit] = load_eva_vit(model, w.eva_vit)
    if w.blip2:
        ignored[w.blip2] = load_blip2(model, w.blip2)
    if w.blip2_hf:
        ignored[w.blip2_hf] = load_blip2_hf(model, w.blip2_hf)
    if w.llm:
        load_llm(model, w.llm)
    if w.proj:
        _refuse_lora_projection(model, w.proj)
        ignored[w.proj] = load_proj(model, w.proj)
        first, last = projector_linears(model.llama_proj)
        shape = [last.weight.shape[0], first.weight.shape[1]]
        kind = "" if model.cfg.projector == "linear" else f" ({model.cfg.projector})"
        log.info(f"projection llama_proj{kind} {shape} loaded from {w.proj}")
    if model.cfg.lora.enabled():
        # After the LLM's weights: PEFT wraps the loaded layers (the adapters are no part of its folder).
        attach_lora(model)
        if w.lora:
            load_lora(model, w.lora)
            log.info(f"LoRA adapters (rank {model.cfg.lora.rank}) loaded from {w.lora}")
    return ignored


def _refuse_lora_projection(model: MiniGPT4, proj: str) -> None:
    """A projection trained with LoRA adapters (a LoRA checkpoint's, with its adapter folder beside it)
    means little without them: a model without model.lora refuses it (WeightsError)."""
    adapters = os.path.join(os.path.dirname(proj), LORA_DIR)
    if not model.cfg.lora.enabled() and os.path.isdir(adapters):
        raise WeightsError(
            f"{proj} was trained with LoRA adapters ({adapters}), and model.lora is off: set model.lora as "
            f"that run did and model.weights.lora={adapters} (or load its checkpoint, which does both)"
        )
