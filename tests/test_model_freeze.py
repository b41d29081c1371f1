"""Exactly the projection trains; frozen parts stay in eval mode and keep no autograd state."""

from __future__ import annotations

import pytest
import torch

from mgpt4.model import TRAINABLE_MODULES, apply_freeze, build_model
from mgpt4.model.freeze import is_trainable


def test_policy_is_the_projection():
    assert TRAINABLE_MODULES == ("llama_proj",)
    assert is_trainable("llama_proj.weight") and is_trainable("llama_proj.bias")
    assert not is_trainable("llm.model.embed_tokens.weight")
    assert not is_trainable("query_tokens")
    assert not is_trainable("llama_projection_extra.weight")
    # Names, not patterns: a wildcard is no module of the model.
    assert not is_trainable("llama_proj.weight", ("llama_*",))
    assert is_trainable("query_tokens", ("query_tokens",))


def test_trainable_set_is_exactly_llama_proj(tiny_cfg, tokenizer):
    model = build_model(tiny_cfg, tokenizer)
    trainable = apply_freeze(model)
    assert trainable == ["llama_proj.weight", "llama_proj.bias"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(trainable)


def test_frozen_modules_stay_in_eval_mode(tiny_cfg, tokenizer):
    model = build_model(tiny_cfg, tokenizer)
    apply_freeze(model)
    model.train()
    assert model.training and model.llama_proj.training
    for part in (model.visual_encoder, model.ln_vision, model.qformer, model.llm):
        assert not part.training
        assert not any(m.training for m in part.modules())
    model.eval()
    assert not model.llama_proj.training


def test_backward_reaches_only_the_projection(tiny_cfg, tokenizer):
    model = build_model(tiny_cfg, tokenizer)
    apply_freeze(model)
    model.train()
    loss = model.loss(torch.randn(2, 3, 56, 56), ["a red circle", "a blue square"])
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {"llama_proj.weight", "llama_proj.bias"}


def test_frozen_vision_path_runs_without_autograd(tiny_cfg, tokenizer):
    model = build_model(tiny_cfg, tokenizer)
    apply_freeze(model)
    seen = []
    model.qformer.register_forward_hook(lambda m, i, o: seen.append(o.last_hidden_state.requires_grad))
    out = model.encode_img(torch.randn(1, 3, 56, 56))
    assert seen == [False] and out.requires_grad  # autograd starts at llama_proj


def test_unknown_pattern_is_an_error(tiny_cfg):
    model = build_model(tiny_cfg)
    with pytest.raises(ValueError, match="match no parameter"):
        apply_freeze(model, ("llama_projector",))
    with pytest.raises(ValueError, match=r"\['llama_\*'\] match no parameter of MiniGPT4"):
        apply_freeze(model, ("llama_*",))


def test_gradient_checkpointing_gives_the_same_gradient(tiny_cfg, tokenizer):
    images = torch.randn(2, 3, 56, 56)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(tiny_cfg, tokenizer)
        apply_freeze(model)
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        model.loss(images, ["a red circle", "a blue square"]).backward()
        grads.append(model.llama_proj.weight.grad.clone())
    assert getattr(model.llm, "is_activation_checkpointing", None) or model.llm.is_gradient_checkpointing
    torch.testing.assert_close(grads[0], grads[1])
