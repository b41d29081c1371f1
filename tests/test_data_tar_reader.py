"""Shard specs and the streaming tar reader (grouping, restart at an offset, pipes, damage)."""

from __future__ import annotations

import io
import tarfile

import pytest
from data_fixtures import numbered_shards, sample_files, write_tar

from mgpt4.data.shard_lists import check_url, expand_shards
from mgpt4.data.tar_reader import ShardError, TarReader


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
