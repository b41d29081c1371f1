"""Rank wiring for every way mgpt4 is started: deepspeed/torchrun, srun, mpirun, or plain python.

DeepSpeed reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT and never SLURM_*; when
they are missing it falls back to mpi4py discovery. So:
- set by a launcher (deepspeed, torchrun): used as they are;
- under mpirun (OMPI_COMM_WORLD_* or PMI_*): inside an sbatch job every mpirun rank also sees
  SLURM_PROCID=0, so Open MPI's variables must win over SLURM's; `setup` then asks MPI itself (mpi4py)
  for the ranks and shares rank 0's address and a free port, as DeepSpeed's own discovery does but
  without its fixed port 29500;
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
from collections.abc import MutableMapping
from dataclasses import dataclass

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
    if "MASTER_PORT" not in env:
        env["MASTER_PORT"] = str(free_port())
    return "single"


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits: global rank, world size, rank on its node, and where rank 0 listens."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def host_address() -> str:
    """This host's address as other nodes see it: the first of `hostname -I` (as DeepSpeed's MPI
    discovery takes it), else what the host name resolves to."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return socket.gethostbyname(socket.gethostname())


def fill_from_mpi(env: MutableMapping[str, str]) -> None:
    """The torch variables from MPI (mpirun): ranks from the communicator, and rank 0's address and
    a free port of rank 0 (unless MASTER_ADDR / MASTER_PORT are set), shared by a broadcast."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise SystemExit(
            "started by mpirun, but mpi4py is not installed: pip install -e '.[mpi]' (or mpi4py)"
        ) from None
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    local = env.get("OMPI_COMM_WORLD_LOCAL_RANK") or env.get("MPI_LOCALRANKID")
    if local is None:
        local = str(comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank).Get_rank())
    master = None
    if rank == 0:
        master = (env.get("MASTER_ADDR") or host_address(), env.get("MASTER_PORT") or str(free_port("")))
    addr, port = comm.bcast(master, root=0)
    env.update(
        RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(local), MASTER_ADDR=addr, MASTER_PORT=port
    )


def setup(env: MutableMapping[str, str] | None = None) -> tuple[str, RankInfo]:
    """Wire the torch variables in `env` (default: this process's environment, which DeepSpeed reads)
    for whatever started this process; returns (launcher, ranks). Pass a copy to leave the process's
    environment as it is (a library call must not leave a port behind for later subprocesses).

    Raises SystemExit with the variable named when the launcher's variables are not integers or do
    not fit together.
    """
    env = os.environ if env is None else env
    how = wire(env)
    if how == "mpirun":
        fill_from_mpi(env)
    try:
        info = RankInfo(
            int(env["RANK"]),
            int(env["WORLD_SIZE"]),
            int(env.get("LOCAL_RANK", "0")),
            env["MASTER_ADDR"],
            int(env["MASTER_PORT"]),
        )
    except ValueError as e:
        raise SystemExit(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {e}") from None
    if info.world_size < 1 or not 0 <= info.rank < info.world_size:
        raise SystemExit(f"RANK={info.rank} is not within WORLD_SIZE={info.world_size}")
    return how, info
