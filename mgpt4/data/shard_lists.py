"""Shard lists: brace patterns, lists and `@FILE` lists expanded to URLs, checked before any worker starts."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import braceexpand


def expand_shards(spec: str | Sequence[str], where: str = "shards") -> list[str]:
    """Brace patterns, lists and `@FILE` lists of URLs -> a flat list of URLs (order kept)."""
    items = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"{where}: expected a non-empty URL, brace pattern or @FILE, got {item!r}")
        item = item.strip()
        if item.startswith("@"):
            path = item[1:]
            try:
                with open(path, encoding="utf-8") as f:
                    lines = [ln.split("#", 1)[0].strip() for ln in f]
            except OSError as e:
                raise ValueError(f"{where}: cannot read the list of shards {path!r}: {e}") from e
            listed = [ln for ln in lines if ln]
            if not listed:
                raise ValueError(f"{where}: the list of shards {path!r} has no URLs")
            urls.extend(expand_shards(listed, f"{where} ({path})"))
        else:
            urls.extend(braceexpand.braceexpand(item))
    return urls


def check_url(url: str, where: str) -> None:
    """Refuse schemes the reader cannot open before any worker starts."""
    m = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", url)
    if m and m.group(1) not in ("file", "http", "https"):
        raise ValueError(
            f"{where}: cannot open {url!r} directly; wrap it in a command, e.g. 'pipe:aws s3 cp {url} -'"
        )


def local_path(url: str) -> str | None:
    """The file behind a local URL (a plain path or file://), None for pipe: and http(s)."""
    if url.startswith("pipe:") or re.match(r"^https?://", url):
        return None
    return url[len("file://") :] if url.startswith("file://") else url


def check_local_shards(urls: Sequence[str], where: str, name: str) -> None:
    """A source whose local shards are all missing is a wrong path, not bad luck: stop before training."""
    local = [p for p in (local_path(u) for u in urls) if p is not None]
    if local and len(local) == len(urls) and not any(os.path.exists(p) for p in local):
        raise ValueError(
            f"{where}: none of the {len(local)} shard(s) of source {name!r} exist (first: {local[0]!r}); "
            f"check the path or brace pattern, e.g. --set '{where.replace('[', '.').replace(']', '')}=/data/{name}/{{00000..00999}}.tar'"
        )


def check_not_folders(urls: Sequence[str], where: str) -> None:
    """A local shard path that is a folder is a wrong path (the reader needs .tar files): ValueError
    naming the setting and the folder, before anything is loaded or written."""
    for path in (local_path(u) for u in urls):
        if path is not None and os.path.isdir(path):
            raise ValueError(
                f"{where}: {path!r} is a folder; expected .tar shard files, e.g. "
                f"'{path.rstrip('/')}/{{00000..00009}}.tar' or @FILE with one shard per line"
            )


def missing_local_shards(urls: Sequence[str]) -> list[str]:
    """The local shards (plain paths and file://) that do not exist, in list order."""
    return [p for p in (local_path(u) for u in urls) if p is not None and not os.path.exists(p)]


_TAR_NAME = re.compile(r"([^\s/'\"=:]+\.tar)(?![\w.])")


def shard_file_name(url: str) -> str:
    """The file name of a shard, whatever holds it: `/d/00001.tar`, `https://h/00001.tar?x=1` and
    `pipe:aws s3 cp s3://b/00001.tar -` are all `00001.tar`. Raises ValueError when no `*.tar` is named."""
    path = local_path(url)
    if path is not None:
        return os.path.basename(path)
    found = _TAR_NAME.findall(url.split("?", 1)[0] if url.startswith("http") else url)
    if not found:
        raise ValueError(f"cannot tell the shard file name of {url!r}: no '*.tar' in it")
    return found[-1]
