"""The one process wiring of every mgpt4 job (training, the benchmark, curation's describe and fix, caption
evaluation, feature extraction): which launcher started this process, the process group and its
timeouts, barriers and the few collectives the jobs share, and the rank that logging tags lines with.

A leaf: it imports nothing from mgpt4 (logging asks it for the rank) and never DeepSpeed (only the
training engine does; it hands in DeepSpeed's `init_distributed` and the groups DeepSpeed makes).

Launchers. DeepSpeed and torch read RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT and never
SLURM_*. So:
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

Timeouts. A collective that hangs becomes an error after the timeout of its group. Training starts with
a long one (weights load and data workers start at different speeds on different ranks) and shortens
it once the first step is done (`set_timeout`), so that a dead rank then fails the job fast; the
offline jobs lengthen theirs for the final gather instead. DeepSpeed makes its own group beside the
world group (a clone of it, for ZeRO's collectives) with torch's default timeout, so a timeout set on
the world group alone would never reach the collectives of a step. This module therefore keeps the
list of groups whose timeout it owns: the world group it creates, and each group `adopt` is given (the
engine adopts every group its DeepSpeed engine and optimizer hold, right after `deepspeed.initialize`).
`set_timeout` sets all of them through `torch.distributed.set_timeout`, and checks with the public
`get_pg_count` that no other group exists.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import subprocess
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as tdist

# The console handler and its rank filter sit on the `mgpt4` logger (mgpt4/logs.py, which imports this
# module for the rank, so this one uses `logging` directly).
log = logging.getLogger("mgpt4.dist")
_ALL_RANKS = {"all_ranks": True}  # mgpt4.logs.ALL_RANKS: a line every rank writes

T = TypeVar("T")

TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

# The offline jobs' ranks meet twice: after reading the store (all start together), and when every
# share is done (ranks finish theirs at different times).
STARTUP_TIMEOUT_MIN = 60.0
FINISH_TIMEOUT_MIN = 24 * 60.0


# ---------------------------------------------------------------------------------------------
# Launch detection


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


def job_port(env: Mapping[str, str]) -> str | None:
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


def _launcher(env: Mapping[str, str]) -> tuple[str, dict[str, str]]:
    """The launcher that started this process and the RANK, WORLD_SIZE and LOCAL_RANK it implies (a
    variable already set wins). Reads `env` only: no collective, nothing written."""
    if all(v in env for v in TORCH_VARS):
        # torchrun's agent sets TORCHELASTIC_RUN_ID; the deepspeed launcher, CROSS_RANK (its node's rank).
        name = "launcher"  # another that sets them all
        if "TORCHELASTIC_RUN_ID" in env:
            name = "torchrun"
        elif "CROSS_RANK" in env:
            name = "deepspeed"
        return name, {v: env[v] for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if "OMPI_COMM_WORLD_SIZE" in env:
        name, rank, world = "mpirun", env["OMPI_COMM_WORLD_RANK"], env["OMPI_COMM_WORLD_SIZE"]
        local = env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")
    elif "PMI_SIZE" in env:
        name, rank, world = "mpirun", env.get("PMI_RANK", "0"), env["PMI_SIZE"]
        local = env.get("MPI_LOCALRANKID", "0")
    elif "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and "SLURM_NTASKS" in env:
        # A job step started by srun; the batch script itself (no SLURM_STEP_ID) is a single process.
        name, rank, world = "srun", env["SLURM_PROCID"], env["SLURM_NTASKS"]
        local = env.get("SLURM_LOCALID", "0")
    else:
        name, rank, world, local = "single", "0", "1", "0"
    return name, {v: env.get(v, d) for v, d in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local))}


def wire(
    env: MutableMapping[str, str],
    rank0_endpoint: Callable[[str | None], tuple[str, str]] = mpi_rank0_endpoint,
) -> str:
    """Fill the torch variables in `env` for the detected launcher; returns its name (deepspeed,
    torchrun, launcher (another that sets them all), mpirun, srun or single).

    Under mpirun this is a collective call (rank 0's endpoint is broadcast) unless MASTER_ADDR and
    MASTER_PORT are both set already.
    """
    name, ranks = _launcher(env)
    if name in ("deepspeed", "torchrun", "launcher"):
        return name
    for var, value in ranks.items():
        env.setdefault(var, value)
    if name == "mpirun":
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            host, port = rank0_endpoint(env.get("MASTER_PORT") or job_port(env))
            env.setdefault("MASTER_ADDR", host)
            env.setdefault("MASTER_PORT", port)
    elif name == "srun":
        env.setdefault(
            "MASTER_ADDR", first_node(env.get("SLURM_JOB_NODELIST", env.get("SLURMD_NODENAME", "127.0.0.1")))
        )
        env.setdefault("MASTER_PORT", job_port(env) or "29500")
    else:
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in env:
            env["MASTER_PORT"] = str(free_port())
    return name


def detect(env: MutableMapping[str, str] | None = None) -> tuple[str, RankInfo]:
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


def rank_info() -> RankInfo:
    """This process's ranks, wired as training wires them, with this process's environment left
    unchanged: the rendezvous address travels in the RankInfo (what the offline jobs use)."""
    return detect(dict(os.environ))[1]


def process_rank(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(rank, world size) of this process, what logging tags its lines with: the process group's once
    there is one; before that, the launcher's variables read as `wire` reads them (`env`, default this
    process's environment; no collective, nothing written). (0, 1) where they are not integers (the
    launch itself then stops with the variable named)."""
    if tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    _, ranks = _launcher(os.environ if env is None else env)
    try:
        return int(ranks["RANK"]), int(ranks["WORLD_SIZE"])
    except ValueError:
        return 0, 1


# ---------------------------------------------------------------------------------------------
# The process group and its timeouts

# Every group whose timeout this module owns (the world group first), and the timeout they have now.
_groups: list[tdist.ProcessGroup] = []
_timeout: datetime.timedelta | None = None


@dataclass
class DistInfo:
    """Where a training rank runs: global rank, world size, rank on its node, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _minutes(minutes: float) -> datetime.timedelta:
    return datetime.timedelta(minutes=minutes)


def _joined(timeout: datetime.timedelta) -> None:
    """The world group exists now, created with `timeout`: it is the first group this module owns."""
    global _timeout
    _groups[:] = [tdist.group.WORLD]
    _timeout = timeout


def _owned() -> list[tdist.ProcessGroup]:
    """The groups this module owns, starting with the world group of now: one created by a caller
    (a test, a library user) is owned from its first use here, and groups of an earlier world,
    destroyed without `shutdown`, are dropped."""
    global _timeout
    world = tdist.group.WORLD
    if not _groups or _groups[0] is not world:
        _groups[:] = [world]
        _timeout = None  # the creator's, unknown here
    return _groups


def init(
    startup_timeout_min: float,
    join: Callable[[datetime.timedelta], None] | None = None,
    device_type: str | None = None,
) -> DistInfo:
    """Join the process group of a training job, wired in this process's environment (DeepSpeed reads
    it): the deepspeed launcher or torchrun, srun, mpirun (mpi4py) or a world of one.

    `join(timeout)` creates the world group from the torch variables; the engine passes DeepSpeed's
    `init_distributed`, which also sets up DeepSpeed's own comm layer (default: torch's
    `init_process_group`, backend chosen by torch). Collectives get `startup_timeout_min` until
    `set_timeout` is called. `device_type` is the accelerator's (default: cuda when torch sees a GPU):
    on cuda this rank's GPU (LOCAL_RANK) becomes the current device; on cpu the names of DeepSpeed's
    all-reduce segments are removed once every rank has mapped them (see `cpu_allreduce_buffer`).
    """
    launcher, info = detect()
    timeout = _minutes(startup_timeout_min)
    if join is None:
        tdist.init_process_group(timeout=timeout)
    else:
        join(timeout)
    _joined(timeout)
    rank, world = tdist.get_rank(), tdist.get_world_size()
    # Every rank says who it is and where, once: what a log of many nodes is read against (which
    # process is which rank, on which node, and whether all of them met at the same address).
    log.info(
        f"rank {rank}/{world} local_rank {info.local_rank} node {socket.gethostname()} pid {os.getpid()} "
        f"rendezvous {info.master_addr}:{info.master_port} ({launcher})",
        extra=_ALL_RANKS,
    )
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cpu":
        _unlink_cpu_allreduce_buffer(rank)
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
        device = torch.device("cuda", info.local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(rank, world, info.local_rank, device)


def init_group(info: RankInfo, timeout_min: float = STARTUP_TIMEOUT_MIN) -> bool:
    """Join a gloo group for an offline job when there are several ranks, at `info`'s rendezvous
    address (this process's environment stays as it was); True when this call created it. gloo:
    the barrier and the final gather are all the group does, with or without GPUs. Within a job
    that has its group already (the benchmark's extraction), nothing happens."""
    if info.world_size == 1 or tdist.is_initialized():
        return False
    timeout = _minutes(timeout_min)
    tdist.init_process_group(
        "gloo",
        init_method=f"tcp://{info.master_addr}:{info.master_port}",
        rank=info.rank,
        world_size=info.world_size,
        timeout=timeout,
    )
    _joined(timeout)
    return True


def held_groups(*objects: Any) -> list[tdist.ProcessGroup]:
    """The process groups that `objects` hold as attributes (directly, or in a list, tuple or dict):
    how the engine finds the groups DeepSpeed made for its engine and ZeRO optimizer, without naming
    DeepSpeed's private module state."""
    found: list[tdist.ProcessGroup] = []
    for obj in objects:
        for value in vars(obj).values() if obj is not None else ():
            items: Iterable[Any] = (
                value.values()
                if isinstance(value, dict)
                else value
                if isinstance(value, (list, tuple))
                else (value,)
            )
            found += [g for g in items if isinstance(g, tdist.ProcessGroup)]
    return found


def adopt(*groups: tdist.ProcessGroup | None) -> None:
    """Put groups made outside this module (DeepSpeed's) under its timeout: each gets the current one
    now (the start-up timeout, instead of torch's default) and every later `set_timeout`. Nothing
    without a group."""
    if not tdist.is_initialized():
        return
    owned = _owned()
    for group in groups:
        if group is None or group is tdist.GroupMember.NON_GROUP_MEMBER or any(group is g for g in owned):
            continue
        owned.append(group)
        if _timeout is not None:
            tdist.set_timeout(_timeout, group)


def groups() -> list[tdist.ProcessGroup]:
    """The groups whose timeout this module owns, the world group first (empty without a group)."""
    return list(_owned()) if tdist.is_initialized() else []


def set_timeout(minutes: float) -> None:
    """From now on a collective of this process on any group waits at most `minutes`: the world group
    and every adopted group. Training calls it once its first step is done (the step timeout: a hung
    collective now means a dead rank); nothing without a group.

    A group made by someone who did not hand it to `adopt` keeps its own timeout: that is warned
    about, counted with torch's public `get_pg_count`.
    """
    global _timeout
    if not tdist.is_initialized():
        return
    _timeout = _minutes(minutes)
    owned = _owned()
    for group in owned:
        tdist.set_timeout(_timeout, group)
    others = tdist.get_pg_count() - len(owned)
    if others > 0:
        log.warning(
            f"{others} process group(s) made outside mgpt4.dist keep the timeout they were made with, "
            f"not {minutes} min: hand them to mgpt4.dist.adopt"
        )


def barrier() -> None:
    """Every rank waits here until all have arrived (on the world group); nothing without a group."""
    if tdist.is_initialized():
        tdist.barrier()


def all_mean(value: float, device: torch.device) -> float:
    """The mean of `value` over all ranks (a collective call; `device` is where the backend reduces)."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    tdist.all_reduce(t)
    return float(t.item()) / tdist.get_world_size()


def gather(value: Any) -> list[Any]:
    """Every rank's `value`, on every rank (a list of one without a group). Called when an offline
    job's work is done: ranks finish their shares at different times, so it waits up to
    `FINISH_TIMEOUT_MIN`."""
    if not tdist.is_initialized():
        return [value]
    set_timeout(FINISH_TIMEOUT_MIN)
    out: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, value)
    return out


def shutdown(clean: bool = True) -> None:
    """Leave the process group. After a clean run every rank meets first (without it, 1 training run in
    3 crashed at exit); after a failure it does not: a peer may be dead, and a barrier would hang
    this rank for another full timeout on top of the error that is already on its way out."""
    global _timeout
    if tdist.is_initialized():
        if clean:
            tdist.barrier()
        tdist.destroy_process_group()
    _groups.clear()
    _timeout = None


def close_group(created: bool) -> None:
    """Leave the offline job's group if `init_group` created it (no barrier: see `shutdown`)."""
    if created:
        shutdown(clean=False)


def share(items: Sequence[T], info: RankInfo) -> list[T]:
    """This rank's part of an offline job's pending items: every world_size-th one, so ranks get
    equal shares."""
    return list(items[info.rank :: info.world_size])


def rank_device(device: str, info: RankInfo) -> str:
    """A bare `cuda` means this rank's GPU (LOCAL_RANK) when several ranks run on a node; `auto` is
    that GPU when there is one, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
        return f"cuda:{info.local_rank}"
    return device


# ---------------------------------------------------------------------------------------------
# DeepSpeed's CPU all-reduce segments


def cpu_allreduce_buffer(rank: int, env: Mapping[str, str] = os.environ) -> Path:
    """The /dev/shm segment that DeepSpeed's CPU all-reduce (csrc/cpu/comm/shm.cpp, built when
    every rank is on one node) creates for `rank`: named by uid, MASTER_ADDR and MASTER_PORT."""
    addr, port = env.get("MASTER_ADDR", ""), env.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def _unlink_cpu_allreduce_buffer(rank: int) -> None:
    """Remove this rank's all-reduce segment name once every rank has mapped it.

    DeepSpeed never unlinks these segments (64 MiB a rank), so each CPU run on a new port used to
    leave them in /dev/shm, which is memory: a few hundred runs filled a 24 GiB machine. Each rank
    maps all its peers' segments while joining (DeepSpeed's comm layer, in `join`); after the
    barrier no one opens a name again, and the memory itself lives until the last process that
    maps it exits.
    """
    tdist.barrier()
    cpu_allreduce_buffer(rank).unlink(missing_ok=True)
