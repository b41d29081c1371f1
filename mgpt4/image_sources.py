"""Where describe and caption evaluation find images: folders, webdataset shards (.tar) and list files,
as items with ids; and the items' images as the model's eval input (`EvalImages`).

An item's id is also its cc_sbu_align file name (`image/{id}.jpg`), so it is made file-name safe
(letters of any script, digits, `.`, `_`, `-`; Unicode in NFC form) and unique over all inputs:

- an image's id is its name without the extension: `photos/cat.jpg` -> `photos__cat`, `犬.jpg` -> `犬`;
- names that would give the same id (ignoring case, as macOS and Windows file systems do) keep
  their extension: `IMG_0001.jpg` and `IMG_0001.png` -> `IMG_0001_jpg` and `IMG_0001_png`;
- names that collide even then (`a b.jpg` and `a_b.jpg`) get a short hash of their full path.

Ids follow from the names alone, so a re-run gets the same ids. Only true duplicates are an error:
the same file given twice, or one id given to two files in list files (`ID<Tab>PATH`).
Shards are indexed once (member offsets), so any worker reads any image with one seek, and an item
can be read again later by `filter` from the same record.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import tarfile
import unicodedata
from collections import defaultdict
from dataclasses import asdict, dataclass, replace

import braceexpand
import torch
from torch.utils.data import Dataset

from mgpt4 import images

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# \w is Unicode-aware: letters and digits of every script stay, everything else becomes "_".
_UNSAFE = re.compile(r"[^\w.-]+")


class SourceError(ValueError):
    """An image input (given to describe or caption evaluation) cannot be used; the message names it."""


@dataclass(frozen=True)
class ImageItem:
    id: str
    path: str  # the image file, or the shard holding it
    member: str | None = None  # name inside the shard
    offset: int | None = None  # data offset of the member inside the shard
    size: int | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None and k != "id"}

    @classmethod
    def from_record(cls, rec: dict) -> ImageItem:
        src = rec.get("source")
        if not isinstance(src, dict) or not isinstance(src.get("path"), str):
            raise SourceError(f"item {rec.get('id')!r}: record has no 'source.path'")
        return cls(
            id=rec["id"],
            path=src["path"],
            member=src.get("member"),
            offset=src.get("offset"),
            size=src.get("size"),
        )

    def describe(self) -> str:
        return f"{self.path}:{self.member}" if self.member else self.path

    def read_bytes(self) -> bytes:
        if self.member is None:
            with open(self.path, "rb") as f:
                return f.read()
        if self.offset is None or self.size is None:
            raise SourceError(f"{self.describe()}: shard member without offset/size")
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self.describe()}: shard is truncated ({len(data)} of {self.size} bytes)")
        return data


def safe_id(text: str) -> str:
    """`text` as a file-name-safe id (NFC, runs of other characters as "_"); safe_id(safe_id(x)) == safe_id(x)."""
    out = _UNSAFE.sub("_", unicodedata.normalize("NFC", text)).strip("._")
    return out or "_"


@dataclass(frozen=True)
class _Found:
    """An image found in an input, before ids are assigned: its item, its name and how it was named."""

    item: ImageItem
    name: str  # the image's path relative to its input (folder, shard), with its extension
    explicit: bool = False  # the id was given in a list file (ID<Tab>PATH)

    @property
    def stem_id(self) -> str:
        if self.explicit:
            return self.item.id
        d, base = os.path.split(self.name)
        # A shard's key ends at the first dot of its base name (webdataset); a file's at the last.
        stem = base.split(".", 1)[0] if self.item.member else os.path.splitext(base)[0]
        return safe_id(os.path.join(d, stem).replace(os.sep, "__").replace("/", "__"))

    @property
    def ext_id(self) -> str:
        ext = self.name.rsplit(".", 1)[-1] if "." in os.path.basename(self.name) else ""
        return safe_id(f"{self.stem_id}_{ext}") if ext else self.stem_id

    @property
    def hash_id(self) -> str:
        digest = hashlib.sha1(self.item.describe().encode("utf-8", "surrogatepass")).hexdigest()[:8]
        return f"{self.stem_id}-{digest}"


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS)


def list_folder(root: str) -> list[_Found]:
    items = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            if not _is_image(name):
                continue
            path = os.path.join(dirpath, name)
            items.append(_Found(ImageItem(id="", path=os.path.abspath(path)), os.path.relpath(path, root)))
    return items


def list_shard(path: str, problems: list[str]) -> list[_Found]:
    """The image of each sample of an uncompressed webdataset tar (first image extension per key).

    A shard damaged part-way gives the images before the damage; the damage goes to `problems`.
    """
    try:
        tar = tarfile.open(path, "r:")  # noqa: SIM115 - closed below
    except (tarfile.TarError, OSError) as e:
        problems.append(f"{path}: not a readable uncompressed tar shard, no image taken from it: {e}")
        return []
    items: dict[str, _Found] = {}
    try:
        for m in tar:
            if not m.isfile() or not _is_image(m.name):
                continue
            # webdataset's key: the member path up to the first dot of its base name.
            d, base = os.path.split(m.name)
            key = os.path.join(d, base.split(".", 1)[0])
            if key in items:
                continue
            item = ImageItem(
                id="", path=os.path.abspath(path), member=m.name, offset=m.offset_data, size=m.size
            )
            items[key] = _Found(item, m.name)
    except (tarfile.TarError, OSError) as e:
        problems.append(f"{path}: damaged shard, read {len(items)} image(s) before the damage: {e}")
    finally:
        tar.close()
    return list(items.values())


def list_file(path: str) -> list[_Found]:
    """A text file of images, one per line: `PATH` or `ID<Tab>PATH`; relative paths are from the file."""
    base = os.path.dirname(os.path.abspath(path))
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split("\t")
            if len(parts) > 2:
                raise SourceError(f"{path}:{n}: expected PATH or ID<Tab>PATH, got {len(parts)} fields")
            img = parts[-1]
            img = os.path.abspath(img if os.path.isabs(img) else os.path.join(base, img))
            # A missing file is not an error here: describe records it as a failed item.
            if len(parts) == 2:
                items.append(_Found(ImageItem(id=safe_id(parts[0]), path=img), os.path.basename(img), True))
            else:
                items.append(_Found(ImageItem(id="", path=img), os.path.basename(img)))
    return items


def expand(spec: str) -> list[str]:
    """Brace ranges (`shard-{00000..00099}.tar`) and globs; a plain path is returned as is."""
    out = []
    for s in braceexpand.braceexpand(spec):
        if glob.has_magic(s):
            matches = sorted(glob.glob(s))
            if not matches:
                raise SourceError(f"{s}: no file matches")
            out.extend(matches)
        else:
            out.append(s)
    return out


def list_images(specs: list[str], problems: list[str] | None = None) -> list[ImageItem]:
    """All items of the given folders, shards (.tar) and list files, sorted by id; ids are unique
    (see the module docstring). The same file given twice, or one list-file id given to two files,
    raises SourceError.

    Damage that hides items (a shard cut part-way) is appended to `problems`, not raised.
    """
    problems = [] if problems is None else problems
    found: list[_Found] = []
    for spec in specs:
        for path in expand(spec):
            if os.path.isdir(path):
                found.extend(list_folder(path))
            elif not os.path.exists(path):
                raise SourceError(f"{path}: no such folder, shard or list file")
            elif path.endswith(".tar"):
                found.extend(list_shard(path, problems))
            elif _is_image(path):
                found.append(_Found(ImageItem(id="", path=os.path.abspath(path)), os.path.basename(path)))
            else:
                found.extend(list_file(path))
    items = assign_ids(found)
    return sorted(items, key=lambda it: it.id)


def assign_ids(found: list[_Found]) -> list[ImageItem]:
    """Give every found image its id: the stem, then stem + extension, then stem + a path hash."""
    where: dict[str, _Found] = {}
    for f in found:
        src = f.item.describe()
        if src in where:
            raise SourceError(
                f"two images get the id {f.stem_id!r}: {src} is given twice (as {_shown(where[src])} and "
                f"as {_shown(f)}); ids become cc_sbu_align file names, so list each image once"
            )
        where[src] = f
    ids: dict[int, str] = {}
    taken: dict[str, _Found] = {}
    for k, f in enumerate(found):
        if f.explicit:
            key = f.item.id.casefold()
            if key in taken:
                raise SourceError(
                    f"two images get the id {f.item.id!r}: {taken[key].item.describe()} and {f.item.describe()}; "
                    "ids become cc_sbu_align file names and must be unique (give each its own ID in the list file)"
                )
            taken[key] = f
            ids[k] = f.item.id
    # Each level settles the names it makes unique; the rest go on to the next, longer form.
    rest = [k for k, f in enumerate(found) if not f.explicit]
    for level in ("stem_id", "ext_id", "hash_id"):
        groups: dict[str, list[int]] = defaultdict(list)
        for k in rest:
            groups[getattr(found[k], level).casefold()].append(k)
        rest = []
        for key, members in groups.items():
            if len(members) == 1 and key not in taken:
                ids[members[0]] = getattr(found[members[0]], level)
                taken[key] = found[members[0]]
            else:
                rest.extend(members)
    if rest:  # the same path hash twice: only a duplicate source gives that, refused above
        raise SourceError(f"cannot give {found[rest[0]].item.describe()} a unique id")
    return [replace(f.item, id=ids[k]) for k, f in enumerate(found)]


def _shown(f: _Found) -> str:
    return f"id {f.item.id!r}" if f.explicit else repr(f.name)


class EvalImages(Dataset):
    """Items' images as the model's eval input [3, S, S], decoded in DataLoader workers; a bad image
    becomes an error string, never an exception (describe records it, caption evaluation scores it as
    an empty caption). Item i is (i, tensor or None, error or None)."""

    def __init__(self, items: list[ImageItem], size: int):
        self.items = items
        self.size = size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        item = self.items[i]
        try:
            return i, images.eval_transform(images.decode_rgb(item.read_bytes()), self.size), None
        except Exception as e:  # any decoder failure is this item's, not the run's
            return i, None, f"unreadable image {item.describe()}: {type(e).__name__}: {e}"
