"""Where describe finds images: folders, webdataset shards (.tar) and list files, as items with ids.

An item's id is also its cc_sbu_align file name (`image/{id}.jpg`), so ids are made file-name safe
and must be unique over all inputs. Shards are indexed once (member offsets), so any worker reads
any image with one seek, and an item can be read again later by `filter` from the same record.
"""

from __future__ import annotations

import glob
import os
import re
import tarfile
from dataclasses import asdict, dataclass

import braceexpand

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class SourceError(ValueError):
    """An input given to describe cannot be used; the message names it."""


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
    out = _UNSAFE.sub("_", text).strip("._")
    return out or "_"


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS)


def list_folder(root: str) -> list[ImageItem]:
    items = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            if not _is_image(name):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.splitext(os.path.relpath(path, root))[0]
            items.append(ImageItem(id=safe_id(rel.replace(os.sep, "__")), path=os.path.abspath(path)))
    return items


def list_shard(path: str, problems: list[str]) -> list[ImageItem]:
    """The image of each sample of an uncompressed webdataset tar (first image extension per key).

    A shard damaged part-way gives the images before the damage; the damage goes to `problems`.
    """
    try:
        tar = tarfile.open(path, "r:")  # noqa: SIM115 - closed below
    except (tarfile.TarError, OSError) as e:
        problems.append(f"{path}: not a readable uncompressed tar shard, no image taken from it: {e}")
        return []
    items: dict[str, ImageItem] = {}
    try:
        for m in tar:
            if not m.isfile() or not _is_image(m.name):
                continue
            # webdataset's key: the member path up to the first dot of its base name.
            d, base = os.path.split(m.name)
            key = os.path.join(d, base.split(".", 1)[0])
            if key in items:
                continue
            items[key] = ImageItem(
                id=safe_id(key.replace("/", "__")),
                path=os.path.abspath(path),
                member=m.name,
                offset=m.offset_data,
                size=m.size,
            )
    except (tarfile.TarError, OSError) as e:
        problems.append(f"{path}: damaged shard, read {len(items)} image(s) before the damage: {e}")
    finally:
        tar.close()
    return list(items.values())


def list_file(path: str) -> list[ImageItem]:
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
            img = img if os.path.isabs(img) else os.path.join(base, img)
            item_id = parts[0] if len(parts) == 2 else os.path.splitext(os.path.basename(img))[0]
            # A missing file is not an error here: describe records it as a failed item.
            items.append(ImageItem(id=safe_id(item_id), path=os.path.abspath(img)))
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
    """All items of the given folders, shards (.tar) and list files, sorted by id; ids must be unique.

    Damage that hides items (a shard cut part-way) is appended to `problems`, not raised.
    """
    problems = [] if problems is None else problems
    items: list[ImageItem] = []
    for spec in specs:
        for path in expand(spec):
            if os.path.isdir(path):
                found = list_folder(path)
            elif not os.path.exists(path):
                raise SourceError(f"{path}: no such folder, shard or list file")
            elif path.endswith(".tar"):
                found = list_shard(path, problems)
            elif _is_image(path):
                found = [ImageItem(id=safe_id(os.path.splitext(os.path.basename(path))[0]), path=path)]
            else:
                found = list_file(path)
            items.extend(found)
    by_id: dict[str, ImageItem] = {}
    for it in items:
        if it.id in by_id:
            raise SourceError(
                f"two images get the id {it.id!r}: {by_id[it.id].describe()} and {it.describe()}; "
                "ids become cc_sbu_align file names and must be unique (give a list file with ID<Tab>PATH)"
            )
        by_id[it.id] = it
    return [by_id[k] for k in sorted(by_id)]
