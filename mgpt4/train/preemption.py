"""Preemption and time limits: on SLURM's early signal, save a checkpoint and requeue the job.

`sbatch --signal=USR1@180` (set in slurm/*.sh) sends SIGUSR1 to every task of the job's steps three
minutes before the job's end. Under mpirun only the ranks on the other nodes get it: mpirun and the
first node's ranks run in the batch step, which is not signalled; on one node no rank gets it. The
handler records the signal and says so in the log (which rank on which node); the training loop
asks all ranks at each step boundary (one small all-reduce), so every rank stops at the same step,
saves, and rank 0 requeues the job. The requeued job starts again and resumes from that checkpoint.

SLURM signals every process of the step, not only the ranks: the data workers, their fork server,
Python's resource tracker and torch.compile's workers get SIGUSR1 too, and a process that does not
handle it dies of it (the default action). A rank that then asked a dead worker for a batch crashed
instead of saving. So the rank blocks the signal in its main thread as its first act after the process
group: every thread and process it starts from then on inherits the block (a signal mask survives
fork and exec). The rank itself still gets it: the kernel hands it to one of its older threads (gloo's,
the TCP store's), which do not block it, and Python runs the handler in the main thread; where every
thread blocks it, `requested()` takes it from the pending set (`sigtimedwait`). A signal that arrives
while the model loads waits for the first step boundary instead of ending the rank.
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
    """SIGUSR1 (or `signals`) -> a request that every rank sees at the same step boundary.

    Construct it in the main thread before any data worker or compile worker starts; `close()`
    unblocks the signals and gives back the handlers (a default action becomes "ignore").
    """

    def __init__(self, rank: int = 0, signals: tuple[int, ...] = (signal.SIGUSR1,)):
        self.received: int | None = None
        self.who = f"rank {rank} on node {socket.gethostname()}"
        self.pid = os.getpid()
        self.signals = tuple(signals)
        # The handler runs (in the main thread) when a thread started earlier, which does not block
        # the signal, receives it; everything started from now on blocks it.
        self._handlers = {sig: signal.signal(sig, self._handle) for sig in self.signals}
        # macOS has no sigtimedwait: there the signal stays unblocked, as it was before (a worker may die).
        blocks = hasattr(signal, "sigtimedwait")
        self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, self.signals) if blocks else None

    def _handle(self, signum, frame) -> None:
        # A process forked from this one inherits the handler (and the block): only the rank acts.
        if os.getpid() != self.pid:
            return
        self._record(signum)

    def _record(self, signum: int) -> None:
        self.received = signum
        # One os.write, not print: the handler may run in the middle of a print to the same stream.
        note = f"{self.who}: {signal.Signals(signum).name} received, saving at the next step boundary\n"
        os.write(1, note.encode())

    def _take_pending(self, record: bool = True) -> None:
        """Take the signals that wait, blocked, for this process, and record the first (none: returns
        at once)."""
        while self._mask is not None and (info := signal.sigtimedwait(self.signals, 0)) is not None:
            if record and self.received is None:
                self._record(info.si_signo)

    def requested(self, device: torch.device) -> bool:
        """True on every rank once any rank has received the signal (a collective call)."""
        self._take_pending()
        flag = torch.tensor([1 if self.received is not None else 0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        """Unblock what this object blocked, and give back the handlers the process had, except that a
        default action (ending the process) becomes "ignore": the job's early signal may still come
        while the rank shuts down, after its last checkpoint, and must not end it with a failure."""
        for sig, handler in self._handlers.items():
            signal.signal(sig, signal.SIG_IGN if handler == signal.SIG_DFL else handler)
        self._take_pending(record=False)  # after the last step boundary: nothing will act on it
        if self._mask is not None:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, set(self.signals) - self._mask)

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
