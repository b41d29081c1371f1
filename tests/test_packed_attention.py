"""Packed rows compute only their samples' attention blocks, and exactly what the unpacked batch computes."""

from __future__ import annotations

import pytest
import torch

from mgpt4.data.packing import RowPacker
from mgpt4.model import apply_freeze, build_model
from mgpt4.model.packing import PACKED_SDPA, pack_sequences, packed_sdpa_attention
from mgpt4.model.presets import stage1_text, tiny
from mgpt4.tokenizer import encode_answers

CAPTIONS = [
    "a red circle",
    "two green squares and a yellow triangle at the top left",
    "a small purple star in the bottom right corner of the picture",
    "a red circle on a blue background",
    "a small purple star",
]


def _layout(lengths, rows, length, slots):
    packer = RowPacker(rows, length, slots)
    for n in lengths:
        assert packer.place(n)
    return packer.layout()


class _Heads(torch.nn.Module):
    """What transformers' attention functions read from the attention module."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def _reference(q, k, v, lengths, scale):
    """Each sample's causal attention on its own, written out: softmax(q k^T * scale, causal) v."""
    outs = []
    groups = q.shape[0] // k.shape[0]
    for n, t in enumerate(lengths):
        qs, ks, vs = (
            q[:, n, :t],
            k[:, n, :t].repeat_interleave(groups, 0),
            v[:, n, :t].repeat_interleave(groups, 0),
        )
        scores = qs @ ks.transpose(-1, -2) * scale
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        outs.append((scores.softmax(-1) @ vs).transpose(0, 1))  # [t, H, D]
    return outs


@pytest.mark.parametrize("kv_heads", [4, 2])  # multi-head and grouped-query attention
def test_packed_sdpa_equals_each_samples_own_attention(kv_heads):
    torch.manual_seed(0)
    heads, dim, t_max = 4, 8, 9
    lengths = [5, 9, 3, 7]
    slot, pos = _layout(lengths, rows=2, length=14, slots=4)
    assert (slot < 0).any() and (slot.max(1).values > slot.min(1).values).all()  # padding; several per row
    # Per-sample queries, keys, values [H, N, T, D]: the rows are gathered from them as the model does.
    q = torch.randn(heads, 4, t_max, dim, dtype=torch.float64, requires_grad=True)
    k = torch.randn(kv_heads, 4, t_max, dim, dtype=torch.float64, requires_grad=True)
    v = torch.randn(kv_heads, 4, t_max, dim, dtype=torch.float64, requires_grad=True)

    def rows(x):  # [h, N, T, D] -> [R, h, L, D]
        h = x.shape[0]
        embeds = x.permute(1, 2, 0, 3).reshape(4, t_max, h * dim)
        packed = pack_sequences(embeds, torch.zeros(4, t_max, dtype=torch.long), slot, pos)
        return packed, packed.inputs_embeds.reshape(*slot.shape, h, dim).transpose(1, 2)

    packed, qr = rows(q)
    _, kr = rows(k)
    _, vr = rows(v)
    scale = dim**-0.5
    out, _ = packed_sdpa_attention(
        _Heads(heads // kv_heads), qr, kr, vr, None, scaling=scale, dropout=0.0, **packed.attention_kwargs()
    )
    assert out.shape == (*slot.shape, heads, dim)
    expected = _reference(q, k, v, lengths, scale)
    for n, sample in enumerate(expected):
        torch.testing.assert_close(out[slot == n], sample, rtol=1e-10, atol=1e-10)
    assert out[slot < 0].abs().max() == 0  # row padding: a zero output
    # The gradients too: what reaches the queries, keys and values of each sample's own positions only.
    weights = torch.randn_like(out)
    got = torch.autograd.grad((out * weights).sum(), (q, k, v))
    ref = torch.autograd.grad(
        sum((e * weights[slot == n]).sum() for n, e in enumerate(expected)), (q, k, v), allow_unused=True
    )
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def _model(tokenizer, attn="sdpa", kv_heads=None):
    cfg = tiny()
    cfg.text = stage1_text()
    cfg.attn_implementation = attn
    cfg.llm.num_kv_heads = kv_heads
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer)
    apply_freeze(model)
    return model.train()


def _batch(tokenizer, model):
    torch.manual_seed(1)
    images = torch.randn(len(CAPTIONS), 3, 56, 56)
    ids, mask = encode_answers(tokenizer, CAPTIONS, model.text_spec.end_sym, model.cfg.text.max_txt_len)
    lengths = (model.sample_layouts()[0].context_length + mask.sum(1)).tolist()
    slot, pos = _layout(lengths, rows=2, length=2 * max(lengths) + 8, slots=len(CAPTIONS))
    return images, ids, mask, slot, pos


def _loss_and_grad(model, **inputs):
    model.zero_grad()
    out = model(**inputs)
    out.loss.backward()
    return out.loss.detach(), model.llama_proj.weight.grad.clone(), model.llama_proj.bias.grad.clone()


@pytest.mark.parametrize(("attn", "kv_heads"), [("sdpa", None), ("sdpa", 2), ("eager", None)])
def test_packed_loss_and_gradient_equal_unpacked_on_each_cpu_backend(tokenizer, attn, kv_heads):
    model = _model(tokenizer, attn, kv_heads)
    images, ids, mask, slot, pos = _batch(tokenizer, model)
    plain = _loss_and_grad(model, image=images, text_ids=ids, text_mask=mask)
    packed = _loss_and_grad(model, image=images, text_ids=ids, text_mask=mask, pack_slot=slot, pack_pos=pos)
    for p, u in zip(packed, plain):
        torch.testing.assert_close(p, u, rtol=1e-5, atol=1e-6)
    # SDPA runs per sample from the first packed batch on; eager keeps its masked row.
    assert model.llm.config._attn_implementation == (PACKED_SDPA if attn == "sdpa" else "eager")
    # Unpacked batches still get plain SDPA (and its padding mask) on the switched model.
    again = _loss_and_grad(model, image=images, text_ids=ids, text_mask=mask)
    for a, u in zip(again, plain):
        torch.testing.assert_close(a, u, rtol=1e-6, atol=1e-7)


def test_sdpa_on_packed_rows_computes_only_the_samples_blocks(tokenizer, monkeypatch):
    """Every SDPA call of a packed step is per sample ([slots, heads, sample length, dim], causal, no
    mask): no attention between the samples of a row is computed and masked out."""
    model = _model(tokenizer)
    images, ids, mask, slot, pos = _batch(tokenizer, model)
    calls, in_llm = [], []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, is_causal=False, **kwargs):
        if in_llm:  # the LLM's calls (the ViT and Q-Former have their own)
            calls.append((tuple(query.shape), tuple(key.shape), attn_mask is None, is_causal))
        return sdpa(query, key, value, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    model.llm.register_forward_pre_hook(lambda *_: in_llm.append(True))
    model.llm.register_forward_hook(lambda *_: in_llm.clear())
    model(image=images, text_ids=ids, text_mask=mask, pack_slot=slot, pack_pos=pos).loss.backward()
    llm = model.llm.config
    n, t = len(CAPTIONS), model.sample_layouts()[0].length
    per_sample = (n, llm.num_attention_heads, t, llm.hidden_size // llm.num_attention_heads)
    assert len(calls) == llm.num_hidden_layers
    assert all(c == (per_sample, per_sample, True, True) for c in calls), calls


def test_gradient_checkpointing_recomputes_the_per_sample_attention(tokenizer):
    model = _model(tokenizer)
    images, ids, mask, slot, pos = _batch(tokenizer, model)
    inputs = dict(image=images, text_ids=ids, text_mask=mask, pack_slot=slot, pack_pos=pos)
    plain = _loss_and_grad(model, image=images, text_ids=ids, text_mask=mask)
    model.enable_gradient_checkpointing()
    for p, u in zip(_loss_and_grad(model, **inputs), plain):
        torch.testing.assert_close(p, u, rtol=1e-5, atol=1e-6)
