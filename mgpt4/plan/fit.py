"""Per-rank memory of a training config under each ZeRO setting, the largest micro-batch that fits a GPU,
and the setting to use.

A rank holds: the frozen weights (ZeRO-2 whole; ZeRO-3 a 1/N partition of each plus the small ones it
keeps whole, and the layers it gathers for the step: the one running and the one prefetched, or as many
as DeepSpeed's prefetcher keeps gathered, up to `stage3_max_live_parameters` elements (at 1e9 and 7B: 2 GB
of bf16, about five decoder layers); with
parameter offload the partition lives in host memory instead), the trainable set and its AdamW state
(`optimizer.py`), the activations of one micro-batch (`activations.py`), and transients: the logits in the
LLM's dtype and the loss's gradient while the backward starts, and under gradient checkpointing one
layer's recomputed activations. `RESERVE_BYTES` + `RESERVE_FRACTION` of the GPU stand for the CUDA
context, the kernels' workspaces and the allocator's fragmentation.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from mgpt4.config import DTYPES, Config
from mgpt4.model import MiniGPT4
from mgpt4.model.layout import IMAGE_ONLY
from mgpt4.plan.activations import FP32, Batch, LLMShape, activation_bytes, layer_bytes
from mgpt4.plan.optimizer import TrainableBytes, trainable_bytes
from mgpt4.plan.weights import Param, build_meta, by_part, count_params
from mgpt4.strict_config import ConfigError
from mgpt4.train.resolve import check_precision

GIB = 1024**3
RESERVE_BYTES = 1 * GIB  # CUDA context and library workspaces
RESERVE_FRACTION = 0.05  # the caching allocator's fragmentation
# ds_configs/z3*.json: parameters below this many elements stay whole on every rank.
PERSISTENCE_THRESHOLD = 100_000
# ds_configs/z3*.json's stage3_max_live_parameters (DeepSpeed's default). DeepSpeed's coordinator fetches the
# running module whatever it holds, and prefetches the coming ones, stage3_prefetch_bucket_size elements at
# each fetch, until this many elements are gathered (partitioned_param_coordinator.py); the ones kept for
# reuse (stage3_max_reuse_distance) count towards it. A long model therefore holds about this many.
MAX_LIVE_PARAMETERS = 1_000_000_000
CHARS_PER_TOKEN = 3  # a conservative guess for prompt text when no tokenizer is at hand


@dataclass(frozen=True)
class Setting:
    name: str
    stage: int
    offload: bool


SETTINGS = (Setting("z2", 2, False), Setting("z3", 3, False), Setting("z3_offload", 3, True))


@dataclass(frozen=True)
class StagePlan:
    """One ZeRO setting on one rank, in bytes."""

    setting: Setting
    frozen: dict[tuple[str, str], int]  # resident on the GPU, by (part, dtype)
    gathered: int  # ZeRO-3: layers gathered for the step
    host: int  # parameter offload: the partition held in host memory
    trainable: TrainableBytes
    activations: dict[bool, int]  # per micro-batch, by gradient checkpointing
    transient: dict[bool, int]
    fixed: int  # everything but activations and transients
    largest: dict[bool, int]  # largest micro-batch (padded: samples; packed: rows) that fits
    fits: dict[bool, bool]  # the config's micro-batch
    refused: str | None  # why the trainer refuses this setting for the config (ConfigError), if it does


@dataclass(frozen=True)
class Plan:
    cfg: Config
    gpus: int
    gpu_bytes: int
    params: list[Param]
    batch: Batch
    context_tokens: int
    context_exact: bool
    stages: list[StagePlan]
    recommendation: Choice | None


def context_length(cfg: Config, model, tokenizer) -> tuple[int, bool]:
    """Tokens before the answer (BOS, prompt, image tokens), the longest over the recipe's instructions:
    exact with a tokenizer (the sample layout), else estimated from the prompt's characters."""
    if tokenizer is not None:
        model.tokenizer = tokenizer
        return max(lay.context_length for lay in model.sample_layouts()), True
    n_img = model.num_image_tokens
    text = cfg.model.text
    prompts = text.instructions or [IMAGE_ONLY]
    wrap = text.prompt_template or ("{}" if not text.instructions else "###Human: {} ###Assistant: ")
    longest = max(len(wrap.replace("{}", p).replace("<ImageHere>", "")) for p in prompts)
    return 1 + n_img + math.ceil(longest / CHARS_PER_TOKEN), False


def micro_batch(cfg: Config, model, context: int, rows: int | None = None) -> Batch:
    """The config's micro-batch (or `rows` rows of it) as the LLM sees it."""
    d = cfg.model
    n_img, width = d.image_token_shape()
    if cfg.data.packs():
        r = rows if rows is not None else cfg.data.pack_rows
        # A packed batch holds at most batch_size samples; more rows hold proportionally more.
        samples = math.ceil(cfg.data.batch_size * r / cfg.data.pack_rows)
        return Batch(r, cfg.data.pack_length, samples, True, n_img, width, context + d.text.max_txt_len)
    r = rows if rows is not None else cfg.data.batch_size
    return Batch(r, context + d.text.max_txt_len, r, False, n_img, width)


def _frozen(params: list[Param], gpus: int, s: Setting) -> tuple[dict[tuple[str, str], int], int, int]:
    """(resident frozen bytes by part and dtype, gathered bytes, host bytes) per rank."""
    frozen = [p for p in params if not p.trainable]
    if s.stage < 3:
        return by_part(params, trainable=False), 0, 0
    resident: dict[tuple[str, str], int] = {}
    host = 0
    for p in frozen:
        whole = p.numel < PERSISTENCE_THRESHOLD
        share = p.nbytes if whole else math.ceil(p.nbytes * math.ceil(p.numel / gpus) / p.numel)
        if s.offload and not whole:
            host += share
        else:
            resident[(p.part, p.dtype)] = resident.get((p.part, p.dtype), 0) + share
    layers: dict[str, tuple[int, int]] = {}  # layer -> (bytes, elements) gathered with it
    for p in params:
        if p.numel >= PERSISTENCE_THRESHOLD:
            nbytes, numel = layers.get(p.layer, (0, 0))
            layers[p.layer] = (nbytes + p.nbytes, numel + p.numel)
    largest = sorted(layers.values(), reverse=True)
    running = sum(b for b, _ in largest[:2])  # the one running and the one prefetched
    # Up to MAX_LIVE_PARAMETERS elements gathered at once; the largest layers stand for whichever are (an
    # upper bound). A model smaller than that is gathered whole during the step.
    live, room = 0, MAX_LIVE_PARAMETERS
    for nbytes, numel in largest:
        if room <= 0:
            break
        take = min(numel, room)
        live, room = live + nbytes * take // numel, room - take
    return resident, max(running, live), host


def plan(cfg: Config, gpus: int, gpu_memory_gb: float, tokenizer=None, model: MiniGPT4 | None = None) -> Plan:
    """The per-rank memory of `cfg` (a resolved config: `data.batch_size` per rank) on `gpus` GPUs of
    `gpu_memory_gb` GB (10^9 bytes, as GPUs are sold), under z2, z3 and z3_offload. `model`: its
    `build_meta(cfg.model)`, when one is at hand (a build of a 13B model takes seconds)."""
    cfg = copy.deepcopy(cfg)
    gpu_bytes = int(gpu_memory_gb * 1e9)
    model = model if model is not None else build_meta(cfg.model)
    params = count_params(model, cfg.model.precision.llm)
    shape = LLMShape.of(model.llm.config)
    context, exact = context_length(cfg, model, tokenizer)
    batch = micro_batch(cfg, model, context)
    engine = DTYPES[cfg.train.precision].itemsize
    llm_bytes = cfg.model.precision.llm_dtype().itemsize
    attn = cfg.model.attn_implementation

    def acts(rows: int, ckpt: bool) -> tuple[int, int]:
        b = micro_batch(cfg, model, context, rows)
        a = activation_bytes(shape, b, llm_bytes, engine, attn, ckpt)
        t = b.rows * b.length * shape.vocab * (llm_bytes + FP32)
        if ckpt:
            t += layer_bytes(shape, b, llm_bytes, attn, False)
        return a, t

    budget = gpu_bytes - RESERVE_BYTES - int(RESERVE_FRACTION * gpu_bytes)
    stages = []
    for s in SETTINGS:
        frozen, gathered, host = _frozen(params, gpus, s)
        train = trainable_bytes(params, gpus, s.stage, engine)
        if s.offload:  # the trainable partition is offloaded with the rest; its optimizer state is not
            host += train.module
            train = TrainableBytes(0, train.grads, train.master, train.moments)
        fixed = sum(frozen.values()) + gathered + train.total
        activations, transient, largest, fits = {}, {}, {}, {}
        for ckpt in (False, True):
            a, t = acts(batch.rows, ckpt)
            activations[ckpt], transient[ckpt] = a, t
            fits[ckpt] = fixed + a + t <= budget
            lo, hi = 0, 1
            while fixed + sum(acts(hi, ckpt)) <= budget and hi < 1 << 20:
                lo, hi = hi, hi * 2
            while hi - lo > 1:  # the largest rows count that fits: bytes grow with rows
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if fixed + sum(acts(mid, ckpt)) <= budget else (lo, mid)
            largest[ckpt] = lo
        try:
            check_precision(cfg, s.stage)
            refused = None
        except ConfigError as e:
            refused = str(e)
        stages.append(
            StagePlan(s, frozen, gathered, host, train, activations, transient, fixed, largest, fits, refused)
        )
    return Plan(
        cfg, gpus, gpu_bytes, params, batch, context, exact, stages, recommend(cfg, gpus, batch, stages)
    )


@dataclass(frozen=True)
class Choice:
    """The recommended setting: ZeRO setting, checkpointing, micro-batch per rank and step (samples, or
    packed rows), gradient accumulation steps, the --deepspeed/--set flags and why."""

    setting: str
    checkpointing: bool
    per_rank: int
    grad_accum: int
    flags: str
    why: str

    def short(self) -> str:
        ckpt = " + ckpt" if self.checkpointing else ""
        accum = f", accum {self.grad_accum}" if self.grad_accum > 1 else ""
        return f"{self.setting}{ckpt}, micro-batch {self.per_rank}{accum}"


def recommend(cfg: Config, gpus: int, batch: Batch, stages: list[StagePlan]) -> Choice | None:
    """The first setting, in order of speed (z2 before z3 before offload; checkpointing off before on),
    that runs the config's micro-batch; else the one that runs the most of it, with the gradient
    accumulation that keeps the global batch; None when not one row fits."""
    order = [(s, ckpt) for s in stages if s.refused is None for ckpt in (False, True)]
    unit = "data.pack_rows" if batch.packed else "data.batch_size"
    t = cfg.train
    for s, ckpt in order:
        if s.fits[ckpt]:
            why = f"the recipe's micro-batch fits ({unit}={batch.rows} per rank)"
            return Choice(s.setting.name, ckpt, batch.rows, t.grad_accum, _flags(s, ckpt), why)
    if not order or max(s.largest[ckpt] for s, ckpt in order) < 1:
        return None
    s, ckpt = max(order, key=lambda o: o[0].largest[o[1]])
    most = s.largest[ckpt]
    accum = math.ceil(batch.rows / most)
    if t.global_batch_size is not None and not batch.packed:
        # The micro-batch is derived: global / (ranks x accumulation) must be whole and fit.
        while t.global_batch_size % (gpus * accum) or t.global_batch_size // (gpus * accum) > most:
            accum += 1
        sets = f" --set train.grad_accum={accum}"
        per_rank = t.global_batch_size // (gpus * accum)
    else:
        per_rank = math.ceil(batch.rows / accum)
        accum *= t.grad_accum
        sets = f" --set {unit}={per_rank} --set train.grad_accum={accum}"
    why = f"{per_rank} per rank and step: the recipe's {batch.rows} does not fit; the accumulation keeps the global batch"
    return Choice(s.setting.name, ckpt, per_rank, accum, _flags(s, ckpt) + sets, why)


def _flags(s: StagePlan, ckpt: bool) -> str:
    flag = f"--deepspeed ds_configs/{s.setting.name}.json"
    return flag + (" --set model.gradient_checkpointing=true" if ckpt else "")
