"""An annotation file (LLaVA JSON list, or JSONL of LLaVA or ShareGPT entries) indexed once and checked.

A 558K-entry JSON list would take about 1.5 GB as Python objects in every data worker. The index is
instead two int64 arrays, the byte span of each entry in the file (16 bytes an entry, 9.6 MB for 600K),
made by one pass of the decoder over the file in the trainer's process. A worker gets the arrays and
memory-maps the file (pages shared with every other process through the page cache), and parses
the one entry it reads. The same pass checks every entry: all structural problems are raised in one
error with the file and the entry (JSON list) or line (JSONL), before anything trains.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import re
from dataclasses import dataclass

import numpy as np

from mgpt4.data.formats.records import FORMATS, Record, parse_record

log = logging.getLogger("mgpt4.data")

# How many problems the error shows before it gives the count of the rest.
SHOW_PROBLEMS = 20
_SPACE = re.compile(r"\s*")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(path: str) -> bool:
    return bool(_URL.match(path))


def read_image(path: str, where: str) -> bytes | tuple[str, str, str]:
    """The bytes of a local image file, or the skip `(reason, where, detail)`: `image_url` for a URL
    (mgpt4 reads local files), `no_image` for a file that cannot be read."""
    if is_url(path):
        return ("image_url", where, f"{path!r} is a URL; mgpt4 reads local image files")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        return ("no_image", where, f"{path}: {e.strerror or e}")


class AnnotationError(ValueError):
    """An annotation file with structural problems; the message lists them all (file, entry or line)."""


@dataclass(frozen=True)
class FileStamp:
    """What identifies one version of a file: a changed file is indexed again."""

    path: str
    size: int
    mtime_ns: int


def _stamp(path: str) -> FileStamp:
    st = os.stat(path)
    return FileStamp(os.path.abspath(path), st.st_size, st.st_mtime_ns)


class AnnotationIndex:
    """The entries of one annotation file, by number: `record(i)`, `where(i)`, `image_path(p)`.

    Pickles as its path and arrays; the file is memory-mapped again where it is unpickled (a worker).
    """

    def __init__(
        self, path: str, fmt: str, image_root: str, starts: np.ndarray, ends: np.ndarray, jsonl: bool
    ):
        self.path = path
        self.fmt = fmt
        self.image_root = image_root
        self.starts = starts
        self.ends = ends
        self.jsonl = jsonl
        self.lines: np.ndarray | None = None  # JSONL with blank lines: the line of each entry
        self._map: mmap.mmap | None = None

    def __len__(self) -> int:
        return len(self.starts)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_map"] = None
        return state

    def identity(self) -> list[str]:
        """What a saved data position records of this input: the file, its entries and its size."""
        return [self.path, f"{len(self)} entries", f"{os.path.getsize(self.path)} bytes"]

    def where(self, i: int) -> str:
        """`file entry i` (JSON list, 0-based as in the list) or `file line n` (JSONL, 1-based)."""
        return f"{self.path} {'line' if self.jsonl else 'entry'} {self.number(i)}"

    def number(self, i: int) -> int:
        if not self.jsonl:
            return i
        return int(self.lines[i]) if self.lines is not None else i + 1

    def raw(self, i: int) -> bytes:
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._map[int(self.starts[i]) : int(self.ends[i])]

    def record(self, i: int) -> Record:
        """Entry i, parsed and normalised; ValueError when the file changed since it was indexed."""
        try:
            entry = json.loads(self.raw(i))
        except ValueError as e:
            raise ValueError(f"{self.where(i)}: no longer valid JSON (the file changed?): {e}") from None
        record, problems = parse_record(entry, self.fmt)
        if record is None:
            raise ValueError(f"{self.where(i)}: {problems[0]}")
        return record

    def image_path(self, path: str) -> str:
        """An image path as the file writes it, made absolute against the image root (URLs unchanged)."""
        if is_url(path) or os.path.isabs(path):
            return path
        return os.path.join(self.image_root, path)

    def sample(self, i: int) -> tuple:
        """Entry i as a shard sample, `("ok", file, key, files)` with files `jpg` (the image's bytes,
        whatever its format), `txt` (the caption) and `json` (the entry), or a skip `(reason, where,
        detail)`: `bad_json` (the file changed), `image_url`, `no_image` (unreadable)."""
        where = self.where(i)
        try:
            record = self.record(i)
        except ValueError as e:
            return ("bad_json", where, str(e))
        image = read_image(self.image_path(record.images[0]), where)
        if isinstance(image, tuple):
            return image
        files = {"jpg": image, "txt": record.caption().encode(), "json": self.raw(i)}
        return ("ok", self.path, str(self.number(i)), files)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None


def _spans_jsonl(data: bytes) -> tuple[list[int], list[int], list[int], list[tuple[int, object | Exception]]]:
    """(starts, ends, line numbers, [(line, entry or error)]) of the non-blank lines of a JSONL file."""
    starts, ends, lines, entries = [], [], [], []
    pos, n = 0, len(data)
    line = 0
    while pos < n:
        end = data.find(b"\n", pos)
        end = n if end < 0 else end
        line += 1
        chunk = data[pos:end]
        if chunk.strip():
            try:
                entries.append((line, json.loads(chunk)))
            except ValueError as e:
                entries.append((line, e))
            starts.append(pos)
            ends.append(end)
            lines.append(line)
        pos = end + 1
    return starts, ends, lines, entries


def _spans_json_list(data: bytes, path: str) -> tuple[list[int], list[int], list[tuple[int, object]]]:
    """(byte starts, byte ends, [(entry number, entry)]) of a JSON list; AnnotationError with the line
    number when the file is not valid JSON (a broken list cannot be read past its first error)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path}: not UTF-8 text: {e.reason} at byte {e.start}") from None
    bom = len(data) - len(text.encode("utf-8")) if data.startswith(b"\xef\xbb\xbf") else 0
    ascii_only = text.isascii()
    decoder = json.JSONDecoder()
    starts, ends, entries = [], [], []
    # Byte offsets follow character offsets through the non-ASCII text between entries.
    byte_at, char_at = bom, 0

    def to_byte(c: int) -> int:
        nonlocal byte_at, char_at
        if ascii_only:
            return c + bom
        byte_at += len(text[char_at:c].encode("utf-8"))
        char_at = c
        return byte_at

    def broken(e: json.JSONDecodeError) -> AnnotationError:
        return AnnotationError(
            f"{path}: broken JSON at line {e.lineno} column {e.colno}: {e.msg} "
            f"(after {len(entries)} good entries)"
        )

    pos = _SPACE.match(text, 0).end()
    if text[pos : pos + 1] != "[":
        raise AnnotationError(
            f"{path}: expected a JSON list of entries ([...]) or JSON lines, one entry a line"
        )
    pos = _SPACE.match(text, pos + 1).end()
    if text[pos : pos + 1] == "]":
        return starts, ends, entries
    while True:
        try:
            entry, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise broken(e) from None
        starts.append(to_byte(pos))
        ends.append(to_byte(end))
        entries.append((len(entries), entry))
        pos = _SPACE.match(text, end).end()
        sep = text[pos : pos + 1]
        if sep == "]":
            rest = _SPACE.match(text, pos + 1).end()
            if rest != len(text):
                raise broken(json.JSONDecodeError("extra data after the list", text, rest))
            return starts, ends, entries
        if sep != ",":
            raise broken(json.JSONDecodeError("expected ',' or ']' after an entry", text, pos))
        pos = _SPACE.match(text, pos + 1).end()


def looks_like_jsonl(data: bytes) -> bool:
    """A JSON list starts with `[`; anything else is read as JSON lines."""
    head = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n")
    return not head.startswith(b"[")


def build_index(
    path: str, fmt: str, image_root: str | None = None, check_images: bool = True, pairs: bool = False
) -> AnnotationIndex:
    """Index and check `path` (`fmt` one of FORMATS; images relative to `image_root`, default the file's
    folder). Raises FileNotFoundError when the file is missing, AnnotationError listing every problem:
    broken JSON (line), entries without images or conversation, roles out of order, no assistant turn,
    `<image>` tags that differ from the images listed, non-string text, image files that do not exist
    (with `check_images`; URLs are not checked here, they are skipped when read), and with `pairs`
    (a training sample holds one image) entries with more than one image."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown annotation format {fmt!r}; expected one of {FORMATS}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: annotation file does not exist")
    root = image_root if image_root else os.path.dirname(os.path.abspath(path))
    with open(path, "rb") as f:
        data = f.read()
    jsonl = looks_like_jsonl(data)
    lines: list[int] | None = None
    if jsonl:
        starts, ends, lines, entries = _spans_jsonl(data)
        label = "line"
    else:
        starts, ends, entries = _spans_json_list(data, path)
        label = "entry"
    del data
    problems: list[str] = []
    missing = 0
    for number, entry in entries:
        if isinstance(entry, Exception):
            problems.append(f"line {number}: broken JSON: {entry}")
            continue
        record, found = parse_record(entry, fmt)
        problems += [f"{label} {number}: {p}" for p in found]
        if record is not None and pairs and len(record.images) != 1:
            problems.append(
                f"{label} {number}: {len(record.images)} images; a training sample holds one image"
            )
        if record is None or not check_images:
            continue
        for image in record.images:
            if is_url(image):
                continue
            full = image if os.path.isabs(image) else os.path.join(root, image)
            if not os.path.isfile(full):
                missing += 1
                if missing <= SHOW_PROBLEMS:
                    problems.append(f"{label} {number}: image file {full!r} does not exist")
    if missing > SHOW_PROBLEMS:
        problems.append(f"{missing} image files missing in all (the first {SHOW_PROBLEMS} are named above)")
    if not entries and not problems:
        problems.append("no entries")
    if problems:
        shown = problems[:SHOW_PROBLEMS]
        if len(problems) > SHOW_PROBLEMS:
            shown.append(f"... and {len(problems) - SHOW_PROBLEMS} more")
        raise AnnotationError(
            "\n  ".join([f"{path}: {len(problems)} problem(s) among {len(entries)} {fmt} entries:", *shown])
        )
    index = AnnotationIndex(
        path, fmt, root, np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64), jsonl
    )
    if lines is not None and lines != list(range(1, len(lines) + 1)):
        index.lines = np.asarray(lines, dtype=np.int64)  # blank lines: entry i is not line i + 1
    return index


_INDEXES: dict[tuple, AnnotationIndex] = {}
# Bumped when what an index file holds, or what its checks cover, changes.
INDEX_VERSION = 1


def index_cache_path(key: tuple) -> str:
    """Where the checked index of one version of a file is kept: $MGPT4_CACHE/indexes (default
    ~/.cache/mgpt4/indexes), named by the file's path, size and mtime and the settings it was checked under."""
    base = os.environ.get("MGPT4_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mgpt4")
    digest = hashlib.sha1(repr((INDEX_VERSION, *key)).encode()).hexdigest()[:20]
    return os.path.join(base, "indexes", f"{digest}.npz")


def _load_cached(cache: str, path: str, fmt: str, root: str) -> AnnotationIndex | None:
    try:
        with np.load(cache) as z:
            index = AnnotationIndex(path, fmt, root, z["starts"], z["ends"], bool(z["jsonl"]))
            if "lines" in z:
                index.lines = z["lines"]
            return index
    except (OSError, ValueError, KeyError):  # absent, or a damaged cache file: index again
        return None


def _save_cached(cache: str, index: AnnotationIndex) -> None:
    arrays = {"starts": index.starts, "ends": index.ends, "jsonl": np.array(index.jsonl)}
    if index.lines is not None:
        arrays["lines"] = index.lines
    tmp = f"{cache}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, cache)  # atomic: ranks that index the same file at once write the same bytes
    except OSError as e:
        log.warning(
            "could not keep the index of %s in %s (%s); it is built again next run", index.path, cache, e
        )


def load_index(path: str, fmt: str, image_root: str | None = None, pairs: bool = False) -> AnnotationIndex:
    """`build_index`, once per version of the file: in this process (the config check and the loader
    share it), and across runs through an index file in the cache (`index_cache_path`), so a run
    that starts again on an unchanged file neither parses nor checks it again. Image files deleted
    after the check are then found when read (skipped and counted as `no_image`)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: annotation file does not exist")
    stamp = _stamp(path)
    root = image_root if image_root else os.path.dirname(os.path.abspath(path))
    key = (stamp, fmt, os.path.abspath(root), pairs)
    if key not in _INDEXES:
        cache = index_cache_path((stamp.path, stamp.size, stamp.mtime_ns, *key[1:]))
        index = _load_cached(cache, path, fmt, root)
        if index is None:
            index = build_index(path, fmt, image_root, pairs=pairs)
            _save_cached(cache, index)
        _INDEXES[key] = index
    return _INDEXES[key]
