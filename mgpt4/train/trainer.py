"""The trainer: an explicit build order, then a training loop that fits on a screen.

Build order: dist -> config (resolved and checked, nothing written) -> the run folder locked (rank 0,
until the run ends) -> where to start (the checkpoints checked, nothing written) -> demo assets -> seed ->
model (build, load, freeze) -> engine -> data -> checkpoint (resume) -> run folder (its first write) ->
metrics -> loop.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mgpt4.config import DTYPES, Config
from mgpt4.data.batches import model_inputs
from mgpt4.data.feeder import DeviceFeeder
from mgpt4.data.loader import build_loader
from mgpt4.dist import DistInfo, all_mean, barrier, set_timeout, shutdown
from mgpt4.logs import get_logger
from mgpt4.model import MiniGPT4, apply_freeze, build_model, load_weights
from mgpt4.model.layout import IMAGE, Layout, Segment
from mgpt4.model.llm import llm_sizes
from mgpt4.train import engine as eng_mod
from mgpt4.train import resume as resume_mod
from mgpt4.train import run_lock
from mgpt4.train.assets import ensure_demo_assets
from mgpt4.train.compiled import check_compile, compile_model, compiled_graphs
from mgpt4.train.ds_config import zero_stage
from mgpt4.train.flops import device_peak_tflops
from mgpt4.train.metrics import Metrics, device_memory_gb, log_failure
from mgpt4.train.preemption import Preemption
from mgpt4.train.resolve import resolve_config
from mgpt4.train.run_state import save_checkpoint
from mgpt4.train.tally import Tally
from mgpt4.train.validation import Validation, build_validation

log = get_logger(__name__)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(kw_only=True)
class Run:
    """What the loop needs, and what a restart needs: `state_dict()` / `load_state_dict()`."""

    cfg: Config
    dist: DistInfo
    model: MiniGPT4
    engine: Any
    optimizer: Any
    scheduler: Any
    zero: eng_mod.ZeroSetup  # holds HfDeepSpeedConfig alive as long as the engine
    feeder: DeviceFeeder
    tally: Tally  # what the steps since the last sync held, exactly
    preemption: Preemption
    validation: Validation | None = None  # data.val: the held-out loss
    metrics: Metrics = field(init=False)  # made after the restore: its first write comes after every check
    step: int = 0
    samples_seen: int = 0
    sample_images: torch.Tensor | None = None  # or, from a feature cache, their features
    reported: bool = False

    def __post_init__(self) -> None:
        eng_mod.require_zero(self.engine)  # at the start, not at the first save

    def state_dict(self) -> dict[str, Any]:
        """Everything a restart needs (a collective call: the trainable set is gathered from every rank):
        the trainable weights with their Adam moments and step, the schedule, the engine's counters and
        the fp16 loss scale ("trainable"), step, samples seen, the data pass, the same on every rank, and
        the sample images (rank 0's are saved: only rank 0 writes the sample grid); and under "rank"
        this rank's data position and RNG. The tally holds nothing more once synced (`save` syncs it):
        its window is the log window, which restarts with the run as the loss and timing windows do."""
        data = self.feeder.state_dict()
        return {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "data_pass": int(data["data_pass"]),
            "sample_images": self.sample_images,
            "trainable": eng_mod.trainable_state_dict(self.engine, self.model),
            "rank": {"data": data, "rng": resume_mod.rng_state()},
        }

    def load_state_dict(self, state: dict[str, Any], fresh_data: bool = False) -> None:
        """Continue from `state` (a `state_dict()`, from any number of ranks). Without a "rank" part, or
        with `fresh_data`, the data starts the pass after the saved one; raises DataStateMismatch when
        the saved position belongs to other data, ResumeError when the trainable set does not match."""
        self.step, self.samples_seen = int(state["step"]), int(state["samples_seen"])
        self.sample_images = state["sample_images"]
        eng_mod.load_trainable_state_dict(self.engine, self.model, state["trainable"])
        own = state.get("rank")
        if own is not None:
            resume_mod.set_rng_state(own["rng"])
        if own is None or fresh_data:
            self.feeder.source.start_pass(int(state["data_pass"]) + 1)
        else:
            self.feeder.load_state_dict(own["data"])


def build_model_and_engine(cfg: Config, ds_config: dict[str, Any], device: torch.device | None = None):
    """Steps 5-7 of the build order, shared with the benchmark: (zero setup, model, engine, optimizer, scheduler)."""
    zero = eng_mod.ZeroSetup(cfg, ds_config)
    model = build_model(cfg.model, device=device)  # 5. model: build, load
    load_weights(model)
    apply_freeze(model)  # 6. freeze
    zero.cast_for_engine(model)
    if cfg.model.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    engine, optimizer, scheduler = eng_mod.create_engine(model, cfg, ds_config)  # 7. engine
    return zero, model, engine, optimizer, scheduler


def build(cfg: Config, ds_path: str, resume: bool, d: DistInfo, preemption: Preemption) -> Run:
    """Everything after the process group and the preemption signal's block (step 1), in the declared order."""
    cfg, ds_config, _ = resolve_config(cfg, ds_path, d.world_size)  # 2. config: checks, no writes
    check_compile(cfg.train.compile, zero_stage(ds_config))
    run_lock.take(cfg.train.output_dir, d.rank)  # no other run reads or writes the folder from here on
    start = resume_mod.plan_start(cfg, d.world_size, resume)  # the checkpoints checked, no writes
    ensure_demo_assets(cfg)  # 3. demo assets: rank 0 generates, the others then find them
    seed_all(cfg.train.seed)  # 4. seed: the same on every rank, so random parts start equal
    zero, model, engine, optimizer, scheduler = build_model_and_engine(cfg, ds_config)
    if cfg.train.compile:
        compile_model(model, d.device)  # compiles on the first step
    text = cfg.model.text
    layouts = model.sample_layouts()  # one per instruction: what the loader packs and the tally counts
    conversations = cfg.data.kind == "conversations"
    if conversations:  # a conversation's text is all in text_ids; the tally adds its image tokens
        layouts = (Layout((Segment(IMAGE, model.num_image_tokens),)),)
    loader = build_loader(  # 8. data: the loader draws each batch's instruction (and packs its rows)
        cfg.data,
        model.tokenizer,
        text.max_txt_len,
        model.text_spec.end_sym,  # the template's when the config leaves it to it
        d.rank,
        d.world_size,
        num_instructions=len(text.instructions),
        context_lengths=[lay.context_length for lay in layouts],
        feature_shape=cfg.model.image_token_shape() if cfg.data.kind == "features" else None,
        conversation=model.conversation_encoder(cfg.data.conversation_tokens) if conversations else None,
    )
    validation = build_validation(cfg, model, d.rank, d.world_size, d.device)  # held-out set, read once
    run = Run(
        cfg=cfg,
        dist=d,
        model=model,
        engine=engine,
        optimizer=optimizer,
        scheduler=scheduler,
        zero=zero,
        feeder=DeviceFeeder(loader, d.device, DTYPES[cfg.train.precision]),
        tally=Tally(cfg.model, layouts, cfg.data.kind == "features", d.device, llm_sizes(model.llm.config)),
        preemption=preemption,
        validation=validation,
    )
    resume_mod.restore(start, run, d.rank, d.world_size)  # 9. checkpoint
    resume_mod.prepare_output(cfg, start, ds_config, d.rank)  # 10. the run folder's first write
    barrier()
    peak = cfg.train.peak_tflops or device_peak_tflops(d.device, DTYPES[cfg.train.precision])  # 11. metrics
    run.metrics = Metrics(
        cfg.train.output_dir, d.rank, d.world_size, cfg.train.steps, peak, start_step=run.step
    )
    return run


def save(run: Run) -> None:
    run.samples_seen += run.tally.sync()  # exact over all ranks, packed or not
    folder = save_checkpoint(run.cfg, run.state_dict())
    log.info(f"saved {folder}")


def write_samples(run: Run) -> None:
    """Captions for the fixed sample images; every rank generates (ZeRO-3 needs all of them).

    This runs outside the engine's forward, where ZeRO-3 fetches a partitioned parameter only through
    its own module's call: `encode_img` reads the ViT's own parameters (`pos_embed`, `cls_token`) under
    `forward_features` and the model's `query_tokens` by attribute, so those are gathered here; every
    part it calls (ViT blocks, `ln_vision`, Q-Former, projection, LLM) fetches its own.
    """
    text = run.cfg.model.text
    prompt = run.model.sample_prompts()[0]  # the first trained prompt, as the layout lays it out
    images = run.sample_images if run.sample_images.dim() == 4 else None  # features from a cache: no pixels
    run.model.eval()
    try:
        with torch.no_grad():
            if images is not None:
                with eng_mod.gathered(run.model.visual_encoder, run.model, recurse=False):
                    embeds = run.model.encode_img(images)
            else:
                embeds = run.model.project_features(run.sample_images)
            captions = run.model.generate_from_embeds(
                [embeds],
                prompt,
                max_new_tokens=text.max_txt_len,
                synced_gpus=eng_mod.is_zero3(run.engine),
            )
    finally:
        run.model.train()
    run.metrics.write_samples(run.step, images, [c.split("\n")[0].strip() for c in captions])


def write_samples_or_warn(run: Run) -> None:
    """`write_samples` as the auxiliary it is: it runs after the step's checkpoint is saved, and a
    failure (generation, images, TensorBoard) is one warning line; the run goes on."""
    try:
        write_samples(run)
    except Exception as e:
        log_failure(f"step {run.step}: sample captions", e)


def log_window(run: Run, loss_sum: torch.Tensor, steps: int) -> None:
    loss = all_mean(float(loss_sum.item()) / max(steps, 1), run.dist.device)
    run.samples_seen += run.tally.sync()
    grad_norm = run.engine.get_global_grad_norm()
    scalars = {
        "train/loss": loss,
        "train/lr": run.scheduler.get_last_lr()[0],
        "train/samples_seen": run.samples_seen,
    }
    if grad_norm is not None:
        scalars["train/grad_norm"] = float(grad_norm)
    counts: list[dict[str, int]] = [{}] * run.dist.world_size
    dist.all_gather_object(counts, run.feeder.stats())
    skipped: dict[str, int] = {}
    for c in counts:
        for reason, n in c.items():
            skipped[reason] = skipped.get(reason, 0) + n
    run.metrics.write(run.step, scalars, device_memory_gb(run.dist.device), skipped, run.tally.take_window())
    if run.cfg.train.compile:  # training steps add none after the first
        log.info(f"step {run.step}: compiled graphs: {compiled_graphs()}")
    if not run.reported:
        # Adam's state exists only after the first step, so where memory lives is reported here.
        report = eng_mod.memory_report(run.engine, run.optimizer, run.model)
        run.reported = True
        if run.dist.rank == 0:
            with open(os.path.join(run.cfg.train.output_dir, "engine.json"), "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2)
            log.info(f"engine: {json.dumps(report)}")


def train_loop(run: Run) -> None:
    t = run.cfg.train
    end = min(t.stop_at or t.steps, t.steps)
    batches = iter(run.feeder)
    run.model.train()
    loss_sum, window = torch.zeros((), device=run.dist.device), 0
    first = run.step + 1
    while run.step < end:
        waited = 0.0
        for _ in range(t.grad_accum):
            batch = next(batches)
            waited += run.feeder.last_wait_s
            if run.sample_images is None:
                pixels_or_features = batch["image"] if "image" in batch else batch["features"]
                run.sample_images = pixels_or_features[: t.num_sample_images].detach().clone().cpu()
            loss = run.engine(**model_inputs(batch)).loss
            run.engine.backward(loss)
            run.engine.step()
            run.tally.add(batch)
            loss_sum += loss.detach().float() / t.grad_accum
        run.step += 1
        if run.step == first:  # start-up is over: a hung collective now means a dead rank
            set_timeout(t.comm_timeout_min)
        window += 1
        run.metrics.add_step(waited)
        last = run.step == end
        if run.validation is not None and run.validation.due(run.step):
            run.metrics.add_eval(*run.validation.evaluate(run.engine, run.model))
        if run.step % t.log_every == 0 or last:
            log_window(run, loss_sum, window)
            loss_sum, window = torch.zeros((), device=run.dist.device), 0
        saved = run.step % t.save_every == 0 or last
        if saved:
            save(run)  # before any auxiliary output: a failure there never costs the checkpoint
        if not last and run.preemption.requested(run.dist.device):  # every rank asks, save step or not
            if not saved:
                save(run)
            if run.dist.rank == 0:
                run.preemption.requeue(run.step)
            return  # the job is ending: the checkpoint and the requeue, not this step's samples
        if (t.sample_every and run.step % t.sample_every == 0) or run.step == t.steps:
            write_samples_or_warn(run)


def train(cfg: Config, ds_path: str, resume: bool = True) -> None:
    d = eng_mod.init_distributed(cfg.train.startup_timeout_min)  # 1. dist
    # SIGUSR1 -> save and requeue at a step boundary. Blocked before any worker starts, so none dies of it.
    preemption = Preemption(d.rank)
    clean = False
    try:
        run = build(cfg, ds_path, resume, d, preemption)
        try:
            if run.step >= min(run.cfg.train.stop_at or run.cfg.train.steps, run.cfg.train.steps):
                log.info(f"nothing to do: the run is already at step {run.step}")
            else:
                train_loop(run)
        finally:
            run.metrics.close()
            run.feeder.source.close()
        clean = True
    finally:
        preemption.close()
        run_lock.release()
        shutdown(clean)
