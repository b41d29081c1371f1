"""Gradient checkpointing of the frozen LLM recomputes its layers: fewer activations kept, same gradient."""

from __future__ import annotations

import dataclasses

import torch

from mgpt4.model import apply_freeze, build_model
from mgpt4.tokenizer import encode_answers

CAPTIONS = ["a red circle on a blue background", "two green squares and a yellow triangle"]


def _model(tiny_cfg, tokenizer, checkpointing: bool):
    llm = dataclasses.replace(tiny_cfg.llm, num_layers=6)
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(tiny_cfg, llm=llm), tokenizer)
    apply_freeze(model)
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model.train()


def _saved_bytes_and_grad(model, images, ids, mask) -> tuple[int, torch.Tensor]:
    """Bytes of every tensor autograd keeps for the backward of one training forward, and the
    projection's gradient after that backward."""
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(images, ids, mask).loss
    loss.backward()
    return saved, model.llama_proj.weight.grad.clone()


def test_checkpointing_recomputes_the_frozen_llm(tiny_cfg, tokenizer):
    torch.manual_seed(1)
    images = torch.randn(2, 3, 56, 56)
    ids, mask = encode_answers(tokenizer, CAPTIONS, "\n", 32, True)
    off, grad_off = _saved_bytes_and_grad(_model(tiny_cfg, tokenizer, False), images, ids, mask)
    on_model = _model(tiny_cfg, tokenizer, True)
    on, grad_on = _saved_bytes_and_grad(on_model, images, ids, mask)
    assert on < 0.5 * off, (on, off)
    torch.testing.assert_close(grad_on, grad_off, rtol=1e-5, atol=1e-7)
    # The frozen parts still run without dropout: nothing inside a decoder layer is in training mode.
    llm = on_model.llm
    assert not llm.training and not llm.model.training
    layers = list(llm.model.layers)
    assert all(layer.training for layer in layers)
    assert not any(m.training for layer in layers for m in layer.modules() if m is not layer)
    # eval() turns the recompute off again (generation keeps its cache).
    on_model.eval()
    assert not any(layer.training for layer in layers)
