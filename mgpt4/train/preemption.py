"""Preemption and time limits: on SLURM's early signal, save a checkpoint and requeue the job.

`sbatch --signal=USR1@180` (set in slurm/*.sh) sends SIGUSR1 to every task of the job's steps three
minutes before the job's end. Under mpirun only the ranks on the other nodes get it: mpirun and the
first node's ranks run in the batch step, which is not signalled; on one node no rank gets it. The
handler records the signal and says so in the log (which rank on which node); the training loop
asks all ranks at each step boundary (one small all-reduce), so every rank stops at the same step,
saves, and rank 0 requeues the job. The requeued job starts again and resumes from that checkpoint.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess

import torch
import torch.distributed as dist

from mgpt4.logs import get_logger

log = get_logger(__name__)


class Preemption:
    def __init__(self, rank: int = 0, signals: tuple[int, ...] = (signal.SIGUSR1,)):
        self.received: int | None = None
        self.who = f"rank {rank} on node {socket.gethostname()}"
        self.pid = os.getpid()
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        # SLURM signals every process of a task; forked data workers inherit this handler and
        # ignore the signal (without a handler it would end them). The rank's own process acts.
        if os.getpid() != self.pid:
            return
        self.received = signum
        # One os.write, not print: the handler may run in the middle of a print to the same stream.
        note = f"{self.who}: {signal.Signals(signum).name} received, saving at the next step boundary\n"
        os.write(1, note.encode())

    def requested(self, device: torch.device) -> bool:
        """True on every rank once any rank has received the signal (a collective call)."""
        flag = torch.tensor([1 if self.received is not None else 0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    @staticmethod
    def requeue(step: int) -> None:
        """Ask SLURM to requeue this job, saying so in the log first.

        The requeue ends the job's processes at once: a line written after `scontrol requeue` returns
        may never reach the log (seen under mpirun).
        """
        job = os.environ.get("SLURM_JOB_ID")
        if not job:
            log.info(f"preempted at step {step}: not under SLURM, no requeue (run again to resume)")
            return
        log.info(f"preempted at step {step}: requeueing job {job}")
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if proc.returncode != 0:
            log.error(f"scontrol requeue {job} failed: {proc.stderr.strip()} (submit again to resume)")
