"""Preemption and time limits: on SLURM's early signal, save a checkpoint and requeue the job.

`sbatch --signal=USR1@180` (set in slurm/*.sh) sends SIGUSR1 to every task three minutes before the
job's end. The handler only records it; the training loop asks all ranks at each step boundary
(one small all-reduce), so every rank stops at the same step, saves, and rank 0 requeues the job.
The requeued job starts again and resumes from that checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess

import torch
import torch.distributed as dist


class Preemption:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR1,)):
        self.received: int | None = None
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def requested(self, device: torch.device) -> bool:
        """True on every rank once any rank has received the signal (a collective call)."""
        flag = torch.tensor([1 if self.received is not None else 0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    @staticmethod
    def requeue() -> str:
        """Ask SLURM to requeue this job; returns what happened, for the log."""
        job = os.environ.get("SLURM_JOB_ID")
        if not job:
            return "not under SLURM: no requeue (run again to resume)"
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if proc.returncode != 0:
            return f"scontrol requeue {job} failed: {proc.stderr.strip()} (submit again to resume)"
        return f"job {job} requeued"
