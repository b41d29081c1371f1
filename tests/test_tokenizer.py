"""The tiny tokenizer behaves like LLaMA's sentencepiece; answers encode as the official code does."""

from __future__ import annotations

import os

import sentencepiece as spm
import torch

from mgpt4.model.prompts import STAGE2_INSTRUCTIONS, VICUNA_V0_SYSTEM
from mgpt4.tokenizer import encode_answers


def test_ids_equal_sentencepiece(tokenizer):
    sp = spm.SentencePieceProcessor(model_file=os.path.join(tokenizer.name_or_path, "tokenizer.model"))
    for text in [
        "###Human: <Img>",
        "</Img> Describe this image in detail. ###Assistant: ",
        "a red circle\n",
        "two green squares###",
        VICUNA_V0_SYSTEM,
        *STAGE2_INSTRUCTIONS,
    ]:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)


def test_encode_answers_truncates_and_pads_with_eos(tokenizer):
    first = tokenizer("a red circle\n", add_special_tokens=False)["input_ids"]
    second = "a small purple star in the bottom right corner of the picture"
    n = len(first) + 3
    assert len(tokenizer(second + "\n", add_special_tokens=False)["input_ids"]) > n
    ids, mask = encode_answers(tokenizer, ["a red circle", second], "\n", n)
    assert ids.shape == mask.shape == (2, n) and ids.dtype == torch.long
    assert ids[0, : len(first)].tolist() == first and mask[0].sum() == len(first)
    assert (ids[0, len(first) :] == tokenizer.eos_token_id).all()
    assert mask[1].all()
    ids2, _ = encode_answers(tokenizer, ["a red circle"], "\n", n, pad_to_max_len=False)
    assert ids2.shape == (1, len(first))
