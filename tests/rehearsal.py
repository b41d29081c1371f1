"""A rehearsal at real shapes on CPU: random weights in the official layouts, then the real launchers.

    python -m tests.rehearsal --size full --workdir /scratch/rehearsal     # ~23 GB RAM, ~16 GB disk, ~25 min
    python -m tests.rehearsal --size small                                 # the same path, toy sizes
    python -m pytest -m rehearsal                                          # the full size, as a test

1. Writes `eva_vit_g.pth` (ViT-g, fp16), the BLIP-2 file (ln_vision, Q-Former, query tokens and the
   parts MiniGPT-4 drops) and a LLaMA-7B-shaped Hugging Face folder (bf16, one safetensors shard per
   layer and an index; a small trained sentencepiece tokenizer) with `tests/official_files.py`, and a few
   synthetic image shards and a cc_sbu_align folder.
2. Stage 1: 2 steps of `stage1_vicuna7b` under ZeRO-3 (`ds_configs/z3.json`) on 2 CPU ranks, bf16,
   global batch 2, a checkpoint and sample captions at step 2 (the step that used to crash, issue 28).
3. Stage 2: 1 step of `stage2_vicuna7b` from the stage-1 export (`llama_proj.pth`), the same way.
4. One chat reply: `python -m mgpt4.chat --checkpoint <stage 2>` with the question on stdin.

It reports each process's peak resident memory (the kernel's VmHWM, per rank and for the rank's data
workers), the start-up time (launch, weight loading and engine set-up, until the first step starts), the
step times, the sample-caption time and the checkpoint's size; it checks the checkpoint holds the
projection of the expected shape (and nothing of the frozen model), that stage 2 loads it, and that chat
replies. The report is printed and written to `<workdir>/report.json`. `--size small` runs the same
recipe, launchers and files at toy widths with ZeRO-3 forced to partition every tensor (a persistence
threshold of 0), as at full size where the frozen ViT-g and Q-Former are partitioned too, and without
data workers (one per rank at full size, where their memory is checked: below half a rank's).
The weight files are deleted at the end unless `--keep`; a kept set is reused by the next run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import torch

from tests.launch import REPO, deepspeed_cmd, launcher_env, read_jsonl
from tests.official_files import read_manifest, write_llm_folder, write_vision_files

# Toy widths for `--size small`, applied to stage1_vicuna7b's model as --set overrides (the 32 query
# tokens, 224 px images and the 32000-entry vocabulary stay as in the recipe).
SMALL = {
    "model.vision.width": 64,
    "model.vision.depth": 3,
    "model.vision.heads": 4,
    "model.qformer.width": 64,
    "model.qformer.depth": 2,
    "model.qformer.heads": 4,
    "model.qformer.ffn_dim": 128,
    "model.llm.hidden_size": 64,
    "model.llm.intermediate_size": 128,
    "model.llm.num_layers": 2,
    "model.llm.num_heads": 4,
}
SIZES = {"full": {}, "small": SMALL}
RANKS = 2
STEPS = 2
# Compute is what costs at 7B on CPU. With AVX-512 (oneDNN), a bf16 matmul runs at about 28 GFLOP/s a core
# and a stage-1 step takes about 2 minutes on 2 cores. On a CPU with AVX2 only, a bf16 matmul with the
# weight as stored ([out, in], as in grad_input = grad_output @ weight, the LLM's backward) ran at 0.37
# GFLOP/s a core, and one step's backward took more than 45 minutes. Under ZeRO-3 each generated token
# gathers the whole partitioned LLM over gloo (13.5 GB; about 30 s a token on 2 AVX-512 cores). The text
# of both stages is therefore cut to 8 tokens (the recipes' max_txt_len is 32 and 160; sample captions
# generate that many), and the sample captions are of one image, not 4: the same code paths at a
# fraction of the time.
SAMPLE_IMAGES = 1
TEXT_TOKENS = 8
# Seconds each command of a full-size run may take: on a CPU with AVX2 only a step takes hours.
FULL_TIMEOUT_S = 4 * 3600
QUESTION = "What is in this picture?"


def model_overrides(size: str) -> list[str]:
    return [f"{k}={v}" for k, v in SIZES[size].items()]


def model_config(size: str):
    """The model of stage1_vicuna7b at `size` (the one the files are written for)."""
    from mgpt4.strict_config import apply_overrides
    from mgpt4.train.recipes import get_recipe

    return apply_overrides(get_recipe("stage1_vicuna7b"), model_overrides(size)).model


# ---------------------------------------------------------------------------------------------
# Files


def write_inputs(workdir: str, size: str) -> dict[str, object]:
    """The weight files and the data under `workdir`, reused when a complete set of this size is there.
    Returns their paths and, when written now, the seconds and bytes it took."""
    from mgpt4.data.synthetic import write_align, write_shards
    from mgpt4.model.prompts import STAGE2_INSTRUCTIONS, STAGE2_TEMPLATE, VICUNA_V0_SYSTEM
    from mgpt4.tokenizer import train_tiny_tokenizer

    weights, data = os.path.join(workdir, "weights"), os.path.join(workdir, "data")
    paths: dict[str, object] = {
        "eva_vit": os.path.join(weights, "eva_vit_g.pth"),
        "blip2": os.path.join(weights, "blip2_pretrained_flant5xxl.pth"),
        "llm": os.path.join(weights, "vicuna-7b"),
        "shards": [os.path.join(data, "shards", f"{i:05d}.tar") for i in range(2)],
        "align_root": os.path.join(data, "cc_sbu_align"),
    }
    done = os.path.join(workdir, f".complete-{size}")
    if os.path.exists(done):
        return paths
    for folder in (weights, data):
        shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    _, captions = write_shards(os.path.join(data, "shards"), 2, 8, min_size=256, max_size=400)
    captions += write_align(str(paths["align_root"]), 8, min_size=256, max_size=400)
    corpus = [*captions, VICUNA_V0_SYSTEM, *(STAGE2_TEMPLATE.format(i) for i in STAGE2_INSTRUCTIONS)] * 4
    cfg = model_config(size)
    with tempfile.TemporaryDirectory() as tmp:
        # A small vocabulary: its ids fit the LLM's 32000 rows (write_llm_folder zeroes the rest's logits).
        tokenizer = train_tiny_tokenizer(corpus, tmp, vocab_size=1000)
        llm_bytes = write_llm_folder(str(paths["llm"]), cfg.llm, tokenizer, dtype=torch.bfloat16)
    write_vision_files(weights, cfg, dtype=torch.float16)
    paths["write_s"] = round(time.perf_counter() - start, 1)
    paths["weights_gb"] = round(
        (llm_bytes + sum(os.path.getsize(str(paths[k])) for k in ("eva_vit", "blip2"))) / 1e9, 2
    )
    # A stale marker of the other size must not make a later run reuse these files as its own.
    for other in SIZES:
        if os.path.exists(os.path.join(workdir, f".complete-{other}")):
            os.remove(os.path.join(workdir, f".complete-{other}"))
    with open(done, "w", encoding="utf-8") as f:
        json.dump({k: paths[k] for k in ("write_s", "weights_gb")}, f)
    return paths


# At full size, how many parameters ZeRO-3 may keep gathered (live, or kept for reuse within this
# distance). z3.json has DeepSpeed's default, 1e9: 2 GB of bf16 per rank, which two ranks of the 7B model
# on a 24 GiB machine do not have (step 2 was killed for memory with it). 2e8 is 0.4 GB.
FULL_LIVE_PARAMETERS = 200_000_000


def zero3_config(workdir: str, size: str) -> tuple[str, dict[str, int]]:
    """ds_configs/z3.json with two changes: at full size, `FULL_LIVE_PARAMETERS` as
    `stage3_max_live_parameters` and `stage3_max_reuse_distance`; at small size, every tensor
    partitioned (at full size the ViT-g's and the Q-Former's large tensors are, and only those below 100K
    elements stay whole). Returns the written config's path and the changes."""
    with open(os.path.join(REPO, "ds_configs", "z3.json"), encoding="utf-8") as f:
        ds = json.load(f)
    if size == "full":
        changes = {
            "stage3_max_live_parameters": FULL_LIVE_PARAMETERS,
            "stage3_max_reuse_distance": FULL_LIVE_PARAMETERS,
        }
    else:
        changes = {"stage3_param_persistence_threshold": 0, "stage3_model_persistence_threshold": 0}
    ds["zero_optimization"].update(changes)
    path = os.path.join(workdir, f"z3_{size}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(ds, f, indent=2)
    return path, changes


# ---------------------------------------------------------------------------------------------
# Running a command and watching its memory


def _peak_rss_gb(pid: int) -> float | None:
    """The process's peak resident set (VmHWM in /proc/PID/status, Linux), in GB; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        return None
    return None


class Watched:
    """A command run to its end, its output lines time-stamped (seconds from the start) and written to
    `log`, and the peak resident memory of every process of its tree, read every `poll_s`: per rank
    (the processes started with `--local_rank=N`, a rank's own peak) and per rank's helpers (its data
    workers: every process below the rank). A command that is not a launcher has one "rank", itself."""

    def __init__(self, cmd: list[str], log: str, env: dict[str, str], stdin: str | None = None):
        self.cmd, self.log, self.env, self.stdin = cmd, log, env, stdin
        self.lines: list[tuple[float, str]] = []
        self.rank_gb: dict[int, float] = {}
        self.helpers_gb: dict[int, float] = {}

    def run(self, timeout_s: float, poll_s: float = 0.5) -> int:
        start = time.monotonic()
        proc = subprocess.Popen(
            self.cmd,
            cwd=REPO,
            env=self.env,
            stdin=subprocess.PIPE if self.stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        if self.stdin is not None:
            proc.stdin.write(self.stdin)
            proc.stdin.close()
        reader = threading.Thread(target=self._read, args=(proc, start), daemon=True)
        reader.start()
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            if time.monotonic() - start > timeout_s:
                for child in root.children(recursive=True):
                    child.kill()
                proc.kill()
                break
            self._sample(root)
            time.sleep(poll_s)
        reader.join(timeout=30)
        return proc.wait()

    def _read(self, proc: subprocess.Popen, start: float) -> None:
        with open(self.log, "w", encoding="utf-8") as f:
            for line in proc.stdout:
                self.lines.append((time.monotonic() - start, line.rstrip("\n")))
                f.write(line)
                f.flush()

    def _sample(self, root: psutil.Process) -> None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        ranks: dict[int, int] = {}  # pid -> rank
        for p in tree:
            try:
                m = re.search(r"--local_rank=(\d+)", " ".join(p.cmdline()))
            except psutil.Error:
                continue
            if m:
                ranks[p.pid] = int(m.group(1))
        if not ranks:  # a plain command: the process itself is the one "rank"
            ranks = {root.pid: 0}
        for pid, rank in ranks.items():
            self._keep(self.rank_gb, rank, _peak_rss_gb(pid))
            try:
                helpers = psutil.Process(pid).children(recursive=True)
            except psutil.Error:
                continue
            for h in helpers:
                self._keep(self.helpers_gb, rank, _peak_rss_gb(h.pid))

    @staticmethod
    def _keep(peaks: dict[int, float], rank: int, gb: float | None) -> None:
        if gb is not None:
            peaks[rank] = max(peaks.get(rank, 0.0), gb)

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def first(self, pattern: str, after: float = -1.0) -> tuple[float, re.Match] | None:
        """The time and match of the first output line matching `pattern` after time `after`."""
        for t, line in self.lines:
            m = re.search(pattern, line)
            if m and t > after:
                return t, m
        return None

    def memory(self) -> dict[str, object]:
        return {
            "peak_rss_gb_per_rank": [round(self.rank_gb[r], 2) for r in sorted(self.rank_gb)],
            # Its data workers and whatever else a rank starts, by rank.
            "peak_rss_gb_rank_children": {r: round(gb, 2) for r, gb in sorted(self.helpers_gb.items())},
        }


class RehearsalFailed(RuntimeError):
    pass


def _check(ok: bool, what: str, watched: Watched | None = None) -> None:
    if not ok:
        tail = "" if watched is None else "\n" + watched.text()[-4000:]
        raise RehearsalFailed(f"rehearsal: {what} (log: {watched.log if watched else '-'}){tail}")


# ---------------------------------------------------------------------------------------------
# The stages


def weight_overrides(paths: dict[str, object]) -> list[str]:
    return [f"model.weights.{k}={paths[k]}" for k in ("eva_vit", "blip2", "llm")]


def train_stage(
    name: str,
    launcher: str,
    recipe: str,
    overrides: list[str],
    workdir: str,
    ds_config: str,
    size: str,
    timeout_s: float,
) -> tuple[Watched, dict[str, object], str]:
    """Run a training launcher on RANKS CPU ranks; returns the watched run, its figures and its last
    checkpoint folder."""
    out = os.path.join(workdir, name)
    shutil.rmtree(out, ignore_errors=True)
    args = ["--recipe", recipe, "--deepspeed", ds_config]
    sets = [f"train.output_dir={out}", "train.log_every=1", "train.precision=bf16"]
    for o in [
        *overrides,
        *sets,
        f"train.num_sample_images={SAMPLE_IMAGES}",
        f"model.text.max_txt_len={TEXT_TOKENS}",
    ]:
        args += ["--set", o]
    env = launcher_env(os.path.join(workdir, "cache"))
    watched = Watched(deepspeed_cmd(launcher, RANKS, *args), os.path.join(workdir, f"{name}.log"), env)
    rc = watched.run(timeout_s)
    _check(rc == 0, f"{name} exited with {rc}", watched)
    _check("not written" not in watched.text(), f"{name}: an auxiliary output failed", watched)
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    steps = [r["step"] for r in rows]
    losses = [r["train/loss"] for r in rows]
    _check(steps == list(range(1, len(rows) + 1)) and steps, f"{name}: logged steps {steps}", watched)
    _check(all(math.isfinite(x) for x in losses), f"{name}: losses {losses}", watched)
    ckpt = os.path.join(out, "checkpoints", f"step_{steps[-1]:08d}")
    _check(os.path.isdir(ckpt), f"{name}: no checkpoint {ckpt}", watched)

    step_times = [round(r["perf/step_time_s"], 1) for r in rows]
    data_waits = [round(r["perf/data_wait_s"], 1) for r in rows]
    first_step = watched.first(rf"step 1/{steps[-1]} \|")
    saved = watched.first(rf"saved {re.escape(ckpt)}")
    _check(first_step is not None and saved is not None, f"{name}: no step or save line", watched)
    samples = watched.first(r"sample \d+: ", after=saved[0])
    _check(samples is not None, f"{name}: no sample captions after the checkpoint", watched)
    last_sample = max(t for t, line in watched.lines if re.search(r"sample \d+: ", line))
    with open(os.path.join(out, "engine.json"), encoding="utf-8") as f:
        engine = json.load(f)
    figures = {
        **watched.memory(),
        # Launch, imports, weight loading and engine set-up: until the first step starts.
        "startup_s": round(first_step[0] - step_times[0], 1),
        "step_times_s": step_times,
        # Of each step's time, waiting for its batch (the first: the data workers starting).
        "data_wait_s": data_waits,
        "losses": [round(x, 4) for x in losses],
        "sample_captions_s": round(last_sample - saved[0], 1),
        "checkpoint": ckpt,
        "checkpoint_mb": round(folder_bytes(ckpt) / 1e6, 1),
        "params_per_rank": engine.get("params_per_rank"),
        "wall_s": round(watched.lines[-1][0], 1) if watched.lines else None,
    }
    check_partitioned(figures["params_per_rank"], size, watched)
    if size == "full":  # a data worker must not hold the model (issue 28: forked workers held 8.8 GB)
        ranks, workers = figures["peak_rss_gb_per_rank"], list(figures["peak_rss_gb_rank_children"].values())
        _check(
            bool(workers) and max(workers) < min(ranks) / 2,
            f"{name}: data workers' peak {workers} GB, ranks' {ranks} GB",
            watched,
        )
    return watched, figures, ckpt


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def check_partitioned(params_per_rank: dict[str, list[int]], size: str, watched: Watched) -> None:
    """Every part, the frozen ViT-g and Q-Former included, is split over the ranks: each rank holds less
    than the whole part and the ranks together all of it (engine.json's shards against a meta build)."""
    from mgpt4.model import build_model

    cfg = model_config(size)
    cfg.weights.llm = None  # the sizes are the config's; no folder is read
    model = build_model(cfg, device="meta")
    whole = {name: sum(p.numel() for p in part.parameters()) for name, part in model.named_children()}
    whole["query_tokens"] = model.query_tokens.numel()
    _check(set(params_per_rank) == set(whole), f"engine.json parts {sorted(params_per_rank)}", watched)
    for name, numel in whole.items():
        shards = params_per_rank[name]
        _check(
            len(shards) == RANKS and sum(shards) >= numel and all(n < numel for n in shards),
            f"{name} ({numel} parameters) is not split over the ranks: {shards}",
            watched,
        )


def check_projection(ckpt: str, size: str, watched: Watched) -> dict[str, object]:
    """The export holds llama_proj of the 7B shape (at full size, the manifest's), fp32 and finite, and
    the checkpoint holds the projection's training state only: no frozen weights."""
    cfg = model_config(size)
    proj = torch.load(os.path.join(ckpt, "llama_proj.pth"), weights_only=True)["model"]
    want = {
        "llama_proj.weight": [cfg.llm.hidden_size, cfg.qformer.width],
        "llama_proj.bias": [cfg.llm.hidden_size],
    }
    if size == "full":
        _check(
            want == dict(read_manifest("llama_proj", "7b")), f"the 7B shapes differ from the manifest: {want}"
        )
    got = {k: list(v.shape) for k, v in proj.items()}
    _check(got == want, f"{ckpt}/llama_proj.pth holds {got}, expected {want}", watched)
    _check(
        all(v.dtype == torch.float32 and v.isfinite().all() for v in proj.values()),
        "projection not finite fp32",
    )
    proj_bytes = sum(v.numel() * 4 for v in proj.values())
    # The export, the run state's fp32 copy and Adam's two moments: four projections, plus the sample
    # images and small state. A frozen part saved by mistake would be far more (the ViT-g: 2 GB).
    total = folder_bytes(ckpt)
    _check(
        4 * proj_bytes <= total <= 4 * proj_bytes + 16e6,
        f"{ckpt}: {total} bytes for a {proj_bytes}-byte projection",
    )
    return {"projection_shape": got["llama_proj.weight"], "projection_mb": round(proj_bytes / 1e6, 2)}


def chat(workdir: str, stage2_out: str, image: str, timeout_s: float) -> dict[str, object]:
    cmd = [
        sys.executable, "-m", "mgpt4.chat", "--image", image, "--checkpoint", stage2_out, "--device", "cpu",
        "--greedy", "--max-new-tokens", "8",
    ]  # fmt: skip
    env = launcher_env(os.path.join(workdir, "cache"))
    env["OMP_NUM_THREADS"] = str(os.cpu_count() or 1)  # one process now: every core, not one per rank
    watched = Watched(cmd, os.path.join(workdir, "chat.log"), env, QUESTION + "\n")
    rc = watched.run(timeout_s)
    _check(rc == 0, f"chat exited with {rc}", watched)
    reply = watched.first(r"MiniGPT-4: (.*\S.*)")
    _check(reply is not None, "chat wrote no reply", watched)
    loading = watched.first(r"Loading the model")
    return {
        "peak_rss_gb": watched.memory()["peak_rss_gb_per_rank"][0],
        "load_and_reply_s": round(reply[0] - (loading[0] if loading else 0.0), 1),
        "reply": reply[1].group(1).strip(),
    }


def rehearse(size: str, workdir: str, keep: bool, timeout_s: float) -> dict[str, object]:
    os.makedirs(workdir, exist_ok=True)
    report: dict[str, object] = {"size": size, "ranks": RANKS}
    try:
        paths = write_inputs(workdir, size)
        report["files"] = {k: paths[k] for k in ("write_s", "weights_gb") if k in paths}
        ds, changes = zero3_config(workdir, size)
        report["zero"] = {"config": "ds_configs/z3.json", "changed": changes}
        sizes, shards = model_overrides(size), paths["shards"]
        # One data worker per rank at full size, where its memory shows it holds no model (issue 28: forked
        # workers held 8.8 GB each); none at small size, where starting one costs half a minute a stage.
        workers = 1 if size == "full" else 0
        common = [
            *sizes,
            *weight_overrides(paths),
            f"data.num_workers={workers}",
            f"train.global_batch_size={RANKS}",
        ]
        stage1_sets = [
            *common,
            f"data.sources.0.shards={shards[0]}",
            f"data.sources.1.shards={shards[1]}",
            f"train.steps={STEPS}",
            f"train.save_every={STEPS}",
            f"train.sample_every={STEPS}",
        ]
        s1, report["stage1"], ckpt = train_stage(
            "stage1", "launchers/pretrain.py", "stage1_vicuna7b", stage1_sets, workdir, ds, size, timeout_s
        )
        report["stage1"].update(check_projection(ckpt, size, s1))
        stage2_sets = [
            *common,
            f"model.weights.proj={ckpt}/llama_proj.pth",
            f"data.align_root={paths['align_root']}",
            "train.steps=1",
            "train.save_every=1",
        ]
        s2, report["stage2"], ckpt2 = train_stage(
            "stage2", "launchers/finetune.py", "stage2_vicuna7b", stage2_sets, workdir, ds, size, timeout_s
        )
        _check(
            s2.first(rf"projection llama_proj .* loaded from {re.escape(ckpt)}") is not None,
            "stage 2 did not load the stage-1 projection",
            s2,
        )
        report["stage2"].update(check_projection(ckpt2, size, s2))
        image = os.path.join(str(paths["align_root"]), "image", "0.jpg")
        report["chat"] = chat(workdir, os.path.join(workdir, "stage2"), image, timeout_s)
    finally:
        if not keep:
            for name in ("weights", "data", "cache"):
                shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
            for name in SIZES:
                if os.path.exists(os.path.join(workdir, f".complete-{name}")):
                    os.remove(os.path.join(workdir, f".complete-{name}"))
    with open(os.path.join(workdir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.rehearsal", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--size", choices=sorted(SIZES), default="small", help="full: the 7B shapes; small: toy widths"
    )
    p.add_argument(
        "--workdir", default=None, help="where files, runs and logs go (default: a new temporary folder)"
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the weight files (a later run with this --workdir reuses them)",
    )
    p.add_argument("--timeout", type=float, default=FULL_TIMEOUT_S, help="seconds each command may run")
    args = p.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix=f"mgpt4-rehearsal-{args.size}-")
    try:
        report = rehearse(args.size, workdir, args.keep, args.timeout)
    except RehearsalFailed as e:
        raise SystemExit(str(e)) from None
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
