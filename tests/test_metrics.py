"""The metrics component on a resume: the steps a resumed run repeats have one row each."""

from __future__ import annotations

import json

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mgpt4.train.metrics import Metrics


def _run(folder, start: int, steps: range) -> None:
    m = Metrics(str(folder), 0, 1, 30, None, start_step=start)
    for step in steps:
        m.writer.add_scalar("train/loss", float(step), step)
        m.jsonl.write(json.dumps({"step": step, "train/loss": float(step)}) + "\n")
    m.close()


def test_a_run_resumed_from_an_older_checkpoint_keeps_one_row_per_step(tmp_path):
    _run(tmp_path, 0, range(5, 25, 5))  # crashed after step 20; its newest checkpoint was step 10
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 25, "train/lo')  # a line cut short by the crash
    _run(tmp_path, 10, range(15, 35, 5))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [5, 10, 15, 20, 25, 30]
