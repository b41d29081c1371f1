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

import torch

from mgpt4.train.preemption import Preemption

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


def test_the_request_is_seen_on_the_next_boundary_and_close_restores_the_process():
    before_mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    before_handler = signal.getsignal(signal.SIGUSR1)
    preemption = Preemption(0)
    try:
        assert signal.SIGUSR1 in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # what children inherit
        assert not preemption.requested(torch.device("cpu"))
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preemption.requested(torch.device("cpu"))
        assert preemption.requested(torch.device("cpu"))  # it stays requested
    finally:
        preemption.close()
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before_mask
    assert signal.getsignal(signal.SIGUSR1) == before_handler
