"""The rehearsal at real shapes (tests/rehearsal.py): stage 1 under ZeRO-3 on 2 CPU ranks with a
checkpoint and sample captions at its last step, stage 2 from its export, one chat reply.

`test_rehearsal_small` runs the same recipe, launchers and official-layout files at toy widths with every
tensor partitioned; `test_rehearsal_full` runs the 7B shapes (~23 GB of RAM, ~16 GB of disk; about 25
minutes on 2 cores with AVX-512, hours with AVX2 only) and is deselected unless asked for:
`python -m pytest -m rehearsal`.
"""

from __future__ import annotations

import math
import os

import pytest

from tests.rehearsal import FULL_TIMEOUT_S, RANKS, STEPS, rehearse

pytestmark = [pytest.mark.slow, pytest.mark.multirank]


def _check_report(report: dict, projection: list[int]) -> None:
    for stage, steps in (("stage1", STEPS), ("stage2", 1)):
        r = report[stage]
        assert len(r["losses"]) == steps and all(math.isfinite(x) for x in r["losses"]), (stage, r)
        assert len(r["step_times_s"]) == steps, (stage, r)
        assert len(r["peak_rss_gb_per_rank"]) == RANKS and min(r["peak_rss_gb_per_rank"]) > 0, (stage, r)
        assert r["projection_shape"] == projection, (stage, r)
        assert os.path.isfile(os.path.join(r["checkpoint"], "llama_proj.pth")), (stage, r)
    assert report["chat"]["reply"], report["chat"]


def test_rehearsal_small(tmp_path):
    report = rehearse("small", str(tmp_path), keep=False, timeout_s=600)
    _check_report(report, [64, 64])
    # The weight files are cleaned up; the runs, their logs and the report stay.
    assert not (tmp_path / "weights").exists() and (tmp_path / "report.json").is_file()


@pytest.mark.rehearsal
def test_rehearsal_full(tmp_path):
    report = rehearse("full", str(tmp_path), keep=False, timeout_s=FULL_TIMEOUT_S)
    _check_report(report, [4096, 768])
    # The LLM is sharded, not whole on each rank: 6.74B parameters over 2 ranks.
    assert max(report["stage1"]["params_per_rank"]["llm"]) < 6.74e9 / RANKS + 1e6
