"""The local back end of fix: a Hugging Face causal LM folder rewrites paragraphs in batches."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from mgpt4.config import DTYPES
from mgpt4.strict_config import ConfigError

# A base model has no chat turn to end its answer: this cue starts the answer, a blank line ends it.
PLAIN_TEMPLATE = "{message}\n\nFixed paragraph:\n"
PLAIN_STOP = "\n\n"


@dataclass
class HFRewriterConfig:
    model_path: str  # a local folder with config.json, weights and the tokenizer
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    # "auto": bf16 on a GPU, fp32 on a CPU.
    dtype: str = "auto"
    batch_size: int = 8
    max_new_tokens: int = 512
    # A longer prompt is this item's failure: cutting it would drop the instruction or the paragraph.
    max_input_tokens: int = 2048

    def validate(self) -> None:
        if not os.path.isdir(self.model_path):
            raise ConfigError(
                f"--hf-model {self.model_path!r}: no such folder (expected a Hugging Face model folder)"
            )
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be auto or one of {sorted(DTYPES)}, got {self.dtype!r}")


class HFRewriter:
    """Greedy rewrites with the model's chat template when its tokenizer has one, else a plain prompt."""

    def __init__(self, cfg: HFRewriterConfig):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cfg.validate()
        self.cfg = cfg
        dtype = cfg.dtype if cfg.dtype != "auto" else ("bf16" if cfg.device.startswith("cuda") else "fp32")
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model_path, local_files_only=True)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Left padding: every row's answer then starts at the same position.
        self.tokenizer.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(
            cfg.model_path, local_files_only=True, dtype=DTYPES[dtype]
        ).to(cfg.device)
        self.model.eval()
        self.chat = bool(getattr(self.tokenizer, "chat_template", None))

    def prompt(self, message: str) -> str:
        if self.chat:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=False
            )
        return PLAIN_TEMPLATE.format(message=message)

    @torch.no_grad()
    def rewrite(self, messages: list[str]) -> list[tuple[str | None, str | None]]:
        """(reply, None) or (None, reason) per message, in order."""
        tok = self.tokenizer
        prompts = [self.prompt(m) for m in messages]
        # A chat template writes its own BOS; a plain prompt needs the tokenizer's.
        special = not self.chat
        lengths = [len(ids) for ids in tok(prompts, add_special_tokens=special)["input_ids"]]
        results: list[tuple[str | None, str | None]] = [
            (None, f"prompt has {n} tokens, above max_input_tokens={self.cfg.max_input_tokens}")
            for n in lengths
        ]
        fit = [i for i, n in enumerate(lengths) if n <= self.cfg.max_input_tokens]
        if not fit:
            return results
        enc = tok([prompts[i] for i in fit], return_tensors="pt", padding=True, add_special_tokens=special)
        enc = enc.to(self.cfg.device)
        extra = {} if self.chat else {"stop_strings": [PLAIN_STOP], "tokenizer": tok}
        out = self.model.generate(
            **enc,
            max_new_tokens=self.cfg.max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            **extra,
        )
        new = out[:, enc["input_ids"].shape[1] :]
        for i, row in zip(fit, new):
            text = tok.decode(row, skip_special_tokens=True).strip()
            results[i] = (text, None) if text else (None, "empty reply")
        return results
