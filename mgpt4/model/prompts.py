"""Instruction lists, the Vicuna v0 conversation template and stop words of the official MiniGPT-4."""

from __future__ import annotations

from dataclasses import dataclass, field

IMAGE_PLACEHOLDER = "<ImageHere>"
IMAGE_TAG = "<Img><ImageHere></Img>"

STAGE2_INSTRUCTIONS = [
    f"{IMAGE_TAG} Describe this image in detail.",
    f"{IMAGE_TAG} Take a look at this image and describe what you notice.",
    f"{IMAGE_TAG} Please provide a detailed description of the picture.",
    f"{IMAGE_TAG} Could you describe the contents of this image for me?",
]
STAGE2_TEMPLATE = "###Human: {} ###Assistant: "

VICUNA_V0_SYSTEM = (
    "Give the following image: <Img>ImageContent</Img>. "
    "You will be able to see the image once I provide it to you. Please answer my questions."
)
SEP = "###"
HUMAN = "Human: "
ASSISTANT = "Assistant: "


@dataclass
class Conversation:
    """A Vicuna v0 conversation: `system###Human: <Img><ImageHere></Img> q###Assistant: a###...`."""

    system: str = VICUNA_V0_SYSTEM
    messages: list[list[str | None]] = field(default_factory=list)

    def add_image(self) -> None:
        self.messages.append([HUMAN, IMAGE_TAG])

    def ask(self, text: str) -> None:
        # A question right after the image joins the image's turn, as the official chat does.
        if self.messages and self.messages[-1][0] == HUMAN and str(self.messages[-1][1]).endswith("</Img>"):
            self.messages[-1][1] = f"{self.messages[-1][1]} {text}"
        else:
            self.messages.append([HUMAN, text])

    def prompt_for_reply(self) -> str:
        """The prompt that asks the model for the next reply (an open Assistant turn)."""
        return self._render() + ASSISTANT

    def add_reply(self, text: str) -> None:
        self.messages.append([ASSISTANT, text])

    def _render(self) -> str:
        out = self.system + SEP
        for role, message in self.messages:
            out += f"{role}{message}{SEP}"
        return out

    @property
    def num_images(self) -> int:
        return sum(str(m).count(IMAGE_PLACEHOLDER) for _, m in self.messages)


def clean_reply(text: str) -> str:
    """The reply shown to a person: text before the first `###`, after any echoed `Assistant:`."""
    return text.split(SEP)[0].split("Assistant:")[-1].strip()
