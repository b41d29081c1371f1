"""Reference captions in the COCO captions format, and which image each belongs to.

    {"images": [{"id": 391895, "file_name": "COCO_val2014_000000391895.jpg"}, ...],
     "annotations": [{"image_id": 391895, "caption": "A man with a red helmet on a small moped."}, ...]}

(`captions_val2014.json`, the Karpathy test split files and nocaps all have this shape.) An image on
disk is matched to a reference image by name: its file name without the extension (for a shard
member, its webdataset key; in a subfolder, the relative path with `__` for `/`, as
`mgpt4.image_sources` names items) equals the reference image's `file_name` without the extension,
or, when the file has no `images` list, its `image_id`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from mgpt4.image_sources import safe_id

# How many names an error lists before it gives only the count.
_SHOW = 10

FORMAT_HINT = (
    'expected the COCO captions format: {"images": [{"id": ..., "file_name": ...}, ...], '
    '"annotations": [{"image_id": ..., "caption": "..."}, ...]} ("images" is optional)'
)


class ReferencesError(ValueError):
    """The references file cannot be used, or does not match the images; the message says why."""


@dataclass
class References:
    """Reference captions by image key, and the file's own image id of each key (for the outputs)."""

    path: str
    captions: dict[str, list[str]]
    image_ids: dict[str, Any]


def _is_id(value: Any) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool) and str(value) != ""


def reference_key(file_name: str) -> str:
    """The key of a reference image: its file name without the extension, as image items are named."""
    return safe_id(os.path.splitext(file_name)[0].replace("\\", "/").replace("/", "__"))


def load_references(path: str) -> References:
    """Read and check a COCO captions file; every problem names the file and the entry."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ReferencesError(f"{path}: no such references file") from None
    except (OSError, ValueError) as e:
        raise ReferencesError(f"{path}: not readable JSON ({e}); {FORMAT_HINT}") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ReferencesError(f"{path}: no 'annotations' list; {FORMAT_HINT}")
    names: dict[str, str] | None = None
    if "images" in data:
        if not isinstance(data["images"], list):
            raise ReferencesError(f"{path}: 'images' is not a list; {FORMAT_HINT}")
        names = {}
        for i, img in enumerate(data["images"]):
            if (
                not isinstance(img, dict)
                or not _is_id(img.get("id"))
                or not isinstance(img.get("file_name"), str)
            ):
                raise ReferencesError(
                    f"{path}: images[{i}] is {img!r}; expected {{'id': ..., 'file_name': '...'}}"
                )
            names[str(img["id"])] = img["file_name"]
    captions: dict[str, list[str]] = {}
    image_ids: dict[str, Any] = {}
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not _is_id(ann.get("image_id")):
            raise ReferencesError(f"{path}: annotations[{i}] has no image_id: {ann!r}; {FORMAT_HINT}")
        caption = ann.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise ReferencesError(
                f"{path}: annotations[{i}].caption: expected a non-empty string, got {caption!r}"
            )
        image_id = ann["image_id"]
        if names is not None and str(image_id) not in names:
            raise ReferencesError(f"{path}: annotations[{i}].image_id {image_id!r} is not among 'images'")
        key = reference_key(names[str(image_id)]) if names is not None else safe_id(str(image_id))
        if key in image_ids and image_ids[key] != image_id:
            raise ReferencesError(
                f"{path}: images {image_ids[key]!r} and {image_id!r} have the same name {key!r}"
            )
        image_ids[key] = image_id
        captions.setdefault(key, []).append(caption)
    if not captions:
        raise ReferencesError(f"{path}: 'annotations' is empty; {FORMAT_HINT}")
    return References(path, captions, image_ids)


def _listing(keys: list[str]) -> str:
    more = f" and {len(keys) - _SHOW} more" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def check_matches(image_keys: list[str], refs: References, images_arg: str) -> None:
    """Every image has references and every referenced image is there; else one error naming them."""
    have = set(image_keys)
    no_ref = sorted(have - set(refs.captions))
    missing = sorted(set(refs.captions) - have)
    problems = []
    if no_ref:
        problems.append(
            f"{len(no_ref)} image(s) of {images_arg} have no reference caption in {refs.path}: {_listing(no_ref)}"
        )
    if missing:
        problems.append(
            f"{len(missing)} image(s) referenced in {refs.path} are not among {images_arg}: {_listing(missing)}"
        )
    if problems:
        raise ReferencesError(
            "; ".join(problems) + ". An image matches a reference by its file name without the extension "
            "(the reference image's file_name, or its image_id when the file has no 'images' list)"
        )
