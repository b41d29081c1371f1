"""Rank wiring for every way mgpt4 is started: deepspeed/torchrun, srun, mpirun, or plain python.

DeepSpeed reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT and never SLURM_*; when
they are missing it falls back to mpi4py discovery. So:
- set by a launcher (deepspeed, torchrun): used as they are;
- under Open MPI's mpirun (OMPI_COMM_WORLD_*): ranks from Open MPI's variables, MASTER_ADDR is rank 0's
  hostname (sent to all ranks with mpi4py) and the port is the job's, as under srun. DeepSpeed's own
  mpi4py discovery takes the first address of rank 0's `hostname -I` instead, which on a host with
  several networks may be one the other nodes cannot reach, and always port 29500. Inside an sbatch
  job every mpirun rank also sees SLURM_PROCID=0, so Open MPI's variables must win over SLURM's.
  Other MPIs (PMI_SIZE) are left to DeepSpeed's discovery;
- one task per GPU under srun: SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS become the torch
  variables, MASTER_ADDR is the job's first node and MASTER_PORT is derived from the job id;
- plain `python launchers/pretrain.py`: a world of one on this host.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable, MutableMapping

TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def first_node(nodelist: str) -> str:
    """The first host of a SLURM node list such as `gpu[03-05,07],cpu1` (via scontrol when present)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = nodelist.split(",")[0]
    if "[" not in head:
        return head
    prefix, ranges = head.split("[", 1)
    first = ranges.rstrip("]").split(",")[0].split("-")[0]
    return prefix + first


def mpi_rank0_host() -> str:
    """Rank 0's hostname, on every rank (a collective call over MPI_COMM_WORLD)."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise SystemExit(f"started by mpirun, mgpt4 needs mpi4py: pip install -e '.[mpi]' ({e})") from e
    return MPI.COMM_WORLD.bcast(socket.gethostname(), root=0)


def job_port(env: MutableMapping[str, str]) -> str:
    """A port per SLURM job, so that two jobs sharing a first node do not collide; else torch's 29500."""
    job = env.get("SLURM_JOB_ID")
    return str(20000 + int(job) % 20000) if job else "29500"


def wire(env: MutableMapping[str, str], rank0_host: Callable[[], str] = mpi_rank0_host) -> str:
    """Fill the torch variables in `env` for the detected launcher; returns its name."""
    if all(v in env for v in TORCH_VARS):
        return "launcher"
    if "OMPI_COMM_WORLD_SIZE" in env:
        env.setdefault("RANK", env["OMPI_COMM_WORLD_RANK"])
        env.setdefault("WORLD_SIZE", env["OMPI_COMM_WORLD_SIZE"])
        env.setdefault("LOCAL_RANK", env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0"))
        if "MASTER_ADDR" not in env:
            env["MASTER_ADDR"] = rank0_host()
        env.setdefault("MASTER_PORT", job_port(env))
        return "mpirun"
    if "PMI_SIZE" in env:
        return "mpirun"
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and "SLURM_NTASKS" in env:
        env.setdefault("RANK", env["SLURM_PROCID"])
        env.setdefault("WORLD_SIZE", env["SLURM_NTASKS"])
        env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
        env.setdefault(
            "MASTER_ADDR", first_node(env.get("SLURM_JOB_NODELIST", env.get("SLURMD_NODENAME", "127.0.0.1")))
        )
        env.setdefault("MASTER_PORT", job_port(env))
        return "srun"
    env.setdefault("RANK", "0")
    env.setdefault("WORLD_SIZE", "1")
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29500")
    return "single"
