"""Tokenizer loading, tiny tokenizers for tests and demos, and answer encoding shared by data and model.

The data workers and the model both turn `caption + end_sym` into ids; both call `encode_answers`
so that a batch made by the loader and a batch made by `MiniGPT4.loss` are the same tokens.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence

import torch


def load_tokenizer(path: str, config=None):
    """Load the tokenizer of a local Hugging Face folder; pad is eos, as in the official code.

    `config` (a transformers config) is used instead of the folder's config.json, which AutoTokenizer
    otherwise reads, asking whether to run the code it names (an export of the LLaMA-2 variant's does).

    Special-token text in captions and prompts becomes the token's id (a literal `</s>` is EOS, `<s>`
    BOS), as with the official slow LLaMA tokenizer; the official Llama-2 recipe ends answers that way.
    A BOS token is optional (Qwen2's tokenizers have none; `model.text.add_bos` decides); EOS is not.
    """
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer folder {path!r} does not exist (expected a Hugging Face folder)")
    tok = AutoTokenizer.from_pretrained(
        path, config=config, local_files_only=True, split_special_tokens=False
    )
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer in {path!r} has no EOS token; answers and replies need one to end")
    tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def encode_like_slow_llama(tokenizer, text: str) -> list[int]:
    """`text` as the official code's slow LLaMA tokenizer (`use_fast=False`, legacy) encodes it without
    special tokens: cut at the tokenizer's added tokens (`<s>`, `</s>`, `<unk>`), each becoming its id,
    and each piece between them encoded on its own, so it gets sentencepiece's leading `▁`
    (`SYSTEM<s>[INST] ` is `... <s> ▁[ INST ]`, Meta's Llama-2 format).

    A fast tokenizer encodes text after a special token with or without that `▁` depending on its
    folder's `legacy` flag and class (transformers 5's `LlamaTokenizer` leaves it out); encoding the
    pieces one by one makes it the official tokens whatever the folder says.
    """

    def encode(piece: str) -> list[int]:
        return list(tokenizer(piece, add_special_tokens=False)["input_ids"])

    added = getattr(tokenizer, "added_tokens_encoder", None) or {}
    specials = sorted((t for t in added if t), key=len, reverse=True)
    if not specials:
        return encode(text)
    # Sentencepiece's dummy prefix is a `▁` before every piece, also before one that starts with a space
    # (` b` is `▁▁b`); a Metaspace pre-tokenizer adds it only to text that does not start with one
    # (` b` is `▁b`, as `b`). Such a tokenizer is given the prefix's space itself.
    merges_space = encode(" a") == encode("a")
    ids: list[int] = []
    for piece in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
        if piece in added:
            ids.append(added[piece])
        elif piece:
            ids.extend(encode(" " + piece if merges_space and piece.startswith(" ") else piece))
    return ids


def train_tiny_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 400):
    """Train a LLaMA-style sentencepiece BPE model (unk 0, bos 1, eos 2, byte fallback) and load it.

    Identity normalisation and a dummy prefix mirror LLaMA's tokenizer, so newlines become the
    `<0x0A>` byte piece and `###` splits the way the real tokenizer splits it.
    """
    import sentencepiece as spm

    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        with open(corpus, "w", encoding="utf-8") as f:
            for t in texts:
                f.write(t.replace("\n", " ") + "\n")
        spm.SentencePieceTrainer.train(
            input=corpus,
            model_prefix=os.path.join(tmp, "tokenizer"),
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            normalization_rule_name="identity",
            add_dummy_prefix=True,
            remove_extra_whitespaces=False,
            split_digits=True,
            hard_vocab_limit=False,
            minloglevel=2,
        )
        shutil.copy(os.path.join(tmp, "tokenizer.model"), os.path.join(out_dir, "tokenizer.model"))
    return load_tokenizer(out_dir)


def encode_answers(
    tokenizer,
    texts: Sequence[str],
    end_sym: str,
    max_len: int,
    pad_to_max_len: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize `text + end_sym` without special tokens, cut to `max_len`, right-pad with eos.

    Returns (ids, mask), both int64 [B, L]; L is `max_len` when `pad_to_max_len`, else the longest.
    Truncation can cut `end_sym` off, exactly as the official `max_txt_len` does.
    """
    encoded = tokenizer([t + end_sym for t in texts], add_special_tokens=False)["input_ids"]
    encoded = [ids[:max_len] for ids in encoded]
    length = max_len if pad_to_max_len else max((len(ids) for ids in encoded), default=0)
    ids = torch.full((len(encoded), length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for i, row in enumerate(encoded):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask
