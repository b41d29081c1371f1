"""Demo assets for the tiny recipes: synthetic data and a tiny model written as official weight files.

Two separate steps, so that a dry run stays dry:
- `fill_demo_paths(cfg)` (pure): every data or weight path the user left unset points to where the
  assets live in the cache (MGPT4_CACHE, default ~/.cache/mgpt4); paths the user set are kept, so
  `--set data.sources.0.shards=...` or `--set model.weights.proj=...` take effect.
- `ensure_demo_assets(cfg)`: the first step of a real run (training, feature extraction, the
  benchmark); generates whichever of those cache paths are missing, once, and reuses them afterwards.
  Rank 0 generates them, the other ranks wait for it and then find them.
The tiny model goes through the same strict loaders as the real files, so the default job exercises
the real path.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

import torch

from mgpt4.config import Config, ModelConfig, WeightsConfig
from mgpt4.data.synthetic import ensure_synthetic, synthetic_location
from mgpt4.dist import barrier, process_rank
from mgpt4.model.prompts import STAGE2_INSTRUCTIONS, STAGE2_TEMPLATE, VICUNA_V0_SYSTEM

ASSETS_VERSION = 1
# Held-out samples generated beside the synthetic training data, for the tiny recipes' val/loss.
DEMO_VAL_SAMPLES = 32


log = logging.getLogger(__name__)


def cache_root() -> str:
    return os.environ.get("MGPT4_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mgpt4")


def _size_tag(cfg: ModelConfig, own_llm: bool = False) -> str:
    v, q, m = cfg.vision, cfg.qformer, cfg.llm
    qformer = f"q{q.width}x{q.depth}x{q.num_query_tokens}" if q is not None else "noq"
    llm = "-nollm" if own_llm else f"-llm{m.hidden_size}x{m.num_layers}-voc{m.vocab_size}"
    return f"v{ASSETS_VERSION}-vit{v.image_size}-{v.patch_size}-{v.width}x{v.depth}-{qformer}{llm}"


def tiny_weights_location(cfg: ModelConfig, seed: int = 0, own_llm: bool = False) -> WeightsConfig:
    """Where the tiny model of `cfg`'s sizes lives in the cache (whether or not it exists yet).

    `own_llm`: the run brings its own LLM folder, so only the vision files are tiny: a folder of
    them alone (`llm` None), made without a tokenizer or LLM and keyed by the vision sizes only.
    """
    final = os.path.join(cache_root(), "tiny-weights", f"{_size_tag(cfg, own_llm)}-seed{seed}")
    return WeightsConfig(
        eva_vit=os.path.join(final, "eva_vit_g.pth"),
        # Without a Q-Former (the LLaMA-2 variant) no BLIP-2 file is made or read.
        blip2=os.path.join(final, "blip2_pretrained.pth") if cfg.qformer is not None else None,
        llm=None if own_llm else os.path.join(final, "llm"),
    )


def _tiny_for(cfg: ModelConfig) -> WeightsConfig:
    """The tiny files this config's demo paths point to: the whole tiny model, or the vision files
    alone when `model.weights.llm` names another folder (the user's LLM)."""
    llm = cfg.weights.llm
    return tiny_weights_location(cfg, own_llm=bool(llm) and llm != tiny_weights_location(cfg).llm)


def ensure_tiny_weights(
    cfg: ModelConfig, captions: list[str], seed: int = 0, own_llm: bool = False
) -> WeightsConfig:
    """Official-format files of a random model with `cfg`'s sizes and a tokenizer trained on `captions`;
    with `own_llm`, the vision files alone (see `tiny_weights_location`)."""
    from mgpt4.model.export import save_official_files
    from mgpt4.model.minigpt4 import MiniGPT4
    from mgpt4.tokenizer import train_tiny_tokenizer

    weights = tiny_weights_location(cfg, seed, own_llm)
    final = os.path.dirname(weights.eva_vit)
    if os.path.isdir(final):
        return weights
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tiny-", dir=os.path.dirname(final))
    try:
        if own_llm:
            torch.manual_seed(seed)
            _save_tiny_vision(cfg, tmp)
        else:
            corpus = [
                *captions,
                VICUNA_V0_SYSTEM,
                *(STAGE2_TEMPLATE.format(i) for i in STAGE2_INSTRUCTIONS),
            ] * 4
            tokenizer = train_tiny_tokenizer(
                corpus, os.path.join(tmp, "tokenizer"), vocab_size=cfg.llm.vocab_size
            )
            torch.manual_seed(seed)
            bare = ModelConfig(vision=cfg.vision, qformer=cfg.qformer, llm=cfg.llm)
            save_official_files(MiniGPT4(bare, tokenizer=tokenizer), tmp)
            shutil.rmtree(os.path.join(tmp, "tokenizer"))
        _publish(tmp, final)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return weights


def _save_tiny_vision(cfg: ModelConfig, root: str) -> None:
    """eva_vit_g.pth and the BLIP-2 file of a random vision path of `cfg`'s sizes, as
    `save_official_files` writes them, without building an LLM or a tokenizer."""
    from mgpt4.model.export import lavis_qformer_key
    from mgpt4.model.qformer import build_qformer
    from mgpt4.model.vision import FP32LayerNorm, build_eva_vit

    w = tiny_weights_location(cfg, own_llm=True)
    torch.save(build_eva_vit(cfg.vision).state_dict(), os.path.join(root, os.path.basename(w.eva_vit)))
    if w.blip2 is not None:
        n_img, img_width = cfg.image_token_shape()
        ln = FP32LayerNorm(cfg.vision.width, eps=cfg.vision.ln_vision_eps)
        qformer = build_qformer(cfg.qformer, encoder_width=cfg.vision.width)
        blip2 = {"query_tokens": torch.randn(1, n_img, img_width) * 0.02}
        blip2.update({f"ln_vision.{k}": v for k, v in ln.state_dict().items()})
        blip2.update({lavis_qformer_key(k): v for k, v in qformer.state_dict().items()})
        torch.save({"model": blip2}, os.path.join(root, os.path.basename(w.blip2)))


# ChatML, as Qwen2-Instruct's tokenizer writes it (a default system turn when none is given).
CHATML_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_decoder_location(seed: int = 0) -> str:
    """Where the tiny random Qwen2 folder of the `tiny_decoder_*` recipes lives in the cache."""
    return os.path.join(cache_root(), "tiny-decoders", f"v{ASSETS_VERSION}-qwen2-seed{seed}")


def ensure_tiny_decoder(captions: list[str], seed: int = 0) -> str:
    """A Hugging Face folder as `save_pretrained` writes a Qwen2-Instruct model, at toy size: a random
    Qwen2ForCausalLM (80 wide, 2 layers, 4 heads over 2 key-value heads, tied embeddings) and a
    byte-level BPE tokenizer trained on `captions` and the chat markup, without BOS, `<|im_end|>` as
    EOS and a ChatML chat template. What a newcomer without a decoder folder trains "any Hugging Face
    decoder" on; its sizes are not the tiny preset's, so they can only come from its config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

    final = tiny_decoder_location(seed)
    if os.path.isdir(final):
        return final
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tiny-", dir=os.path.dirname(final))
    try:
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=500,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        bpe.train_from_iterator(
            [*captions, *STAGE2_INSTRUCTIONS, "You are a helpful assistant."] * 4, trainer
        )
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
        )
        tokenizer.chat_template = CHATML_TEMPLATE
        tokenizer.save_pretrained(tmp)
        config = Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=80,
            intermediate_size=144,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp)
        _publish(tmp, final)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# Tiny vision towers (`model.vision.kind: hf`): two-tower CLIP, SigLIP and SigLIP2 folders as
# `save_pretrained` writes them, 56 px, patch 14 (16 patches), 32 wide, 2 layers; CLIP with a class token.
TOWER_FAMILIES = ("siglip", "clip", "siglip2")
TINY_TOWER_SIZES = {"image_size": 56, "patch_size": 14, "width": 32, "depth": 2, "heads": 4}


def write_tiny_tower(folder: str, family: str = "siglip", seed: int = 0) -> str:
    """A random two-tower `family` model (CLIP, SigLIP or SigLIP2, the text half at toy size too) saved
    with its preprocessor_config.json (56 px; CLIP's mean/std, SigLIP's 0.5; SigLIP2's at most 16
    patches of 14, which a square image fills as 4 x 4) into `folder`, as transformers writes a
    downloaded one. Returns `folder`."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        Siglip2Config,
        Siglip2ImageProcessor,
        Siglip2Model,
        SiglipConfig,
        SiglipImageProcessor,
        SiglipModel,
    )

    if family not in TOWER_FAMILIES:
        raise ValueError(f"tiny tower: expected one of {TOWER_FAMILIES}, got {family!r}")
    t = TINY_TOWER_SIZES
    vision = dict(
        hidden_size=t["width"],
        intermediate_size=2 * t["width"],
        num_hidden_layers=t["depth"],
        num_attention_heads=t["heads"],
        image_size=t["image_size"],
        patch_size=t["patch_size"],
    )
    text = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        vocab_size=64,
        max_position_embeddings=16,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    if family == "clip":
        model = CLIPModel(CLIPConfig(vision_config=vision, text_config=text))
        side = t["image_size"]
        pre = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    elif family == "siglip2":
        grid = (t["image_size"] // t["patch_size"]) ** 2
        vision = {k: v for k, v in vision.items() if k != "image_size"} | {"num_patches": grid}
        model = Siglip2Model(Siglip2Config(vision_config=vision, text_config=text))
        pre = Siglip2ImageProcessor(patch_size=t["patch_size"], max_num_patches=grid)
    else:
        model = SiglipModel(SiglipConfig(vision_config=vision, text_config=text))
        pre = SiglipImageProcessor(size={"height": t["image_size"], "width": t["image_size"]})
    model.save_pretrained(folder)
    pre.save_pretrained(folder)
    return folder


def tiny_tower_location(family: str = "siglip", seed: int = 0) -> str:
    """Where the tiny random tower folder of the `tiny_tower_*` recipes lives in the cache."""
    return os.path.join(cache_root(), "tiny-towers", f"v{ASSETS_VERSION}-{family}-seed{seed}")


def ensure_tiny_tower(family: str = "siglip", seed: int = 0) -> str:
    """`write_tiny_tower` into the cache once (an atomic rename: ranks racing here end with one folder)."""
    final = tiny_tower_location(family, seed)
    if os.path.isdir(final):
        return final
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tower-", dir=os.path.dirname(final))
    try:
        write_tiny_tower(tmp, family, seed)
        _publish(tmp, final)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _wants_tiny_decoder(cfg: ModelConfig) -> bool:
    """A demo config whose LLM sizes come from a folder (the `tiny_decoder_*` recipes: one left null
    cannot be made up): its unset `model.weights.llm` is the tiny Qwen2 folder, whose config.json
    must then agree with any size that is set."""
    m = cfg.llm
    return m.hidden_size is None or m.num_layers is None or m.vocab_size is None


def fill_demo_paths(cfg: Config) -> list[str]:
    """Point every unset data and weight path of a demo recipe into the cache (in place, no I/O).

    Returns the filled paths: those `ensure_demo_assets` generates when they are missing.
    """
    if not cfg.train.demo_assets:
        return []
    filled: list[str] = []
    synthetic = synthetic_location(val=DEMO_VAL_SAMPLES)
    val = cfg.data.val
    if cfg.data.kind == "align":
        if not cfg.data.align_root:
            cfg.data.align_root = synthetic.align_root
            filled.append(synthetic.align_root)
        if val.enabled() and not val.align_root and not val.holdout:
            val.align_root = synthetic.val_align_root
            filled.append(val.align_root)
    else:
        for src in cfg.data.sources:
            if not src.shards and not src.is_annotations():
                src.shards = list(synthetic.shards)
                filled.extend(synthetic.shards)
        if val.enabled() and not val.shards:
            val.shards = list(synthetic.val_shards)
            filled.extend(synthetic.val_shards)
    if cfg.model.vision.kind == "hf" and cfg.model.vision.folder == tiny_tower_location():
        filled.append(cfg.model.vision.folder)  # the tiny_tower recipes' SigLIP, made by the first run
    w = cfg.model.weights
    if not w.llm and _wants_tiny_decoder(cfg.model):
        w.llm = tiny_decoder_location()
        filled.append(w.llm)
    tiny = _tiny_for(cfg.model)  # your own LLM folder: no tiny LLM or tokenizer is pointed to or made
    names = [n for n in ("eva_vit", "blip2", "llm") if getattr(tiny, n)]
    if cfg.model.vision.kind != "eva_vit_g":  # the tower's own folder or file: no EVA or BLIP-2 file
        names = [n for n in names if n == "llm"]
    if not all(getattr(w, n) for n in names) and not w.blip2_hf:
        for name in names:
            if not getattr(w, name):
                setattr(w, name, getattr(tiny, name))
                filled.append(getattr(tiny, name))
    return filled


def synthetic_val_for_own_data(cfg: Config, filled: list[str]) -> str | None:
    """The warning for a demo run that trains on the user's data but validates on the synthetic held-out
    set `fill_demo_paths` filled in (its `filled` paths); None when training and validation data agree.
    Such a val/loss says nothing about the user's data, and choosing their held-out set is theirs."""
    val = cfg.data.val

    def ours(shards: str | list[str]) -> bool:  # a spec the user set is a string or their own list
        return not isinstance(shards, str) and bool(shards) and all(s in filled for s in shards)

    if cfg.data.kind == "align":
        own, what, field = cfg.data.align_root not in filled, "data.align_root", "data.val.align_root"
        synthetic_val = bool(val.align_root) and val.align_root in filled
    else:
        own = any(src.is_annotations() or not ours(src.shards) for src in cfg.data.sources)
        what, field, synthetic_val = "data.sources", "data.val.shards", ours(val.shards)
    if not (own and synthetic_val and val.enabled()):
        return None
    return (
        f"{field}: the recipe's synthetic held-out set, while {what} is yours: val/loss will measure "
        f"the synthetic data; set {field} to held-out data of yours, or turn validation off with "
        f"--set data.val.samples=0 --set train.eval_every=0"
    )


def ensure_demo_assets(cfg: Config) -> None:
    """Generate the cache files that `fill_demo_paths` pointed the config to, where missing.

    Rank 0 generates them, every rank meets it (a barrier, when there is a process group), then the
    others find them, or make their node's copy where nodes do not share the cache folder: called
    by every rank of a job. Nothing without demo assets (the same on every rank: the config is).
    """
    if not cfg.train.demo_assets:
        return
    rank = process_rank()[0]
    if rank == 0:
        _make_missing(cfg)
    barrier()
    if rank != 0:
        _make_missing(cfg)


def _make_missing(cfg: Config) -> None:
    """What `ensure_demo_assets` does on one rank. The synthetic set is made when the data uses it or a
    tiny model is still to be made (its tokenizer is trained on the synthetic captions). Safe on
    several ranks at once (atomic renames)."""
    d, w = cfg.data, cfg.model.weights
    synthetic = synthetic_location(val=DEMO_VAL_SAMPLES)
    data_paths = (
        [d.align_root or "", d.val.align_root or ""]
        if d.kind == "align"
        else [
            p
            for shards in [*(src.shards for src in d.sources), d.val.shards]
            for p in ([shards] if isinstance(shards, str) else shards)
        ]
    )
    decoder = w.llm == tiny_decoder_location() and not os.path.isdir(w.llm)
    tiny = _tiny_for(cfg.model)
    uses_tiny = bool({tiny.eva_vit, tiny.blip2, tiny.llm} & {w.eva_vit, w.blip2, w.llm} - {None})
    missing_tiny = uses_tiny and not os.path.isdir(os.path.dirname(tiny.eva_vit))
    # The tiny tokenizer is trained on the synthetic captions; the vision files alone need none.
    make_synthetic = (
        (missing_tiny and tiny.llm) or decoder or any(p.startswith(synthetic.root) for p in data_paths)
    )
    tower = cfg.model.vision.kind == "hf" and cfg.model.vision.folder == tiny_tower_location()
    if (
        missing_tiny
        or decoder
        or (tower and not os.path.isdir(tiny_tower_location()))
        or (make_synthetic and not os.path.isdir(synthetic.root))
    ):  # said once, so that a first run's minute and the cache's megabytes have a place
        log.info("first use: writing the demo data and tiny weights under %s", cache_root())
    if make_synthetic:
        synthetic = ensure_synthetic(val=DEMO_VAL_SAMPLES)
    if decoder:
        ensure_tiny_decoder(synthetic.captions)
    if tower:
        ensure_tiny_tower()
    if missing_tiny:
        ensure_tiny_weights(cfg.model, synthetic.captions, own_llm=tiny.llm is None)


def _publish(tmp: str, final: str) -> None:
    """Rename the finished folder `tmp` to `final`, atomically: ranks racing here all end with the same
    complete folder (a rank that loses the race keeps the winner's and drops its own)."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not os.path.isdir(final):
            raise
