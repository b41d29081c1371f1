"""A multi-turn conversation as one training sequence: token ids, which of them the loss reads, and where
the image goes. The stage-2 counterpart of `mgpt4.model.layout` for data that brings its own turns.

    [BOS] [system] [user turn 1 in the template, <ImageHere> where the image goes] [answer 1 + end_sym]
                   [user turn 2 in the template] [answer 2 + end_sym] ...

Each user turn is wrapped as the model's stage-2 training prompt wraps an instruction (Vicuna v0:
`###Human: {} ###Assistant: `, Llama-2-Chat: `[INST] {} [/INST] `), so a single-turn conversation is
exactly the official stage-2 sample; a tokenizer's chat template wraps the later turns as it writes them
after an answer. The loss is on the answers and their end_sym only. `<image>` in the data (LLaVA's and
ShareGPT's tag) becomes the image tag `<Img><ImageHere></Img>`; a conversation without a tag has the
image before its first question, as the official instructions do. Prompt text is tokenized as the model
tokenizes prompts (`mgpt4.model.templates.prompt_tokenizer`: official templates as the slow LLaMA
tokenizer does, piece by piece), answers as `mgpt4.tokenizer.encode_answers` does.

A conversation longer than `max_tokens` text positions (image tokens not counted) keeps its first
exchanges that fit, whole; one that cannot keep the exchange holding its image is not a sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mgpt4.model.prompts import IMAGE_PLACEHOLDER, IMAGE_TAG
from mgpt4.tokenizer import encode_like_slow_llama

DATA_IMAGE_TOKEN = "<image>"  # LLaVA's and ShareGPT's tag for where an image goes
USER_SLOT = "\x00MGPT4-USER\x00"
SYSTEM_SLOT = "\x00MGPT4-SYSTEM\x00"


@dataclass(frozen=True)
class EncodedConversation:
    """ids: the text token ids (BOS included); loss: 1 where the loss reads the id (answers + end_sym);
    image_at: the index in `ids` before which the image tokens go; exchanges: how many were kept."""

    ids: tuple[int, ...]
    loss: tuple[int, ...]
    image_at: int
    exchanges: int


@dataclass(frozen=True)
class ConversationEncoder:
    """Turns (role, text) lists into `EncodedConversation`s for one model; pickles into data workers.

    `first`, `first_system` and `later` are the wrappers of a user turn (USER_SLOT where its text goes,
    SYSTEM_SLOT where a system message goes); `mgpt4.model.templates.conversation_wrappers` makes them.
    """

    tokenizer: Any
    first: str
    first_system: str
    later: str
    end_sym: str
    bos_id: int | None
    slow_llama_pieces: bool
    max_tokens: int
    image_tokens: int  # LLM positions the image takes (the model's num_image_tokens)

    def _prompt_ids(self, text: str) -> list[int]:
        if not text:
            return []
        if self.slow_llama_pieces:
            return encode_like_slow_llama(self.tokenizer, text)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _answer_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text + self.end_sym, add_special_tokens=False)["input_ids"])

    def encode(self, turns: Sequence[Sequence[str]], system: str | None = None) -> EncodedConversation | None:
        """`turns` alternate ("user", text), ("assistant", text); the conversation has one image (one
        `<image>` tag, or none: before the first question). None when the exchange with the image
        cannot fit `max_tokens`."""
        users = [t for r, t in turns if r == "user"]
        answers = [t for r, t in turns if r == "assistant"]
        tagged = [DATA_IMAGE_TOKEN in u for u in users]
        if sum(u.count(DATA_IMAGE_TOKEN) for u in users) > 1:
            raise ValueError("a training conversation holds one image; this one has more <image> tags")
        image_turn = tagged.index(True) if any(tagged) else 0
        ids: list[int] = []
        loss: list[int] = []
        image_at = -1
        kept = 0
        for k, (user, answer) in enumerate(zip(users, answers)):
            if k == image_turn:
                user = user.replace(DATA_IMAGE_TOKEN, IMAGE_TAG) if tagged[k] else f"{IMAGE_TAG} {user}"
            if k == 0:
                wrapper = self.first_system.replace(SYSTEM_SLOT, system) if system else self.first
            else:
                wrapper = self.later
            prompt = wrapper.replace(USER_SLOT, user)
            pieces = prompt.split(IMAGE_PLACEHOLDER)
            part: list[int] = []
            at = -1
            for i, piece in enumerate(pieces):
                piece_ids = self._prompt_ids(piece)
                if k == 0 and i == 0 and self.bos_id is not None and piece_ids[:1] != [self.bos_id]:
                    piece_ids = [self.bos_id, *piece_ids]
                part += piece_ids
                if i < len(pieces) - 1:
                    at = len(ids) + len(part)
            answer_ids = self._answer_ids(answer)
            if len(ids) + len(part) + len(answer_ids) > self.max_tokens:
                break
            ids += part
            loss += [0] * len(part)
            ids += answer_ids
            loss += [1] * len(answer_ids)
            if at >= 0:
                image_at = at
            kept += 1
        if kept <= image_turn:
            return None
        return EncodedConversation(tuple(ids), tuple(loss), image_at, kept)
