"""Rank wiring for every way mgpt4 is started: deepspeed/torchrun, srun, mpirun, or plain python.

DeepSpeed reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT and never SLURM_*. So:
- set by a launcher (deepspeed, torchrun): used as they are;
- under mpirun (Open MPI's OMPI_COMM_WORLD_*, or PMI_* of MPICH-style MPIs): the ranks come from the
  MPI's variables. Inside an sbatch job every mpirun rank also sees SLURM_PROCID=0, so the MPI's
  variables must win over SLURM's. MASTER_ADDR is rank 0's hostname, sent to every rank with
  mpi4py; MASTER_PORT is the job's port under SLURM, else one rank 0 finds free. (DeepSpeed's own
  mpi4py discovery takes the first address of rank 0's `hostname -I`, which on a host with several
  networks may be one the other nodes cannot reach, and always port 29500.);
- one task per GPU under srun: SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS become the torch
  variables, MASTER_ADDR is the job's first node and MASTER_PORT is derived from the job id;
- plain `python launchers/pretrain.py`: a world of one on this host, on a free port unless
  MASTER_PORT is set (so two runs on one machine never collide).

Training and curation both start ranks through `setup`.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass

TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits: global rank, world size, rank on its node, and where rank 0 listens."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0


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


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def job_port(env: MutableMapping[str, str]) -> str | None:
    """A port per SLURM job, so that two jobs sharing a first node do not collide; None outside SLURM."""
    job = env.get("SLURM_JOB_ID")
    return str(20000 + int(job) % 20000) if job else None


def mpi_rank0_endpoint(port: str | None) -> tuple[str, str]:
    """(rank 0's hostname, `port` or a port free on rank 0), on every rank: a collective over MPI_COMM_WORLD."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise SystemExit(f"started by mpirun, mgpt4 needs mpi4py: pip install -e '.[mpi]' ({e})") from e
    comm = MPI.COMM_WORLD
    mine = (socket.gethostname(), port or str(free_port(""))) if comm.Get_rank() == 0 else None
    return comm.bcast(mine, root=0)


def wire(
    env: MutableMapping[str, str],
    rank0_endpoint: Callable[[str | None], tuple[str, str]] = mpi_rank0_endpoint,
) -> str:
    """Fill the torch variables in `env` for the detected launcher; returns its name.

    Under mpirun this is a collective call (rank 0's endpoint is broadcast) unless MASTER_ADDR and
    MASTER_PORT are both set already.
    """
    if all(v in env for v in TORCH_VARS):
        return "launcher"
    if "OMPI_COMM_WORLD_SIZE" in env or "PMI_SIZE" in env:
        if "OMPI_COMM_WORLD_SIZE" in env:
            rank, world = env["OMPI_COMM_WORLD_RANK"], env["OMPI_COMM_WORLD_SIZE"]
            local = env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")
        else:
            rank, world, local = env.get("PMI_RANK", "0"), env["PMI_SIZE"], env.get("MPI_LOCALRANKID", "0")
        env.setdefault("RANK", rank)
        env.setdefault("WORLD_SIZE", world)
        env.setdefault("LOCAL_RANK", local)
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            host, port = rank0_endpoint(env.get("MASTER_PORT") or job_port(env))
            env.setdefault("MASTER_ADDR", host)
            env.setdefault("MASTER_PORT", port)
        return "mpirun"
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and "SLURM_NTASKS" in env:
        env.setdefault("RANK", env["SLURM_PROCID"])
        env.setdefault("WORLD_SIZE", env["SLURM_NTASKS"])
        env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
        env.setdefault(
            "MASTER_ADDR", first_node(env.get("SLURM_JOB_NODELIST", env.get("SLURMD_NODENAME", "127.0.0.1")))
        )
        env.setdefault("MASTER_PORT", job_port(env) or "29500")
        return "srun"
    env.setdefault("RANK", "0")
    env.setdefault("WORLD_SIZE", "1")
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        env["MASTER_PORT"] = str(free_port())
    return "single"


def setup(env: MutableMapping[str, str] | None = None) -> tuple[str, RankInfo]:
    """Wire the torch variables in `env` (default: this process's environment, which DeepSpeed reads)
    for whatever started this process; returns (launcher, ranks). Pass a copy to leave the process's
    environment as it is (a library call must not leave a port behind for later subprocesses).

    Raises SystemExit with the variable named when the launcher's variables are not integers or do
    not fit together.
    """
    env = os.environ if env is None else env
    how = wire(env)
    try:
        info = RankInfo(
            int(env["RANK"]),
            int(env["WORLD_SIZE"]),
            int(env.get("LOCAL_RANK", "0")),
            env["MASTER_ADDR"],
            int(env["MASTER_PORT"]),
        )
    except ValueError as e:
        raise SystemExit(f"RANK / WORLD_SIZE / LOCAL_RANK / MASTER_PORT must be integers: {e}") from None
    if info.world_size < 1 or not 0 <= info.rank < info.world_size:
        raise SystemExit(f"RANK={info.rank} is not within WORLD_SIZE={info.world_size}")
    return how, info
