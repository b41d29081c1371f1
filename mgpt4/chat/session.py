"""One person's conversation about one image, shared by the terminal chat and the web demo.

The upload is checked (a readable image within size limits), preprocessed as the official eval
transform does, and encoded once; each reply then streams from the LLM over the conversation template
that belongs to the model (`model.text.template`: Vicuna v0, Llama-2-Chat or the tokenizer's own), in
whole characters (`streaming.py`), each piece extending the text before it.

A conversation longer than `max_context` loses its oldest questions and answers, never the system
text or the image (`generate` alone would cut the context from the left, the image first); the
person is told once per conversation (`take_notices`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image, UnidentifiedImageError
from transformers import StoppingCriteria

from mgpt4.chat.streaming import ReplyStreamer
from mgpt4.images import eval_transform, to_rgb
from mgpt4.model.generation import GenerationError, GenerationSettings
from mgpt4.model.minigpt4 import MiniGPT4
from mgpt4.model.prompts import IMAGE_TAG, SEP, Conversation


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


def visible_reply(
    text: str, final: bool = False, stops: Sequence[str] = (SEP,), echo: str | None = "Assistant:"
) -> str:
    """The reply to show: the text before the first stop text (`###`), without an echoed leading role
    (`Assistant:`); the model's template gives both.

    While the reply is being written (`final=False`) it also holds back what may still change: the
    start of a stop text (`#` or `##` of `###`), trailing spaces, and a start that may become the
    echoed role. So each text shown extends the one before, and the final reply extends them all. It
    differs from `clean_reply` (the official demo's) only when the role appears after the start:
    text already shown is kept, where the official demo would cut everything before it.
    """
    out = text
    for stop in stops:
        out = out.split(stop)[0]
    if not final:
        for stop in stops:
            held = next((n for n in range(len(stop) - 1, 0, -1) if out.endswith(stop[:n])), 0)
            out = out[: len(out) - held]
    out = out.lstrip()
    if echo:
        if out.startswith(echo):
            out = out[len(echo) :].lstrip()
        elif not final and echo.startswith(out):
            return ""
    return out.strip() if final else out.rstrip()


def drop_oldest_exchange(conv: Conversation) -> bool:
    """Drop the oldest question and answer after the image; False when nothing can go.

    Kept: the system text, everything before the image turn, and the image itself. The image turn
    holds the first question (`<Img><ImageHere></Img> question`); when that exchange goes, the next
    question takes its place beside the image, so turns keep alternating. Works on any template
    whose `messages` are `[role, text]` pairs and whose image turn holds `IMAGE_TAG`.
    """
    msgs = conv.messages
    img = next((k for k, (_, text) in enumerate(msgs) if IMAGE_TAG in str(text)), None)
    if img is None:
        return False
    user = msgs[img][0]
    text = str(msgs[img][1])
    head = text[: text.rindex(IMAGE_TAG) + len(IMAGE_TAG)]
    nxt = next((k for k in range(img + 1, len(msgs)) if msgs[k][0] == user), None)
    if text[len(head) :].strip():
        # The first question sits in the image turn: the next question replaces it there.
        if nxt is None:
            return False
        msgs[img][1] = f"{head} {msgs[nxt][1]}"
        del msgs[img + 1 : nxt + 1]
        return True
    # The image turn stands alone: drop the first exchange after it, up to the next question.
    later = next((k for k in range(nxt + 1, len(msgs)) if msgs[k][0] == user), None) if nxt else None
    if later is None:
        return False
    del msgs[nxt:later]
    return True


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
        self._notices: list[str] = []
        self._told_trim = False

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

    def cancel(self) -> None:
        """Stop the reply being written, if any (from another thread: a reset button, a new upload)."""
        self._stop.set()

    def reset(self) -> None:
        """Forget the conversation, keep the image; a reply being written stops."""
        self.cancel()
        self.conversation = self.model.new_conversation()
        self._told_trim = False
        if self.has_image:
            self.conversation.add_image()

    def take_notices(self) -> list[str]:
        """Things to tell the person since the last call (the context was trimmed, say), once each."""
        out, self._notices = self._notices, []
        return out

    def _ids(self, text: str) -> list[int]:
        return self.model.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_tokens(self, prompt: str) -> int:
        """Positions of `prompt` in the LLM's context, as the model lays it out (`MiniGPT4.layout`):
        BOS (when the model adds one), the text, and the image embeddings."""
        return self.model.layout(prompt).length

    def fit_context(self, settings: GenerationSettings) -> None:
        """Drop the oldest exchanges until the prompt and the reply fit in `settings.max_context`;
        a question that does not fit even then keeps only its end.

        Raises ChatError when the system text and the image alone leave no room for a question.
        """
        conv = self.conversation
        budget = settings.max_context - settings.max_new_tokens
        dropped = False
        while self.prompt_tokens(conv.prompt_for_reply()) > budget and drop_oldest_exchange(conv):
            dropped = True
        if dropped and not self._told_trim:
            self._told_trim = True
            self._notices.append(
                f"The conversation no longer fits the model's context ({settings.max_context} tokens with "
                f"room for a {settings.max_new_tokens}-token reply), so its oldest questions and answers "
                "are left out from now on; the image stays."
            )
        if self.prompt_tokens(conv.prompt_for_reply()) > budget:
            self._cut_question(budget, settings)

    def _cut_question(self, budget: int, settings: GenerationSettings) -> None:
        """Keep the end of a question too long for the context (its start goes, not the image)."""
        conv = self.conversation
        msg = conv.messages[-1]
        text = str(msg[1])
        head = text[: text.rindex(IMAGE_TAG) + len(IMAGE_TAG)] + " " if IMAGE_TAG in text else ""
        ids = self._ids(text[len(head) :])
        while (over := self.prompt_tokens(conv.prompt_for_reply()) - budget) > 0:
            keep = len(ids) - over
            if keep <= 0:
                raise ChatError(
                    f"the context of {settings.max_context} tokens (with room for a "
                    f"{settings.max_new_tokens}-token reply) has no room left for a question"
                )
            ids = ids[-keep:]
            msg[1] = head + self.model.tokenizer.decode(ids, skip_special_tokens=True).strip()
        self._notices.append(
            f"The question is longer than fits the model's context ({settings.max_context} tokens with room "
            f"for a {settings.max_new_tokens}-token reply): the model sees only its last {len(ids)} tokens."
        )

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
        try:
            self.fit_context(settings)
        except ChatError:
            conv.messages = before
            raise
        prompt = conv.prompt_for_reply()
        stop = self._stop = threading.Event()
        streamer = ReplyStreamer(self.model.tokenizer) if settings.num_beams == 1 else None
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
                partial = visible_reply(text, stops=spec.stops, echo=spec.template.echo)
                # Each text shown extends the last (see visible_reply), so a reader prints only the new part.
                if partial != shown and partial.startswith(shown):
                    shown = partial
                    yield partial
            if streamer is None:
                thread.join()  # beams come whole: the reader is still here until they do
        finally:
            # A no-op once generation has ended; otherwise the reader went away and it stops now.
            stop.set()
            thread.join()
            if "error" in result:
                conv.messages = before
            else:
                # After a reset this is the forgotten conversation: the new one stays clean.
                conv.add_reply(self._final(result, streamer, text, spec))
        if "error" in result:
            raise result["error"]
        reply = self._final(result, streamer, text, spec)
        if reply != shown or not shown:
            yield reply

    @staticmethod
    def _final(result: dict, streamer: ReplyStreamer | None, text: str, spec) -> str:
        """The reply: what was streamed, whole (so it extends every text shown); else generate's."""
        if streamer is not None:
            streamed = streamer.text if "reply" in result else text
            return visible_reply(streamed, final=True, stops=spec.stops, echo=spec.template.echo)
        return result.get("reply", "")

    def _generate(
        self,
        prompt: str,
        settings: GenerationSettings,
        streamer: ReplyStreamer | None,
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
