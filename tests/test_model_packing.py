"""Packed rows compute exactly what the unpacked batch computes: loss, logits and the projection's gradient."""

from __future__ import annotations

import pytest
import torch

from mgpt4.data.packing import RowPacker
from mgpt4.model import apply_freeze, build_model
from mgpt4.model.packing import IGNORE_INDEX, pack_sequences
from mgpt4.model.presets import stage1_text, stage2_text, tiny
from mgpt4.tokenizer import encode_answers

CAPTIONS = [
    "a red circle",
    "two green squares and a yellow triangle at the top left",
    "a small purple star in the bottom right corner of the picture",
    "a red circle on a blue background",
    "a small purple star",
]


def _model(tokenizer, text):
    cfg = tiny()
    cfg.text = text
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer)
    apply_freeze(model)
    return model.train()


def _layout(lengths, rows, length, slots):
    packer = RowPacker(rows, length, slots)
    for n in lengths:
        assert packer.place(n)
    return packer.layout()


def _loss_and_grad(model, **inputs):
    model.zero_grad()
    out = model(**inputs)
    out.loss.backward()
    return out, model.llama_proj.weight.grad.clone(), model.llama_proj.bias.grad.clone()


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_packed_loss_and_projection_gradient_equal_the_unpacked_ones(tokenizer, stage):
    text = stage1_text() if stage == "stage1" else stage2_text()
    text.max_txt_len = 24
    model = _model(tokenizer, text)
    torch.manual_seed(1)
    images = torch.randn(len(CAPTIONS), 3, 56, 56)
    ids, mask = encode_answers(tokenizer, CAPTIONS, text.end_sym, text.max_txt_len)
    extra = {}
    context = 1 + model.cfg.qformer.num_query_tokens
    if stage == "stage2":
        extra["instruction"] = torch.full((len(CAPTIONS),), 2, dtype=torch.int64)
        before, after = model.instruction_prompt(extra["instruction"]).split("<ImageHere>")
        context += sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (before, after))
    assert context == model.sample_layouts()[2 if stage == "stage2" else 0].context_length
    plain, gw, gb = _loss_and_grad(model, image=images, text_ids=ids, text_mask=mask, **extra)

    lengths = (context + mask.sum(1)).tolist()
    slot, pos = _layout(lengths, rows=2, length=3 * (context + text.max_txt_len), slots=len(CAPTIONS))
    assert sorted(set(slot[slot >= 0].tolist())) == list(range(len(CAPTIONS)))  # several samples per row
    packed, pw, pb = _loss_and_grad(
        model, image=images, text_ids=ids, text_mask=mask, pack_slot=slot, pack_pos=pos, **extra
    )
    torch.testing.assert_close(packed.loss, plain.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pw, gw, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pb, gb, rtol=1e-5, atol=1e-6)
    # Token by token: a sample's logits do not see the samples before it in its row.
    for n, length in enumerate(lengths):
        where = slot == n
        torch.testing.assert_close(packed.logits[where], plain.logits[n, :length], rtol=1e-5, atol=1e-5)


def test_empty_slots_and_padding_change_nothing(tokenizer):
    """A batch whose rows filled before its slots: the unused slots and the row padding are ignored."""
    text = stage1_text()
    model = _model(tokenizer, text)
    images = torch.randn(4, 3, 56, 56)
    ids, mask = encode_answers(tokenizer, CAPTIONS[:4], text.end_sym, text.max_txt_len)
    used = 3
    plain, gw, _ = _loss_and_grad(model, image=images[:used], text_ids=ids[:used], text_mask=mask[:used])
    lengths = (1 + 8 + mask[:used].sum(1)).tolist()
    slot, pos = _layout(lengths, rows=2, length=2 * (1 + 8 + 32), slots=4)
    ids[used:], mask[used:] = 7, 0  # what an empty slot holds does not matter
    packed, pw, _ = _loss_and_grad(
        model, image=images, text_ids=ids, text_mask=mask, pack_slot=slot, pack_pos=pos
    )
    torch.testing.assert_close(packed.loss, plain.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pw, gw, rtol=1e-5, atol=1e-6)


def test_positions_restart_and_labels_stay_inside_their_sample():
    inputs = torch.arange(2 * 5 * 1, dtype=torch.float32).reshape(2, 5, 1)
    labels = torch.tensor(
        [[IGNORE_INDEX, IGNORE_INDEX, 10, 11, IGNORE_INDEX], [IGNORE_INDEX, 20, 21, 22, 23]]
    )
    slot, pos = _layout([4, 5], rows=1, length=11, slots=2)
    rows = pack_sequences(inputs, labels, slot, pos)
    packed, positions, packed_labels = rows.inputs_embeds, rows.position_ids, rows.labels
    assert positions.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 0]]
    assert packed[0, :, 0].tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 9, 0, 0]
    # The second sample starts with an ignored label, so no shifted target crosses the boundary.
    assert packed_labels.tolist() == [[-100, -100, 10, 11, -100, 20, 21, 22, 23, -100, -100]]


def test_a_sample_longer_than_a_row_is_refused():
    packer = RowPacker(rows=2, length=10, slots=4)
    with pytest.raises(ValueError, match="longer than a packed row"):
        packer.place(11)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (gpu marker)")
@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2"])
def test_packed_rows_equal_unpacked_ones_on_the_gpu(tokenizer, attn):
    """transformers' packed-sequence path on CUDA: SDPA with the block mask, or FlashAttention's varlen."""
    if attn == "flash_attention_2":
        pytest.importorskip("flash_attn", reason="flash-attn is not installed")
    text = stage1_text()
    cfg = tiny()
    cfg.text = text
    cfg.attn_implementation = attn
    dtype = torch.float32 if attn == "sdpa" else torch.bfloat16
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer)
    apply_freeze(model)
    model = model.to("cuda", dtype if attn != "sdpa" else torch.float32).train()
    images = torch.randn(len(CAPTIONS), 3, 56, 56, device="cuda", dtype=dtype)
    ids, mask = encode_answers(tokenizer, CAPTIONS, text.end_sym, text.max_txt_len)
    ids, mask = ids.cuda(), mask.cuda()
    plain, gw, _ = _loss_and_grad(model, image=images, text_ids=ids, text_mask=mask)
    slot, pos = _layout((9 + mask.sum(1)).tolist(), rows=2, length=3 * 41, slots=len(CAPTIONS))
    packed, pw, _ = _loss_and_grad(
        model, image=images, text_ids=ids, text_mask=mask, pack_slot=slot.cuda(), pack_pos=pos.cuda()
    )
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(packed.loss.float(), plain.loss.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(pw.float(), gw.float(), rtol=tol, atol=tol)
