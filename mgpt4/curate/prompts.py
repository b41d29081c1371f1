"""The paper's curation prompts (shared/reference/README.md, "Data curation")."""

from __future__ import annotations

from mgpt4.model.prompts import IMAGE_TAG

DESCRIBE_PROMPT = (
    f"###Human: {IMAGE_TAG} Describe this image in detail. Give as many details as possible. "
    "Say everything you see. ###Assistant: "
)
# Appended after a short first answer; the second answer is concatenated to the first.
CONTINUE_PROMPT = "###Human: Continue ###Assistant: "

FIX_PROMPT = (
    "Fix the error in the given paragraph. Remove any repeating sentences, meaningless characters, "
    "not English sentences, and so on. Remove unnecessary repetition. Rewrite any incomplete sentences. "
    "Return directly the results without explanation. Return directly the input paragraph if it is "
    "already correct without explanation."
)


def fix_message(instruction: str, paragraph: str) -> str:
    """The single user message sent to the fixing LLM: one message works with every chat template."""
    return f"{instruction}\n\n{paragraph}"
