"""Shard specs and the streaming tar reader (grouping, restart at an offset, pipes, damage)."""

from __future__ import annotations

import io
import tarfile

import pytest

from mgpt4.data.shard_lists import check_url, expand_shards
from mgpt4.data.tar_reader import ShardError, TarReader
from tests.data_fixtures import (
    HTTP_ERROR_BODY,
    flipped,
    gzip_bytes,
    member_spans,
    numbered_shards,
    sample_files,
    write_tar,
)


def _all(reader: TarReader) -> list[tuple[str, dict[str, bytes]]]:
    out = []
    while (s := reader.next_sample()) is not None:
        out.append(s)
    return out


def test_expand_brace_list_and_file(tmp_path):
    assert expand_shards("/d/{000..002}.tar") == ["/d/000.tar", "/d/001.tar", "/d/002.tar"]
    assert expand_shards(["/a/{0,1}.tar", "/b/x.tar"]) == ["/a/0.tar", "/a/1.tar", "/b/x.tar"]
    listing = tmp_path / "urls.txt"
    listing.write_text("# LAION part 1\n/l/{00..01}.tar\n\npipe:cat /l/02.tar  # remote\n")
    assert expand_shards(f"@{listing}") == ["/l/00.tar", "/l/01.tar", "pipe:cat /l/02.tar"]


def test_expand_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"data.sources\[0\].shards: cannot read the list of shards"):
        expand_shards(f"@{tmp_path}/nope.txt", "data.sources[0].shards")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="has no URLs"):
        expand_shards(f"@{empty}")
    with pytest.raises(ValueError, match=r"wrap it in a command, e.g. 'pipe:aws s3 cp s3://b/x.tar -'"):
        check_url("s3://b/x.tar", "data.sources[0].shards")


def test_reader_groups_members_by_key(tmp_path):
    files = sample_files("k1", "a caption")
    path = write_tar(
        str(tmp_path / "s.tar"),
        [("k1", files), ("dir/k2", sample_files("k2", "another")), ("k3", {"jpg": b"x"})],
    )
    samples = _all(TarReader(path))
    assert [k for k, _ in samples] == ["k1", "dir/k2", "k3"]
    assert samples[0][1] == files
    assert set(samples[1][1]) == {"jpg", "txt", "json"}
    assert samples[2][1] == {"jpg": b"x"}


def test_reader_restarts_at_next_offset(tmp_path):
    path = numbered_shards(str(tmp_path), 1, 6)[0]
    full = _all(TarReader(path))
    reader = TarReader(path)
    head = [reader.next_sample() for _ in range(2)]
    rest = _all(TarReader(path, reader.next_offset))
    assert head + rest == full
    # The same through a pipe, which cannot seek and reads up to the offset instead.
    rest_pipe = _all(TarReader(f"pipe:cat {path}", reader.next_offset))
    assert rest_pipe == rest
    # Restarting where a fully read shard ended finds the end marker, not a cut-off archive.
    done = TarReader(path)
    _all(done)
    assert TarReader(path, done.next_offset).next_sample() is None


def test_pax_long_names(tmp_path):
    path = str(tmp_path / "pax.tar")
    long_key = "d" * 120 + "/sample"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for ext, data in (("jpg", b"img"), ("txt", b"caption")):
            info = tarfile.TarInfo(f"{long_key}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    reader = TarReader(path)
    assert reader.next_sample() == (long_key, {"jpg": b"img", "txt": b"caption"})
    assert reader.next_sample() is None


def test_missing_shard_is_reported_by_name(tmp_path):
    missing = str(tmp_path / "laion-00042.tar")
    with pytest.raises(ShardError) as e:
        TarReader(missing)
    assert e.value.reason == "shard_open_failed"
    assert "laion-00042.tar" in str(e.value)


def test_failing_pipe_is_reported_with_status_and_stderr():
    reader = TarReader("pipe:echo 'NoSuchBucket: cc-sbu' >&2; exit 3")
    with pytest.raises(ShardError) as e:
        reader.next_sample()
    assert e.value.reason == "shard_open_failed"
    assert "status 3" in str(e.value) and "NoSuchBucket" in str(e.value)


@pytest.mark.parametrize("extra", [600, 0], ids=["mid-member", "at-a-boundary"])
def test_truncated_shard_keeps_the_samples_before_the_cut(tmp_path, extra):
    path = numbered_shards(str(tmp_path), 1, 4)[0]
    reader = TarReader(path)
    keys = [reader.next_sample()[0] for _ in range(2)]
    cut = str(tmp_path / "cut.tar")
    with open(path, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(reader.next_offset + extra))
    reader = TarReader(cut)
    got = []
    with pytest.raises(ShardError) as e:
        while (s := reader.next_sample()) is not None:
            got.append(s[0])
    assert e.value.reason == "truncated_shard" and "cut.tar" in str(e.value)
    assert got == keys[: len(got)] and len(got) >= 1


def test_corrupt_header_is_detected(tmp_path):
    path = numbered_shards(str(tmp_path), 1, 2)[0]
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[10:20] = b"XXXXXXXXXX"  # inside the first header's name: the checksum no longer matches
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    with pytest.raises(ShardError) as e:
        TarReader(str(bad)).next_sample()
    assert e.value.reason == "corrupt_shard"


def test_a_source_whose_shards_all_miss_is_refused_by_name(tmp_path):
    from mgpt4.data.shard_lists import check_local_shards

    with pytest.raises(ValueError, match=r"none of the 2 shard\(s\) of source 'laion' exist"):
        check_local_shards(
            [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")], "data.sources[0].shards", "laion"
        )
    (tmp_path / "a.tar").write_bytes(b"")
    check_local_shards([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")], "data.sources[0].shards", "laion")
    check_local_shards(["pipe:cat /nowhere.tar"], "data.sources[0].shards", "laion")  # not checked locally


def _not_tar_cases(tmp_path) -> dict[str, bytes]:
    shard = numbered_shards(str(tmp_path / "valid"), 1, 3)[0]
    with open(shard, "rb") as f:
        data = f.read()
    second_sample = member_spans(shard)[3][1]  # the header of sample 1's first file
    return {
        "http-error-body": HTTP_ERROR_BODY,
        "html-page": b"<!DOCTYPE html><html><body><h1>503 Service Unavailable</h1></body></html>\n" * 40,
        "short-html": b"<html>404 Not Found</html>\n",
        "gzip-of-an-error-body": gzip_bytes(HTTP_ERROR_BODY),
        "not-gzip-after-the-magic": b"\x1f\x8b" + b"\x00" * 2000,
        "checksum-flipped": flipped(data, 148 + 2, 0x40),  # an octal digit becomes a letter
        "size-flipped": flipped(data, 124 + 9, 0x01),
        "second-sample-header-flipped": flipped(data, second_sample + 130, 0x40),
    }


@pytest.mark.parametrize(
    "case",
    [
        "http-error-body",
        "html-page",
        "short-html",
        "gzip-of-an-error-body",
        "not-gzip-after-the-magic",
        "checksum-flipped",
        "size-flipped",
        "second-sample-header-flipped",
    ],
)
def test_a_file_that_is_not_a_tar_is_a_corrupt_shard(tmp_path, case):
    """Whatever sits under a shard's name, reading it raises ShardError('corrupt_shard') naming the file,
    never a bare ValueError; samples before a damaged header are still delivered."""
    path = tmp_path / f"laion-{case}.tar"
    path.write_bytes(_not_tar_cases(tmp_path)[case])
    reader = TarReader(str(path))
    got = []
    with pytest.raises(ShardError) as e:
        while (s := reader.next_sample()) is not None:
            got.append(s[0])
    assert e.value.reason == "corrupt_shard", e.value
    assert f"laion-{case}.tar" in str(e.value)
    assert got == (["000000000"] if case == "second-sample-header-flipped" else [])
    if case in ("http-error-body", "html-page", "short-html"):
        assert "not a tar archive" in str(e.value) and "<" in str(e.value)  # shows how the file starts


def _rewritten(src: str, dst: str, drop: tuple[str, ...] = ()) -> str:
    """A copy of tar `src` without the members whose extension is in `drop`."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin:
            if m.name.rsplit(".", 1)[1] not in drop:
                tout.addfile(m, tin.extractfile(m))
    return dst


@pytest.mark.parametrize("name", ["laion-00001.tar.gz", "laion-00001.tgz", "gzipped-00001.tar"])
@pytest.mark.parametrize("captions", [True, False], ids=["captions", "no-captions"])
def test_gzip_compressed_shards_are_read_and_resumed(tmp_path, name, captions):
    """img2dataset shards compressed with gzip (as webdataset reads them), whatever their name says,
    with or without caption files; a resume offset counts bytes of the decompressed tar."""
    plain = numbered_shards(str(tmp_path / "plain"), 1, 5)[0]
    if not captions:
        plain = _rewritten(plain, str(tmp_path / "nocap.tar"), drop=("txt", "json"))
    with open(plain, "rb") as f:
        (tmp_path / name).write_bytes(gzip_bytes(f.read()))
    path = str(tmp_path / name)
    expected = _all(TarReader(plain))
    assert len(expected) == 5 and all(("txt" in files) == captions for _, files in expected)
    assert _all(TarReader(path)) == expected
    reader = TarReader(path)
    head = [reader.next_sample() for _ in range(2)]
    assert head + _all(TarReader(path, reader.next_offset)) == expected
    assert _all(TarReader(f"pipe:cat {path}")) == expected
    assert _all(TarReader(f"pipe:cat {path}", reader.next_offset)) == expected[2:]
    done = TarReader(path)
    _all(done)
    assert TarReader(path, done.next_offset).next_sample() is None


def test_a_cut_gzip_shard_keeps_its_complete_samples(tmp_path):
    plain = numbered_shards(str(tmp_path), 1, 6)[0]
    with open(plain, "rb") as f:
        packed = gzip_bytes(f.read())
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(packed[: len(packed) * 2 // 3])
    reader = TarReader(str(cut))
    got = []
    with pytest.raises(ShardError) as e:
        while (s := reader.next_sample()) is not None:
            got.append(s)
    assert e.value.reason == "truncated_shard" and "cut.tar.gz" in str(e.value)
    assert 1 <= len(got) < 6 and got == _all(TarReader(plain))[: len(got)]


def _cuts(path: str) -> list[int]:
    """Offsets to cut a shard at: in every header, at every header and data boundary, inside data and
    inside the padding after it; up to where the end-of-archive blocks start. A file shorter than one
    header block is not a tar at all (see the test above), so cuts start after the first header."""
    cuts = set()
    for _, header, start, end in member_spans(path):
        padded = start + (end - start + 511) // 512 * 512
        cuts.update({header, header + 100, start, (start + end) // 2, end, min(end + 7, padded), padded})
    return sorted(c for c in cuts if c >= 512)


def test_a_cut_shard_delivers_every_sample_whose_files_are_complete(tmp_path):
    path = numbered_shards(str(tmp_path), 1, 4)[0]
    spans = member_spans(path)
    with open(path, "rb") as f:
        data = f.read()
    full = dict(_all(TarReader(path)))
    keys = list(full)
    for cut in _cuts(path):
        shard = tmp_path / "cut.tar"
        shard.write_bytes(data[:cut])
        complete = [k for k in keys if all(end <= cut for key, _, _, end in spans if key == k)]
        for url in (str(shard), f"pipe:cat {shard}"):
            reader = TarReader(url)
            got = []
            with pytest.raises(ShardError) as e:
                while (s := reader.next_sample()) is not None:
                    got.append(s)
            assert e.value.reason == "truncated_shard", (cut, e.value)
            assert [k for k, _ in got][: len(complete)] == complete, (cut, url)
            # Nothing is cut: a sample that comes out has whole files, at most missing a later one.
            assert len(got) <= len(complete) + 1, (cut, url)
            for key, files in got:
                assert files == {ext: full[key][ext] for ext in files}, (cut, key)


def test_the_header_shortcut_reads_what_tarfile_reads():
    """The reader's shortcut for plain-file headers gives tarfile's (name, size, type) or leaves the
    header to tarfile; never a different reading, on valid headers and on damaged ones."""
    import numpy as np

    from mgpt4.data.tar_reader import _common_header

    blocks = []
    names = ["00001.jpg", "d" * 99, "a/" * 60 + "k.txt", "ünïcode/00002.json", "old-dir/"]
    for name in names:
        for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
            for size in (0, 1, 511, 512, 8**11 - 1):
                info = tarfile.TarInfo(name)
                info.size = size
                try:
                    raw = info.tobuf(fmt, "utf-8", "surrogateescape")
                except ValueError:
                    continue  # a name this format cannot hold
                blocks += [raw[i : i + 512] for i in range(0, len(raw), 512)]
    rng = np.random.default_rng(7)
    damaged = [
        flipped(b, int(rng.integers(0, 512)), int(rng.integers(1, 256))) for b in blocks for _ in range(20)
    ]
    agreed = 0
    for block in blocks + damaged:
        got = _common_header(block)
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "replace")
        except tarfile.HeaderError:
            assert got is None, block
            continue
        if got is not None:
            assert got == (info.name, info.size, info.type), block
            agreed += 1
    assert agreed > len(blocks) // 3  # the shortcut did take the common headers


def test_keys_end_at_the_first_dot_of_the_file_name_as_in_webdataset(tmp_path):
    """webdataset's key rule: the key ends at the first dot of the file name (not of the path), the rest
    is the extension; so 'a.b.jpg' is key 'a' with extension 'b.jpg', and dots in folders stay in the key."""
    path = write_tar(
        str(tmp_path / "s.tar"),
        [("a", {"b.jpg": b"1", "b.txt": b"2"}), ("v1.2/c", {"jpg": b"3", "tar.gz": b"4"})],
    )
    samples = _all(TarReader(path))
    assert samples == [("a", {"b.jpg": b"1", "b.txt": b"2"}), ("v1.2/c", {"jpg": b"3", "tar.gz": b"4"})]
