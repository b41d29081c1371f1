"""Rank wiring for every way mgpt4 is started: deepspeed/torchrun, srun, mpirun, or plain python.

DeepSpeed reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT and never SLURM_*; when
they are missing it falls back to mpi4py discovery. So:
- set by a launcher (deepspeed, torchrun): used as they are;
- under mpirun (OMPI_COMM_WORLD_*): left to DeepSpeed's mpi4py discovery. Inside an sbatch job every
  mpirun rank also sees SLURM_PROCID=0, so Open MPI's variables must win over SLURM's;
- one task per GPU under srun: SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS become the torch
  variables, MASTER_ADDR is the job's first node and MASTER_PORT is derived from the job id;
- plain `python launchers/pretrain.py`: a world of one on this host.
"""

from __future__ import annotations

import subprocess
from collections.abc import MutableMapping

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


def wire(env: MutableMapping[str, str]) -> str:
    """Fill the torch variables in `env` for the detected launcher; returns its name."""
    if all(v in env for v in TORCH_VARS):
        return "launcher"
    if "OMPI_COMM_WORLD_SIZE" in env or "PMI_SIZE" in env:
        return "mpirun"
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and "SLURM_NTASKS" in env:
        env.setdefault("RANK", env["SLURM_PROCID"])
        env.setdefault("WORLD_SIZE", env["SLURM_NTASKS"])
        env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
        env.setdefault(
            "MASTER_ADDR", first_node(env.get("SLURM_JOB_NODELIST", env.get("SLURMD_NODENAME", "127.0.0.1")))
        )
        # A port per job, so that two jobs sharing a first node do not collide.
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return "srun"
    env.setdefault("RANK", "0")
    env.setdefault("WORLD_SIZE", "1")
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29500")
    return "single"
