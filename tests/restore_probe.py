"""Build a run as the training launcher does (resuming from its output folder), then save what it
restored, before any step, to the file after `--probe-out` (rank 0): how a test sees that a resume on
another number of ranks restored the trainable set exactly. Takes the launcher's flags otherwise.

    deepspeed --num_gpus 2 tests/restore_probe.py --probe-out restored.pt --deepspeed ... --set ...
"""

from __future__ import annotations

import sys

import torch

from mgpt4 import dist
from mgpt4.strict_config import apply_overrides
from mgpt4.train import engine as eng_mod
from mgpt4.train import run_lock
from mgpt4.train.cli import parse_args
from mgpt4.train.preemption import Preemption
from mgpt4.train.recipes import get_recipe
from mgpt4.train.trainer import build


def main(argv: list[str]) -> None:
    at = argv.index("--probe-out")
    dest = argv[at + 1]
    args = parse_args(argv[:at] + argv[at + 2 :], "tiny_stage1", __doc__)
    cfg = apply_overrides(get_recipe(args.recipe), args.set)
    d = eng_mod.init_distributed(cfg.train.startup_timeout_min)
    preemption = Preemption(d.rank)
    try:
        run = build(cfg, args.deepspeed, not args.no_resume, d, preemption)
        try:
            state = run.state_dict()  # every rank: the trainable set is gathered from all of them
            if d.rank == 0:
                torch.save({k: v for k, v in state.items() if k != "rank"}, dest)
        finally:
            run.metrics.close()
            run.feeder.source.close()
    finally:
        preemption.close()
        run_lock.release()
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
