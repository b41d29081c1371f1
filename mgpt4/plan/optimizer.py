"""The trainable set's bytes per rank as DeepSpeed keeps them: the module's own copy, gradients, and the
AdamW state (an fp32 master copy and two fp32 moments) of the rank's partition.

Partitions (DeepSpeed 0.19, read from its source and checked by `tests/test_plan.py` on a ZeRO-2
engine): ZeRO-1/2 flatten each parameter group (mgpt4's two AdamW groups: weights with decay, biases and
norms without, `mgpt4.train.optim.param_groups`) and pad it to a multiple of 2 x ranks elements
(`nccl_start_alignment_factor`), so a rank holds ceil(n / 2N) x 2 of each group; ZeRO-3 pads every
parameter to a multiple of the ranks, so a rank holds ceil(n / N) of each. The optimizer state covers
the trainable parameters only (shared/reference/deepspeed-notes.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mgpt4.plan.weights import Param

FP32 = 4
ADAM_MOMENTS = 2  # exp_avg and exp_avg_sq, fp32 each


def partition_numel(params: list[Param], ranks: int, stage: int) -> int:
    """Elements of the trainable set that one rank's optimizer partition holds under ZeRO `stage`."""
    train = [p for p in params if p.trainable]
    if stage >= 3:
        return sum(math.ceil(p.numel / ranks) for p in train)
    groups = [sum(p.numel for p in train if p.ndim >= 2), sum(p.numel for p in train if p.ndim < 2)]
    return sum(math.ceil(n / (2 * ranks)) * 2 for n in groups if n)


@dataclass(frozen=True)
class TrainableBytes:
    """Per rank: the module's copy in the engine's dtype, its gradients (the engine's dtype while they
    are reduced, and the fp32 partition the optimizer steps on), the fp32 master partition and the two
    Adam moments."""

    module: int
    grads: int
    master: int
    moments: int

    @property
    def optimizer(self) -> int:
        return self.master + self.moments

    @property
    def total(self) -> int:
        return self.module + self.grads + self.master + self.moments


def trainable_bytes(params: list[Param], ranks: int, stage: int, engine_bytes: int) -> TrainableBytes:
    """The trainable set per rank under ZeRO `stage` with the engine computing in `engine_bytes`-wide
    floats (train.precision). ZeRO-2 keeps the module copy and its reduced gradient whole on every rank,
    ZeRO-3 a partition of each."""
    part = partition_numel(params, ranks, stage)
    whole = sum(p.numel for p in params if p.trainable)
    held = part if stage >= 3 else whole
    return TrainableBytes(
        module=held * engine_bytes,
        grads=held * engine_bytes + part * FP32,
        master=part * FP32,
        moments=part * FP32 * ADAM_MOMENTS,
    )
