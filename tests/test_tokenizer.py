"""The tiny tokenizer behaves like LLaMA's sentencepiece; answers encode as the official code does."""

from __future__ import annotations

import os

import sentencepiece as spm
import torch

from mgpt4.model.prompts import STAGE2_INSTRUCTIONS, VICUNA_V0_SYSTEM
from mgpt4.tokenizer import encode_answers, encode_like_slow_llama, load_tokenizer, train_tiny_tokenizer
from tests.conftest import TOKENIZER_CORPUS


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


def test_text_with_special_tokens_is_cut_as_the_official_slow_tokenizer_cuts_it(tmp_path):
    """Issue 20.12: whatever a folder's `legacy` flag, each piece between special tokens is encoded on
    its own, as the slow LLaMA tokenizer (`SentencePieceBackend`, legacy) does."""
    import json

    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    folder = tmp_path / "tok"
    train_tiny_tokenizer(TOKENIZER_CORPUS, str(folder))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    slow = SentencePieceBackend(vocab_file=str(folder / "tokenizer.model"), legacy=True, **special)
    texts = ["please.<s>[INST] hi", "a</s> b", "x <s> y", "<s><s>a", " lead<unk>trail ", "a\nb</s>", "plain"]
    # A Llama-2 folder as transformers 5 reads it (LlamaTokenizer; `legacy` false, true or absent), and
    # the sentencepiece model alone (converted to a tokenizers backend).
    for legacy in (False, True, None, "no config"):
        conf = {"tokenizer_class": "LlamaTokenizer", **special}
        conf.update({} if legacy in (None, "no config") else {"legacy": legacy})
        (folder / "tokenizer_config.json").write_text(json.dumps(conf))
        if legacy == "no config":
            (folder / "tokenizer_config.json").unlink()
        tok = load_tokenizer(str(folder))
        for text in texts:
            assert encode_like_slow_llama(tok, text) == slow(text, add_special_tokens=False)["input_ids"], (
                legacy,
                text,
            )
