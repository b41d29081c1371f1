"""A streaming tar reader that can restart at a byte offset, for plain and gzip-compressed shards.

img2dataset shards are tars whose members are grouped into samples by key (`00001.jpg`, `00001.txt`,
`00001.json` -> key `00001`). The reader returns raw bytes per sample and knows the byte offset where
the next sample starts, which is what a resumable data position records. Local files seek to that
offset; `pipe:` streams read up to it. A gzip-compressed shard (`.tar.gz`, `.tgz`, or any name: the
content decides, as webdataset's `r|*` does) is decompressed as it streams, and its offsets count bytes
of the decompressed tar, so a resume decompresses the shard up to the offset again.

Headers are parsed and validated as the standard library's `tarfile` does (checksum, number fields,
pax and GNU long names); only the common header, a plain file entry with an octal size and a matching
checksum, is read by a shortcut that gives the same result faster.

Damage is a `ShardError` whose `reason` is the counter it goes to: `shard_open_failed` (the file or
command cannot be read), `corrupt_shard` (not a tar, not gzip, or a header that fails the checks) or
`truncated_shard` (the archive stops before its end-of-archive blocks). Every sample whose files all end
before the damage is delivered first; the error comes with the call after it.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import re
import subprocess
import tarfile
import tempfile
import zlib

_BLOCK = tarfile.BLOCKSIZE
_KEY_EXT = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$")
_GZIP_MAGIC = b"\x1f\x8b"
# pax and GNU long-name headers describe the member that follows them.
_EXTENDED = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)
# A pax record or long name is a few hundred bytes; a size above this is a damaged header, not a name.
_MAX_EXTENDED = 1 << 20
# Large reads go in pieces, so a damaged size field never allocates more than the data that is there.
_CHUNK = 16 << 20
_ENCODING, _ERRORS = "utf-8", "replace"


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


class _Rejoined:
    """A stream whose first bytes were read (to look for the gzip magic) and are put back in front."""

    def __init__(self, head: bytes, stream):
        self._head = head
        self._stream = stream

    def read(self, n: int = -1) -> bytes:
        if not self._head:
            return self._stream.read(n)
        if n < 0:
            out, self._head = self._head + self._stream.read(), b""
            return out
        out, self._head = self._head[:n], self._head[n:]
        return out + self._stream.read(n - len(out)) if len(out) < n else out


def _open(url: str):
    if url.startswith("pipe:"):
        return _PipeStream(url, url[5:])
    if url.startswith(("http://", "https://")):
        return _PipeStream(url, f"curl -s -L --fail {subprocess.list2cmdline([url])}")
    path = url[7:] if url.startswith("file://") else url
    return open(path, "rb", buffering=1 << 20)


def _padded(size: int) -> int:
    return (size + _BLOCK - 1) // _BLOCK * _BLOCK


def _common_header(block: bytes) -> tuple[str, int, bytes] | None:
    """(name, size, type) of a plain file entry with an octal size and a matching checksum, exactly as
    `tarfile.TarInfo.frombuf` reads it; None for anything else, which `frombuf` then parses and judges.

    A shortcut because the data loader reads three headers per sample: `frombuf` takes 15 us a header
    (it checks every number field and two checksum variants), this 3 us; on 224 px JPEGs that is 6% of
    a worker's time.
    """
    kind = block[156:157]
    if kind not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        return None
    try:
        stored = int(block[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
        size = int(block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return None
    if stored != sum(block) - sum(block[148:156]) + 256 or size < 0:
        return None
    name = block[:100].split(b"\0", 1)[0].decode(_ENCODING, _ERRORS)
    if kind == tarfile.AREGTYPE and name.endswith("/"):
        return None  # an old-style directory entry
    prefix = block[345:500].split(b"\0", 1)[0]
    if prefix:
        name = prefix.decode(_ENCODING, _ERRORS) + "/" + name
    return name, size, kind


def _described(headers: bytes) -> tuple[str, int, bytes]:
    """(name, size, type) of the member that a run of pax or GNU long-name headers, ending with the
    member's own header, describes; parsed by tarfile. Raises ValueError for a damaged run."""
    try:
        with tarfile.open(fileobj=io.BytesIO(headers + bytes(2 * _BLOCK)), mode="r:") as tar:
            info = tar.next()
    except Exception as e:  # tarfile's parser on untrusted bytes: whatever it raises is damage
        raise ValueError(f"{type(e).__name__}: {e}") from None
    if info is None:
        raise ValueError("extended header without a member after it")
    return info.name, info.size, info.type


class TarReader:
    """Samples of one shard as (key, {ext: bytes}); `next_offset` is where the next sample starts.

    Raises ShardError (see the module docstring) from the constructor (the shard cannot be opened or
    read up to `offset`) and from `next_sample`.
    """

    def __init__(self, url: str, offset: int = 0):
        self.url = url
        try:
            self._raw = _open(url)
        except OSError as e:
            raise ShardError("shard_open_failed", url, f"cannot open: {e}") from e
        self._f = self._raw
        self.compressed = False
        self._pos = 0  # in the tar stream: bytes of the decompressed tar for a gzip shard
        self._pending: tuple[int, str, str, bytes] | None = None
        self._eof = False
        self._end_offset = 0
        self._member_start = 0
        self._inside: str | None = None  # the key of the sample whose file is being read
        self._cut_after: ShardError | None = None  # damage right after a complete member
        self._error: ShardError | None = None  # damage found after a complete sample, raised next
        self.samples_read = 0
        try:
            self._start(offset)
        except BaseException:
            self.close()
            raise
        self.next_offset = offset

    def _start(self, offset: int) -> None:
        try:
            head = self._raw.read(2)
        except OSError as e:
            raise ShardError("shard_open_failed", self.url, f"cannot read: {e}") from e
        if head == _GZIP_MAGIC:
            self.compressed = True
            self._f = gzip.GzipFile(fileobj=_Rejoined(head, self._raw), mode="rb")
        elif isinstance(self._raw, _PipeStream):
            self._f = _Rejoined(head, self._raw)
        else:
            self._raw.seek(offset)
            self._pos = offset
            return
        while self._pos < offset:
            if not self._read(min(1 << 20, offset - self._pos)):
                raise ShardError(
                    "truncated_shard", self.url, f"ended at byte {self._pos} before resume offset {offset}"
                )

    def _read(self, n: int) -> bytes:
        """Up to n bytes (fewer only at the end of the stream); bad compressed data is a ShardError."""
        parts: list[bytes] = []
        got = 0
        try:
            while got < n:
                part = self._f.read(min(n - got, _CHUNK))
                if not part:
                    break
                parts.append(part)
                got += len(part)
        except EOFError as e:  # gzip: the compressed stream stops before its end marker
            self._pos += got
            raise self._truncated(f"compressed data cut off ({e})") from None
        except (zlib.error, gzip.BadGzipFile) as e:
            self._pos += got
            raise ShardError(
                "corrupt_shard", self.url, f"bad gzip data after byte {self._pos} of the tar: {e}"
            ) from None
        except OSError as e:
            raise ShardError("shard_open_failed", self.url, f"read failed at byte {self._pos}: {e}") from None
        self._pos += got
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _stream_failure(self) -> str | None:
        return self._raw.failure() if isinstance(self._raw, _PipeStream) else None

    def _truncated(self, what: str) -> ShardError:
        failure = self._stream_failure()
        if failure and self.samples_read == 0 and self._pos == 0:
            return ShardError("shard_open_failed", self.url, failure)
        detail = f"{what} at byte {self._pos}" + (f" ({failure})" if failure else "")
        return ShardError("truncated_shard", self.url, detail)

    def _not_tar(self, block: bytes, why: str) -> ShardError:
        # What a failed download leaves (an HTML or XML error page) shows in its first bytes.
        packed = "gzip-compressed, " if self.compressed else ""
        return ShardError(
            "corrupt_shard", self.url, f"not a tar archive ({packed}{why}; it starts with {block[:40]!r})"
        )

    def _header(self) -> tuple[str, int, bytes, bytes] | None:
        """(name, size, type, block) of the next header, or None at an end-of-archive block."""
        at = self._pos
        block = self._read(_BLOCK)
        if len(block) < _BLOCK:
            if at == 0 and block:
                raise self._not_tar(block, f"only {len(block)} bytes")
            # Writers end a tar with zero blocks; a stream that just stops was cut short.
            raise self._truncated(
                "archive ends without its end-of-archive blocks" if not block else "header cut off"
            )
        common = _common_header(block)
        if common is not None:
            return (*common, block)
        try:
            info = tarfile.TarInfo.frombuf(block, _ENCODING, _ERRORS)
        except tarfile.EOFHeaderError:
            return None
        except tarfile.HeaderError as e:
            if at == 0:
                raise self._not_tar(block, str(e)) from None
            raise ShardError("corrupt_shard", self.url, f"bad tar header at byte {at}: {e}") from None
        if info.size < 0:
            raise ShardError("corrupt_shard", self.url, f"bad tar header at byte {at}: negative size")
        return info.name, info.size, info.type, block

    def _next_member(self) -> tuple[int, str, str, bytes] | None:
        """(start offset, key, ext, data) of the next sample file, or None at the end of the archive."""
        start = self._member_start = self._pos
        if self._cut_after is not None:
            raise self._cut_after
        extended: list[bytes] = []
        while True:
            at = self._pos
            header = self._header()
            if header is None:
                if extended:
                    raise ShardError(
                        "corrupt_shard", self.url, f"extended header without a member at byte {at}"
                    )
                self._end_offset = at  # a restart here sees the end marker again
                return None
            name, size, kind, block = header
            if kind in _EXTENDED:
                if size > _MAX_EXTENDED:
                    raise ShardError(
                        "corrupt_shard", self.url, f"bad extended header at byte {at}: {size} bytes"
                    )
                data = self._read(_padded(size))
                if len(data) < size:
                    raise self._truncated("extended header cut off")
                extended.append(block + data)
                continue
            if extended:
                try:
                    name, size, kind = _described(b"".join(extended) + block)
                except ValueError as e:
                    raise ShardError(
                        "corrupt_shard", self.url, f"bad extended header before byte {at}: {e}"
                    ) from None
                extended.clear()
            if kind == tarfile.GNUTYPE_SPARSE:
                raise ShardError("corrupt_shard", self.url, f"GNU sparse member {name!r} at byte {at}")
            # As tarfile: links, folders and devices carry no data whatever their size field says.
            if kind not in tarfile.REGULAR_TYPES and kind in tarfile.SUPPORTED_TYPES:
                size = 0
            m = _KEY_EXT.match(name) if kind in tarfile.REGULAR_TYPES else None
            if m is None:
                self._skip(_padded(size), name)
                start = self._pos
                continue
            self._inside = m.group(1)
            data = self._read(size)
            if len(data) < size:
                raise self._truncated(f"member {name} cut off")
            self._inside = None
            padding = _padded(size) - size
            if padding and len(self._read(padding)) < padding:
                # The file is whole; only the padding after it is missing.
                self._cut_after = self._truncated(f"archive ends after member {name}")
            return start, m.group(1), m.group(2).lower(), data

    def _skip(self, n: int, name: str) -> None:
        while n > 0:
            got = len(self._read(min(n, 1 << 20)))
            if got == 0:
                raise self._truncated(f"member {name} cut off")
            n -= got

    def next_sample(self) -> tuple[str, dict[str, bytes]] | None:
        """The next sample, or None at the end; raises ShardError for damaged or failed shards."""
        if self._error is not None:
            error, self._error = self._error, None
            self._eof = True
            raise error
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
            try:
                member = self._next_member()
            except ShardError as e:
                if self._inside == key:
                    raise  # a file of this sample is cut or damaged: the sample goes with the shard
                # Every file of this sample is whole: it is delivered, and the damage reported next.
                self._error = e
                self.next_offset = self._member_start
                break
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
        raw, self._raw = self._raw, None
        for stream in (f, raw):
            if stream is not None and hasattr(stream, "close"):
                stream.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()
