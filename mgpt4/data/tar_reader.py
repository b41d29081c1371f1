"""A small streaming tar reader that can restart at a byte offset.

img2dataset shards are plain tars whose members are grouped into samples by key (`00001.jpg`,
`00001.txt`, `00001.json` -> key `00001`). The reader returns raw bytes per sample and knows the byte
offset where the next sample starts, which is what a resumable data position records. Local files
seek to that offset; `pipe:` streams read up to it.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import tempfile

_BLOCK = 512
_KEY_EXT = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$")


class ShardError(Exception):
    """A shard cannot be read; `reason` is the counter it goes to and the message names the shard."""

    def __init__(self, reason: str, url: str, message: str):
        super().__init__(f"shard {url}: {message}")
        self.reason = reason
        self.url = url


class _PipeStream:
    """stdout of a shell command; the exit status and stderr tail are checked at the end."""

    def __init__(self, url: str, command: str):
        self.url = url
        self.command = command
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        self._proc = subprocess.Popen(
            command, shell=True, stdout=subprocess.PIPE, stderr=self._stderr, bufsize=1 << 20
        )
        self._stdout = self._proc.stdout

    def read(self, n: int) -> bytes:
        return self._stdout.read(n)

    def failure(self) -> str | None:
        """After EOF: None if the command succeeded, else a message with its status and stderr."""
        status = self._proc.wait()
        if status == 0:
            return None
        self._stderr.seek(0)
        tail = self._stderr.read()[-500:].decode("utf-8", "replace").strip()
        return f"command exited with status {status}" + (f": {tail}" if tail else "")

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._stdout.close()
        self._proc.wait()
        self._stderr.close()


def _open(url: str):
    if url.startswith("pipe:"):
        return _PipeStream(url, url[5:])
    if url.startswith(("http://", "https://")):
        return _PipeStream(url, f"curl -s -L --fail {subprocess.list2cmdline([url])}")
    path = url[7:] if url.startswith("file://") else url
    return open(path, "rb", buffering=1 << 20)


def _octal(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for sizes above 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_path(data: bytes) -> str | None:
    path = None
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        record = data[space + 1 : pos + length - 1]
        key, _, value = record.partition(b"=")
        if key == b"path":
            path = value.decode("utf-8")
        pos += length
    return path


class TarReader:
    """Samples of one shard as (key, {ext: bytes}); `next_offset` is where the next sample starts."""

    def __init__(self, url: str, offset: int = 0):
        self.url = url
        try:
            self._f = _open(url)
        except OSError as e:
            raise ShardError("shard_open_failed", url, f"cannot open: {e}") from e
        self._pos = 0
        self._pending: tuple[int, str, str, bytes] | None = None
        self._eof = False
        self._end_offset = 0
        self.samples_read = 0
        if offset:
            self._skip_to(offset)
        self.next_offset = offset

    def _skip_to(self, offset: int) -> None:
        if hasattr(self._f, "seek"):
            self._f.seek(offset)
            self._pos = offset
            return
        while self._pos < offset:
            got = self._f.read(min(1 << 20, offset - self._pos))
            if not got:
                raise ShardError(
                    "truncated_shard", self.url, f"ended at byte {self._pos} before resume offset {offset}"
                )
            self._pos += len(got)

    def _read(self, n: int) -> bytes:
        data = self._f.read(n)
        while len(data) < n:
            more = self._f.read(n - len(data))
            if not more:
                break
            data += more
        self._pos += len(data)
        return data

    def _stream_failure(self) -> str | None:
        return self._f.failure() if isinstance(self._f, _PipeStream) else None

    def _truncated(self, what: str) -> ShardError:
        failure = self._stream_failure()
        if failure and self.samples_read == 0 and self._pos == 0:
            return ShardError("shard_open_failed", self.url, failure)
        detail = f"{what} at byte {self._pos}" + (f" ({failure})" if failure else "")
        return ShardError("truncated_shard", self.url, detail)

    def _next_member(self) -> tuple[int, str, str, bytes] | None:
        """(start offset, key, ext, data) of the next regular file, or None at the end of the archive."""
        start = self._pos
        long_name: str | None = None
        while True:
            header = self._read(_BLOCK)
            if not header:
                # Writers end a tar with zero blocks; a stream that just stops was cut short.
                raise self._truncated("archive ends without its end-of-archive blocks")
            if len(header) < _BLOCK:
                raise self._truncated("header cut off")
            if header == b"\0" * _BLOCK:
                self._end_offset = self._pos - _BLOCK  # a restart here sees the end marker again
                return None
            stored = _octal(header[148:156])
            computed = sum(header[:148]) + 256 + sum(header[156:])
            if stored != computed:
                raise ShardError(
                    "corrupt_shard", self.url, f"bad tar header checksum at byte {self._pos - _BLOCK}"
                )
            size = _octal(header[124:136])
            kind = header[156:157]
            padded = (size + _BLOCK - 1) // _BLOCK * _BLOCK
            data = self._read(padded)
            if len(data) < padded:
                raise self._truncated("member cut off")
            data = data[:size]
            if kind in (b"x", b"L"):
                long_name = _pax_path(data) if kind == b"x" else data.split(b"\0", 1)[0].decode("utf-8")
                continue
            if kind not in (b"0", b"\0", b"7"):
                long_name = None
                start = self._pos
                continue
            name = long_name
            if name is None:
                name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
                prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
                if header[257:262] == b"ustar" and prefix:
                    name = prefix + "/" + name
            m = _KEY_EXT.match(name)
            if m is None:
                long_name = None
                start = self._pos
                continue
            return start, m.group(1), m.group(2).lower(), data

    def next_sample(self) -> tuple[str, dict[str, bytes]] | None:
        """The next sample, or None at the end; raises ShardError for damaged or failed shards."""
        if self._eof:
            return None
        member = self._pending if self._pending is not None else self._next_member()
        self._pending = None
        if member is None:
            self._eof = True
            self.next_offset = self._end_offset
            return None
        _, key, ext, data = member
        files = {ext: data}
        while True:
            member = self._next_member()
            if member is None:
                self._eof = True
                self.next_offset = self._end_offset
                break
            if member[1] != key:
                self._pending = member
                self.next_offset = member[0]
                break
            files[member[2]] = member[3]
        self.samples_read += 1
        return key, files

    def close(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            f.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()
