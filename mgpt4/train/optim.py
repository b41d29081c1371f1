"""The optimizer and schedule of the official recipe, DeepSpeed-free: AdamW on the trainable set,
linear warmup from `warmup_lr`, then cosine from `lr` to `min_lr` over the whole run.

Source: MiniGPT-4's `LinearWarmupCosineLRScheduler` (LAVIS `lavis/common/optims.py`), per step.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mgpt4.config import OptimConfig
from mgpt4.model.lora import is_lora_param


def param_groups(
    model: torch.nn.Module, weight_decay: float, lora_lr: float | None = None
) -> list[dict[str, Any]]:
    """Weight decay on weight matrices only; biases and norms get none (as the official recipe). The
    LoRA adapters (`model.lora`) form groups of their own, after the projection's, with `lora_lr` as
    their lr when given (else the optimizer's). The grouping does not depend on the values given."""
    decay, no_decay, lora_decay, lora_no_decay = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_lora_param(name):
            (lora_decay if p.ndim >= 2 else lora_no_decay).append(p)
        else:
            (decay if p.ndim >= 2 else no_decay).append(p)
    lora = {} if lora_lr is None else {"lr": lora_lr}
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": lora_decay, "weight_decay": weight_decay, **lora},
        {"params": lora_no_decay, "weight_decay": 0.0, **lora},
    ]
    return [g for g in groups if g["params"]]


def lr_at(step: int, total: int, o: OptimConfig) -> float:
    """Linear warmup from warmup_lr to lr, then cosine from lr to min_lr over the whole run."""
    if step < o.warmup_steps:
        return o.warmup_lr + (o.lr - o.warmup_lr) * step / max(o.warmup_steps, 1)
    return o.min_lr + (o.lr - o.min_lr) * 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))


def build_optimizer(
    model: torch.nn.Module, o: OptimConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the parameters that require grad, and the per-step warmup + cosine schedule: each
    group's lr follows it scaled to the group's peak (`optim.lr`; the adapters' `optim.lora_lr`)."""
    optimizer = torch.optim.AdamW(
        param_groups(model, o.weight_decay, o.lora_lr), lr=o.lr, betas=tuple(o.betas), eps=o.eps
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, total_steps, o) / o.lr)
    return optimizer, scheduler


def resume_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, saved: dict[str, Any]) -> None:
    """Load a saved `scheduler.state_dict()` into `scheduler` (from `build_optimizer`, under this run's
    settings) but keep this run's base lr, and set its optimizer's lr to the schedule's value at the
    saved step: a resumed run follows its own settings from the resumed step on, whatever the
    checkpoint's were (the saved base lr would scale this run's schedule)."""
    step = int(saved["last_epoch"])
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    scheduler.load_state_dict({**saved, "base_lrs": list(scheduler.base_lrs), "_last_lr": lrs})
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
