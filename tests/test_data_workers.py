"""Data workers do not inherit the trainer's memory: they start from a fork server, not by forking the
process that holds the model (a forked worker showed the whole 7B-size process, 8.8 GB, as its own)."""

from __future__ import annotations

import contextlib

import psutil
import torch

from mgpt4.data import DataConfig, SourceConfig, build_loader
from tests.data_fixtures import numbered_shards, tiny_tokenizer

L = 12
MODEL_BYTES = 2**30


def _resident_of_started(cfg: DataConfig) -> dict[int, int]:
    """Resident bytes of every process below this one while a loader runs: its workers (and the fork
    server they come from)."""
    loader = build_loader(cfg, tiny_tokenizer(), L, "\n")
    try:
        batch = next(iter(loader))  # every worker has started once a batch has come back
        assert batch["image"].shape[0] == cfg.batch_size
        resident = {}
        for p in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):  # gone, or an earlier test's zombie
                resident[p.pid] = p.memory_info().rss
        assert len(resident) >= cfg.num_workers, resident
        return resident
    finally:
        loader.close()


def test_a_worker_does_not_hold_the_models_parameters(tmp_path):
    paths = numbered_shards(str(tmp_path), 2, 8)
    cfg = DataConfig(sources=[SourceConfig(shards=paths)], batch_size=2, num_workers=2, image_size=16)
    before = _resident_of_started(cfg)  # what a worker holds of its own: imports, buffers
    # A model's weights, written so every page is resident here before the workers start again.
    weights = torch.nn.Parameter(torch.ones(MODEL_BYTES // 4), requires_grad=False)
    assert psutil.Process().memory_info().rss > MODEL_BYTES
    after = _resident_of_started(cfg)
    # A forked worker counts all of its parent's pages as its own resident memory, the weights included.
    assert all(rss < max(before.values()) + MODEL_BYTES // 2 for rss in after.values()), (before, after)
    assert float(weights[0]) == 1.0  # the weights lived until the workers were measured


# Run in a process of its own: a loader with two workers, its pid and its workers' on stdout, then it
# waits to be killed.
_TRAINER = """
import sys, time
sys.path.insert(0, {root!r})
import psutil
from tests.data_fixtures import numbered_shards, tiny_tokenizer
from mgpt4.data import DataConfig, SourceConfig, build_loader

if __name__ == "__main__":  # a worker runs this file again as __mp_main__
    paths = numbered_shards({folder!r}, 2, 8)
    cfg = DataConfig(sources=[SourceConfig(shards=paths)], batch_size=2, num_workers=2, image_size=16)
    loader = build_loader(cfg, tiny_tokenizer(), 12, "###")
    next(iter(loader))
    below = [p.pid for p in psutil.Process().children(recursive=True)]
    print(" ".join(map(str, below)), flush=True)
    time.sleep(3600)
"""


def test_workers_and_their_fork_server_end_with_a_killed_trainer(tmp_path):
    """A worker is the fork server's child, so DataLoader's check of its parent never sees the trainer
    die: each worker watches the trainer itself (kill -9 left both running forever before)."""
    import os
    import signal
    import subprocess
    import sys

    script = tmp_path / "trainer.py"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script.write_text(_TRAINER.format(root=root, folder=str(tmp_path)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        below = [psutil.Process(int(pid)) for pid in proc.stdout.readline().split()]
        assert len(below) >= 3, below  # the fork server and two workers
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # A guard against a hang, not a bound on the time: every one of them must end.
        _, alive = psutil.wait_procs(below, timeout=120)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
    finally:
        if proc.poll() is None:
            proc.kill()
