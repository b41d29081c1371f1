"""The full-size model, built on the meta device, has exactly the official keys and shapes."""

from __future__ import annotations

import pytest

from mgpt4.model import build_model
from mgpt4.model.loading import (
    BLIP2_IGNORED,
    PROJ_PREFIXES,
    QFORMER_PREFIXES,
    VIT_PREFIXES,
    model_keys,
    plan_mapped,
    rename_blip2,
    rename_eva_vit,
    vit_ignored,
)
from mgpt4.model.presets import vicuna7b, vicuna13b
from tests.official_files import read_manifest


def _meta_state(manifest: str, variant: str | None = None):
    import torch

    return {k: torch.empty(shape, device="meta") for k, shape in read_manifest(manifest, variant)}


@pytest.fixture(scope="module")
def meta_13b():
    return build_model(vicuna13b(), device="meta")


def test_vit_manifest_is_consumed_exactly(meta_13b):
    state = _meta_state("eva_vit_g")
    assert len(state) == 511
    own = model_keys(meta_13b, VIT_PREFIXES)
    mapped, ignored = plan_mapped(own, state, "manifest_eva_vit_g.tsv", rename_eva_vit, vit_ignored(39))
    assert ignored == []
    assert set(mapped) == set(own)
    params = sum(t.numel() for t in own.values())
    assert abs(params / 1e6 - 985.9) < 0.1


def test_vit_block_39_of_the_released_file_is_ignored_by_name(meta_13b):
    state = _meta_state("eva_vit_g")
    state.update(
        {k.replace("blocks.38.", "blocks.39."): v for k, v in state.items() if k.startswith("blocks.38.")}
    )
    own = model_keys(meta_13b, VIT_PREFIXES)
    mapped, ignored = plan_mapped(own, state, "eva_vit_g.pth", rename_eva_vit, vit_ignored(39))
    assert len(ignored) == 13 and all(k.startswith("blocks.39.") for k in ignored)
    assert set(mapped) == set(own)


def test_qformer_manifest_is_consumed_exactly(meta_13b):
    state = _meta_state("qformer_minigpt4")
    assert len(state) == 258
    own = model_keys(meta_13b, QFORMER_PREFIXES)
    mapped, ignored = plan_mapped(own, state, "manifest_qformer_minigpt4.tsv", rename_blip2, BLIP2_IGNORED)
    assert ignored == ["Qformer.bert.embeddings.position_ids"]  # a buffer of the dropped text embeddings
    assert set(mapped) == set(own)


@pytest.mark.parametrize("variant,preset", [("13b", vicuna13b), ("7b", vicuna7b)])
def test_projection_manifest(variant, preset):
    model = build_model(preset(), device="meta")
    state = _meta_state("llama_proj", variant)
    own = model_keys(model, PROJ_PREFIXES)
    mapped, _ = plan_mapped(own, state, "manifest_llama_proj.tsv", lambda k: k)
    assert set(mapped) == set(own) == {"llama_proj.weight", "llama_proj.bias"}


def test_every_parameter_outside_the_llm_comes_from_a_manifest(meta_13b):
    covered = set(model_keys(meta_13b, VIT_PREFIXES + QFORMER_PREFIXES + PROJ_PREFIXES))
    others = {k for k in meta_13b.state_dict() if not k.startswith("llm.")}
    assert others == covered
    llm_params = sum(p.numel() for n, p in meta_13b.named_parameters() if n.startswith("llm."))
    assert abs(llm_params / 1e9 - 13.016) < 0.01
