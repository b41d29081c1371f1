"""One annotation entry (LLaVA or ShareGPT / OpenAI messages) as a normalised record, with its problems.

The spellings this reads, each a fact of the tool that writes it:

- LLaVA (`llava/train/train.py`, LLaVA-Pretrain-558K, LLaVA-Instruct, ShareGPT4V):
  `{"id", "image": "rel/path.jpg", "conversations": [{"from": "human", "value": "<image>\\n..."},
  {"from": "gpt", "value": "..."}]}`; `image` may also be a list.
- ShareGPT / OpenAI messages (LLaMA-Factory's `sharegpt` format, ms-swift):
  `{"messages": [{"role": "user", "content": "<image>..."}, {"role": "assistant", "content": "..."}],
  "images": ["path"]}`, or `conversations` with `from`/`value`; a `system` message (or a top-level
  `system` string) is kept.

Roles are `user` (human), `assistant` (gpt, model) and `system`; after an optional system message the
turns alternate user, assistant, starting with the user and ending with the assistant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mgpt4.data.samples import not_text

IMAGE_TOKEN = "<image>"  # where an image goes in LLaVA and ShareGPT text
FORMATS = ("llava", "sharegpt")
USER, ASSISTANT, SYSTEM = "user", "assistant", "system"
_ROLES = {
    "human": USER,
    "user": USER,
    "gpt": ASSISTANT,
    "assistant": ASSISTANT,
    "model": ASSISTANT,
    "bot": ASSISTANT,
    "system": SYSTEM,
}


@dataclass(frozen=True)
class Record:
    """A normalised entry: image paths as written (relative to the image root, or absolute, or URLs),
    the turns as (role, text) pairs alternating user / assistant, and the system message or None."""

    images: tuple[str, ...]
    turns: tuple[tuple[str, str], ...]
    system: str | None = None

    def caption(self) -> str:
        """The first assistant turn: the caption of an image-caption pair (LLaVA-Pretrain's answer)."""
        return next(text for role, text in self.turns if role == ASSISTANT)

    def instruction(self) -> str:
        """The first user turn without its `<image>` tokens, stripped (LLaVA-Pretrain's instruction,
        "Render a clear and concise summary of the photo.")."""
        first = next(text for role, text in self.turns if role == USER)
        return first.replace(IMAGE_TOKEN, "").strip()


def _images(entry: dict, fmt: str) -> tuple[list[str] | None, list[str]]:
    """The entry's image list and its problems; LLaVA names them `image`, ShareGPT `images`."""
    keys = ("image", "images") if fmt == "llava" else ("images", "image")
    key = next((k for k in keys if k in entry), None)
    if key is None:
        return None, [f"no images (expected {keys[0]!r})"]
    value = entry[key]
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        return None, [f"{key!r}: expected a path or a non-empty list of paths, got {value!r:.60}"]
    bad = [i for i, p in enumerate(items) if not isinstance(p, str) or not p.strip()]
    if bad:
        return None, [f"{key}[{bad[0]}]: expected a path, got {items[bad[0]]!r:.60}"]
    return items, []


def _turns(entry: dict) -> tuple[list[tuple[str, str]] | None, str | None, list[str]]:
    """(turns, system, problems) from `messages` (role/content) or `conversations` (from/value)."""
    key = "messages" if "messages" in entry else "conversations" if "conversations" in entry else None
    if key is None:
        return None, None, ["no conversation (expected 'conversations' or 'messages')"]
    msgs = entry[key]
    if not isinstance(msgs, list) or not msgs:
        return None, None, [f"{key!r}: expected a non-empty list of messages, got {msgs!r:.60}"]
    problems: list[str] = []
    turns: list[tuple[str, str]] = []
    system = entry.get("system")
    if system is not None and not isinstance(system, str):
        problems.append(f"'system': expected a string, got {system!r:.60}")
    # The checks run on every entry of a 558K file at start-up: the common case costs a few lookups.
    for i, msg in enumerate(msgs):
        if type(msg) is not dict:
            problems.append(f"{key}[{i}]: expected an object, got {msg!r:.60}")
            continue
        role_key, text_key = ("role", "content") if "role" in msg else ("from", "value")
        name = msg.get(role_key)
        role = (_ROLES.get(name) or _ROLES.get(name.lower())) if isinstance(name, str) else None
        text = msg.get(text_key)
        if role is None:
            problems.append(f"{key}[{i}].{role_key}: expected one of {sorted(_ROLES)}, got {name!r:.40}")
            continue
        if type(text) is not str:
            problems.append(f"{key}[{i}].{text_key}: expected a string, got {text!r:.60}")
            continue
        if ("\ufffd" in text or "\x00" in text) and (bad := not_text(text)):
            problems.append(f"{key}[{i}].{text_key}: has {bad}")
            continue
        if role == SYSTEM:
            if i > 0:
                problems.append(f"{key}[{i}]: a system message after the conversation started")
            else:
                system = text
            continue
        turns.append((role, text))
    if problems:
        return None, None, problems
    for i, (role, _) in enumerate(turns):
        expected = USER if i % 2 == 0 else ASSISTANT
        if role != expected:
            return None, None, [f"{key}: roles out of order: turn {i} is {role}, expected {expected}"]
    if len(turns) < 2:
        return None, None, [f"{key}: no assistant turn"]
    if len(turns) % 2:
        return None, None, [f"{key}: ends with a user turn that has no answer"]
    if not any(text.strip() for role, text in turns if role == ASSISTANT):
        return None, None, [f"{key}: every assistant turn is empty"]
    return turns, system, []


def parse_record(entry: Any, fmt: str) -> tuple[Record | None, list[str]]:
    """(record, []) for a good entry, (None, problems) otherwise; each problem is a phrase that the
    caller prefixes with the file and entry or line (`mgpt4.data.formats.annotations`)."""
    if not isinstance(entry, dict):
        return None, [f"expected an object, got {entry!r:.60}"]
    images, problems = _images(entry, fmt)
    turns, system, more = _turns(entry)
    problems += more
    if images is not None and turns is not None:
        tokens = sum(text.count(IMAGE_TOKEN) for _, text in turns)
        # LLaVA-Pretrain writes "<image>" in the first turn; an entry without any tag has its image
        # before the first turn (LLaVA's own preprocessing puts it there), which is only unambiguous
        # for one image.
        if tokens != len(images) and not (tokens == 0 and len(images) == 1):
            problems.append(
                f"{tokens} {IMAGE_TOKEN} tag(s) in the conversation, {len(images)} image(s) listed"
            )
    if problems:
        return None, problems
    return Record(tuple(images), tuple(turns), system), []


def record_images(entry: Any, fmt: str) -> tuple[tuple[str, ...] | None, list[str]]:
    """`parse_record`'s verdict without the Record: (the images, []) for a good entry, (None, problems)
    otherwise. The index checks every entry of a 558K file at start-up: an entry of the common shape
    (images, then user/assistant turns, an optional first system message) passes in one loop, any other
    goes through `parse_record`, which words its problems (this never changes a verdict or a message)."""
    if type(entry) is not dict:
        return _verdict(entry, fmt)
    value = entry.get("image" if fmt == "llava" else "images")
    if type(value) is str and value.strip():
        images: tuple[str, ...] = (value,)
    elif type(value) is list and value and all(type(p) is str and p.strip() for p in value):
        images = tuple(value)
    else:  # absent (the other key may hold them), or a problem
        return _verdict(entry, fmt)
    msgs = entry.get("messages") if "messages" in entry else entry.get("conversations")
    system = entry.get("system")
    if type(msgs) is not list or (system is not None and type(system) is not str):
        return _verdict(entry, fmt)
    expected, turns, tokens, answered = USER, 0, 0, False
    for i, msg in enumerate(msgs):
        if type(msg) is not dict:
            return _verdict(entry, fmt)
        if "role" in msg:
            name, text = msg.get("role"), msg.get("content")
        else:
            name, text = msg.get("from"), msg.get("value")
        if type(name) is not str or type(text) is not str or "\ufffd" in text or "\x00" in text:
            return _verdict(entry, fmt)
        role = _ROLES.get(name) or _ROLES.get(name.lower())
        if role == SYSTEM and i == 0:
            continue
        if role != expected:
            return _verdict(entry, fmt)
        if role == ASSISTANT:
            expected = USER
            answered = answered or bool(text.strip())
        else:
            expected = ASSISTANT
        turns += 1
        tokens += text.count(IMAGE_TOKEN)
    if turns < 2 or expected != USER or not answered:
        return _verdict(entry, fmt)
    if tokens != len(images) and not (tokens == 0 and len(images) == 1):
        return _verdict(entry, fmt)
    return images, []


def _verdict(entry: Any, fmt: str) -> tuple[tuple[str, ...] | None, list[str]]:
    record, problems = parse_record(entry, fmt)
    return (None, problems) if record is None else (record.images, [])
