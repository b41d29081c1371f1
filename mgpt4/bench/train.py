"""Training-step benchmark: samples/s, tokens/s, TFLOP/s and MFU of a recipe's model under DeepSpeed.

    python -m mgpt4.bench.train --recipe tiny_stage1 --steps 20
    deepspeed --num_gpus 1 -m mgpt4.bench.train --recipe stage1_vicuna7b --random-weights \
        --set data.batch_size=16 --set model.gradient_checkpointing=true

Batches are random tensors of the recipe's static shapes, so only the model step is timed (the data
pipeline has its own benchmark, mgpt4.bench.data). `--random-weights` drops every weight path: the
full-size model is built with random weights directly on the device, no files needed. On the CPU the
machine's measured matmul peak is the MFU denominator and is printed too.
"""

from __future__ import annotations

import argparse
import time

import torch

from mgpt4.config import DTYPES, WeightsConfig
from mgpt4.strict_config import apply_overrides
from mgpt4.train import engine as eng_mod
from mgpt4.train.assets import ensure_demo_assets
from mgpt4.train.ds_config import zero_stage
from mgpt4.train.flops import device_peak_tflops, measure_matmul_tflops, train_flops_per_sample
from mgpt4.train.recipes import RECIPES, get_recipe
from mgpt4.train.resolve import resolve_config
from mgpt4.train.trainer import build_model_and_engine, seed_all, sequence_length


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="tiny_stage1", choices=list(RECIPES))
    p.add_argument("--deepspeed", default="ds_configs/z2.json")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument(
        "--random-weights", action="store_true", help="no weight files: random weights at full size"
    )
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = apply_overrides(get_recipe(args.recipe), args.set)
    if args.random_weights:
        cfg.model.weights = WeightsConfig()
        cfg.train.demo_assets = False
    d = eng_mod.init_distributed(cfg.train.startup_timeout_min)
    try:
        if args.random_weights and cfg.data.kind == "webdataset" and not cfg.data.sources:
            from mgpt4.data.config import SourceConfig

            cfg.data.sources = [SourceConfig(name="random", shards="unused.tar")]  # batches are random here
        cfg, ds_config, _ = resolve_config(
            cfg, args.deepspeed, d.world_size, check_inputs=not args.random_weights
        )
        ensure_demo_assets(cfg)
        seed_all(cfg.train.seed)
        # Random weights are made on the device directly; under ZeRO-3 transformers partitions them.
        built_on = None if cfg.model.weights.llm or zero_stage(ds_config) == 3 else d.device
        _zero, model, engine, _, _ = build_model_and_engine(cfg, ds_config, built_on)
        run(args, cfg, d, model, engine)
    finally:
        eng_mod.shutdown()


def run(args, cfg, d, model, engine) -> None:
    micro, seq = cfg.data.batch_size, sequence_length(model)
    size, length = cfg.model.vision.image_size, cfg.model.text.max_txt_len
    dtype = DTYPES[cfg.train.precision]
    gen = torch.Generator().manual_seed(d.rank)
    images = torch.randint(0, 256, (micro, 3, size, size), dtype=torch.uint8, generator=gen)
    images = ((images.float() / 255 - 0.45) / 0.27).to(d.device, dtype)
    ids = torch.randint(3, model.llm.config.vocab_size, (micro, length), generator=gen).to(d.device)
    mask = torch.ones_like(ids)
    model.train()

    def step() -> float:
        loss = 0.0
        for _ in range(cfg.train.grad_accum):
            out = engine(images, ids, mask)
            engine.backward(out.loss)
            engine.step()
            loss = float(out.loss.detach())
        return loss

    for _ in range(args.warmup):
        step()
    _sync(d.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(d.device)
    elapsed = time.perf_counter() - start
    samples = args.steps * micro * cfg.train.grad_accum * d.world_size
    samples_s = samples / elapsed
    flops = train_flops_per_sample(cfg.model, seq)
    tflops = flops * samples_s / d.world_size / 1e12
    measured = measure_matmul_tflops(dtype) if d.device.type == "cpu" else None
    peak = cfg.train.peak_tflops or measured or device_peak_tflops(d.device, dtype)
    if d.rank != 0:
        return
    device_name = torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else "CPU"
    params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # full sizes under ZeRO-3
    print(f"recipe: {cfg.recipe}  device: {device_name} x {d.world_size}  precision: {cfg.train.precision}")
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    print(f"params: {params / 1e6:.1f}M (trainable {trainable:,})")
    print(f"micro batch: {micro}  grad accum: {cfg.train.grad_accum}  sequence: {seq} tokens")
    print(f"model FLOPs per sample: {flops / 1e9:.2f} GFLOP")
    print(f"step time: {elapsed / args.steps * 1000:.1f} ms")
    print(f"samples/s: {samples_s:.2f}")
    print(f"tokens/s: {samples_s * seq:.1f}")
    print(f"TFLOP/s per device: {tflops:.4f}")
    if measured is not None:
        print(f"CPU matmul peak (measured, {cfg.train.precision}): {measured:.4f} TFLOP/s")
    if peak:
        print(f"MFU: {100 * tflops / peak:.2f}% of {peak:.4g} TFLOP/s")
    if d.device.type == "cuda":
        print(f"peak memory: {torch.cuda.max_memory_allocated(d.device) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
