"""Hugging Face datasets on disk (local parquet files, or a folder `Dataset.save_to_disk` wrote), read
with the `datasets` library as stage-1 pairs or stage-2 conversations.

The table is Arrow, memory-mapped: a worker gets the dataset pickled as the paths of its Arrow files
and reads the one row it needs (parquet files are converted to Arrow once, into the `datasets` cache,
as `Dataset.from_parquet` does). Columns, names settable (`image_column`, `text_column`):

- the image: an embedded `{bytes, path}` struct (the `datasets.Image` feature), a path, or a list of
  them (one per training sample: a row with more is refused);
- the text: a caption string, or a conversation, a list of `{role, content}` or `{from, value}`
  messages (`mgpt4.data.formats.records` reads it as a ShareGPT entry).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

from mgpt4.data.formats.annotations import SHOW_PROBLEMS, AnnotationError, read_image
from mgpt4.data.formats.records import ASSISTANT, USER, Record, parse_record

DEFAULT_IMAGE_COLUMN = "image"
DEFAULT_TEXT_COLUMN = "caption"


def _datasets():
    """The `datasets` library (the `data` extra): only sources of this format need it."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            "data.sources[i].format huggingface reads with the `datasets` library: pip install 'mgpt4[data]'"
        ) from e
    return datasets


def _open(path: str):
    """A `datasets.Dataset` from a save_to_disk folder, a parquet file, a folder of them or a glob."""
    datasets = _datasets()
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "state.json")):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            raise AnnotationError(
                f"{path}: a DatasetDict with splits {list(ds)}; point data.sources[i].annotations at one "
                f"split's folder ({os.path.join(path, next(iter(ds)))})"
            )
        return ds
    files = (
        sorted(glob.glob(os.path.join(path, "*.parquet"))) if os.path.isdir(path) else sorted(glob.glob(path))
    )
    if not files:
        raise FileNotFoundError(f"{path}: no parquet file and no save_to_disk folder (state.json) there")
    return datasets.Dataset.from_parquet(files)


def _image_items(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _good_image(item: Any) -> bool:
    if isinstance(item, str):
        return bool(item.strip())
    return isinstance(item, dict) and (bool(item.get("bytes")) or bool(item.get("path")))


class HFIndex:
    """The rows of one dataset, by number, with the interface of `AnnotationIndex`."""

    fmt = "sharegpt"  # the spelling of the `json` member `sample` gives (normalised messages)

    def __init__(self, path: str, dataset: Any, image_column: str, text_column: str, image_root: str):
        self.path = path
        self.dataset = dataset
        self.image_column = image_column
        self.text_column = text_column
        self.image_root = image_root

    def __len__(self) -> int:
        return len(self.dataset)

    def identity(self) -> list[str]:
        return [self.path, f"{len(self)} rows", f"fingerprint {self.dataset._fingerprint}"]

    def where(self, i: int) -> str:
        return f"{self.path} row {i}"

    def number(self, i: int) -> int:
        return i

    def record_of(self, images: Any, text: Any) -> tuple[Record | None, list[str]]:
        """The row's record and its problems (a caption becomes a one-exchange conversation)."""
        items = _image_items(images)
        if not items or not all(_good_image(x) for x in items):
            return None, [
                f"{self.image_column!r}: expected an image ({{bytes, path}}, a path or a list), got {images!r:.60}"
            ]
        paths = [x if isinstance(x, str) else (x.get("path") or "<embedded>") for x in items]
        if isinstance(text, str):
            if not text.strip():
                return None, [f"{self.text_column!r}: an empty caption"]
            return Record(tuple(paths), ((USER, ""), (ASSISTANT, text))), []
        if isinstance(text, (list, tuple)):
            return parse_record(
                {
                    "messages" if text and "role" in (text[0] or {}) else "conversations": list(text),
                    "images": paths,
                },
                "sharegpt",
            )
        return None, [f"{self.text_column!r}: expected a caption or a list of messages, got {text!r:.60}"]

    def sample(self, i: int) -> tuple:
        """Row i as a shard sample ("ok", path, key, files, where) or a skip (reason, where, detail);
        `where` names the row, and the image file when the row holds a path rather than the bytes."""
        where = self.where(i)
        row = self.dataset[int(i)]
        record, problems = self.record_of(row[self.image_column], row[self.text_column])
        if record is None:
            return ("bad_json", where, problems[0])
        item = _image_items(row[self.image_column])[0]
        if isinstance(item, dict) and item.get("bytes"):
            data: Any = item["bytes"]
            sample_where = where
        else:
            path = item if isinstance(item, str) else item["path"]
            path = path if os.path.isabs(path) else os.path.join(self.image_root, path)
            data = read_image(path, where)
            if isinstance(data, tuple):
                return data
            sample_where = f"{where} (image {path})"
        messages = [{"role": r, "content": t} for r, t in record.turns]
        entry = {"messages": messages, "images": list(record.images)}
        files = {"jpg": data, "txt": record.caption().encode(), "json": json.dumps(entry).encode()}
        return ("ok", self.path, str(i), files, sample_where)

    def close(self) -> None:
        pass


def load_hf(
    path: str, image_column: str = "", text_column: str = "", image_root: str = "", pairs: bool = True
) -> HFIndex:
    """Open and check a dataset: the columns must exist, and every row must hold an image and a caption
    or a well-formed conversation (with `pairs`, one image), image paths must exist; AnnotationError
    lists every problem with its row, FileNotFoundError when there is no dataset at `path`."""
    datasets = _datasets()
    ds = _open(path)
    image_column = image_column or DEFAULT_IMAGE_COLUMN
    text_column = text_column or DEFAULT_TEXT_COLUMN
    missing = [c for c in (image_column, text_column) if c not in ds.column_names]
    if missing:
        raise AnnotationError(
            f"{path}: no column {' or '.join(map(repr, missing))}; the columns are {ds.column_names} "
            f"(set data.sources[i].image_column / text_column)"
        )
    if isinstance(ds.features[image_column], datasets.Image):  # bytes and path, not a decoded picture
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    root = image_root or (path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)))
    index = HFIndex(path, ds, image_column, text_column, root)
    problems: list[str] = []
    for i, (images, text) in enumerate(zip(ds[image_column], ds[text_column])):
        record, found = index.record_of(images, text)
        problems += [f"row {i}: {p}" for p in found]
        if record is None:
            continue
        if pairs and len(record.images) != 1:
            problems.append(f"row {i}: {len(record.images)} images; a training sample holds one image")
        for item in _image_items(images):
            if isinstance(item, dict) and item.get("bytes"):
                continue
            p = item if isinstance(item, str) else item["path"]
            full = p if os.path.isabs(p) else os.path.join(root, p)
            if not os.path.isfile(full):
                problems.append(f"row {i}: image file {full!r} does not exist")
    if not len(ds):
        problems.append("no rows")
    if problems:
        shown = problems[:SHOW_PROBLEMS] + (
            [f"... and {len(problems) - SHOW_PROBLEMS} more"] if len(problems) > SHOW_PROBLEMS else []
        )
        raise AnnotationError(
            "\n  ".join([f"{path}: {len(problems)} problem(s) among {len(ds)} rows:", *shown])
        )
    return index


_OPENED: dict[tuple, HFIndex] = {}


def load_hf_once(path: str, image_column: str, text_column: str, image_root: str) -> HFIndex:
    """`load_hf`, once per dataset and settings in this process (the config check and the loader share it)."""
    if not os.path.exists(path) and not glob.glob(path):
        raise FileNotFoundError(f"{path}: no such dataset (parquet files or a save_to_disk folder)")
    key = (os.path.abspath(path), image_column, text_column, image_root)
    if key not in _OPENED:
        _OPENED[key] = load_hf(path, image_column, text_column, image_root)
    return _OPENED[key]
