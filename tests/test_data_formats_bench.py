"""The annotation-source benchmark runs and prints its figures (at a tiny size)."""

from __future__ import annotations

import re

from mgpt4.bench import formats


def test_the_benchmark_prints_its_figures(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MGPT4_CACHE", str(tmp_path))
    formats.main(["--entries", "3000", "--workers", "1", "--images", "4", "--batches", "1"])
    out = capsys.readouterr().out
    assert re.search(
        r"index: first run builds and checks it in [\d.]+ s, a later run loads it from the cache", out
    )
    assert re.search(r"workers: 1 started, first batch after [\d.]+ s; .* USS \d+ MiB", out), out
    assert re.search(r"objects: json.load takes -?\d+ MiB resident for 3000 entries", out), out
