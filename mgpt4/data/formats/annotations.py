"""An annotation file (LLaVA JSON list, or JSONL of LLaVA or ShareGPT entries) indexed once and checked.

A 558K-entry JSON list would take about 1.5 GB as Python objects in every data worker. The index is
instead two int64 arrays, the byte span of each entry in the file (16 bytes an entry, 9.6 MB for 600K),
made by one pass of the decoder over the file in the trainer's process. A worker gets the arrays and
memory-maps the file (pages shared with every other process through the page cache), and parses
the one entry it reads. The same pass checks every entry as it is decoded (the entries are never all
held): all structural problems are raised in one error with the file and the entry (JSON list) or
line (JSONL), before anything trains. For 600K LLaVA-Pretrain-like entries (144 MiB) the pass takes
about 5 s of one core here (`python -m mgpt4.bench.formats`): half of it the decoder, a third the
checks, a fraction of a second the images (one listing per folder).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import mmap
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from mgpt4.data.formats.records import FORMATS, Record, parse_record, record_images

log = logging.getLogger("mgpt4.data")

# How many problems the error shows before it gives the count of the rest.
SHOW_PROBLEMS = 20
_SPACE = re.compile(r"\s*")
_CHUNK = 1 << 22  # bytes counted at a time when character offsets are made byte offsets
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
        """Entry i as a shard sample, `("ok", file, key, files, where)` with files `jpg` (the image's
        bytes, whatever its format), `txt` (the caption) and `json` (the entry), and `where` naming the
        entry and its image file (what a skip line shows when the image does not decode), or a skip
        `(reason, where, detail)`: `bad_json` (the file changed), `image_url`, `no_image` (unreadable)."""
        where = self.where(i)
        try:
            record = self.record(i)
        except ValueError as e:
            return ("bad_json", where, str(e))
        path = self.image_path(record.images[0])
        image = read_image(path, where)
        if isinstance(image, tuple):
            return image
        files = {"jpg": image, "txt": record.caption().encode(), "json": self.raw(i)}
        return ("ok", self.path, str(self.number(i)), files, f"{where} (image {path})")

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None


def _jsonl_entries(
    data: bytes, starts: list[int], ends: list[int], lines: list[int]
) -> Iterator[tuple[int, object | Exception]]:
    """(line, entry or error) of each non-blank line of a JSONL file, its byte span and line number
    appended to `starts`, `ends`, `lines` as it is read."""
    pos, n = 0, len(data)
    line = 0
    while pos < n:
        end = data.find(b"\n", pos)
        end = n if end < 0 else end
        line += 1
        chunk = data[pos:end]
        if chunk.strip():
            starts.append(pos)
            ends.append(end)
            lines.append(line)
            try:
                entry = json.loads(chunk)
            except ValueError as e:
                entry = e
            yield line, entry
        pos = end + 1


def _json_list_entries(
    data: bytes, path: str, starts: list[int], ends: list[int]
) -> Iterator[tuple[int, object]]:
    """(entry number, entry) of each entry of a JSON list as it is decoded, its byte span appended to
    `starts` and `ends` (all of them byte offsets once the iteration ends); AnnotationError with the
    line number when the file is not valid JSON (a broken list cannot be read past its first error).
    Each entry is checked and let go before the next is decoded: the entries are never all held."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path}: not UTF-8 text: {e.reason} at byte {e.start}") from None
    bom = len(data) - len(text.encode("utf-8")) if data.startswith(b"\xef\xbb\xbf") else 0
    decoder = json.JSONDecoder()
    count = 0

    def broken(e: json.JSONDecodeError) -> AnnotationError:
        return AnnotationError(
            f"{path}: broken JSON at line {e.lineno} column {e.colno}: {e.msg} (after {count} good entries)"
        )

    pos = _SPACE.match(text, 0).end()
    if text[pos : pos + 1] != "[":
        raise AnnotationError(
            f"{path}: expected a JSON list of entries ([...]) or JSON lines, one entry a line"
        )
    pos = _SPACE.match(text, pos + 1).end()
    if text[pos : pos + 1] == "]":
        return
    scan = decoder.scan_once  # raw_decode without its Python wrapper: the loop runs once an entry
    while True:
        try:
            entry, end = scan(text, pos)
        except StopIteration as e:
            raise broken(json.JSONDecodeError("Expecting value", text, e.value)) from None
        except json.JSONDecodeError as e:
            raise broken(e) from None
        starts.append(pos)  # character offsets, made byte offsets at the end
        ends.append(end)
        yield count, entry
        count += 1
        if text.startswith(",{", end):  # the common separator, as json.dump writes it
            pos = end + 1
            continue
        pos = _SPACE.match(text, end).end()
        sep = text[pos : pos + 1]
        if sep == "]":
            rest = _SPACE.match(text, pos + 1).end()
            if rest != len(text):
                raise broken(json.JSONDecodeError("extra data after the list", text, rest))
            if not text.isascii():
                bounds = np.empty(2 * len(starts), dtype=np.int64)
                bounds[0::2], bounds[1::2] = starts, ends  # ascending: an entry ends before the next starts
                bounds = _byte_offsets(data, bom, bounds)
                starts[:], ends[:] = bounds[0::2].tolist(), bounds[1::2].tolist()
            elif bom:
                starts[:], ends[:] = [c + bom for c in starts], [c + bom for c in ends]
            return
        if sep != ",":
            raise broken(json.JSONDecodeError("expected ',' or ']' after an entry", text, pos))
        pos = _SPACE.match(text, pos + 1).end()


def _byte_offsets(data: bytes, skip: int, chars: np.ndarray) -> np.ndarray:
    """The byte offsets in `data` of the ascending character offsets `chars` in `data[skip:]` (UTF-8).

    Character c starts c bytes after `skip`, plus one for each continuation byte (10xxxxxx) before it;
    the continuation byte j (0-based) at byte q has q - skip - j characters before it. Counted a few
    MiB at a time, so no array of the file's size is made."""
    b = np.frombuffer(data, np.uint8)
    out = np.empty_like(chars)
    done, extra = 0, 0  # offsets converted; continuation bytes before the chunk
    for lo in range(skip, len(b), _CHUNK):
        hi = min(lo + _CHUNK, len(b))
        cont = np.flatnonzero((b[lo:hi] & 0xC0) == 0x80) + lo
        before = cont - skip - np.arange(extra, extra + len(cont))  # characters before each
        upto = int(np.searchsorted(chars, hi - skip - extra - len(cont)))  # characters that start here
        part = chars[done:upto]
        out[done:upto] = part + skip + extra + np.searchsorted(before, part, side="right")
        done, extra = upto, extra + len(cont)
    out[done:] = chars[done:] + skip + extra  # the offset at the end of the text
    return out


def looks_like_jsonl(data: bytes) -> bool:
    """A JSON list starts with `[`; anything else is read as JSON lines."""
    head = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n")
    return not head.startswith(b"[")


class _ImageCheck:
    """`check(image)`: whether an image path as the file writes it names an existing file (following
    symbolic links) under the image root, or is a URL (not checked here: skipped when read).

    A stat per entry costs seconds for a 558K-entry file (more on a network file system); instead each
    folder the file names is listed once (`os.scandir`), and a name looked up in its listing. A name
    the listing lacks is checked with `os.path.isfile` before it is called missing, so a file system
    that matches names loosely (case, Unicode normalisation) gives the same verdict as a stat."""

    def __init__(self, root: str):
        self.root = root
        self.folders: dict[str, set[str] | None] = {}  # folder as written -> its files (None: unlisted)

    def __call__(self, image: str) -> bool:
        cut = image.rfind("/") + 1
        folder = image[:cut]  # with its last "/": "" (the root itself), "a/b/", "/abs/a/"
        files = self.folders.get(folder)
        if files is None and folder not in self.folders:
            files = self.folders[folder] = self._list(folder)
        if files is not None and image[cut:] in files:
            return True
        if "://" in image and is_url(image):
            return True
        return os.path.isfile(image if os.path.isabs(image) else os.path.join(self.root, image))

    def _list(self, folder: str) -> set[str] | None:
        """The names of the files in one folder of image paths (ending in "/"), or None where a listing
        would not answer as a stat does: a folder that cannot be listed or searched, a URL, a system
        with another path separator."""
        if os.sep != "/" or os.altsep or "://" in folder:
            return None
        where = folder if folder.startswith("/") else os.path.join(self.root, folder)
        try:
            if not os.access(where, os.X_OK):  # names listed, but no file in it can be stat'ed
                return None
            with os.scandir(where) as it:
                return {e.name for e in it if e.is_file()}
        except OSError:
            return None


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
    # The entries are millions of new containers, none in a reference cycle: the cyclic collector
    # would walk them all again and again as they are made (a third of the time), to free nothing.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _build_index(path, fmt, image_root, check_images, pairs)
    finally:
        if collecting:
            gc.enable()


def _build_index(
    path: str, fmt: str, image_root: str | None, check_images: bool, pairs: bool
) -> AnnotationIndex:
    root = image_root if image_root else os.path.dirname(os.path.abspath(path))
    with open(path, "rb") as f:
        data = f.read()
    jsonl = looks_like_jsonl(data)
    starts: list[int] = []
    ends: list[int] = []
    lines: list[int] | None = None
    if jsonl:
        lines = []
        entries = _jsonl_entries(data, starts, ends, lines)
        label = "line"
    else:
        entries = _json_list_entries(data, path, starts, ends)
        label = "entry"
    problems: list[str] = []
    missing = 0
    exists = _ImageCheck(root)
    for number, entry in entries:
        if isinstance(entry, Exception):
            problems.append(f"line {number}: broken JSON: {entry}")
            continue
        images, found = record_images(entry, fmt)
        if found:
            problems += [f"{label} {number}: {p}" for p in found]
        if images is not None and pairs and len(images) != 1:
            problems.append(f"{label} {number}: {len(images)} images; a training sample holds one image")
        if images is None or not check_images:
            continue
        for image in images:
            if exists(image):
                continue
            missing += 1
            if missing <= SHOW_PROBLEMS:
                full = image if os.path.isabs(image) else os.path.join(root, image)
                problems.append(f"{label} {number}: image file {full!r} does not exist")
    if missing > SHOW_PROBLEMS:
        problems.append(f"{missing} image files missing in all (the first {SHOW_PROBLEMS} are named above)")
    del data, entries
    if not starts and not problems:
        problems.append("no entries")
    if problems:
        shown = problems[:SHOW_PROBLEMS]
        if len(problems) > SHOW_PROBLEMS:
            shown.append(f"... and {len(problems) - SHOW_PROBLEMS} more")
        raise AnnotationError(
            "\n  ".join([f"{path}: {len(problems)} problem(s) among {len(starts)} {fmt} entries:", *shown])
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
