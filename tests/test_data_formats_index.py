"""The annotation index built fast (one scan, folder listings, a fast path for good entries, byte offsets
counted in bulk) gives exactly what the straightforward build gives: the same spans, line numbers and
error text, on files made to trip every shortcut."""

from __future__ import annotations

import json
import os
import random
import re

import numpy as np
import pytest

from mgpt4.data.formats import annotations
from mgpt4.data.formats.annotations import AnnotationError, build_index
from mgpt4.data.formats.records import parse_record, record_images

_SPACE = re.compile(r"\s*")


def _reference(path: str, fmt: str, root: str, pairs: bool) -> tuple[list, list, list | None] | str:
    """The build done the plain way: a `raw_decode` per entry with byte offsets from encoding the text
    before it, `parse_record` for every entry, a stat for every image. (starts, ends, lines) or the
    error text."""
    with open(path, "rb") as f:
        data = f.read()
    label = "line" if annotations.looks_like_jsonl(data) else "entry"
    entries, starts, ends, lines = [], [], [], None
    if label == "line":
        lines, pos = [], 0
        for number, raw in enumerate(data.split(b"\n"), 1):
            if raw.strip():
                try:
                    entries.append((number, json.loads(raw)))
                except ValueError as e:
                    entries.append((number, e))
                starts.append(pos)
                ends.append(pos + len(raw))
                lines.append(number)
            pos += len(raw) + 1
    else:
        text = data.decode("utf-8-sig")
        bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0

        def broken(e: json.JSONDecodeError) -> str:
            where = f"line {e.lineno} column {e.colno}: {e.msg}"
            return f"{path}: broken JSON at {where} (after {len(entries)} good entries)"

        pos = _SPACE.match(text, _SPACE.match(text).end() + 1).end()
        while text[pos : pos + 1] != "]" or entries:
            try:
                entry, end = json.JSONDecoder().raw_decode(text, pos)
            except json.JSONDecodeError as e:
                return broken(e)
            starts.append(bom + len(text[:pos].encode()))
            ends.append(bom + len(text[:end].encode()))
            entries.append((len(entries), entry))
            pos = _SPACE.match(text, end).end()
            if text[pos : pos + 1] == "]":
                rest = _SPACE.match(text, pos + 1).end()
                if rest != len(text):
                    return broken(json.JSONDecodeError("extra data after the list", text, rest))
                break
            if text[pos : pos + 1] != ",":
                return broken(json.JSONDecodeError("expected ',' or ']' after an entry", text, pos))
            pos = _SPACE.match(text, pos + 1).end()
    problems, missing = [], 0
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
        for image in record.images if record is not None else ():
            full = image if os.path.isabs(image) else os.path.join(root, image)
            if not annotations.is_url(image) and not os.path.isfile(full):
                missing += 1
                if missing <= 20:
                    problems.append(f"{label} {number}: image file {full!r} does not exist")
    if missing > 20:
        problems.append(f"{missing} image files missing in all (the first 20 are named above)")
    if not entries and not problems:
        problems.append("no entries")
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        return "\n  ".join(
            [f"{path}: {len(problems)} problem(s) among {len(entries)} {fmt} entries:", *shown]
        )
    if lines == list(range(1, len(lines or []) + 1)):
        lines = None
    return starts, ends, lines


def _built(path: str, fmt: str, root: str, pairs: bool) -> tuple[list, list, list | None] | str:
    try:
        index = build_index(path, fmt, root, pairs=pairs)
    except AnnotationError as e:
        return str(e)
    lines = None if index.lines is None else index.lines.tolist()
    assert index.starts.dtype == index.ends.dtype == np.int64
    return index.starts.tolist(), index.ends.tolist(), lines


@pytest.fixture
def image_tree(tmp_path):
    """Images in two folders and the root, a folder named like an image, a symlinked image and a broken
    one; returns (root, relative paths that exist, relative paths that do not)."""
    root = tmp_path / "images"
    for folder in ("a", "b/c", "x.jpg"):
        (root / folder).mkdir(parents=True)
    good = ["a/1.jpg", "a/2.jpg", "b/c/3.jpg", "top.jpg", "a/ünï.jpg"]
    for rel in good:
        (root / rel).write_bytes(b"jpeg")
    os.symlink(root / "a" / "1.jpg", root / "b" / "link.jpg")
    os.symlink(root / "a" / "gone.jpg", root / "b" / "dangling.jpg")
    good += ["b/link.jpg", "a/../a/2.jpg", "./top.jpg", "b//c/3.jpg", str(root / "a" / "1.jpg")]
    bad = ["x.jpg", "b/dangling.jpg", "a/1.jpg/", "a/.", "a/..", "nope/1.jpg", "a/3.jpg", "b/c/4.jpg"]
    bad += ["a/1.JPG", str(root / "a" / "9.jpg"), "/nonexistent/1.jpg", "missing.jpg", "a/ünï2.jpg"]
    return str(root), good, bad


_CAPTIONS = ["a red ball", "ünïcödé 字幕 😀 caption", 'tab\tand "quotes" and \\ slash', "   "]
_URLS = ["http://example.com/a.jpg", "s3://bucket/k/b.jpg", "1a://not-a-url.jpg"]


def _entry(rng: random.Random, fmt: str, good: list[str], bad: list[str]) -> object:
    """A good entry mostly, now and then one of the shapes that take the slow path or fail."""
    image = rng.choice(good) if rng.random() < 0.8 else rng.choice(bad + _URLS)
    caption = rng.choice(_CAPTIONS[:3]) if rng.random() < 0.95 else _CAPTIONS[3]
    if fmt == "llava":
        conv = [
            {"from": "human", "value": "<image>\nDescribe."},
            {"from": rng.choice(["gpt", "GPT"]), "value": caption},
        ]
        entry: dict = {"id": "x", "image": image, "conversations": conv}
    else:
        conv = [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": caption}]
        if rng.random() < 0.3:
            conv.insert(0, {"role": "system", "content": "be brief"})
        entry = {"messages": conv, "images": [image]}
    odd = rng.random()
    if odd < 0.04:
        entry.pop("image" if fmt == "llava" else "images")
        entry["images" if fmt == "llava" else "image"] = [image, rng.choice(good)]  # the other key
    elif odd < 0.07:
        conv.append({"from": "human", "value": "and?"})  # no answer
    elif odd < 0.09:
        conv.reverse()  # roles out of order
    elif odd < 0.11:
        conv[-1]["value" if fmt == "llava" else "content"] = 7
    elif odd < 0.13:
        conv[0]["value" if fmt == "llava" else "content"] = "no tag \ufffd here"
    elif odd < 0.15:
        return rng.choice([3, "text", None, [1]])
    elif odd < 0.17:
        entry["system"] = rng.choice(["sys", 5])
    elif odd < 0.19:
        conv.append({"role": "system", "content": "late"})
    elif odd < 0.21:
        conv[1] = "not an object"
    elif odd < 0.23:
        conv[-2]["value" if fmt == "llava" else "content"] = "<image><image> two tags"
    elif odd < 0.25:
        entry["image" if fmt == "llava" else "images"] = [image, image]  # one tag, two images
    elif odd < 0.27:
        conv[-2]["value" if fmt == "llava" else "content"] = "no tag"
        entry["image" if fmt == "llava" else "images"] = [image, image] if rng.random() < 0.5 else [image]
    return entry


def _write(path: str, entries: list, jsonl: bool, rng: random.Random) -> None:
    """The entries as a JSON list (BOM and odd but accepted whitespace now and then) or JSONL (blank
    lines, a broken line now and then)."""
    parts = [json.dumps(e, ensure_ascii=rng.random() < 0.3) for e in entries]
    if jsonl:
        lines = []
        for p in parts:
            lines += [p] + ([""] if rng.random() < 0.1 else []) + (["{broken"] if rng.random() < 0.02 else [])
        text = "\n".join(lines) + "\n"
    else:
        seps = [
            ",",
            ",\n  ",
            " , ",
            ",\t",
            ",\u2003",
        ]  # \u2003: whitespace to Python, accepted between entries
        text = "[" + "".join(p + rng.choice(seps) for p in parts[:-1]) + "".join(parts[-1:]) + "\n]\n"
        text = ("\ufeff" if rng.random() < 0.5 else "") + text
        if rng.random() < 0.4:  # broken: cut short, or a stray character between or inside entries
            cut = rng.randrange(2, len(text))
            text = text[:cut] if rng.random() < 0.5 else text[:cut] + rng.choice("}]x,") + text[cut:]
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


@pytest.mark.parametrize("jsonl", [False, True])
@pytest.mark.parametrize("fmt", ["llava", "sharegpt"])
def test_the_index_matches_the_plain_build(tmp_path, image_tree, fmt, jsonl):
    root, good, bad = image_tree
    for seed in range(20):
        rng = random.Random(seed)
        count = rng.choice([1, 5, 40, 200])
        entries = [_entry(rng, fmt, good, bad) for _ in range(count)]
        if seed % 3 == 0:  # a clean file: the arrays themselves are compared
            entries = [record for record in entries if _clean(record, fmt, root)]
        path = str(tmp_path / f"{seed}.{'jsonl' if jsonl else 'json'}")
        _write(path, entries, jsonl, rng)
        for pairs in (False, True):
            assert _built(path, fmt, root, pairs) == _reference(path, fmt, root, pairs), (seed, pairs)


def _clean(entry: object, fmt: str, root: str) -> bool:
    images, _ = record_images(entry, fmt)
    return images is not None and all(
        annotations.is_url(i) or os.path.isfile(i if os.path.isabs(i) else os.path.join(root, i))
        for i in images
    )


def test_every_shape_of_entry_gets_the_verdict_of_parse_record(image_tree):
    _, good, bad = image_tree
    rng = random.Random(0)
    for fmt in ("llava", "sharegpt"):
        for _ in range(2000):
            entry = _entry(rng, fmt, good, bad)
            record, problems = parse_record(entry, fmt)
            assert record_images(entry, fmt) == ((None, problems) if record is None else (record.images, []))


def test_non_ascii_offsets_across_chunks(tmp_path, monkeypatch):
    """Byte offsets counted a few bytes at a time (the chunk cut inside characters) still fall on the
    entries, after a BOM."""
    monkeypatch.setattr(annotations, "_CHUNK", 5)
    (tmp_path / "p.jpg").write_bytes(b"jpeg")
    entries = [
        {
            "image": "p.jpg",
            "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": c}],
        }
        for c in ["😀字", "ascii", "ë" * 7, "\u2028 sep"]
    ]
    path = tmp_path / "a.json"
    body = "[" + ",\u00a0 ".join(json.dumps(e, ensure_ascii=False) for e in entries) + "]"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    index = build_index(str(path), "llava")
    raw = path.read_bytes()
    assert [json.loads(raw[s:e]) for s, e in zip(index.starts, index.ends)] == entries
    assert _built(str(path), "llava", str(tmp_path), False) == _reference(
        str(path), "llava", str(tmp_path), False
    )


def test_folders_that_cannot_be_listed_are_checked_file_by_file(tmp_path, image_tree, monkeypatch):
    root, good, bad = image_tree
    entries = [
        {
            "image": image,
            "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "c"}],
        }
        for image in good + bad[:3]
    ]
    path = str(tmp_path / "l.json")
    with open(path, "w") as f:
        json.dump(entries, f)

    def refuse(folder):
        raise PermissionError(13, "Permission denied", folder)

    monkeypatch.setattr(annotations.os, "scandir", refuse)
    assert _built(path, "llava", root, True) == _reference(path, "llava", root, True)
    assert "3 problem(s) among 13 llava entries" in _reference(path, "llava", root, True)


def test_missing_images_are_named_as_before(tmp_path, image_tree):
    """The exact error: problems in entry order, the first 20 missing images named with their full
    paths, the count of all missing ones, and the count of the problems not shown."""
    root = image_tree[0]
    entries = [
        {
            "image": image,
            "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "c"}],
        }
        for image in ["a/1.jpg", "x.jpg", "http://h/u.jpg", "b/link.jpg"]
        + [f"nope/{i}.jpg" for i in range(21)]
    ]
    entries.insert(2, {"image": "a/1.jpg", "conversations": []})
    path = tmp_path / "m.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(AnnotationError) as e:
        build_index(str(path), "llava", root)
    lines = str(e.value).split("\n  ")
    assert lines[0] == f"{path}: 22 problem(s) among 26 llava entries:"
    assert lines[1] == f"entry 1: image file {os.path.join(root, 'x.jpg')!r} does not exist"
    assert lines[2] == "entry 2: 'conversations': expected a non-empty list of messages, got []"
    assert lines[3] == f"entry 5: image file {os.path.join(root, 'nope/0.jpg')!r} does not exist"
    assert lines[20] == f"entry 22: image file {os.path.join(root, 'nope/17.jpg')!r} does not exist"
    assert lines[21:] == ["... and 2 more"]
    assert str(e.value) == _reference(str(path), "llava", root, False)


def test_a_role_that_is_not_a_string_is_a_problem_not_a_crash(tmp_path):
    """A list or object as the role (unhashable) was a TypeError out of the check; it is a problem
    named with its entry, like any other role that is not one of the known ones."""
    (tmp_path / "p.jpg").write_bytes(b"jpeg")
    conv = [{"from": ["human"], "value": "<image>"}, {"from": {"a": 1}, "value": "c"}]
    path = tmp_path / "r.json"
    path.write_text(json.dumps([{"image": "p.jpg", "conversations": conv}]))
    with pytest.raises(AnnotationError) as e:
        build_index(str(path), "llava")
    roles = "['assistant', 'bot', 'gpt', 'human', 'model', 'system', 'user']"
    assert str(e.value).split("\n  ")[1:] == [
        f"entry 0: conversations[0].from: expected one of {roles}, got ['human']",
        f"entry 0: conversations[1].from: expected one of {roles}, got {{'a': 1}}",
    ]


@pytest.mark.parametrize(
    "text, error",
    [
        ('[{"a": 1} x]', "broken JSON at line 1 column 11: expected ',' or ']' after an entry (after 1 good"),
        (
            '[{"a": 1}]\n x',
            "broken JSON at line 2 column 2: extra data after the list (after 1 good entries)",
        ),
        ('[{"a": 1},]', "broken JSON at line 1 column 11: Expecting value (after 1 good entries)"),
        ("[ ]", "1 problem(s) among 0 llava entries:\n  no entries"),
        ("[] junk", "1 problem(s) among 0 llava entries:\n  no entries"),
        ('\ufeff [\u2003{"a": 1}\u00a0,\t{"b": 2}\u00a0]\u2003', "4 problem(s) among 2 llava entries:"),
    ],
)
def test_the_list_around_the_entries(tmp_path, text, error):
    path = tmp_path / "l.json"
    path.write_text(text, encoding="utf-8")
    built = _built(str(path), "llava", str(tmp_path), False)
    assert built == _reference(str(path), "llava", str(tmp_path), False)
    assert error in built
