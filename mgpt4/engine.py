"""The one module that imports DeepSpeed: distributed init, the engine, checkpoints and the export.

Checkpoints hold only the trainable set (the projection) with its optimizer and schedule, plus
per-rank trainer state (data position, RNG); never the frozen weights. A checkpoint becomes the
resume point only once every rank has finished writing it: `latest` is replaced atomically last,
so a crash during a save leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
from dataclasses import dataclass
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import safe_get_full_fp32_param

from mgpt4 import launch_env
from mgpt4.config import DTYPES, Config, OptimConfig, to_dict
from mgpt4.ds_config import zero_stage
from mgpt4.model import MiniGPT4
from mgpt4.model.export import save_projection
from mgpt4.paths import CHECKPOINTS_DIR, CONFIG_FILE, LATEST_FILE, PROJ_FILE, step_dir_name

RANK_STATE = "trainer_state_rank{rank}.pt"


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_distributed(timeout_min: int) -> DistInfo:
    """Join the process group: deepspeed/torchrun variables, srun's, mpirun (mpi4py) or a world of one."""
    # DeepSpeed reads the timeout in minutes; a hung collective then fails instead of waiting forever.
    os.environ.setdefault("DEEPSPEED_TIMEOUT", str(timeout_min))
    launcher = launch_env.wire(os.environ)
    deepspeed.init_distributed()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # Every rank says who it is and where, once: what a log of many nodes is read against (which
    # process is which rank, on which node, and whether all of them met at the same address).
    # One write per line: under mpirun, lines written in two parts interleave across ranks.
    print(
        f"rank {dist.get_rank()}/{dist.get_world_size()} local_rank {local_rank} node {socket.gethostname()} "
        f"pid {os.getpid()} rendezvous {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} ({launcher})\n",
        end="",
        flush=True,
    )
    acc = get_accelerator()
    if acc.device_name() == "cuda":
        acc.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def shutdown() -> None:
    if dist.is_initialized():
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
                part.to(self.dtype)
            model.query_tokens.data = model.query_tokens.data.to(self.dtype)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weight matrices only; biases and norms get none (as the official recipe)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def lr_at(step: int, total: int, o: OptimConfig) -> float:
    """Linear warmup from warmup_lr to lr, then cosine from lr to min_lr over the whole run."""
    if step < o.warmup_steps:
        return o.warmup_lr + (o.lr - o.warmup_lr) * step / max(o.warmup_steps, 1)
    return o.min_lr + (o.lr - o.min_lr) * 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))


def create_engine(model: MiniGPT4, cfg: Config, ds_config: dict[str, Any]):
    """deepspeed.initialize with AdamW over the trainable set and the official schedule."""
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps
    )
    total = cfg.train.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, total, o) / o.lr)
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


def checkpoint_root(cfg: Config) -> str:
    return os.path.join(cfg.train.output_dir, CHECKPOINTS_DIR)


def latest_tag(root: str) -> str | None:
    path = os.path.join(root, LATEST_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        tag = f.read().strip()
    return tag if tag and os.path.isdir(os.path.join(root, tag)) else None


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    engine, model: MiniGPT4, cfg: Config, step: int, client_state: dict[str, Any], rank_state: dict[str, Any]
) -> str:
    """Write checkpoint `step_N` on every rank; `latest` moves to it only when all of it is on disk."""
    root = checkpoint_root(cfg)
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
        _write_atomic(os.path.join(folder, CONFIG_FILE), json.dumps(to_dict(cfg), indent=2))
    barrier()
    if rank == 0:
        _write_atomic(os.path.join(root, LATEST_FILE), tag)
        _rotate(root, keep=cfg.train.keep_last, newest=tag)
    barrier()
    return folder


def _rotate(root: str, keep: int, newest: str) -> None:
    steps = sorted(
        d for d in os.listdir(root) if d.startswith("step_") and os.path.isdir(os.path.join(root, d))
    )
    # Partial folders newer than `latest` (a crash mid-save) are left for the next save to overwrite.
    complete = [d for d in steps if d <= newest]
    for old in complete[:-keep]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def load_checkpoint(engine, cfg: Config) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Restore the newest complete checkpoint: (client_state, this rank's trainer state), or None."""
    root = checkpoint_root(cfg)
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
