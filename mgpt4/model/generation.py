"""How replies are decoded: one settings dataclass for generation, chat, the demo and curation, and
the stop on the template's stop text (`###` in the official templates) and on EOS.

The defaults are the official demo's (`Chat.answer` in MiniGPT-4's `conversation.py`): sampling at
temperature 1.0 with top_p 0.9, 300 new tokens, one beam, no repetition penalty, the context cut
from the left to 2000 tokens. Tools whose results must be reproducible start from `GREEDY`.
Command-line flags are derived from the fields (`mgpt4.inference.flags.add_decoding_args`), so every
tool spells and documents them the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, StoppingCriteria

from mgpt4.model.prompts import SEP


class GenerationError(ValueError):
    """Decoding settings that cannot be used; the message lists every problem."""


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding controls (field metadata `help` becomes each command-line flag's help)."""

    max_new_tokens: int = field(default=300, metadata={"help": "longest reply, in tokens"})
    num_beams: int = field(default=1, metadata={"help": "beam search when > 1 (replies then come whole)"})
    sample: bool = field(
        default=True,
        metadata={
            "help": "sample tokens (--do-sample), or always take the most likely one (--greedy: deterministic)",
            "flags": ("--do-sample", "--greedy"),
        },
    )
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature; 0 means greedy"})
    top_p: float = field(
        default=0.9,
        metadata={"help": "nucleus sampling: the smallest set of tokens with this much probability"},
    )
    repetition_penalty: float = field(default=1.0, metadata={"help": "> 1 discourages repeating tokens"})
    max_context: int = field(
        default=2000, metadata={"help": "tokens of context kept (prompt + reply); older ones are cut"}
    )

    @property
    def do_sample(self) -> bool:
        # Temperature 0 is how people say "no randomness": it means greedy, not a division by zero.
        return self.sample and self.temperature > 0

    def replace(self, **changes) -> GenerationSettings:
        """A copy with some fields changed; unknown names raise TypeError."""
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        """Raise GenerationError naming every field out of range."""
        problems = []
        if not 1 <= self.max_new_tokens < self.max_context:
            problems.append(f"max_new_tokens must be between 1 and max_context-1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            problems.append(f"num_beams must be at least 1, got {self.num_beams}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if problems:
            raise GenerationError("; ".join(problems))

    def hf_kwargs(self) -> dict:
        """The keyword arguments of transformers' `generate` these settings stand for."""
        kwargs = dict(
            max_new_tokens=self.max_new_tokens,
            num_beams=self.num_beams,
            do_sample=self.do_sample,
            repetition_penalty=self.repetition_penalty,
        )
        if self.do_sample:
            kwargs.update(temperature=float(self.temperature), top_p=self.top_p)
        return kwargs


# Deterministic decoding: the Python API's default, curation's and evaluation's.
GREEDY = GenerationSettings(sample=False)


def stop_sequences(tokenizer, stops: Sequence[str] = (SEP,)) -> list[list[int]]:
    """Token sequences that end a reply, for each stop text: the text on its own, and the text right
    after a word. For `###` and LLaMA these are the official demo's stop words, `▁###` [835] and
    `##` `#` [2277, 29937]."""
    seqs = []
    for stop in stops:
        seqs.append(tokenizer(stop, add_special_tokens=False)["input_ids"])
        # After a word the stop text may split differently (no leading-space piece).
        word = tokenizer("a", add_special_tokens=False)["input_ids"]
        joined = tokenizer("a" + stop, add_special_tokens=False)["input_ids"]
        if joined[: len(word)] == word:
            seqs.append(joined[len(word) :])
    unique: list[list[int]] = []
    for s in seqs:
        if s and s not in unique:
            unique.append(s)
    return unique


def eos_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Every id that ends generation: the tokenizer's EOS and those of the LLM's generation config
    (Llama 3 Instruct ends turns with `<|eot_id|>`, which only the latter names)."""
    ids: list[int] = []
    extra = getattr(generation_config, "eos_token_id", None)
    for i in [tokenizer.eos_token_id, *(extra if isinstance(extra, (list, tuple)) else [extra])]:
        if i is not None and i not in ids:
            ids.append(int(i))
    return ids


class StopOnSequences(StoppingCriteria):
    """Stop each row once its output ends with one of the stop sequences."""

    def __init__(self, stops: list[list[int]]):
        super().__init__()
        self.stops = stops

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for stop in self.stops:
            if input_ids.shape[1] >= len(stop):
                tail = torch.tensor(stop, device=input_ids.device)
                done |= (input_ids[:, -len(stop) :] == tail).all(dim=1)
        return done


@dataclass(frozen=True)
class RowSampling:
    """How one row of a batch picks its tokens: greedy (`temperature` 0), or sampled at `temperature`
    from the nucleus `top_p`, drawing from its own CPU `generator` (a seeded request's own stream; None:
    the global RNG)."""

    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


class RowSampler(LogitsProcessor):
    """Per-row decoding inside one batched greedy `generate`: each sampled row draws its token itself
    (temperature, then top-p, then its own generator) and hands `generate` logits whose only finite
    entry is that token, so `generate`'s argmax takes it; greedy rows pass unchanged.

    This lets requests with different settings and seeds share one batch, and a seeded row draws
    the same tokens alone or beside others (its draws never touch the global RNG or another row's
    stream). Top-p keeps the smallest set of most likely tokens whose probability reaches `top_p`,
    as transformers' TopPLogitsWarper does. `rows[i]` is the batch's row i (num_beams 1).
    """

    def __init__(self, rows: Sequence[RowSampling]):
        self.rows = list(rows)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if len(self.rows) != scores.shape[0]:
            raise ValueError(f"RowSampler has {len(self.rows)} rows, the batch {scores.shape[0]}")
        out = scores
        for i, row in enumerate(self.rows):
            if row.greedy:
                continue
            logits = scores[i].float() / row.temperature
            probs = torch.softmax(logits, dim=-1)
            if row.top_p < 1:
                sorted_p, order = probs.sort(descending=True)
                # A token stays when the probability before it is below top_p (the first always does).
                drop = (sorted_p.cumsum(-1) - sorted_p) >= row.top_p
                probs = probs.scatter(0, order, sorted_p.masked_fill(drop, 0.0))
            # Drawn on the CPU, where a generator gives the same stream on every machine.
            token = torch.multinomial(probs.cpu(), 1, generator=row.generator)
            if out is scores:
                out = scores.clone()
            out[i] = float("-inf")
            out[i, token.to(scores.device)] = 0.0
        return out
