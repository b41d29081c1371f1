"""The server benchmark runs end to end at toy size and prints its figures for every setting."""

from __future__ import annotations

import re

from mgpt4.bench import serve as bench


def test_the_benchmark_prints_each_setting_and_the_speedup(capsys):
    bench.main(["--requests", "4", "--concurrency", "1", "4", "--max-tokens", "4", "--device", "cpu"])
    out = capsys.readouterr().out
    rows = re.findall(
        r"^(one at a time|batched)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)$", out, re.M
    )
    assert [(m, int(c)) for m, c, *_ in rows] == [
        ("one at a time", 1),
        ("one at a time", 4),
        ("batched", 1),
        ("batched", 4),
    ]
    # Every reply is --max-tokens long: tokens/s is 4 x requests/s.
    for *_, rps, tps, _, _ in rows:
        assert abs(float(tps) - 4 * float(rps)) <= 0.1 + 0.01 * float(tps)
    assert int(rows[0][5]) == 4  # one at a time: a batch per request
    assert re.search(r"^speedup at 4: [\d.]+$", out, re.M)
