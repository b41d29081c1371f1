"""A reply streamed as whole characters: each piece extends the text before it, and never changes it.

A token does not always end on a character. With LLaMA's byte fallback, an emoji or a CJK
character arrives as three or four byte tokens, and decoding a prefix of them gives U+FFFD; the
decode of a longer token list can also differ from the decode of its prefix at their seam. A
streamer that prints each prefix's decode must then take back what it printed, and a terminal can
only print the reply a second time. This one decodes a window of tokens with one token of context
before it (the incremental detokenisation of vLLM and TGI), emits only text that ends on a whole
character, and the reply *is* the concatenation of what it emitted, so a terminal never reprints.
"""

from __future__ import annotations

import queue

import torch
from transformers.generation.streamers import BaseStreamer

REPLACEMENT = "\ufffd"  # what a decoder gives for bytes that are not (yet) a whole UTF-8 character


class ReplyStreamer(BaseStreamer):
    """Feeds `generate` (one row) and is iterated by the reader thread: `for piece in streamer`.

    `text` is everything emitted so far; after `end()` it is the whole reply (special tokens skipped).
    """

    def __init__(self, tokenizer, timeout: float | None = None):
        self.tokenizer = tokenizer
        self.timeout = timeout
        self.ids: list[int] = []
        self.text = ""
        # Tokens before `_prefix` are emitted and out of the window; those from `_prefix` to `_read`
        # are emitted too but kept as the window's context (a word piece's leading space, a byte run).
        self._prefix = 0
        self._read = 0
        self._prompt = True
        self._queue: queue.Queue[str | None] = queue.Queue()

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _emit(self, piece: str) -> None:
        if piece:
            self.text += piece
            self._queue.put(piece, timeout=self.timeout)

    def put(self, value: torch.Tensor) -> None:
        if self._prompt:
            # `generate` first hands over the prompt's ids (none when it gets embeddings): not reply text.
            self._prompt = False
            return
        if value.dim() > 1:
            if value.shape[0] > 1:
                raise ValueError("ReplyStreamer streams one row")
            value = value[0]
        self.ids.extend(value.tolist())
        done = self._decode(self.ids[self._prefix : self._read])
        now = self._decode(self.ids[self._prefix :])
        # Wait while the window ends inside a character, or its text is not yet longer than before.
        if len(now) > len(done) and not now.endswith(REPLACEMENT):
            self._emit(now[len(done) :])
            self._prefix, self._read = self._read, len(self.ids)

    def end(self) -> None:
        """The rest of the window, whole characters or not: the reply ends here."""
        done = self._decode(self.ids[self._prefix : self._read])
        now = self._decode(self.ids[self._prefix :])
        if len(now) > len(done):
            self._emit(now[len(done) :])
        self._prefix = self._read = len(self.ids)
        self._queue.put(None, timeout=self.timeout)

    def __iter__(self) -> ReplyStreamer:
        return self

    def __next__(self) -> str:
        piece = self._queue.get(timeout=self.timeout)
        if piece is None:
            raise StopIteration
        return piece
