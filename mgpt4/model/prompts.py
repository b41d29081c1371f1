"""Instruction lists, the two conversation templates of the official MiniGPT-4 (Vicuna v0 and
Llama-2-Chat), the conversation that follows one, reply cleaning, and making model text safe to show.

The templates are facts of the official `minigpt4/conversation/conversation.py` (`CONV_VISION_Vicuna0`,
`CONV_VISION_LLama2`, separator style SINGLE) and of its `minigpt4_llama2` configs; a tokenizer's own
chat template is `mgpt4.model.templates.TokenizerChatTemplate`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

IMAGE_PLACEHOLDER = "<ImageHere>"
IMAGE_TAG = "<Img><ImageHere></Img>"

STAGE2_INSTRUCTIONS = [
    f"{IMAGE_TAG} Describe this image in detail.",
    f"{IMAGE_TAG} Take a look at this image and describe what you notice.",
    f"{IMAGE_TAG} Please provide a detailed description of the picture.",
    f"{IMAGE_TAG} Could you describe the contents of this image for me?",
]
STAGE2_TEMPLATE = "###Human: {} ###Assistant: "
LLAMA2_INSTRUCTION_TEMPLATE = "[INST] {} [/INST] "

VICUNA_V0_SYSTEM = (
    "Give the following image: <Img>ImageContent</Img>. "
    "You will be able to see the image once I provide it to you. Please answer my questions."
)
SEP = "###"
HUMAN = "Human: "
ASSISTANT = "Assistant: "


class Template(Protocol):
    """What a conversation needs of a template (an official one, or a tokenizer's chat template)."""

    name: str
    roles: tuple[str, str]
    stops: tuple[str, ...]
    echo: str | None
    # True: prompts are tokenized as the official slow LLaMA tokenizer does (each piece between
    # special tokens on its own, `mgpt4.tokenizer.encode_like_slow_llama`); False: by the tokenizer as is.
    slow_llama_pieces: bool

    def render(self, messages: Sequence[Sequence[str]]) -> str: ...


@dataclass(frozen=True)
class ConversationTemplate:
    """A conversation as the official `Conversation` writes it (separator style SINGLE): `system + sep`,
    then `role + message + sep` for each message, and the model's role left open for the reply."""

    name: str
    system: str
    roles: tuple[str, str]  # (the person's, the model's)
    sep: str
    instruction: str  # the stage-2 training prompt around one instruction ("...{}...")
    end_sym: str  # what ends an answer in stage-2 training text
    # Text that ends a generated reply besides EOS; the official demo stops on `###` with both templates.
    stops: tuple[str, ...] = (SEP,)
    # A role the model may echo at the start of its reply, cut off as the official `Chat.answer` does.
    echo: str | None = "Assistant:"
    # The official code tokenizes with the slow LLaMA tokenizer: after a literal `<s>` (each
    # Llama-2-Chat turn) the next piece starts with `▁`, whatever a fast tokenizer's folder says.
    slow_llama_pieces: bool = True

    def render(self, messages: Sequence[Sequence[str]]) -> str:
        """The prompt that asks for the next reply: every message, then the model's open turn."""
        out = self.system + self.sep
        for role, message in messages:
            out += f"{role}{message}{self.sep}"
        return out + self.roles[1]


VICUNA_V0 = ConversationTemplate(
    name="vicuna_v0",
    system=VICUNA_V0_SYSTEM,
    roles=(HUMAN, ASSISTANT),
    sep=SEP,
    instruction=STAGE2_TEMPLATE,
    end_sym=SEP,
)

# `<s>` is text here: the LLaMA tokenizer turns it into the BOS id, as the official one does.
LLAMA2_CHAT = ConversationTemplate(
    name="llama2_chat",
    system=VICUNA_V0_SYSTEM,
    roles=("<s>[INST] ", " [/INST] "),
    sep="",
    instruction=LLAMA2_INSTRUCTION_TEMPLATE,
    end_sym="</s>",
)

OFFICIAL_TEMPLATES = {t.name: t for t in (VICUNA_V0, LLAMA2_CHAT)}


@dataclass
class Conversation:
    """A conversation in `template` (Vicuna v0 by default), e.g.
    `system###Human: <Img><ImageHere></Img> q###Assistant: a###...` or, in Llama-2-Chat,
    `system<s>[INST] <Img><ImageHere></Img> q [/INST] a<s>[INST] ...`."""

    template: Template = VICUNA_V0
    messages: list[list[str]] = field(default_factory=list)

    def add_image(self) -> None:
        self.messages.append([self.template.roles[0], IMAGE_TAG])

    def ask(self, text: str) -> None:
        # A question right after the image joins the image's turn, as the official chat does.
        user = self.template.roles[0]
        if self.messages and self.messages[-1][0] == user and str(self.messages[-1][1]).endswith("</Img>"):
            self.messages[-1][1] = f"{self.messages[-1][1]} {text}"
        else:
            self.messages.append([user, text])

    def prompt_for_reply(self) -> str:
        """The prompt that asks the model for the next reply (an open model turn)."""
        return self.template.render(self.messages)

    def add_reply(self, text: str) -> None:
        self.messages.append([self.template.roles[1], text])


def clean_reply(text: str, stops: Sequence[str] = (SEP,), echo: str | None = "Assistant:") -> str:
    """The reply shown to a person: text before the first stop (`###`), after any echoed role."""
    for stop in stops:
        text = text.split(stop)[0]
    if echo:
        text = text.split(echo)[-1]
    return text.strip()


# C0 and C1 control characters (Unicode category Cc), but for tab (U+0009) and newline (U+000A).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def displayable(text: str) -> str:
    """Model text made safe to show on a terminal or a web page: each control character, which a
    terminal would obey (a carriage return overwriting the line, ESC sequences, ^N/^O switching the
    character set) and JSON carries as `\\u0000`, written as a visible `\\xNN` escape (CR as `\\x0d`).

    Newlines, tabs and every printable character (emoji with their joiners, CJK, combining marks) are
    kept. Escaping is per character, so escaping the pieces of a stream gives the escaped whole.
    Only what is shown is escaped; the conversation keeps the model's own text.
    """
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
