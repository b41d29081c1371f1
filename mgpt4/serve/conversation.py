"""OpenAI messages -> the prompt the model reads, in its own conversation template, as the chat builds it.

MiniGPT-4 talks about one image, given first: the first user message holds the image (an
`image_url` part) and usually the first question; the image goes into that turn as
`<Img><ImageHere></Img>` followed by the question, later user and assistant messages follow as the
chat's turns (`Conversation.ask` / `add_reply`), and the prompt ends with the model's open turn.
A system message replaces the template's system text (for a tokenizer's chat template it is the
template's own system message). What does not fit this shape is refused with the message it concerns.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from PIL import Image

from mgpt4.model.minigpt4 import MiniGPT4
from mgpt4.model.prompts import IMAGE_PLACEHOLDER, Conversation, ConversationTemplate
from mgpt4.serve.images import ImagePolicy, read_image
from mgpt4.serve.protocol import ApiError, ImagePart, Message


@dataclass
class Prompt:
    text: str  # the prompt, with one `<ImageHere>`
    image: Image.Image
    tokens: int  # its length in the LLM's context (BOS, text, image embeddings)


def _refuse(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param)


def _text(msg: Message, param: str) -> tuple[str, list[tuple[str, ImagePart]]]:
    """A message's text (its text parts joined by newlines) and its image parts with their field names."""
    if msg.content is None:
        raise _refuse(f"{param}.content", "expected text (tool calls are not served)")
    if isinstance(msg.content, str):
        texts, images = [msg.content], []
    else:
        texts = [p.text for p in msg.content if p.type == "text"]
        images = [(f"{param}.content.{k}", p) for k, p in enumerate(msg.content) if isinstance(p, ImagePart)]
    text = "\n".join(t.strip() for t in texts if t.strip())
    if IMAGE_PLACEHOLDER in text or "<Img>" in text:
        raise _refuse(
            f"{param}.content",
            f"{IMAGE_PLACEHOLDER} and <Img> are reserved for the image; send it as an image_url part",
        )
    return text, images


def build_prompt(model: MiniGPT4, messages: list[Message], policy: ImagePolicy) -> Prompt:
    """The prompt for the reply to `messages`, its image read by `policy`; ApiError 400 when the
    messages do not make one (no image, an image after the first user message, two images, no question)."""
    template = model.text_spec.template
    system: list[str] = []
    turns: list[tuple[str, str]] = []
    image: Image.Image | None = None
    for k, msg in enumerate(messages):
        param = f"messages.{k}"
        text, images = _text(msg, param)
        if msg.role in ("system", "developer"):
            if turns:
                raise _refuse(param, "a system message must come before the conversation")
            if images:
                raise _refuse(images[0][0], "images go in a user message")
            system.append(text)
            continue
        if images:
            first_user = msg.role == "user" and not turns
            if not first_user or len(images) > 1 or image is not None:
                raise _refuse(
                    images[1][0] if first_user and len(images) > 1 else images[0][0],
                    "MiniGPT-4 answers about one image, given in the first user message",
                )
            image = read_image(images[0][1].image_url.url, policy, images[0][0] + ".image_url.url")
        elif msg.role == "user" and not turns:
            raise _refuse(
                param,
                "the first user message must hold the image (an image_url part): MiniGPT-4 answers "
                "about an image",
            )
        turns.append((msg.role, text))
    if image is None:
        raise _refuse("messages", "no user message: give one with the image and a question")
    if turns[-1][0] != "user" or not turns[-1][1]:
        raise _refuse(
            f"messages.{len(messages) - 1}",
            "the conversation must end with a user message that asks something",
        )
    conv = _conversation(template, "\n".join(system))
    conv.add_image()
    for role, text in turns:
        if role == "user":
            if text:
                conv.ask(text)
        else:
            conv.add_reply(text)
    prompt = conv.prompt_for_reply()
    return Prompt(prompt, image, model.layout(prompt).length)


def _conversation(template, system: str) -> Conversation:
    if not system:
        return Conversation(template)
    if isinstance(template, ConversationTemplate):
        return Conversation(dataclasses.replace(template, system=system))
    conv = Conversation(template)
    conv.messages.append(["system", system])
    return conv
