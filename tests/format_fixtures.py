"""Tiny annotation files of each format people bring (LLaVA JSON / JSONL, ShareGPT / OpenAI messages),
with their images, made on the fly for the format tests."""

from __future__ import annotations

import json
import os

from tests.data_fixtures import jpeg

INSTRUCTION = "Render a clear and concise summary of the photo."


def write_images(folder: str, count: int, sub: str = "img") -> list[str]:
    """`count` tiny JPEGs under folder/sub; returns their paths relative to `folder`."""
    os.makedirs(os.path.join(folder, sub), exist_ok=True)
    rel = []
    for i in range(count):
        path = os.path.join(sub, f"{i:05d}.jpg")
        with open(os.path.join(folder, path), "wb") as f:
            f.write(jpeg(40, 32, seed=i % 4))
        rel.append(path)
    return rel


def llava_entries(images: list[str], turns: int = 1) -> list[dict]:
    """LLaVA entries: the first human turn holds `<image>`; captions name the entry."""
    out = []
    for i, image in enumerate(images):
        conv = [
            {"from": "human", "value": f"<image>\n{INSTRUCTION}"},
            {"from": "gpt", "value": f"sample number {i} of shard 0"},
        ]
        for t in range(1, turns):
            conv += [
                {"from": "human", "value": f"what is at the top {t}?"},
                {"from": "gpt", "value": f"a red circle {t} of sample {i}"},
            ]
        out.append({"id": f"{i:05d}", "image": image, "conversations": conv})
    return out


def sharegpt_entries(images: list[str], system: str | None = None) -> list[dict]:
    """OpenAI-messages entries with `images`, optionally a system message."""
    out = []
    for i, image in enumerate(images):
        msgs = [] if system is None else [{"role": "system", "content": system}]
        msgs += [
            {"role": "user", "content": "<image>What is this?"},
            {"role": "assistant", "content": f"sample number {i} of shard 1"},
        ]
        out.append({"messages": msgs, "images": [image]})
    return out


def write_json(path: str, entries: list, jsonl: bool = False) -> str:
    with open(path, "w", encoding="utf-8") as f:
        if jsonl:
            f.writelines(json.dumps(e) + "\n" for e in entries)
        else:
            json.dump(entries, f, indent=1)
    return path


def llava_set(folder: str, count: int, jsonl: bool = False, turns: int = 1) -> str:
    """A LLaVA annotation file (JSON list or JSONL) with `count` entries and their images beside it."""
    images = write_images(folder, count)
    return write_json(
        os.path.join(folder, "chat.jsonl" if jsonl else "chat.json"), llava_entries(images, turns), jsonl
    )


def sharegpt_set(folder: str, count: int, system: str | None = None) -> str:
    images = write_images(folder, count)
    return write_json(os.path.join(folder, "messages.jsonl"), sharegpt_entries(images, system), jsonl=True)
