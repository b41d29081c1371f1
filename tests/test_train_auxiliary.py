"""A checkpoint is never lost to an auxiliary output: with sample captions and TensorBoard failing at every
step, the run saves every checkpoint, logs one line per failure and finishes."""

from __future__ import annotations

import math

import pytest

from tests.launch import read_jsonl, run

pytestmark = pytest.mark.slow

# The launcher, with sample writing and TensorBoard's scalars broken the way a full disk breaks them.
BROKEN_LAUNCHER = """
import torch.utils.tensorboard

from mgpt4.train import metrics
from mgpt4.train.cli import main


def broken(*args, **kwargs):
    raise OSError("No space left on device\\n(injected by the test)")


if __name__ == "__main__":  # data workers import this file again (the fork server's __mp_main__)
    metrics.Metrics.write_samples = broken
    torch.utils.tensorboard.SummaryWriter.add_scalar = broken
    main(default_recipe="tiny_stage1")
"""


def test_failing_samples_and_tensorboard_cost_nothing_but_a_line(tmp_path):
    launcher = tmp_path / "broken_pretrain.py"
    launcher.write_text(BROKEN_LAUNCHER)
    out = tmp_path / "run"
    proc = run(
        ["python", str(launcher), "--set", f"train.output_dir={out}", "--set", "train.steps=4",
         "--set", "train.log_every=2", "--set", "train.eval_every=2", "--set", "train.save_every=2",
         "--set", "train.sample_every=2", "--set", "train.keep_last=5"],
        str(tmp_path / "cache"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:]
    for step in (2, 4):
        assert (out / "checkpoints" / f"step_{step:08d}" / "llama_proj.pth").is_file()
        # Saved first: the checkpoint's line comes before the failed samples' line of its step.
        saved = proc.stdout.index(f"saved {out}/checkpoints/step_{step:08d}")
        failed = proc.stdout.index(f"step {step}: sample captions not written, the run goes on: OSError: ")
        assert saved < failed
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    # One line each, the exception's message folded onto it.
    lines = [line for line in proc.stdout.splitlines() if "not written, the run goes on" in line]
    assert len(lines) == 4, lines  # samples and TensorBoard scalars, at steps 2 and 4
    assert all(line.endswith("OSError: No space left on device (injected by the test)") for line in lines)
    assert sum("TensorBoard scalars" in line for line in lines) == 2
    rows = read_jsonl(str(out / "metrics.jsonl"))  # the JSON lines do not depend on TensorBoard
    assert [r["step"] for r in rows] == [2, 4] and all(math.isfinite(r["train/loss"]) for r in rows)
