"""The one module that imports DeepSpeed: distributed init, the engine, checkpoints and the export.

Checkpoints hold only the trainable set (the projection) with its optimizer and schedule, plus
per-rank trainer state (data position, RNG); never the frozen weights. A checkpoint is complete once
every rank has written its marker, which each writes last; `latest` is replaced atomically after
that, so a crash during a save leaves the previous checkpoint loadable. Rank 0 also writes the run's
state in a form any number of ranks can load (full fp32 weights and Adam moments of the trainable set,
schedule, counters), which a resume on another number of ranks starts from.

Frozen parts keep the dtypes the model was built with (`model.precision.*`): the engine's mixed
precision applies to the trainable set only, and the model casts where the parts meet.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pickle
import shutil
import socket
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)

from mgpt4 import logs
from mgpt4.config import DTYPES, Config
from mgpt4.model import MiniGPT4
from mgpt4.model.export import save_projection
from mgpt4.strict_config import to_dict
from mgpt4.train import launch_env
from mgpt4.train.checkpoints import (
    CONFIG_FILE,
    LATEST_FILE,
    PROJ_FILE,
    RANK_STATE,
    RUN_STATE,
    ResumeError,
    checkpoint_root,
    rotate,
    step_dir_name,
    write_atomic,
    write_done,
)
from mgpt4.train.ds_config import zero_stage
from mgpt4.train.optim import build_optimizer

log = logs.get_logger(__name__)


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_distributed(startup_timeout_min: float) -> DistInfo:
    """Join the process group: deepspeed/torchrun variables, srun's, mpirun (mpi4py) or a world of one.

    Collectives get `startup_timeout_min` while weights load and workers start (minutes on a big
    model); `set_step_timeout` shortens it once training runs, so a dead rank fails the job fast.
    """
    launcher, _ = launch_env.setup(os.environ)
    deepspeed.init_distributed(timeout=datetime.timedelta(minutes=startup_timeout_min))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    logs.set_rank(dist.get_rank(), dist.get_world_size())
    # Every rank says who it is and where, once: what a log of many nodes is read against (which
    # process is which rank, on which node, and whether all of them met at the same address).
    log.info(
        f"rank {dist.get_rank()}/{dist.get_world_size()} local_rank {local_rank} node {socket.gethostname()} "
        f"pid {os.getpid()} rendezvous {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} ({launcher})",
        extra=logs.ALL_RANKS,
    )
    acc = get_accelerator()
    if acc.device_name() == "cpu":
        _unlink_cpu_allreduce_buffers(dist.get_rank())
    if acc.device_name() == "cuda":
        acc.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def cpu_allreduce_buffer(rank: int, env: Mapping[str, str] = os.environ) -> Path:
    """The /dev/shm segment that DeepSpeed's CPU all-reduce (csrc/cpu/comm/shm.cpp, built when
    every rank is on one node) creates for `rank`: named by uid, MASTER_ADDR and MASTER_PORT."""
    addr, port = env.get("MASTER_ADDR", ""), env.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def _unlink_cpu_allreduce_buffers(rank: int) -> None:
    """Remove this rank's all-reduce segment name once every rank has mapped it.

    DeepSpeed never unlinks these segments (64 MiB a rank), so each CPU run on a new port used to
    leave them in /dev/shm, which is memory: a few hundred runs filled a 24 GiB machine. Each rank
    maps all its peers' segments inside `init_distributed`; after the barrier no one opens a name
    again, and the memory itself lives until the last process that maps it exits.
    """
    dist.barrier()
    cpu_allreduce_buffer(rank).unlink(missing_ok=True)


def set_step_timeout(minutes: float) -> None:
    """The timeout of every collective from now on, in every process group this rank belongs to
    (DeepSpeed makes its own groups beside the default one)."""
    timeout = datetime.timedelta(minutes=minutes)
    groups = list(getattr(dist.distributed_c10d._world, "pg_map", {})) or [None]
    for group in groups:
        dist.set_timeout(timeout, group)


def shutdown(clean: bool = True) -> None:
    """Leave the process group. After a clean run every rank meets first (without it, 1 run in 3
    crashed at exit); after a failure it does not: a peer may be dead, and a barrier would hang
    this rank for another full timeout on top of the error that is already on its way out."""
    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_mean(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


# ---------------------------------------------------------------------------------------------
# Model under ZeRO


class ZeroSetup:
    """What the model build needs from DeepSpeed: under ZeRO-3 the LLM is created partitioned.

    Keeps the `HfDeepSpeedConfig` alive for as long as the engine lives: transformers checks it to
    load the LLM shard by shard (`from_pretrained` under zero.Init), so no rank ever holds the whole
    LLM; a random LLM (benchmarks) is created partitioned by `from_config` for the same reason.
    """

    def __init__(self, cfg: Config, ds_config: dict[str, Any]):
        self.zero3 = zero_stage(ds_config) == 3
        self.dtype = DTYPES[cfg.train.precision]
        self.hf_ds_config = None
        if self.zero3:
            from transformers.integrations import HfDeepSpeedConfig

            self.hf_ds_config = HfDeepSpeedConfig(ds_config)

    def cast_for_engine(self, model: MiniGPT4) -> None:
        """With a pre-partitioned LLM the engine skips its own dtype cast, so the trainable set is cast
        here; the frozen parts keep their `model.precision` dtypes, as under ZeRO-2."""
        if self.zero3 and self.dtype != torch.float32:
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.to(self.dtype)


def create_engine(model: MiniGPT4, cfg: Config, ds_config: dict[str, Any]):
    """deepspeed.initialize with AdamW over the trainable set and the official schedule.

    Under bf16/fp16 the engine casts every parameter it finds to its dtype; the frozen ones get their
    own dtype back (`model.precision.*`, e.g. an fp32 vision path), from the values kept before the cast.
    """
    optimizer, scheduler = build_optimizer(model, cfg.optim, cfg.train.steps)
    dtype = DTYPES[cfg.train.precision]
    frozen = {p: p.data for p in model.parameters() if not p.requires_grad and p.dtype != dtype}
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    for p, data in frozen.items():
        if p.dtype != data.dtype and not hasattr(p, "ds_id"):
            p.data = data.to(p.device)
    return engine, optimizer, scheduler


def optimizer_state_numel(optimizer) -> int:
    """Elements of Adam state (exp_avg) this rank holds."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return sum(s["exp_avg"].numel() for s in inner.state.values() if "exp_avg" in s)


def local_param_numel(module: torch.nn.Module) -> int:
    """Parameter elements this rank stores for `module` (its shard under ZeRO-3)."""
    return stored_numel(module.parameters())


def stored_numel(params: Iterable[torch.nn.Parameter]) -> int:
    """Elements this rank stores of `params`: a ZeRO-3-partitioned one counts its shard."""
    total = 0
    for p in params:
        ds_tensor = getattr(p, "ds_tensor", None)
        total += ds_tensor.numel() if ds_tensor is not None else p.numel()
    return total


def full_param_numel(module: torch.nn.Module) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


def memory_report(engine, optimizer, model: MiniGPT4) -> dict[str, Any]:
    """Where the parameters and optimizer state live, per rank (a collective call)."""
    parts = {name: stored_numel(part.parameters()) for name, part in model.named_children()}
    own = model.named_parameters(recurse=False)  # query_tokens
    parts.update({name: stored_numel([p]) for name, p in own})
    local = [optimizer_state_numel(optimizer), local_param_numel(model.llm), parts]
    gathered: list[list[Any]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, local)
    return {
        "zero_stage": engine.zero_optimization_stage(),
        "world_size": dist.get_world_size(),
        "trainable_params": sum(
            getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad
        ),
        "llm_params": full_param_numel(model.llm),
        "optimizer_state_numel_per_rank": [g[0] for g in gathered],
        "llm_params_per_rank": [g[1] for g in gathered],
        # Elements each rank holds of each part as its ZeRO-3 shard (as llm_params_per_rank): every
        # parameter is split, the frozen ViT and Q-Former included; one at or below
        # stage3_param_persistence_threshold is also kept whole once it has been used.
        "params_per_rank": {name: [g[2][name] for g in gathered] for name in parts},
        # The dtype each part's parameters are stored in, after the engine's cast.
        "dtypes": {
            name: str(next(part.parameters()).dtype).removeprefix("torch.")
            for name, part in model.named_children()
            if next(part.parameters(), None) is not None
        },
    }


# ---------------------------------------------------------------------------------------------
# Checkpoints


def projection_state(model: MiniGPT4) -> dict[str, torch.Tensor]:
    """The projection's full fp32 (master) weights, gathered on every rank; a collective call."""
    return {
        f"llama_proj.{n}": safe_get_full_fp32_param(p).detach().cpu()
        for n, p in model.llama_proj.named_parameters()
    }


ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def trainable_state(optimizer, model: MiniGPT4) -> dict[str, Any]:
    """The trainable set as any number of ranks can load it: full fp32 weights and Adam moments by
    parameter name, and Adam's step count; gathered on every rank (a collective call)."""
    _link_adam_state(optimizer)
    params: dict[str, torch.Tensor] = {}
    moments: dict[str, dict[str, torch.Tensor]] = {key: {} for key in ADAM_KEYS}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        params[name] = safe_get_full_fp32_param(p).detach().float().cpu()
        for key in ADAM_KEYS:
            moments[key][name] = safe_get_full_optimizer_state(p, key).detach().float().cpu()
    inner = getattr(optimizer, "optimizer", optimizer)
    steps = {int(s["step"]) for s in inner.state.values() if "step" in s}
    return {"params": params, **moments, "adam_step": max(steps, default=0)}


def _link_adam_state(optimizer) -> None:
    """ZeRO-1/2 link each parameter to its slice of Adam's state once, after the first step of the
    first param group, when the other groups (the projection's bias) have no state yet; DeepSpeed's
    full-tensor getters and setters then fail for them. Linking again once all state exists fixes that."""
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def save_checkpoint(
    engine,
    model: MiniGPT4,
    cfg: Config,
    step: int,
    client_state: dict[str, Any],
    rank_state: dict[str, Any],
    run_state: dict[str, Any],
) -> str:
    """Write checkpoint `step_N` on every rank; `latest` moves to it only when all of it is on disk.

    `rank_state` is this rank's (data position, RNG); `run_state` (rank 0's) is completed with the
    trainable set, the schedule and the engine's counters into RUN_STATE. Every file loads with
    `torch.load(weights_only=True)` except DeepSpeed's own.
    """
    root = checkpoint_root(cfg.train.output_dir)
    tag = step_dir_name(step)
    rank, world = dist.get_rank(), dist.get_world_size()
    folder = os.path.join(root, tag)
    if rank == 0 and os.path.isdir(folder):
        # Left by an attempt that crashed mid-save (or superseded by a rollback of `latest`): its stale
        # markers must not vouch for the files written now.
        shutil.rmtree(folder)
    barrier()
    engine.save_checkpoint(
        root, tag=tag, client_state=client_state, save_latest=False, exclude_frozen_parameters=True
    )
    torch.save(rank_state, os.path.join(folder, RANK_STATE.format(rank=rank)))
    proj = projection_state(model)
    trainable = trainable_state(engine.optimizer, model)
    if rank == 0:
        save_projection(proj, os.path.join(folder, PROJ_FILE))
        write_atomic(os.path.join(folder, CONFIG_FILE), json.dumps(to_dict(cfg), indent=2))
        counters = {"global_steps": engine.global_steps, "global_samples": engine.global_samples}
        state = {**run_state, **trainable, **counters, "scheduler": engine.lr_scheduler.state_dict()}
        torch.save({**state, "world_size": world}, os.path.join(folder, RUN_STATE))
    write_done(folder, rank, world, step)  # last: this rank's part is complete
    barrier()
    if rank == 0:
        write_atomic(os.path.join(root, LATEST_FILE), tag)
        rotate(root, keep=cfg.train.keep_last, newest=tag)
    barrier()
    return folder


def load_checkpoint(engine, folder: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore checkpoint `folder` exactly, on the number of ranks that wrote it: (client_state, this
    rank's trainer state)."""
    root, tag = os.path.split(folder)
    rank_file = os.path.join(folder, RANK_STATE.format(rank=dist.get_rank()))
    _, client_state = engine.load_checkpoint(
        root, tag=tag, load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if client_state is None:
        raise ResumeError(f"{folder}: DeepSpeed could not load this checkpoint")
    return client_state, _load_rank_state(rank_file)


def _load_rank_state(path: str) -> dict[str, Any]:
    """A rank's trainer state with weights_only=True; one written before mgpt4 kept numpy's RNG state
    as a list also needs the numpy array type (and nothing else) to load."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:
            from numpy._core.multiarray import _reconstruct
        except ImportError:  # numpy 1.x
            from numpy.core.multiarray import _reconstruct
        with torch.serialization.safe_globals(
            [np.ndarray, np.dtype, _reconstruct, type(np.dtype(np.uint32))]
        ):
            return torch.load(path, map_location="cpu", weights_only=True)


def load_run_state(engine, model: MiniGPT4, folder: str) -> dict[str, Any]:
    """Restore the trainable weights, their Adam moments and step count, the schedule and the engine's
    counters from RUN_STATE, whatever number of ranks wrote it (ZeRO-1, 2 or 3); returns the state
    (step, samples seen, data pass, sample images). The fp16 loss scale starts afresh."""
    state = torch.load(os.path.join(folder, RUN_STATE), map_location="cpu", weights_only=True)
    optimizer = engine.optimizer
    hp_groups = getattr(optimizer, "single_partition_of_fp32_groups", None)  # ZeRO-1/2
    if hp_groups is None:
        hp_groups = getattr(optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO-3
    if hp_groups is None:
        raise ResumeError(f"{folder}: resuming on another number of ranks needs ZeRO stage 1, 2 or 3")
    # Adam's state exists only after a first step: create it, then fill it through DeepSpeed's
    # full-tensor setters, which find this rank's slice of each parameter.
    inner = optimizer.optimizer
    for hp in hp_groups:
        inner.state[hp] = {
            "step": torch.tensor(float(state["adam_step"])),
            **{key: torch.zeros_like(hp) for key in ADAM_KEYS},
        }
    _link_adam_state(optimizer)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = sorted({n for n, _ in trainable} - set(state["params"]))
    if missing:
        raise ResumeError(f"{folder}: {RUN_STATE} has no {', '.join(missing)}")
    for name, p in trainable:  # the setters copy this rank's slice wherever the state lives
        safe_set_full_fp32_param(p, state["params"][name])
        for key in ADAM_KEYS:
            safe_set_full_optimizer_state(p, state[key][name], key)
    # The module's own (low-precision) copy of each weight follows the fp32 master.
    if hasattr(optimizer, "update_lp_params"):
        optimizer.update_lp_params()
    else:
        params = [p for _, p in trainable]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if dist.get_rank() == 0:
                for name, p in trainable:
                    p.data.copy_(state["params"][name].to(device=p.device, dtype=p.dtype))
    engine.lr_scheduler.load_state_dict(state["scheduler"])
    for group, lr in zip(inner.param_groups, engine.lr_scheduler.get_last_lr()):
        group["lr"] = lr
    engine.global_steps = int(state["global_steps"])
    engine.global_samples = int(state["global_samples"])
    return state


def is_zero3(engine) -> bool:
    return engine.zero_optimization_stage() == 3


# ---------------------------------------------------------------------------------------------
# Reads outside the engine's forward


@contextlib.contextmanager
def gathered(*parts: torch.nn.Module | None, recurse: bool = True) -> Iterator[None]:
    """The full values of the ZeRO-3-partitioned parameters of `parts` (None is skipped) while the
    block runs, on this rank; without ZeRO-3, or with nothing partitioned, it does nothing.

    A collective call: every rank enters it together. Inside the engine's forward ZeRO-3 fetches a
    parameter whenever it is read; outside it only a module's own call fetches that module's
    parameters, so an attribute read (a ViT's `pos_embed` under `forward_features`, `query_tokens`)
    sees an empty tensor: `recurse=False` gathers only what each of `parts` holds itself and leaves
    its children, which run through their calls, to the hooks (the cheap choice for a ViT-g).
    Parameters are read-only inside: a change is not kept; on the way out the gathered ones are
    partitioned again.
    """
    params = [p for part in parts if part is not None for p in part.parameters(recurse=recurse)]
    # Only what is partitioned now: one at or below the persistence threshold is whole once used.
    params = [p for p in params if getattr(p, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE]
    if not params:
        yield
        return
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield
