"""The loss equals a hand-built reference: sequence layout, labels, truncation, fixed-length padding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mgpt4.model import apply_freeze, build_model
from mgpt4.model.presets import stage1_text, stage2_text
from mgpt4.model.prompts import STAGE2_INSTRUCTIONS, STAGE2_TEMPLATE
from mgpt4.tokenizer import encode_answers


@pytest.fixture
def model_factory(tokenizer):
    def make(text):
        from mgpt4.model.presets import tiny

        cfg = tiny()
        cfg.text = text
        torch.manual_seed(0)
        model = build_model(cfg, tokenizer)
        apply_freeze(model)
        return model.eval()

    return make


def reference_loss(model, tokenizer, images, captions, prompt, end_sym, max_len):
    """The official recipe written out by hand, token by token."""
    llm = model.llm
    embed = llm.get_input_embeddings()
    img = model.encode_img(images)
    seqs, label_rows = [], []
    for b, caption in enumerate(captions):
        answer = tokenizer(caption + end_sym, add_special_tokens=False)["input_ids"][:max_len]
        parts = [embed(torch.tensor([tokenizer.bos_token_id]))]
        labels = [-100]
        if prompt:
            before, after = prompt.split("<ImageHere>")
            b_ids = tokenizer(before, add_special_tokens=False)["input_ids"]
            a_ids = tokenizer(after, add_special_tokens=False)["input_ids"]
            parts += [embed(torch.tensor(b_ids)), img[b], embed(torch.tensor(a_ids))]
            labels += [-100] * (len(b_ids) + img.shape[1] + len(a_ids))
        else:
            parts.append(img[b])
            labels += [-100] * img.shape[1]
        parts.append(embed(torch.tensor(answer)))
        labels += answer
        seqs.append(torch.cat(parts))
        label_rows.append(labels)
    total, count = 0.0, 0
    for seq, labels in zip(seqs, label_rows):  # one sequence at a time: no padding at all
        logits = llm(inputs_embeds=seq[None]).logits[0]
        target = torch.tensor(labels[1:])
        keep = target != -100
        total = total + F.cross_entropy(logits[:-1][keep], target[keep], reduction="sum")
        count += int(keep.sum())
    return total / count


CAPTIONS = [
    "a red circle on a blue background",
    "two green squares",
    "a small purple star in the bottom right corner",
]


def test_stage1_loss_matches_hand_reference(model_factory, tokenizer):
    model = model_factory(stage1_text())
    images = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        ours = model.loss(images, CAPTIONS)
        ref = reference_loss(model, tokenizer, images, CAPTIONS, None, "\n", 32)
    assert torch.allclose(ours, ref, atol=1e-5), (ours, ref)


def test_stage2_loss_matches_hand_reference(model_factory, tokenizer):
    model = model_factory(stage2_text())
    images = torch.randn(3, 3, 56, 56)
    instruction = STAGE2_INSTRUCTIONS[1]
    with torch.no_grad():
        ours = model.loss(images, CAPTIONS, instruction=instruction)
        ref = reference_loss(
            model, tokenizer, images, CAPTIONS, STAGE2_TEMPLATE.format(instruction), "###", 160
        )
    assert torch.allclose(ours, ref, atol=1e-5), (ours, ref)


def test_truncation_can_cut_end_sym(model_factory, tokenizer):
    text = stage2_text()
    text.max_txt_len = 5
    model = model_factory(text)
    ids, _ = encode_answers(tokenizer, CAPTIONS, "###", 5)
    full = tokenizer(CAPTIONS[2] + "###", add_special_tokens=False)["input_ids"]
    assert len(full) > 5 and ids[2].tolist() == full[:5]  # `###` is gone from the longest answer
    images = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        ours = model.loss(images, CAPTIONS, instruction=STAGE2_INSTRUCTIONS[0])
        ref = reference_loss(
            model, tokenizer, images, CAPTIONS, STAGE2_TEMPLATE.format(STAGE2_INSTRUCTIONS[0]), "###", 5
        )
    assert torch.allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("text", [stage1_text(), stage2_text()], ids=["stage1", "stage2"])
def test_padding_to_fixed_length_does_not_change_the_loss(model_factory, text):
    model = model_factory(text)
    images = torch.randn(3, 3, 56, 56)
    instruction = STAGE2_INSTRUCTIONS[0] if text.instructions else None
    with torch.no_grad():
        fixed = model.loss(images, CAPTIONS, instruction, pad_to_max_len=True)
        longest = model.loss(images, CAPTIONS, instruction, pad_to_max_len=False)
    assert torch.allclose(fixed, longest, atol=1e-5)


def test_sequence_layout_and_labels(model_factory, tokenizer):
    model = model_factory(stage2_text())
    prompt = STAGE2_TEMPLATE.format(STAGE2_INSTRUCTIONS[0])
    before, after = prompt.split("<ImageHere>")
    n_before = len(tokenizer(before, add_special_tokens=False)["input_ids"])
    n_after = len(tokenizer(after, add_special_tokens=False)["input_ids"])
    ids, mask = encode_answers(tokenizer, CAPTIONS[:2], "###", 12)
    img = torch.randn(2, 8, 64)
    inputs, attn, labels = model.build_inputs(img, ids, mask, prompt)
    n_ctx = 1 + n_before + 8 + n_after
    assert inputs.shape == (2, n_ctx + 12, 64)
    assert torch.equal(inputs[:, 1 + n_before : 1 + n_before + 8], img)  # image spliced after BOS + before
    bos = model.llm.get_input_embeddings()(torch.tensor(tokenizer.bos_token_id))
    assert torch.equal(inputs[0, 0], bos)
    assert (labels[:, :n_ctx] == -100).all()
    assert torch.equal(labels[:, n_ctx:], ids.masked_fill(mask == 0, -100))
    assert torch.equal(attn[:, n_ctx:], mask) and (attn[:, :n_ctx] == 1).all()


def test_the_batch_carries_its_instruction_and_the_model_draws_none(model_factory, tokenizer):
    """forward takes tensors only: the loader's instruction index picks the prompt, the same one that
    `loss(instruction=...)` wraps; a stage-2 batch without one, or a stage-1 batch with one, is refused."""
    model = model_factory(stage2_text())
    assert model.sample_prompts() == [STAGE2_TEMPLATE.format(i) for i in STAGE2_INSTRUCTIONS]
    images = torch.randn(3, 3, 56, 56)
    ids, mask = encode_answers(tokenizer, CAPTIONS, "###", 160, pad_to_max_len=False)
    with torch.no_grad():
        for k, instruction in enumerate(STAGE2_INSTRUCTIONS):
            index = torch.full((3,), k, dtype=torch.int64)
            ours = model(image=images, text_ids=ids, text_mask=mask, instruction=index).loss
            assert torch.equal(ours, model.loss(images, CAPTIONS, instruction, pad_to_max_len=False))
        with pytest.raises(ValueError, match="must carry its instruction index"):
            model(image=images, text_ids=ids, text_mask=mask)
        with pytest.raises(ValueError, match="pass instruction="):
            model.loss(images, CAPTIONS)
        with pytest.raises(ValueError, match="indices differ"):
            model(image=images, text_ids=ids, text_mask=mask, instruction=torch.tensor([0, 1, 0]))
        stage1 = model_factory(stage1_text())
        assert stage1.sample_prompts() == ["<ImageHere>"]
        with pytest.raises(ValueError, match="outside the 0 instructions"):
            stage1(image=images, text_ids=ids, text_mask=mask, instruction=torch.zeros(3, dtype=torch.int64))


def test_static_shapes_across_batches(model_factory, tokenizer):
    model = model_factory(stage1_text())
    shapes = set()
    for caps in (["a"], ["a red circle on a blue background with many many shapes" * 3]):
        ids, mask = encode_answers(tokenizer, caps, "\n", 32)
        inputs, _, _ = model.build_inputs(torch.zeros(1, 8, 64), ids, mask, None)
        shapes.add(tuple(inputs.shape))
    assert len(shapes) == 1
