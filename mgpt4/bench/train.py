"""Training-step benchmark: every stage-1 mode on the same captions, and what the feature cache costs.

    python -m mgpt4.bench.train --recipe tiny_stage1 --steps 20
    python -m mgpt4.bench.train --preset small --random-weights          # the issue's CPU size
    deepspeed --num_gpus 1 --module mgpt4.bench.train --recipe stage1_vicuna7b --random-weights \
        --set train.precision=bf16 --set data.batch_size=16 --checkpointing both --json out.json

Modes: `plain` (the official layout: one sample per row, answers padded to max_txt_len), `packed` (whole
samples packed into rows, `data.pack_length`), `cached` (features from a cache: no decode, ViT or
Q-Former in the step) and `packed+cached`; with `--compile`, each also compiled (`train.compile`: rows
"MODE compiled", compiled in the warm-up; a timed step that recompiles is an error). Each mode reads the
same synthetic image shards (captions of 10-15 words) through the real loader, with the crops a cache
holds (`data.crops: sample`); its batches are made before the clock starts, so only the model step is
timed (the data pipeline has its own benchmark, mgpt4.bench.data). The cache is extracted from those shards first, and timed: a cached step
skips work that extraction did, so the end-to-end time of one run and of three runs on one cache is
printed against plain. On the CPU the measured matmul peak is the MFU denominator and is printed too.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from mgpt4.config import DTYPES, Config, WeightsConfig
from mgpt4.data import DeviceFeeder, SourceConfig, build_loader
from mgpt4.data.batches import model_inputs
from mgpt4.data.config import ValConfig
from mgpt4.data.synthetic import write_shards
from mgpt4.dataclass_flags import HelpWithDefaults
from mgpt4.dist import DistInfo, RankInfo, barrier, shutdown
from mgpt4.features.extract import ExtractOptions, extract
from mgpt4.model import MiniGPT4
from mgpt4.strict_config import apply_overrides
from mgpt4.train import engine as eng_mod
from mgpt4.train.assets import ensure_demo_assets
from mgpt4.train.compiled import CompiledParts, compiled_graphs
from mgpt4.train.ds_config import zero_stage
from mgpt4.train.flops import device_peak_tflops, measure_matmul_tflops
from mgpt4.train.recipes import RECIPES, get_recipe
from mgpt4.train.resolve import resolve_config
from mgpt4.train.tally import Tally
from mgpt4.train.trainer import build_model_and_engine, seed_all

MODES = ("plain", "packed", "cached", "packed+cached")
# The small CPU size: ViT 224 px / patch 14 / 256 wide / 6 deep; Q-Former 256 wide, 4 layers,
# 32 queries; LLaMA 512 wide, 4 layers, FFN 1376, a 400-piece tokenizer; batch 8, max_txt_len 32; fp32
# (a CPU has no fast bf16).
PRESETS = {
    "small": [
        "model.vision.image_size=224", "data.image_size=224", "model.vision.width=256", "model.vision.depth=6",
        "model.vision.heads=4", "model.qformer.width=256", "model.qformer.depth=4", "model.qformer.heads=4",
        "model.qformer.ffn_dim=1024", "model.qformer.num_query_tokens=32", "model.llm.hidden_size=512",
        "model.llm.num_layers=4", "model.llm.num_heads=8", "model.llm.intermediate_size=1376",
        "model.llm.vocab_size=400", "data.batch_size=8", "model.text.max_txt_len=32", "train.precision=fp32",
        "model.precision.vit=fp32", "model.precision.qformer=fp32", "model.precision.llm=fp32",
    ],
}  # fmt: skip


def stage1_recipes() -> list[str]:
    """The recipes the bench runs: those that train stage 1 from image shards."""
    return [name for name, recipe in RECIPES.items() if recipe().data.kind == "webdataset"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m mgpt4.bench.train",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpWithDefaults,
    )
    p.add_argument(
        "--recipe",
        default="tiny_stage1",
        choices=stage1_recipes(),
        help="a stage-1 recipe (mgpt4.train.recipes)",
    )
    p.add_argument(
        "--preset",
        choices=list(PRESETS),
        default=None,
        help="a named set of --set overrides (its model.qformer ones only where the recipe has a Q-Former)",
    )
    p.add_argument("--deepspeed", default="ds_configs/z2.json", help="the ZeRO settings")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override, after the preset's; repeatable",
    )
    p.add_argument(
        "--modes",
        default=None,
        help=f"comma-separated, of {', '.join(MODES)} (default: all; without a Q-Former, no cached ones)",
    )
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per mode")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first, per mode")
    p.add_argument(
        "--rounds", type=int, default=4, help="the timed steps of all modes run interleaved in rounds"
    )
    p.add_argument(
        "--pack-length", type=int, default=0, help="tokens per packed row; 0: fit one row to the batch"
    )
    p.add_argument("--pack-rows", type=int, default=1, help="packed rows per step")
    p.add_argument(
        "--checkpointing",
        choices=["config", "off", "on", "both"],
        default="config",
        help="gradient checkpointing of the LLM: as the recipe says, off, on, or each mode with both",
    )
    p.add_argument(
        "--compile",
        choices=["off", "on", "both"],
        default="off",
        help="train.compile (torch.compile; CUDA graphs on a GPU) for every mode: off, on, or each mode both ways",
    )
    p.add_argument(
        "--run-samples", type=float, default=5.12e6, help="samples of the run the end-to-end times are for"
    )
    p.add_argument("--extract-batch", type=int, default=64, help="images per vision forward in extraction")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file (rank 0)")
    p.add_argument(
        "--random-weights", action="store_true", help="no weight files: random weights at full size"
    )
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def choose_modes(arg: str | None, cfg: Config) -> list[str]:
    """The modes to run: `--modes`, or all that the model has (a feature cache needs a Q-Former)."""
    has_cache = cfg.model.qformer is not None
    if arg is None:
        return [m for m in MODES if has_cache or "cached" not in m]
    modes = [m.strip() for m in arg.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        raise SystemExit(f"--modes: choose from {', '.join(MODES)}, got {arg!r}")
    if not has_cache and any("cached" in m for m in modes):
        raise SystemExit(
            f"--modes: recipe {cfg.recipe} has no Q-Former, and a feature cache holds the Q-Former's "
            "output: choose plain or packed"
        )
    return modes


@dataclass
class Result:
    mode: str
    checkpointing: bool
    compiled: bool
    flops_per_sample: float
    samples_per_s: float
    tokens_per_s: float
    padding_fraction: float
    samples_per_step: float
    tflops_per_device: float
    mfu: float | None
    peak_memory_gib: float | None
    step_ms: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_data(cfg: Config, folder: str, samples: int, world_size: int) -> list[str]:
    """Synthetic image shards with stage-1 captions of 10-15 words (one or two shapes), enough for every
    batch of every rank; images a little larger than the model's, as web images are."""
    per_shard = 32
    shards = max(2 * world_size, math.ceil(samples / per_shard))
    size = cfg.model.vision.image_size
    paths, _ = write_shards(folder, shards, per_shard, min_size=size, max_size=int(size * 1.6), shapes=(1, 2))
    return paths


def prepare(args: argparse.Namespace, d: DistInfo) -> tuple[Config, dict]:
    recipe = get_recipe(args.recipe)
    preset = PRESETS[args.preset] if args.preset else []
    if recipe.model.qformer is None:  # the LLaMA-2 variant: the preset's ViT and LLM, no Q-Former
        preset = [o for o in preset if not o.startswith("model.qformer.")]
    if recipe.model.vision.kind == "hf":  # a tower folder's sizes are its own (the preset's ViT is EVA's)
        preset = [o for o in preset if not o.startswith(("model.vision.", "data.image_size="))]
    cfg = apply_overrides(recipe, preset + args.set)
    if args.random_weights:
        cfg.model.weights = WeightsConfig()
        cfg.train.demo_assets = False
    if cfg.data.kind != "webdataset":
        raise SystemExit("mgpt4.bench.train benchmarks stage 1: choose a recipe with data.kind webdataset")
    # Only training steps are timed, never a validation: its held-out shards (which a random-weights run
    # has none of) are not asked for.
    cfg.data.val = ValConfig()
    cfg.train.eval_every = 0
    cfg.data.sources = [SourceConfig(name="bench", shards="unused.tar")]  # filled with the bench shards
    cfg, ds_config, _ = resolve_config(cfg, args.deepspeed, d.world_size, check_inputs=False)
    ensure_demo_assets(cfg)
    return cfg, ds_config


def mode_config(cfg: Config, mode: str, shards: list[str], cache: str, pack: tuple[int, int]) -> Config:
    out = copy.deepcopy(cfg)
    dc = out.data
    dc.sources = [SourceConfig(name="bench", shards=shards)]
    dc.crops, dc.resampled = "sample", True  # the crops the cache holds, in every mode
    if "cached" in mode:
        dc.kind, dc.features_root, dc.crops = "features", cache, "stream"
    if "packed" in mode:
        dc.pack_rows, dc.pack_length = pack
    return out


def take_batches(cfg: Config, model: MiniGPT4, d: DistInfo, count: int) -> list[dict]:
    q = cfg.model.qformer
    loader = build_loader(
        cfg.data, model.tokenizer, cfg.model.text.max_txt_len, model.text_spec.end_sym, d.rank, d.world_size,
        context_lengths=[lay.context_length for lay in model.sample_layouts()],
        feature_shape=(q.num_query_tokens, q.width) if cfg.data.kind == "features" else None,
    )  # fmt: skip
    feeder = DeviceFeeder(loader, d.device, DTYPES[cfg.train.precision])
    batches = [b for b, _ in zip(feeder, range(count))]
    loader.close()
    return batches


def pack_shape(cfg: Config, model: MiniGPT4, shards: list[str], args: argparse.Namespace) -> tuple[int, int]:
    """Rows for the packed modes: `--pack-length` x `--pack-rows`, or one row sized to the batch's mean
    sample length (+5%), measured on the bench captions."""
    from mgpt4.data.tar_reader import TarReader
    from mgpt4.data.transforms import clean_caption

    longest = max(lay.length for lay in model.sample_layouts())  # answers of max_txt_len tokens
    if args.pack_length:
        return args.pack_rows, max(args.pack_length, longest)
    captions = []
    for path in shards[:4]:
        reader = TarReader(path)
        while (s := reader.next_sample()) is not None:
            captions.append(clean_caption(s[1]["txt"].decode()))
    ids = model.tokenizer([c + model.text_spec.end_sym for c in captions], add_special_tokens=False)[
        "input_ids"
    ]
    mean = model.sample_layouts()[0].context_length + statistics.mean(
        min(len(i), cfg.model.text.max_txt_len) for i in ids
    )
    per_row = cfg.data.batch_size * mean * 1.05 / args.pack_rows
    return args.pack_rows, max(longest, 8 * math.ceil(per_row / 8))


@dataclass
class Job:
    """One mode under one checkpointing and compile setting: its batches and what its timed steps held."""

    mode: str
    checkpointing: bool
    cfg: Config
    batches: list[dict]
    tally: Tally
    seconds: float = 0.0
    steps: int = 0
    peak_memory_gib: float | None = None
    compiled: bool = False

    @property
    def label(self) -> str:
        return f"{self.mode} compiled" if self.compiled else self.mode


def run_steps(engine, job: Job, first: int, count: int) -> int:
    """Run `count` steps of `job`; returns the torch threads they ran with (what the CPU peak is
    measured with)."""
    for i in range(first, first + count):
        batch = job.batches[i % len(job.batches)]
        for _ in range(job.cfg.train.grad_accum):
            loss = engine(**model_inputs(batch)).loss
            engine.backward(loss)
            engine.step()
            job.tally.add(batch)
    return torch.get_num_threads()


def time_jobs(
    engine,
    model: MiniGPT4,
    jobs: list[Job],
    d: DistInfo,
    args: argparse.Namespace,
    dtype: torch.dtype,
    compiled: CompiledParts | None = None,
) -> float | None:
    """Warm every job up, then time them in interleaved rounds: on a shared machine a burst of someone
    else's load then slows every mode alike instead of the one that happened to run then. On the CPU
    the matmul peak is measured in every round too, as the steps run (their thread count, the engine's
    dtype), and the best round's is returned: the MFU denominator. Compiled jobs compile in their
    warm-up (at least one step), never in a timed step: the graphs made by then are counted, and a
    timed step that compiles again is an error."""
    rounds = max(1, min(args.rounds, args.steps))
    peaks = []
    for job in jobs:
        set_job(model, job, compiled)
        run_steps(engine, job, 0, max(args.warmup, 1 if job.compiled else 0))
        job.tally.sync()
        job.tally.take_window()
    graphs = compiled_graphs()
    for r in range(rounds):
        count = args.steps // rounds + (1 if r < args.steps % rounds else 0)
        for job in jobs:
            set_job(model, job, compiled)
            if d.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(d.device)
            _sync(d.device)
            start = time.perf_counter()
            threads = run_steps(engine, job, args.warmup + job.steps, count)
            _sync(d.device)
            job.seconds += time.perf_counter() - start
            job.steps += count
            if d.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(d.device) / 2**30
                job.peak_memory_gib = max(job.peak_memory_gib or 0.0, peak)
        if d.device.type == "cpu":
            peaks.append(measure_matmul_tflops(dtype, threads))
    if compiled is not None and compiled_graphs() != graphs:
        raise RuntimeError(
            f"a timed step recompiled: {graphs} graphs after the warm-up, {compiled_graphs()} after the timed steps"
        )
    return max(peaks) if peaks else None


def set_job(model: MiniGPT4, job: Job, compiled: CompiledParts | None) -> None:
    set_checkpointing(model, job.checkpointing)
    if compiled is not None:
        compiled.enable(job.compiled)


def result(job: Job, d: DistInfo, peak: float | None) -> Result:
    job.tally.sync()
    w = job.tally.take_window()
    tflops = w.flops / job.seconds / d.world_size / 1e12
    return Result(
        mode=job.mode,
        checkpointing=job.checkpointing,
        compiled=job.compiled,
        flops_per_sample=w.flops / max(w.samples, 1),
        samples_per_s=w.samples / job.seconds,
        tokens_per_s=w.tokens / job.seconds,
        padding_fraction=w.padding_fraction,
        samples_per_step=w.samples / job.steps,
        tflops_per_device=tflops,
        mfu=tflops / peak if peak else None,
        peak_memory_gib=job.peak_memory_gib,
        step_ms=1000 * job.seconds / job.steps,
    )


def set_checkpointing(model: MiniGPT4, on: bool) -> None:
    if on:
        model.enable_gradient_checkpointing()
        return
    # Newer transformers renamed the call (as MiniGPT4.enable_gradient_checkpointing handles).
    disable = (
        getattr(model.llm, "activation_checkpointing_disable", None)
        or model.llm.gradient_checkpointing_disable
    )
    disable()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    d = eng_mod.init_distributed(60.0)
    work = tempfile.mkdtemp(prefix="mgpt4-bench-") if d.rank == 0 else None
    try:
        cfg, ds_config = prepare(args, d)
        modes = choose_modes(args.modes, cfg)
        box = [work]
        if torch.distributed.is_initialized():
            torch.distributed.broadcast_object_list(box, src=0)
        work = box[0]
        seed_all(cfg.train.seed)
        built_on = None if cfg.model.weights.llm or zero_stage(ds_config) == 3 else d.device
        _zero, model, engine, _, _ = build_model_and_engine(cfg, ds_config, built_on)
        samples = (args.warmup + args.steps) * cfg.data.batch_size * d.world_size
        if d.rank == 0:
            shards = bench_data(cfg, os.path.join(work, "images"), samples, d.world_size)
        barrier()
        shards = sorted(os.path.join(work, "images", f) for f in os.listdir(os.path.join(work, "images")))
        if (
            model.tokenizer is None
        ):  # random weights: a tokenizer of the LLM's vocabulary, trained on the captions
            model.tokenizer = bench_tokenizer(cfg, shards, work, d)
        cached = any("cached" in m for m in modes)  # the cache is made (and timed) only for them
        extraction = (
            time_extraction(cfg, model, shards, os.path.join(work, "features"), args, d) if cached else None
        )
        pack = pack_shape(cfg, model, shards, args)
        settings = {"config": [False, True], "off": [False], "on": [True], "both": [False, True]}[
            args.checkpointing
        ]
        if args.checkpointing == "config":
            settings = [cfg.model.gradient_checkpointing]
        compile_settings = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
        jobs = []
        for mode in modes:
            mcfg = mode_config(cfg, mode, shards, os.path.join(work, "features"), pack)
            batches = take_batches(mcfg, model, d, args.warmup + args.steps)
            cached = mcfg.data.kind == "features"
            for ckpt in settings:  # the same batches with and without checkpointing, compiled or not
                for comp in compile_settings:
                    tally = Tally(mcfg.model, model.sample_layouts(), cached, d.device)
                    jobs.append(Job(mode, ckpt, mcfg, batches, tally, compiled=comp))
        model.train()
        dtype = DTYPES[cfg.train.precision]
        compiled = CompiledParts(model, d.device) if args.compile != "off" else None
        measured = time_jobs(engine, model, jobs, d, args, dtype, compiled)
        peak = cfg.train.peak_tflops or measured or device_peak_tflops(d.device, dtype)
        results = [result(job, d, peak) for job in jobs]
        if d.rank == 0:
            report(cfg, model, d, args, pack, measured, peak, results, extraction)
    finally:
        shutdown()
        if d.rank == 0:  # the bench's shards, tokenizer and cache
            shutil.rmtree(work, ignore_errors=True)


def bench_tokenizer(cfg: Config, shards: list[str], work: str, d: DistInfo):
    from mgpt4.data.tar_reader import TarReader
    from mgpt4.tokenizer import load_tokenizer, train_tiny_tokenizer

    folder = os.path.join(work, "tokenizer")
    if d.rank == 0:
        captions = []
        for path in shards:
            reader = TarReader(path)
            while (s := reader.next_sample()) is not None:
                captions.append(s[1]["txt"].decode())
        train_tiny_tokenizer(captions * 4, folder, vocab_size=cfg.model.llm.vocab_size)
    barrier()
    return load_tokenizer(folder)


def time_extraction(
    cfg: Config, model: MiniGPT4, shards: list[str], out: str, args: argparse.Namespace, d: DistInfo
) -> dict:
    """Extract the bench shards with the model's own vision path (fp16, as a real cache); every rank
    takes its share, as `python -m mgpt4.features extract` under a launcher does."""
    ecfg = copy.deepcopy(cfg)
    ecfg.data.sources = [SourceConfig(name="bench", shards=shards)]
    info = RankInfo(d.rank, d.world_size, d.local_rank)
    opts = ExtractOptions(
        out=out, batch_size=args.extract_batch, num_workers=cfg.data.num_workers, dtype="fp16",
        device=str(d.device) if d.device.type == "cpu" else "cuda",
    )  # fmt: skip
    model.eval()
    barrier()
    _sync(d.device)
    start = time.perf_counter()
    reports = extract(ecfg, opts, info, model=model)
    _sync(d.device)
    barrier()
    elapsed = time.perf_counter() - start
    samples = sum(r.samples for r in reports)
    total = torch.tensor([samples], dtype=torch.int64, device=d.device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    count = int(total.item())
    return {"samples": count, "seconds": elapsed, "samples_per_s": count / elapsed}


def report(
    cfg: Config,
    model: MiniGPT4,
    d: DistInfo,
    args: argparse.Namespace,
    pack: tuple[int, int],
    measured: float | None,
    peak: float | None,
    results: list[Result],
    extraction: dict | None,
) -> None:
    device_name = torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else "CPU"
    params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # full sizes under ZeRO-3
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    print(f"recipe: {cfg.recipe}  device: {device_name} x {d.world_size}  precision: {cfg.train.precision}")
    print(f"params: {params / 1e6:.1f}M (trainable {trainable:,})")
    seq = max(lay.length for lay in model.sample_layouts())
    print(
        f"micro batch: {cfg.data.batch_size}  grad accum: {cfg.train.grad_accum}  unpacked sequence: {seq} tokens  "
        f"packed: {pack[0]} row(s) x {pack[1]} tokens, at most {cfg.data.batch_size} samples"
    )
    if args.compile != "off":
        print(f"compiled graphs: {compiled_graphs()}, all made in the warm-up steps")
    if measured is not None:
        print(
            f"CPU matmul peak (measured, {cfg.train.precision}): {measured:.4f} TFLOP/s "
            f"with {torch.get_num_threads()} thread(s), as the steps ran; the best of {max(1, min(args.rounds, args.steps))} rounds"
        )
    for r in results:
        label = f"{r.mode} compiled" if r.compiled else r.mode
        print(f"== {label}{' (gradient checkpointing)' if r.checkpointing else ''} ==")
        print(f"model FLOPs per sample: {r.flops_per_sample / 1e9:.2f} GFLOP")
        print(f"step time: {r.step_ms:.1f} ms")
        print(f"samples/s: {r.samples_per_s:.2f}")
        print(f"tokens/s: {r.tokens_per_s:.1f}")
        print(f"padding: {100 * r.padding_fraction:.1f}%")
        print(f"TFLOP/s per device: {r.tflops_per_device:.4f}")
        if r.mfu is not None:
            print(f"MFU: {100 * r.mfu:.2f}% of {peak:.4g} TFLOP/s")
        if r.peak_memory_gib is not None:
            print(f"peak memory: {r.peak_memory_gib:.2f} GiB")
    print()
    print(
        "| mode | checkpointing | GFLOP/sample | samples/s | tokens/s | padding | samples/step | vs plain | MFU | peak GiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        base = next(
            (
                b
                for b in results
                if b.mode == "plain" and b.checkpointing == r.checkpointing and not b.compiled
            ),
            None,
        )
        ratio = f"{r.samples_per_s / base.samples_per_s:.2f}x" if base else "-"
        mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "-"
        mem = f"{r.peak_memory_gib:.1f}" if r.peak_memory_gib is not None else "-"
        print(
            f"| {f'{r.mode} compiled' if r.compiled else r.mode} | {'on' if r.checkpointing else 'off'} | {r.flops_per_sample / 1e9:.4g} | {r.samples_per_s:.1f} "
            f"| {r.tokens_per_s:.0f} | {100 * r.padding_fraction:.1f}% | {r.samples_per_step:.1f} | {ratio} | {mfu} | {mem} |"
        )
    print()
    rate = None
    if extraction is not None:
        rate = extraction["samples_per_s"]
        print(
            f"extraction: {extraction['samples']} samples in {extraction['seconds']:.1f} s = {rate:.1f} samples/s"
        )
    costs = end_to_end(results, rate, args.run_samples)
    if costs:
        print(f"end to end for {args.run_samples:,.0f} samples, from the rates above (hours):")
        for name, hours in costs.items():
            print(f"  {name}: {hours:.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "device": device_name, "world_size": d.world_size, "recipe": cfg.recipe,
                    "precision": cfg.train.precision, "params": params, "batch_size": cfg.data.batch_size,
                    "pack": list(pack), "peak_tflops": peak, "extraction": extraction, "end_to_end_hours": costs,
                    "results": [asdict(r) for r in results],
                },
                f, indent=2,
            )  # fmt: skip


def end_to_end(results: list[Result], extract_rate: float | None, samples: float) -> dict[str, float]:
    """Hours for one run and for three runs (three LLMs, or three tries) over `samples`: a run from
    images pays the vision path every time; a cache pays it once, in extraction (`extract_rate`
    samples/s; None: no cache was made)."""
    eager = [r for r in results if not r.compiled] or results
    rate = {r.mode: r.samples_per_s for r in eager if not r.checkpointing} or {
        r.mode: r.samples_per_s for r in eager
    }
    if "plain" not in rate:
        return {}
    hours = lambda n: samples / n / 3600  # noqa: E731
    out = {"one run, plain": hours(rate["plain"])}
    if "packed" in rate:
        out["one run, packed"] = hours(rate["packed"])
    if "packed+cached" in rate and extract_rate:
        out["one run, extraction + packed+cached"] = hours(extract_rate) + hours(rate["packed+cached"])
    out["three runs, plain"] = 3 * hours(rate["plain"])
    if "packed" in rate:
        out["three runs, packed"] = 3 * hours(rate["packed"])
    if "packed+cached" in rate and extract_rate:
        out["three runs on one cache, extraction + 3 x packed+cached"] = hours(extract_rate) + 3 * hours(
            rate["packed+cached"]
        )
    return out


if __name__ == "__main__":
    main()
