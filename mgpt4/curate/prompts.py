"""The paper's curation prompts (the MiniGPT-4 paper, section 3.2; shared/reference/README.md, "Data curation")."""

from __future__ import annotations

from mgpt4.model.prompts import IMAGE_TAG

DESCRIBE_QUESTION = "Describe this image in detail. Give as many details as possible. Say everything you see."
CONTINUE_QUESTION = "Continue"
# The paper's prompts, in the Vicuna v0 turns it used (and no system text).
DESCRIBE_PROMPT = f"###Human: {IMAGE_TAG} {DESCRIBE_QUESTION} ###Assistant: "
# Appended after a short first answer; the second answer is concatenated to the first.
CONTINUE_PROMPT = f"###Human: {CONTINUE_QUESTION} ###Assistant: "

FIX_PROMPT = (
    "Fix the error in the given paragraph. Remove any repeating sentences, meaningless characters, "
    "not English sentences, and so on. Remove unnecessary repetition. Rewrite any incomplete sentences. "
    "Return directly the results without explanation. Return directly the input paragraph if it is "
    "already correct without explanation."
)


def fix_message(instruction: str, paragraph: str) -> str:
    """The single user message sent to the fixing LLM: one message works with every chat template."""
    return f"{instruction}\n\n{paragraph}"
