"""One person's conversation about one image, shared by the terminal chat and the web demo.

The upload is checked (a readable image within size limits), preprocessed as the official eval
transform does, and encoded once; each reply then streams from the LLM token by token over the conversation template
that belongs to the model (`model.text.template`: Vicuna v0, Llama-2-Chat or the tokenizer's own),
with the context cut from the left to `max_context` as in `generate`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image, UnidentifiedImageError
from transformers import StoppingCriteria, TextIteratorStreamer

from mgpt4.images import eval_transform, to_rgb
from mgpt4.model.generation import GenerationError, GenerationSettings
from mgpt4.model.minigpt4 import MiniGPT4
from mgpt4.model.prompts import SEP, clean_reply


class ImageRejected(ValueError):
    """An upload that cannot be used as the image; the message says why, in words for a person."""


class ChatError(RuntimeError):
    """A question the session cannot answer yet (no image, empty question, bad settings)."""


@dataclass(frozen=True)
class ImageLimits:
    # 20 MB holds any camera photo; 40 megapixels is above phone cameras and far below the
    # decompression bombs (tiny files that decode to gigabytes) that the pixel check stops.
    max_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB"):
        if n < 1024 or unit == "MB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def load_image(path: str | os.PathLike, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Open an uploaded file as an RGB image, or raise ImageRejected saying why it cannot be used."""
    name = os.path.basename(os.fspath(path))
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise ImageRejected(f"{name}: cannot read the file ({e.strerror or e})") from None
    if size == 0:
        raise ImageRejected(f"{name} is empty, not an image")
    if size > limits.max_bytes:
        raise ImageRejected(f"{name} is {_size(size)}; images up to {_size(limits.max_bytes)} are accepted")
    try:
        with Image.open(path) as img:
            # The header gives the size before any pixel is decoded.
            w, h = img.size
            if w * h > limits.max_pixels:
                raise ImageRejected(
                    f"{name} is {w}x{h} pixels; images up to {limits.max_pixels / 1e6:g} megapixels are accepted"
                )
            # The rules of training and curation (mgpt4.images): EXIF upright, 16-bit, transparency.
            return to_rgb(img)
    except ImageRejected:
        raise
    except Image.DecompressionBombError:
        raise ImageRejected(f"{name} decodes to too many pixels to be a photo") from None
    except UnidentifiedImageError:
        raise ImageRejected(
            f"{name} is not an image that can be read (PNG, JPEG, WebP, GIF, BMP and TIFF are)"
        ) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageRejected(f"{name}: the image is damaged or truncated ({e})") from None


class _StopWhenSet(StoppingCriteria):
    """Ends generation early when the reader has gone (Ctrl-C, a closed browser tab)."""

    def __init__(self, event: threading.Event):
        super().__init__()
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


def visible_reply(text: str, stops: Sequence[str] = (SEP,), echo: str | None = "Assistant:") -> str:
    """What to show of a reply still being written: as `clean_reply`, minus the start of a stop text
    that may be being written (`#` or `##` of `###`)."""
    for stop in stops:
        text = text.split(stop)[0]
        for n in range(len(stop) - 1, 0, -1):
            if text.rstrip().endswith(stop[:n]):
                text = text.rstrip()[:-n]
                break
    return clean_reply(text, stops, echo)


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


class ChatSession:
    """The conversation and the encoded image of one person; not shared between people."""

    def __init__(self, model: MiniGPT4, limits: ImageLimits = ImageLimits()):
        if model.tokenizer is None:
            raise ValueError("the model has no tokenizer; build it with one to chat")
        self.model = model
        self.limits = limits
        self.img_embeds: torch.Tensor | None = None
        self.conversation = model.new_conversation()
        self._stop = threading.Event()

    @property
    def has_image(self) -> bool:
        return self.img_embeds is not None

    def set_image(self, source: str | os.PathLike | Image.Image) -> Image.Image:
        """Check, preprocess and encode an image (a path or a PIL image); starts a new conversation."""
        img = to_rgb(source) if isinstance(source, Image.Image) else load_image(source, self.limits)
        pixels = eval_transform(img, self.model.cfg.vision.image_size).unsqueeze(0)
        with torch.no_grad():
            self.img_embeds = self.model.encode_img(pixels.to(_device_of(self.model.visual_encoder)))
        self.reset()
        return img

    def clear_image(self) -> None:
        self.img_embeds = None
        self.reset()

    def cancel(self) -> None:
        """Stop the reply being written, if any (from another thread: a reset button, a new upload)."""
        self._stop.set()

    def reset(self) -> None:
        """Forget the conversation, keep the image; a reply being written stops."""
        self.cancel()
        self.conversation = self.model.new_conversation()
        if self.has_image:
            self.conversation.add_image()

    def reply(self, question: str, settings: GenerationSettings | None = None) -> str:
        """The whole reply at once (the last of `stream_reply`'s texts)."""
        *_, last = self.stream_reply(question, settings)
        return last

    def stream_reply(self, question: str, settings: GenerationSettings | None = None) -> Iterator[str]:
        """Ask `question`; yields the reply so far each time it grows, the final reply last.

        Closing the iterator early stops generation; the conversation keeps what was said so far.
        Beam search cannot stream in transformers: with num_beams > 1 the reply comes whole.
        """
        settings = settings or GenerationSettings()
        try:
            settings.validate()
        except GenerationError as e:
            raise ChatError(str(e)) from None
        question = question.strip()
        if not question:
            raise ChatError("the question is empty")
        if not self.has_image:
            raise ChatError("there is no image yet: give one first")
        conv, spec = self.conversation, self.model.text_spec
        before = [list(m) for m in conv.messages]
        conv.ask(question)
        prompt = conv.prompt_for_reply()
        stop = self._stop = threading.Event()
        streamer = None
        if settings.num_beams == 1:
            streamer = TextIteratorStreamer(self.model.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict = {}

        def work() -> None:
            try:
                result["reply"] = self._generate(prompt, settings, streamer, stop)
            except BaseException as e:  # handed to the reader, who re-raises it
                result["error"] = e
                if streamer is not None:
                    streamer.end()

        thread = threading.Thread(target=work, name="mgpt4-generate", daemon=True)
        thread.start()
        text = shown = ""
        try:
            for piece in streamer or ():
                text += piece
                partial = visible_reply(text, spec.stops, spec.template.echo)
                if partial and partial != shown:
                    shown = partial
                    yield partial
        finally:
            # A no-op once generation has ended; otherwise the reader went away and it stops now.
            stop.set()
            thread.join()
            if "error" in result:
                conv.messages = before
            else:
                # After a reset this is the forgotten conversation: the new one stays clean.
                conv.add_reply(result.get("reply", visible_reply(text, spec.stops, spec.template.echo)))
        if "error" in result:
            raise result["error"]
        if result["reply"] != shown or not shown:
            yield result["reply"]

    def _generate(
        self,
        prompt: str,
        settings: GenerationSettings,
        streamer: TextIteratorStreamer | None,
        stop: threading.Event,
    ) -> str:
        [reply] = self.model.generate_from_embeds(
            [self.img_embeds],
            prompt,
            settings,
            streamer=streamer,
            stopping_criteria=[_StopWhenSet(stop)],
        )
        return reply
