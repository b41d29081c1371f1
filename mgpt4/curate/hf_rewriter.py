"""The local back end of fix: a Hugging Face causal LM folder rewrites paragraphs in batches."""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field

import torch

from mgpt4.config import DTYPES
from mgpt4.strict_config import ConfigError

# A base model has no chat turn to end its answer: this cue starts the answer, a blank line ends it.
PLAIN_TEMPLATE = "{message}\n\nFixed paragraph:\n"
PLAIN_STOP = "\n\n"
# What a Hugging Face causal LM folder holds (save_pretrained's names); one of each group is needed.
WEIGHT_PATTERNS = (
    "*.safetensors",
    "pytorch_model*.bin",
    "*.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


@dataclass
class HFRewriterConfig:
    """A local Hugging Face model; each field is a flag of `python -m mgpt4.curate fix`."""

    # A local folder with config.json, weights and the tokenizer.
    model_path: str = field(metadata={"flag": "--hf-model", "help": "a local Hugging Face causal LM folder"})
    device: str = field(
        default="cuda" if torch.cuda.is_available() else "cpu", metadata={"help": "device of the model"}
    )
    dtype: str = field(
        default="auto", metadata={"help": "auto (bf16 on a GPU, fp32 on a CPU), fp32, bf16 or fp16"}
    )
    batch_size: int = field(default=8, metadata={"help": "paragraphs per generate call"})
    max_new_tokens: int = field(default=512, metadata={"help": "longest reply; a reply cut there fails"})
    # A longer prompt is this item's failure: cutting it would drop the instruction or the paragraph.
    max_input_tokens: int = field(
        default=2048, metadata={"help": "longest prompt, in tokens; a longer one is that item's failure"}
    )

    def validate(self) -> None:
        """Check the folder holds a model (config, weights, tokenizer) before anything is written."""
        problems = model_folder_problems(self.model_path)
        if problems:
            raise ConfigError(
                f"--hf-model {self.model_path}: not a Hugging Face causal LM folder: " + "; ".join(problems)
            )
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be auto or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ConfigError("--batch-size and --max-new-tokens must be at least 1")


def model_folder_problems(folder: str) -> list[str]:
    """What a model folder lacks, in words (empty when it looks loadable)."""
    if not os.path.isdir(folder):
        return ["no such folder"]
    problems = []
    config = os.path.join(folder, "config.json")
    try:
        with open(config, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or "model_type" not in data:
            problems.append("config.json has no 'model_type'")
    except FileNotFoundError:
        problems.append("no config.json")
    except (OSError, ValueError) as e:
        problems.append(f"config.json cannot be read ({e})")
    if not any(glob.glob(os.path.join(folder, p)) for p in WEIGHT_PATTERNS):
        problems.append("no weights (*.safetensors or pytorch_model*.bin)")
    if not any(os.path.isfile(os.path.join(folder, n)) for n in TOKENIZER_FILES):
        problems.append(f"no tokenizer (one of {', '.join(TOKENIZER_FILES)})")
    return problems


def folder_stamp(folder: str) -> list[tuple[str, int, int]]:
    """(name, size, mtime_ns) of the folder's files: the model's identity in failure fingerprints."""
    out = []
    for name in sorted(os.listdir(folder)):
        st = os.stat(os.path.join(folder, name))
        out.append((name, st.st_size, st.st_mtime_ns))
    return out


class HFRewriter:
    """Greedy rewrites with the model's chat template when its tokenizer has one, else a plain prompt."""

    def __init__(self, cfg: HFRewriterConfig):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cfg.validate()
        self.cfg = cfg
        dtype = cfg.dtype if cfg.dtype != "auto" else ("bf16" if cfg.device.startswith("cuda") else "fp32")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.model_path, local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(
                cfg.model_path, local_files_only=True, dtype=DTYPES[dtype]
            ).to(cfg.device)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(
                f"--hf-model {cfg.model_path}: cannot be loaded: {type(e).__name__}: {e}"
            ) from e
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Left padding: every row's answer then starts at the same position.
        self.tokenizer.padding_side = "left"
        self.model.eval()
        self.chat = bool(getattr(self.tokenizer, "chat_template", None))

    def prompt(self, message: str) -> str:
        if self.chat:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=False
            )
        return PLAIN_TEMPLATE.format(message=message)

    def _end_ids(self) -> set[int]:
        """Token ids that end a reply: the generation config's EOS (one or several) and padding."""
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.pad_token_id}
        return {i for i in ids if i is not None}

    @torch.no_grad()
    def rewrite(self, messages: list[str]) -> list[tuple[str | None, str | None]]:
        """(reply, None) or (None, reason) per message, in order.

        A reply that ran into `max_new_tokens` without ending (no EOS, no stop string) is cut
        short: it is a failure, as a `finish_reason=length` reply of the HTTP back end is.
        """
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
            # A forced EOS at the limit would make a cut reply look finished.
            forced_eos_token_id=None,
            **extra,
        )
        new = out[:, enc["input_ids"].shape[1] :]
        ends = self._end_ids()
        for i, row in zip(fit, new):
            ids = row.tolist()
            raw = tok.decode(ids, skip_special_tokens=True)
            # Rows that end early are padded to the batch's length; a row that filled every
            # position without an end token or the stop string was stopped by the limit.
            finished = len(ids) < self.cfg.max_new_tokens or bool(ends & set(ids))
            finished = finished or (not self.chat and PLAIN_STOP in raw)
            text = raw.strip()
            if not finished:
                results[i] = (
                    None,
                    f"reply cut at max_new_tokens={self.cfg.max_new_tokens} (the model did not finish); "
                    "raise --max-new-tokens",
                )
            else:
                results[i] = (text, None) if text else (None, "empty reply")
        return results
