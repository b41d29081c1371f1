"""The token layout of a sample or a prompt: where BOS, the prompt's text, the image tokens and the answer
sit in the LLM's input. This is the one place that knows it.

    [BOS] [text before <ImageHere>] [image tokens] [text after] ... [answer + end_sym] [pad]

A stage-1 sample's prompt is `<ImageHere>` alone (no instruction), a stage-2 sample's the instruction
wrapped in the template's prompt (`model.text.prompt_template`), a chat prompt the whole conversation
with any number of images. BOS goes before the first text, unless that text already starts with it
(chat templates such as Llama 3's write their own) or the model adds none (`model.text.add_bos`).

`MiniGPT4` builds its input from these segments (`build_inputs`, `context_embeds`); the loader packs
samples and the tally counts tokens by their lengths (`MiniGPT4.sample_layouts`), and chat trims a
conversation to the context by them (`MiniGPT4.layout`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mgpt4.model.prompts import IMAGE_PLACEHOLDER

BOS, TEXT, IMAGE, ANSWER = "bos", "text", "image", "answer"

# The prompt of a sample without an instruction (stage 1): the image alone.
IMAGE_ONLY = IMAGE_PLACEHOLDER


@dataclass(frozen=True)
class Segment:
    """One run of LLM positions: `kind` is BOS, TEXT, IMAGE or ANSWER; `ids` are the token ids of a BOS
    or TEXT segment (empty for IMAGE and ANSWER, whose embeddings come from elsewhere)."""

    kind: str
    length: int
    ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Layout:
    """The segments of one sequence, in order; empty text segments are left out."""

    segments: tuple[Segment, ...]

    @property
    def length(self) -> int:
        """LLM positions of the whole sequence."""
        return sum(s.length for s in self.segments)

    @property
    def context_length(self) -> int:
        """LLM positions before the answer: BOS, the prompt's text and the image tokens."""
        return sum(s.length for s in self.segments if s.kind != ANSWER)

    @property
    def num_images(self) -> int:
        return sum(s.kind == IMAGE for s in self.segments)

    def count(self, kind: str) -> int:
        """Positions of one kind (BOS, TEXT, IMAGE or ANSWER)."""
        return sum(s.length for s in self.segments if s.kind == kind)

    def text_runs(self) -> list[list[int]]:
        """Token ids (BOS included) before each image and after the last: `num_images + 1` lists."""
        runs: list[list[int]] = [[]]
        for s in self.segments:
            if s.kind == IMAGE:
                runs.append([])
            elif s.kind in (BOS, TEXT):
                runs[-1].extend(s.ids)
        return runs


def wrap_instruction(prompt_template: str, instruction: str) -> str:
    """A stage-2 instruction (`<Img><ImageHere></Img> Describe this image.`) in the prompt template
    ("...{}..."): the prompt of its samples. ValueError unless it holds `<ImageHere>` exactly once."""
    if instruction.count(IMAGE_PLACEHOLDER) != 1:
        raise ValueError(f"instruction must contain {IMAGE_PLACEHOLDER!r} once, got {instruction!r}")
    return prompt_template.format(instruction)


def sample_prompts(prompt_template: str, instructions: Sequence[str]) -> list[str]:
    """The prompt of each instruction, in the order the loader draws their indices; stage 1 (no
    instructions): one prompt, the image alone."""
    return [wrap_instruction(prompt_template, i) for i in instructions] or [IMAGE_ONLY]


def layout(
    prompt: str,
    tokenize: Callable[[str], Sequence[int]],
    bos_id: int | None,
    image_tokens: int,
    answer_tokens: int = 0,
) -> Layout:
    """The layout of `prompt` (text with `<ImageHere>` where each image goes), followed by an answer of
    `answer_tokens` tokens (answer + end_sym; 0 for a prompt that asks for a reply).

    `tokenize` turns text into ids without special tokens (`mgpt4.model.templates.prompt_tokenizer`:
    for the official templates as the official slow LLaMA tokenizer does, a literal `<s>` becoming BOS
    and the piece after it starting with `▁`); `bos_id` is the BOS put before the first text (None:
    none); each image takes `image_tokens` positions.
    """
    pieces = prompt.split(IMAGE_PLACEHOLDER)
    segments: list[Segment] = []
    for i, piece in enumerate(pieces):
        ids = tuple(tokenize(piece)) if piece else ()
        if i == 0 and bos_id is not None and ids[:1] != (bos_id,):
            segments.append(Segment(BOS, 1, (bos_id,)))
        if ids:
            segments.append(Segment(TEXT, len(ids), ids))
        if i < len(pieces) - 1:
            segments.append(Segment(IMAGE, image_tokens))
    if answer_tokens:
        segments.append(Segment(ANSWER, answer_tokens))
    return Layout(tuple(segments))
