"""The one module that imports DeepSpeed: distributed init, the engine, checkpoints and the export.

Checkpoints hold only the trainable set (the projection) with its optimizer and schedule, plus
per-rank trainer state (data position, RNG); never the frozen weights. A checkpoint becomes the
resume point only once every rank has finished writing it: `latest` is replaced atomically last,
so a crash during a save leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from dataclasses import dataclass
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import safe_get_full_fp32_param

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
    checkpoint_root,
    latest_tag,
    rotate,
    step_dir_name,
    write_atomic,
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
    if acc.device_name() == "cuda":
        acc.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


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
        """With a pre-partitioned LLM the engine skips its own dtype cast, so the other parts are cast here."""
        if self.zero3 and self.dtype != torch.float32:
            for part in (model.visual_encoder, model.ln_vision, model.qformer, model.llama_proj):
                if part is not None:  # no Q-Former in the LLaMA-2 variant
                    part.to(self.dtype)
            if model.query_tokens is not None:
                model.query_tokens.data = model.query_tokens.data.to(self.dtype)


def create_engine(model: MiniGPT4, cfg: Config, ds_config: dict[str, Any]):
    """deepspeed.initialize with AdamW over the trainable set and the official schedule."""
    optimizer, scheduler = build_optimizer(model, cfg.optim, cfg.train.steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine, optimizer, scheduler


def optimizer_state_numel(optimizer) -> int:
    """Elements of Adam state (exp_avg) this rank holds."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return sum(s["exp_avg"].numel() for s in inner.state.values() if "exp_avg" in s)


def local_param_numel(module: torch.nn.Module) -> int:
    """Parameter elements this rank stores for `module` (its shard under ZeRO-3)."""
    total = 0
    for p in module.parameters():
        ds_tensor = getattr(p, "ds_tensor", None)
        total += ds_tensor.numel() if ds_tensor is not None else p.numel()
    return total


def full_param_numel(module: torch.nn.Module) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


def memory_report(engine, optimizer, model: MiniGPT4) -> dict[str, Any]:
    """Where the parameters and optimizer state live, per rank (a collective call)."""
    local = [optimizer_state_numel(optimizer), local_param_numel(model.llm)]
    gathered: list[list[int]] = [[] for _ in range(dist.get_world_size())]
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
    }


# ---------------------------------------------------------------------------------------------
# Checkpoints


def projection_state(model: MiniGPT4) -> dict[str, torch.Tensor]:
    """The projection's full fp32 (master) weights, gathered on every rank; a collective call."""
    return {
        f"llama_proj.{n}": safe_get_full_fp32_param(p).detach().cpu()
        for n, p in model.llama_proj.named_parameters()
    }


def save_checkpoint(
    engine, model: MiniGPT4, cfg: Config, step: int, client_state: dict[str, Any], rank_state: dict[str, Any]
) -> str:
    """Write checkpoint `step_N` on every rank; `latest` moves to it only when all of it is on disk."""
    root = checkpoint_root(cfg.train.output_dir)
    tag = step_dir_name(step)
    rank = dist.get_rank()
    engine.save_checkpoint(
        root, tag=tag, client_state=client_state, save_latest=False, exclude_frozen_parameters=True
    )
    folder = os.path.join(root, tag)
    torch.save(rank_state, os.path.join(folder, RANK_STATE.format(rank=rank)))
    proj = projection_state(model)
    if rank == 0:
        save_projection(proj, os.path.join(folder, PROJ_FILE))
        write_atomic(os.path.join(folder, CONFIG_FILE), json.dumps(to_dict(cfg), indent=2))
    barrier()
    if rank == 0:
        write_atomic(os.path.join(root, LATEST_FILE), tag)
        rotate(root, keep=cfg.train.keep_last, newest=tag)
    barrier()
    return folder


def load_checkpoint(engine, cfg: Config) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Restore the newest complete checkpoint: (client_state, this rank's trainer state), or None."""
    root = checkpoint_root(cfg.train.output_dir)
    tag = latest_tag(root)
    if tag is None:
        return None
    folder = os.path.join(root, tag)
    rank_file = os.path.join(folder, RANK_STATE.format(rank=dist.get_rank()))
    written = len([f for f in os.listdir(folder) if f.startswith("trainer_state_rank")])
    if written != dist.get_world_size() or not os.path.isfile(rank_file):
        raise SystemExit(
            f"{folder}: written by {written} ranks but this run has {dist.get_world_size()}; "
            f"resume with the same number of ranks, or start a new output_dir"
        )
    _, client_state = engine.load_checkpoint(
        root, tag=tag, load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if client_state is None:
        raise SystemExit(f"{folder}: DeepSpeed could not load this checkpoint")
    rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
    return client_state, rank_state


def is_zero3(engine) -> bool:
    return engine.zero_optimization_stage() == 3
