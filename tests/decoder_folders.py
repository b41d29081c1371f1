"""Tiny random Hugging Face decoder folders of each architecture mgpt4 names (no downloads).

Each folder is what `save_pretrained` writes for a real model (config.json, weights, tokenizer), at
toy size and with sizes that differ from the tiny preset's, so a test can tell that mgpt4 read them
from config.json:
- `llama`: LlamaForCausalLM with the LLaMA-style sentencepiece tokenizer (BOS, `</s>`), as Vicuna
  and Llama 2 ship;
- `mistral`: MistralForCausalLM with grouped-query attention and a Mistral-Instruct-style chat
  template that writes its own BOS;
- `qwen2`: Qwen2ForCausalLM with tied embeddings and a byte-level BPE tokenizer without BOS, whose
  chat template is ChatML, as Qwen2-Instruct ships.
"""

from __future__ import annotations

import os

import torch

ARCHITECTURES = ("llama", "mistral", "qwen2")

# Mistral-Instruct's conversation form: BOS, then `[INST] user [/INST]` turns, replies ending in EOS.
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
# ChatML, as Qwen2-Instruct writes it: a default system turn when none is given.
CHATML_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_byte_bpe_tokenizer(texts: list[str], out_dir: str, vocab_size: int = 500):
    """A Qwen2-style tokenizer: byte-level BPE, no BOS, `<|im_end|>` as EOS, ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def decoder_config(arch: str, vocab_size: int):
    """A tiny config of `arch`; each has its own width, so the projection shows where sizes came from."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, num_hidden_layers=2, max_position_embeddings=512)
    if arch == "llama":
        return LlamaConfig(
            hidden_size=48,
            intermediate_size=96,
            num_attention_heads=4,
            bos_token_id=1,
            eos_token_id=2,
            **common,
        )
    if arch == "mistral":
        return MistralConfig(
            hidden_size=96,
            intermediate_size=160,
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=None,
            bos_token_id=1,
            eos_token_id=2,
            **common,
        )
    if arch == "qwen2":
        return Qwen2Config(
            hidden_size=80,
            intermediate_size=144,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            bos_token_id=None,
            eos_token_id=None,
            **common,
        )
    raise ValueError(f"unknown architecture {arch!r}")


def write_decoder_folder(root: str, arch: str, sp_tokenizer, corpus: list[str], seed: int = 0) -> str:
    """`root/arch`: a random tiny `arch` model with its tokenizer, as `save_pretrained` writes them.

    `sp_tokenizer` is the LLaMA-style sentencepiece tokenizer (for llama and mistral); qwen2 gets a
    byte-level BPE trained on `corpus`."""
    from transformers import AutoModelForCausalLM

    folder = os.path.join(root, arch)
    os.makedirs(folder, exist_ok=True)
    if arch == "qwen2":
        tokenizer = train_byte_bpe_tokenizer(corpus, folder)
    else:
        tokenizer, saved = sp_tokenizer, sp_tokenizer.chat_template
        if arch == "mistral":
            tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
        tokenizer.save_pretrained(folder)
        tokenizer.chat_template = saved  # the shared tokenizer is left as it was
    config = decoder_config(arch, len(tokenizer))
    if arch == "qwen2":
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder
