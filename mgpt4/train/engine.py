"""The one module that imports DeepSpeed: distributed init, the engine, and the trainable set's part of
a checkpoint.

A checkpoint holds only the trainable set (the projection, and with `model.lora` the LLM's LoRA
adapters: whatever the freeze policy declares), never the frozen weights: its full fp32
weights and Adam moments by parameter name, gathered and restored through DeepSpeed's public
full-tensor API (`deepspeed.utils.safe_get_full_*` / `safe_set_full_*`), so that any number of ranks
under ZeRO-1, 2 or 3 loads what any other number wrote. The format and its files are
`train/run_state.py`'s.

Frozen parts keep the dtypes the model was built with (`model.precision.*`): the engine's mixed
precision applies to the trainable set only, and the model casts where the parts meet.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from deepspeed.utils import (
    lazy_init_hp_params_optimizer_state,
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)

from mgpt4 import logs
from mgpt4.checkpoints import ResumeError
from mgpt4.config import DTYPES, Config
from mgpt4.dist import DistInfo, adopt, barrier, held_groups
from mgpt4.dist import init as dist_init
from mgpt4.model import MiniGPT4
from mgpt4.train.ds_config import zero_stage
from mgpt4.train.optim import build_optimizer, param_groups, resume_schedule

log = logs.get_logger(__name__)


def init_distributed(startup_timeout_min: float) -> DistInfo:
    """Join the process group through DeepSpeed's comm layer (`deepspeed.init_distributed`, which
    DeepSpeed's collectives need); the launcher, the timeouts and the device are `mgpt4.dist.init`'s.

    Collectives get `startup_timeout_min` while weights load and workers start (minutes on a big
    model); `mgpt4.dist.set_timeout` shortens it once training runs, so a dead rank fails the job fast.
    """
    _skip_shm_comm_op()
    return dist_init(
        startup_timeout_min,
        join=lambda timeout: deepspeed.init_distributed(timeout=timeout),
        device_type=get_accelerator().device_name(),
    )


def _skip_shm_comm_op() -> None:
    """Keep DeepSpeed's comm layer from JIT-compiling its shared-memory all-reduce when it joins.

    DeepSpeed's torch backend builds the op `deepspeed_shm_comm` in every process it starts in
    (deepspeed/comm/torch.py, `build_shm_op`): 1-3 minutes of g++ on a first run, and again whenever
    another Python environment sharing the extensions folder built it in between. Only its
    `inference_all_reduce` (DeepSpeed-Inference's tensor parallelism) calls the op; training
    all-reduces through torch.distributed, so the op is marked incompatible here, which is the one
    switch `build_shm_op` reads (`deepspeed.ops.__compatible_ops__`, probed once per process and kept).
    """
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def initialize(**kwargs: Any):
    """`deepspeed.initialize(**kwargs)`, with the process groups DeepSpeed makes for the engine put
    under `mgpt4.dist`'s timeouts: (engine, optimizer, dataloader, lr scheduler).

    DeepSpeed makes its groups here (a clone of the world group for ZeRO's collectives) with torch's
    default timeout, and runs its first collectives on them at once: the ranks meet on the world
    group first, under the start-up timeout, however long each took to load its weights. Adopted
    after, those groups keep the start-up timeout until the first step is done and then take the
    step timeout with the world group. (Under ZeRO-3 the LLM is partitioned on the world group
    itself, before this.)
    """
    barrier()
    out = deepspeed.initialize(**kwargs)
    adopt(*held_groups(out[0], out[0].optimizer))
    return out


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
    engine, optimizer, _, scheduler = initialize(
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
# Checkpoints: the trainable set's part of the run state, through DeepSpeed's public full-tensor API

ADAM_KEYS = ("exp_avg", "exp_avg_sq")
# The loss scaler's state: `optimizer.loss_scaler` (DeepSpeed's LossScaler, or DynamicLossScaler under
# fp16, whose whole object DeepSpeed's own checkpoints pickle): the scale (`cur_scale`, what
# `optimizer.cur_scale` reads), the iteration it counts its growth window from, its last overflow and
# what is left of its hysteresis. Plain numbers, so the file loads with weights_only=True.
LOSS_SCALE_KEYS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def _base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch AdamW `create_engine` handed to DeepSpeed: it steps this rank's flat fp32 partition of
    each param group, and its `state` holds their Adam moments and step."""
    return engine.optimizer.optimizer


def _master_partitions(engine) -> list[torch.Tensor]:
    """This rank's flat fp32 partitions, the tensors Adam's state is keyed by: the torch optimizer's
    params under ZeRO-1/2; under ZeRO-3, which puts them in its param groups only during a step, the
    live tensors the optimizer's public `state_dict()` holds under FP32_FLAT_GROUPS."""
    if is_zero3(engine):
        return list(engine.optimizer.state_dict()[FP32_FLAT_GROUPS])
    return [hp for group in _base_optimizer(engine).param_groups for hp in group["params"]]


def _trainable(model: MiniGPT4) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def require_zero(engine) -> None:
    """Checkpoints gather the trainable set through ZeRO's full-tensor API: raise ValueError without it."""
    if engine.zero_optimization_stage() not in (1, 2, 3):
        raise ValueError(
            f"checkpoints need ZeRO stage 1, 2 or 3 (zero_optimization.stage in the --deepspeed file), "
            f"got stage {engine.zero_optimization_stage()}"
        )


def _link_adam_state(engine, model: MiniGPT4) -> None:
    """ZeRO-1/2: point each parameter at its slice of Adam's state in every param group.

    DeepSpeed links them once, after the first group's first step, before the other groups (the
    projection's bias) have any state: their full-tensor getters and setters then fail. Linking every
    group once all their state exists fixes that (DeepSpeed links again, to the same tensors, at the
    next step of a restored run). ZeRO-3 finds the state at each call."""
    if engine.zero_optimization_stage() >= 3:
        return
    base = _base_optimizer(engine)
    # The grouping `create_engine` gave DeepSpeed (weight decay aside), group for group.
    for lp_group, hp_group in zip(param_groups(model, 0.0, None), base.param_groups):
        for hp in hp_group["params"]:
            lazy_init_hp_params_optimizer_state(lp_group["params"], hp, base.state)


def trainable_state_dict(engine, model: MiniGPT4) -> dict[str, Any]:
    """The trainable set as any number of ranks can load it: full fp32 weights and Adam moments by
    parameter name, Adam's step count, the schedule, the engine's counters and the loss scaler's state.
    Gathered on every rank (a collective call)."""
    require_zero(engine)
    base = _base_optimizer(engine)
    steps = {int(s["step"]) for s in base.state.values() if "step" in s}
    if steps:
        _link_adam_state(engine, model)
    params: dict[str, torch.Tensor] = {}
    moments: dict[str, dict[str, torch.Tensor]] = {key: {} for key in ADAM_KEYS}
    for name, p in _trainable(model):
        params[name] = safe_get_full_fp32_param(p).detach().float().cpu()
        for key in ADAM_KEYS:  # no state yet when every step so far overflowed (fp16): zeros, as Adam starts
            full = safe_get_full_optimizer_state(p, key) if steps else torch.zeros_like(params[name])
            moments[key][name] = full.detach().float().cpu()
    scaler = engine.optimizer.loss_scaler
    return {
        "params": params,
        **moments,
        "adam_step": max(steps, default=0),
        "scheduler": engine.lr_scheduler.state_dict(),
        "global_steps": int(engine.global_steps),
        "global_samples": int(engine.global_samples),
        "skipped_steps": int(engine.skipped_steps),
        "loss_scale": {k: _plain(getattr(scaler, k)) for k in LOSS_SCALE_KEYS if hasattr(scaler, k)},
    }


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) else value


def load_trainable_state_dict(engine, model: MiniGPT4, state: dict[str, Any]) -> None:
    """Restore what `trainable_state_dict` returned, on any number of ranks (ZeRO-1, 2 or 3): this rank
    takes its slice of each full tensor. Raises ResumeError when a trainable parameter is missing or has
    another size."""
    require_zero(engine)
    trainable = _trainable(model)
    for name, p in trainable:
        saved = state["params"].get(name)
        shape = tuple(getattr(p, "ds_shape", p.shape))  # the full shape, also of a ZeRO-3 partition
        if saved is None or tuple(saved.shape) != shape:
            found = "nothing" if saved is None else f"shape {tuple(saved.shape)}"
            raise ResumeError(f"it holds {found} for the trainable parameter {name} of shape {shape}")
    extra = sorted(set(state["params"]) - {name for name, _ in trainable})
    if extra:  # the trainable set is the freeze policy's: a checkpoint of another set is another model
        raise ResumeError(
            f"it holds {len(extra)} trained parameter(s) that this run does not train ({extra[0]}, ...): "
            "it was trained with another trainable set (model.lora)"
        )
    # Adam's state exists only after a first step: create it in the torch optimizer (zeros, the saved
    # step count), then fill it through DeepSpeed's full-tensor setters, which copy this rank's slice.
    base = _base_optimizer(engine)
    for hp in _master_partitions(engine):
        base.state[hp] = {
            "step": torch.tensor(float(state["adam_step"])),
            **{key: torch.zeros_like(hp) for key in ADAM_KEYS},
        }
    _link_adam_state(engine, model)
    for name, p in trainable:
        safe_set_full_fp32_param(p, state["params"][name])
        for key in ADAM_KEYS:
            safe_set_full_optimizer_state(p, state[key][name], key)
    # The module's own (low-precision) copy of each weight follows the fp32 master.
    if hasattr(engine.optimizer, "update_lp_params"):  # ZeRO-1/2
        engine.optimizer.update_lp_params()
    else:
        params = [p for _, p in trainable]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if dist.get_rank() == 0:
                for name, p in trainable:
                    p.data.copy_(state["params"][name].to(device=p.device, dtype=p.dtype).view_as(p))
    # The saved step on this run's schedule (optim.*, train.steps): a changed setting applies as it
    # reads from the resumed step on (the saved base lr would scale the new schedule).
    resume_schedule(engine.lr_scheduler, state["scheduler"])
    engine.global_steps = int(state["global_steps"])
    engine.global_samples = int(state["global_samples"])
    engine.skipped_steps = int(state["skipped_steps"])
    scaler = engine.optimizer.loss_scaler
    for key, value in state["loss_scale"].items():
        if hasattr(scaler, key):
            setattr(scaler, key, value)


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
