"""SLURM's early signal reaches every process of a job step, not only the ranks: the data workers, their
fork server and Python's resource tracker get SIGUSR1 too, and a process without a handler dies of it
(the default action). A rank that then asked a dead worker for its next batch crashed instead of
saving (seen in `tests/test_slurm.py` under load). The rank blocks the signal before it starts any of
them, so they inherit the block; it takes the signal itself at the next step boundary."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mgpt4.train.preemption import Preemption
from tests.launch import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A rank in a process of its own (a fresh fork server): a Preemption, then a loader with two workers.
# Every process below it and the rank itself get SIGUSR1, as slurmstepd sends it; the loader must still
# give its next batches (the stream has no end: a pass is 16) and the rank must see the request.
_RANK = """
import itertools, os, signal, sys, time
sys.path.insert(0, {root!r})
import psutil, torch
from tests.data_fixtures import numbered_shards, tiny_tokenizer
from mgpt4.data import DataConfig, SourceConfig, build_loader
from mgpt4.train.preemption import Preemption

if __name__ == "__main__":  # a worker runs this file again as __mp_main__
    preemption = Preemption(0)
    paths = numbered_shards({folder!r}, 2, 16)
    cfg = DataConfig(sources=[SourceConfig(shards=paths)], batch_size=2, num_workers=2, image_size=16,
                     prefetch=1)
    loader = build_loader(cfg, tiny_tokenizer(), 12, "###")
    it = iter(loader)
    next(it)
    below = psutil.Process().children(recursive=True)
    print("below", len(below), flush=True)
    for p in below:
        os.kill(p.pid, signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(1)  # a dying worker has died by now
    print("batches", 1 + sum(1 for _ in itertools.islice(it, 15)), flush=True)
    print("requested", preemption.requested(torch.device("cpu")), flush=True)
    preemption.close()
    os.kill(os.getpid(), signal.SIGUSR1)  # a late signal, while the rank shuts down
    print("after close", "alive", flush=True)
"""


def test_a_signalled_step_keeps_its_data_workers_and_the_rank_sees_the_request(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(_RANK.format(root=ROOT, folder=str(tmp_path)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert int(lines["below"]) >= 3, proc.stdout  # the fork server and two workers (and the tracker)
    assert lines["batches"] == "16", proc.stdout  # none lost to a dead worker
    assert lines["requested"] == "True", proc.stdout
    assert lines["after"] == "close alive", proc.stdout  # the default action would have ended it


def test_the_request_is_seen_on_the_next_boundary_and_close_gives_the_mask_back():
    before_mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    before_handler = signal.getsignal(signal.SIGUSR1)
    preemption = Preemption(0)
    try:
        assert signal.SIGUSR1 in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # what children inherit
        assert not preemption.requested(torch.device("cpu"))
        os.kill(os.getpid(), signal.SIGUSR1)
        # Another thread of this process may take it and leave the handler to run a moment later.
        deadline = time.monotonic() + 30
        while not preemption.requested(torch.device("cpu")) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert preemption.requested(torch.device("cpu"))
        assert preemption.requested(torch.device("cpu"))  # it stays requested
    finally:
        preemption.close()
        signal.signal(signal.SIGUSR1, before_handler)
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before_mask


# The training launcher, with SLURM's signal sent while the model loads (blocked by then, so it waits).
_SIGNALLED = """
import os, signal, sys
sys.path.insert(0, {root!r})
from mgpt4.train import trainer
from mgpt4.train.cli import main
from mgpt4.train.preemption import Preemption


class SignalledWhileLoading(Preemption):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGUSR1)


trainer.Preemption = SignalledWhileLoading
if __name__ == "__main__":
    main(default_recipe="tiny_stage1", description="")
"""


@pytest.mark.slow
@pytest.mark.parametrize("save_every", [1, 1000])
def test_a_signal_stops_the_run_at_the_first_boundary_save_step_or_not(tmp_path, save_every):
    """With `train.save_every=1` every boundary saves, and the signal was never looked at there: the
    run went on to its last step and the job was never requeued."""
    script = tmp_path / "signalled.py"
    script.write_text(_SIGNALLED.format(root=ROOT))
    out = tmp_path / "run"
    sets = [
        f"train.output_dir={out}",
        "train.steps=5",
        f"train.save_every={save_every}",
        "train.sample_every=0",
        "train.log_every=1",
    ]
    cmd = [sys.executable, str(script), *[a for s in sets for a in ("--set", s)]]
    proc = run(cmd, str(tmp_path / "cache"), timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "SIGUSR1 received, saving at the next step boundary" in proc.stdout, proc.stdout[-4000:]
    assert "preempted at step 1: not under SLURM" in proc.stdout, proc.stdout[-4000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    assert "step 1/5" in proc.stdout and "step 2/5" not in proc.stdout, proc.stdout[-4000:]
