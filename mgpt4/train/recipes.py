"""Named recipes: the official stage-1 / stage-2 hyper-parameters for Vicuna 7B and 13B and for
Llama-2-Chat 7B (the official `minigpt4_llama2` configs: the same schedules, learning rates, batch
sizes and source ratios), the same for any Hugging Face decoder, and tiny CPU ones.

A recipe is a function returning the whole typed config tree. Paths to weights and data follow the
official download layout under `weights/` and `data/`; override them from the command line, e.g.
`--set model.weights.llm=/models/vicuna-13b --set data.sources.0.shards='/laion/{00000..10488}.tar'`.
Each recipe writes to its own folder, `outputs/<recipe>`, so stage 2 never lands in stage 1's run.
"""

from __future__ import annotations

from collections.abc import Callable

from mgpt4.config import (
    Config,
    LLMConfig,
    ModelConfig,
    OptimConfig,
    TextConfig,
    TrainConfig,
    VisionConfig,
    WeightsConfig,
)
from mgpt4.data.config import DataConfig, SourceConfig, ValConfig
from mgpt4.model.presets import (
    decoder,
    llama2_7b,
    stage1_text,
    stage2_text,
    tiny,
    tiny_llama2,
    vicuna7b,
    vicuna13b,
)
from mgpt4.train.assets import DEMO_VAL_SAMPLES, TINY_TOWER_SIZES, tiny_tower_location


def _official_weights(llm: str, qformer: bool = True) -> WeightsConfig:
    # The LLaMA-2 variant has no Q-Former, so no BLIP-2 file: its ln_vision stays fresh.
    return WeightsConfig(
        eva_vit="weights/eva_vit_g.pth",
        blip2="weights/blip2_pretrained_flant5xxl.pth" if qformer else None,
        llm=f"weights/{llm}",
    )


def _stage1(model_fn, llm: str, name: str) -> Config:
    model = model_fn()
    model.text = stage1_text(model.text.template)
    model.weights = _official_weights(llm, model.qformer is not None)
    return Config(
        recipe=name,
        model=model,
        data=DataConfig(
            kind="webdataset",
            sources=[
                SourceConfig(name="laion", shards="data/laion/{00000..10488}.tar", ratio=115.0),
                SourceConfig(name="cc_sbu", shards="data/cc_sbu/{00000..01255}.tar", ratio=14.0),
            ],
            mix="batch",
            resampled=True,
        ),
        optim=OptimConfig(lr=1e-4, min_lr=8e-5, warmup_lr=1e-6, warmup_steps=5000, weight_decay=0.05),
        train=TrainConfig(
            steps=20000,
            global_batch_size=256,
            save_every=1000,
            sample_every=1000,
            output_dir=f"outputs/{name}",
        ),
    )


def _stage2(model_fn, llm: str, name: str) -> Config:
    model = model_fn()
    model.text = stage2_text(model.text.template)
    model.weights = _official_weights(llm, model.qformer is not None)
    # Stage 2 starts from a stage-1 projection: an mgpt4 export or the official checkpoint.
    model.weights.proj = "weights/stage1_llama_proj.pth"
    return Config(
        recipe=name,
        model=model,
        data=DataConfig(kind="align", align_root="data/cc_sbu_align", num_workers=4),
        optim=OptimConfig(lr=3e-5, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=200, weight_decay=0.05),
        train=TrainConfig(
            steps=1000, global_batch_size=12, save_every=200, sample_every=200, output_dir=f"outputs/{name}"
        ),
    )


def stage1_vicuna13b() -> Config:
    return _stage1(vicuna13b, "vicuna-13b", "stage1_vicuna13b")


def stage1_vicuna7b() -> Config:
    return _stage1(vicuna7b, "vicuna-7b", "stage1_vicuna7b")


def stage2_vicuna13b() -> Config:
    return _stage2(vicuna13b, "vicuna-13b", "stage2_vicuna13b")


def stage2_vicuna7b() -> Config:
    return _stage2(vicuna7b, "vicuna-7b", "stage2_vicuna7b")


def stage1_llama2_7b() -> Config:
    """The official `minigpt4_llama2_stage1_pretrain`: no Q-Former, Llama-2-Chat-7B."""
    return _stage1(llama2_7b, "Llama-2-7b-chat-hf", "stage1_llama2_7b")


def stage2_llama2_7b() -> Config:
    """The official `minigpt4_llama2_stage2_finetune`: `[INST] {} [/INST] `, answers end with `</s>`."""
    return _stage2(llama2_7b, "Llama-2-7b-chat-hf", "stage2_llama2_7b")


def stage1_decoder() -> Config:
    """Stage 1 on any Hugging Face decoder (`--set model.weights.llm=DIR`), the Vicuna recipe otherwise."""
    return _stage1(decoder, "decoder", "stage1_decoder")


def stage2_decoder() -> Config:
    """Stage 2 on any Hugging Face decoder, in its tokenizer's chat template, answers ending with its EOS."""
    return _stage2(decoder, "decoder", "stage2_decoder")


def _tower(model: ModelConfig, folder: str | None = None) -> ModelConfig:
    """`model` on a transformers vision tower (`model.vision.kind: hf`; its sizes are read from the folder
    when the config is validated), as LLaVA-1.5 uses one: the penultimate layer's patch tokens, every
    one of them (no Q-Former), through the mlp2x_gelu projector."""
    model.vision = VisionConfig(kind="hf", folder=folder or "weights/vision_tower", feature_layer=-2)
    model.qformer, model.connector, model.projector = None, "none", "mlp2x_gelu"
    model.weights.eva_vit = model.weights.blip2 = None  # the tower's weights are in its folder
    return model


def stage1_tower() -> Config:
    """Stage 1 on any transformers vision tower (`--set model.vision.folder=DIR`: CLIP, SigLIP, DINOv2)
    and any Hugging Face decoder (`--set model.weights.llm=DIR`); the Vicuna recipe's schedule."""
    cfg = _stage1(decoder, "decoder", "stage1_tower")
    _tower(cfg.model)
    return cfg


def stage2_tower() -> Config:
    """Stage 2 on a vision tower and a decoder, from stage1_tower's projection (`model.weights.proj`)."""
    cfg = _stage2(decoder, "decoder", "stage2_tower")
    _tower(cfg.model)
    return cfg


def _tiny_train(steps: int, name: str) -> TrainConfig:
    return TrainConfig(
        steps=steps,
        eval_every=steps // 2,
        precision="fp32",
        save_every=20,
        log_every=5,
        sample_every=0,
        num_sample_images=4,
        output_dir=f"outputs/{name}",
        demo_assets=True,
    )


def tiny_stage1() -> Config:
    """The tiny model on synthetic shards; weights and data are generated into the cache on first use."""
    model = tiny()
    model.text = stage1_text()
    return Config(
        recipe="tiny_stage1",
        model=model,
        # The source's shards are left unset: the synthetic set fills them unless --set gives some.
        data=DataConfig(
            kind="webdataset",
            sources=[SourceConfig(name="synthetic")],
            batch_size=8,
            num_workers=1,
            image_size=56,
            shuffle_buffer=64,
            # Held-out synthetic shards (generated with the training ones) unless --set gives yours.
            val=ValConfig(samples=DEMO_VAL_SAMPLES),
        ),
        optim=OptimConfig(lr=1e-3, min_lr=1e-4, warmup_lr=1e-5, warmup_steps=5),
        train=_tiny_train(40, "tiny_stage1"),
    )


def tiny_stage2() -> Config:
    model = tiny()
    model.text = stage2_text()
    model.text.max_txt_len = 48
    return Config(
        recipe="tiny_stage2",
        model=model,
        data=DataConfig(
            kind="align",
            batch_size=4,
            num_workers=1,
            image_size=56,
            val=ValConfig(samples=DEMO_VAL_SAMPLES),  # a held-out synthetic cc_sbu_align folder
        ),
        optim=OptimConfig(lr=3e-4, min_lr=1e-4, warmup_lr=1e-5, warmup_steps=5),
        train=_tiny_train(20, "tiny_stage2"),
    )


def _tiny_variant(base: Callable[[], Config], model: ModelConfig, name: str) -> Config:
    """`base` (a tiny recipe) on another tiny model, its text in that model's template, its own folder."""
    cfg = base()
    stage2 = cfg.data.kind == "align"
    text = stage2_text(model.text.template) if stage2 else stage1_text(model.text.template)
    text.max_txt_len = cfg.model.text.max_txt_len
    model.text = text
    cfg.model, cfg.recipe = model, name
    cfg.train.output_dir = f"outputs/{name}"
    return cfg


def tiny_llama2_stage1() -> Config:
    """tiny_stage1 on the LLaMA-2 variant at its parity sizes (no Q-Former, 4 adjacent ViT tokens
    concatenated, the Llama-2-Chat template); its tiny files are generated as tiny_stage1's are."""
    return _tiny_variant(tiny_stage1, tiny_llama2(), "tiny_llama2_stage1")


def tiny_llama2_stage2() -> Config:
    """tiny_stage2 on the LLaMA-2 variant: `[INST] {} [/INST] ` instructions, answers ending in `</s>`."""
    return _tiny_variant(tiny_stage2, tiny_llama2(), "tiny_llama2_stage2")


def _tiny_decoder() -> ModelConfig:
    # Every LLM size null: read from the folder's config.json (a tiny random Qwen2 unless
    # --set model.weights.llm names yours); the tiny vision path.
    model = tiny()
    model.llm = LLMConfig()
    model.text = TextConfig(template="chat_template")
    return model


def tiny_decoder_stage1() -> Config:
    """tiny_stage1 on a Hugging Face decoder folder, by default a tiny random Qwen2 with a ChatML
    tokenizer generated into the cache; `--set model.weights.llm=DIR` takes yours (any size)."""
    return _tiny_variant(tiny_stage1, _tiny_decoder(), "tiny_decoder_stage1")


def tiny_decoder_stage2() -> Config:
    """tiny_stage2 on a Hugging Face decoder folder, in its tokenizer's chat template."""
    return _tiny_variant(tiny_stage2, _tiny_decoder(), "tiny_decoder_stage2")


def _tiny_tower() -> ModelConfig:
    # A tiny random SigLIP folder generated into the cache by the first run (`--set model.vision.folder=DIR`
    # takes yours: set its sizes too, or `--set model.vision={"kind":"hf","folder":DIR}` to read them from
    # it); the tiny Qwen2 folder.
    model = _tower(_tiny_decoder(), tiny_tower_location())
    for name, value in TINY_TOWER_SIZES.items():
        setattr(model.vision, name, value)
    return model


def tiny_tower_stage1() -> Config:
    """tiny_stage1 on a tiny random SigLIP tower (16 patch tokens, mlp2x_gelu) and the tiny Qwen2."""
    return _tiny_variant(tiny_stage1, _tiny_tower(), "tiny_tower_stage1")


def tiny_tower_stage2() -> Config:
    """tiny_stage2 on the tiny SigLIP tower and Qwen2, in the tokenizer's chat template."""
    return _tiny_variant(tiny_stage2, _tiny_tower(), "tiny_tower_stage2")


RECIPES: dict[str, Callable[[], Config]] = {
    "tiny_stage1": tiny_stage1,
    "tiny_stage2": tiny_stage2,
    "tiny_llama2_stage1": tiny_llama2_stage1,
    "tiny_llama2_stage2": tiny_llama2_stage2,
    "tiny_decoder_stage1": tiny_decoder_stage1,
    "tiny_decoder_stage2": tiny_decoder_stage2,
    "tiny_tower_stage1": tiny_tower_stage1,
    "tiny_tower_stage2": tiny_tower_stage2,
    "stage1_vicuna13b": stage1_vicuna13b,
    "stage1_vicuna7b": stage1_vicuna7b,
    "stage2_vicuna13b": stage2_vicuna13b,
    "stage2_vicuna7b": stage2_vicuna7b,
    "stage1_llama2_7b": stage1_llama2_7b,
    "stage2_llama2_7b": stage2_llama2_7b,
    "stage1_decoder": stage1_decoder,
    "stage2_decoder": stage2_decoder,
    "stage1_tower": stage1_tower,
    "stage2_tower": stage2_tower,
}


def get_recipe(name: str) -> Config:
    if name not in RECIPES:
        raise SystemExit(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]()
