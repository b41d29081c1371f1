"""`python -m mgpt4.eval bench`: lmms-eval's benchmarks on a run's newest checkpoint, scores written where
the run's other figures are.

    python -m mgpt4.eval bench --checkpoint outputs/stage2 --tasks mme,pope --include-path my_tasks/

Checks the checkpoint and each task's local data (one line each when something is missing), then runs
`python -m lmms_eval --model mgpt4` (the model in `mgpt4.eval.lmms_model`) on the resolved checkpoint,
under `accelerate launch` with `--num-processes N`. lmms-eval's own outputs (results, per-sample logs)
go to `<out>/lmms_eval/`; its numeric scores go to `<out>/metrics.json` and, as
`bench/<task>/<metric>` scalars at the checkpoint's step, to the run's TensorBoard (next to `val/loss`
and the `captions/` metrics). `<out>` is `<run>/bench/step_N` unless `--out` says otherwise.

Offline by default: HF_HUB_OFFLINE and HF_DATASETS_OFFLINE are set to 1 for lmms-eval unless the
environment sets them, so a task whose data is not on this machine fails at once instead of
reaching for the hub.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from mgpt4.logs import get_logger
from mgpt4.strict_config import ConfigError

log = get_logger(__name__)

METRICS_FILE = "metrics.json"
TENSORBOARD_PREFIX = "bench/"
# lmms-eval's results file, `<date>_<time>_results.json` (tasks may write other *_results.json files).
RESULTS_NAME = re.compile(r"\d{8}_\d{6}_results\.json")


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    """The flags of `python -m mgpt4.eval bench`."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a run folder (its newest complete checkpoint is used) or one checkpoint folder",
    )
    parser.add_argument("--tasks", required=True, help="lmms-eval task names, comma-separated (mme,pope)")
    parser.add_argument(
        "--include-path",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder of local task YAMLs (lmms-eval's --include_path); repeatable",
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, help="requests per generate call on each process"
    )
    parser.add_argument(
        "--device", default=None, help="device of the model (default: cuda when visible, else cpu)"
    )
    parser.add_argument(
        "--dtype", default=None, help="dtype of the LLM: fp32, bf16 or fp16 (default: the config's)"
    )
    parser.add_argument(
        "--model-args",
        default="",
        metavar="K=V,...",
        help="more --model_args of the lmms-eval model mgpt4 (e.g. vision_device=cpu,llm_8bit=True)",
    )
    parser.add_argument("--limit", type=float, default=None, help="documents per task (tests and smoke runs)")
    parser.add_argument(
        "--num-processes",
        type=int,
        default=1,
        help="processes under `accelerate launch` (one per GPU); each answers its share of the documents",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="folder for metrics.json and lmms-eval's outputs (default: <run>/bench/step_N)",
    )
    parser.add_argument(
        "--tensorboard",
        default=None,
        metavar="DIR",
        help="TensorBoard folder for the bench/<task>/<metric> scalars (default: the run's tensorboard/)",
    )


def run_layout(checkpoint_dir: str) -> tuple[str, int] | None:
    """(the run's output folder, the step) of `<run>/checkpoints/step_N`, else None."""
    name = os.path.basename(os.path.normpath(checkpoint_dir))
    parent = os.path.dirname(os.path.normpath(checkpoint_dir))
    if not name.startswith("step_") or os.path.basename(parent) != "checkpoints":
        return None
    try:
        return os.path.dirname(parent), int(name[len("step_") :])
    except ValueError:
        return None


def resolve_checkpoint(path: str) -> str:
    """The checkpoint folder `--checkpoint` names (a run's newest complete one); ConfigError otherwise."""
    from mgpt4.checkpoints import find_checkpoint

    if not os.path.exists(path):
        raise ConfigError(f"--checkpoint {path}: no such folder")
    ckpt = find_checkpoint(path)
    if ckpt is None:
        raise ConfigError(
            f"--checkpoint {path}: no complete mgpt4 checkpoint there (a run folder, its checkpoints/ "
            "folder or one step_N folder holding config.json and llama_proj.pth)"
        )
    return ckpt


def check_task_data(tasks: Sequence[str], include_paths: Sequence[str]) -> None:
    """Each task is known to lmms-eval and its local data is there (`dataset_kwargs: load_from_disk`
    folders, local `data_files`); ConfigError naming the task, the YAML and the path otherwise.
    Tasks that read the hub by name are left to lmms-eval (offline it finds them in the HF cache or
    stops)."""
    from lmms_eval.tasks import TaskManager
    from lmms_eval.utils import load_yaml_config

    manager = TaskManager("ERROR", include_path=list(include_paths) or None)
    for name in tasks:
        if name not in manager.all_tasks:
            where = (
                f" or in {', '.join(include_paths)}"
                if include_paths
                else " (local task YAMLs: --include-path DIR)"
            )
            raise ConfigError(f"--tasks {name}: no such lmms-eval task among its own{where}")
        if manager.task_index[name]["type"] != "task":
            continue  # a group or tag: its tasks are checked by lmms-eval as it loads them
        yaml_path = manager.task_index[name]["yaml_path"]
        cfg = load_yaml_config(yaml_path, mode="simple")
        missing = _missing_data(cfg)
        if missing:
            raise ConfigError(
                f"task {name} ({yaml_path}): its data {missing} is not there; prepare it as the README's "
                "'Evaluate on benchmarks' shows, or fix dataset_path / data_files"
            )


def _missing_data(cfg: dict) -> str | None:
    """The local path a task config names that does not exist, if any."""
    path = cfg.get("dataset_path")
    kwargs = cfg.get("dataset_kwargs") or {}
    if kwargs.get("load_from_disk"):
        return None if path and os.path.isdir(path) else f"dataset_path: {path} (load_from_disk)"
    files = kwargs.get("data_files")
    if files:
        values = files.values() if isinstance(files, dict) else [files]
        for value in values:
            for pattern in [value] if isinstance(value, str) else list(value):
                if not glob.glob(pattern):
                    return f"data_files: {pattern}"
    return None


def lmms_eval_command(args: argparse.Namespace, ckpt: str, out: str) -> list[str]:
    """The lmms-eval command line: one process, or `accelerate launch` with several."""
    model_args = [f"checkpoint={ckpt}"]
    if args.device:
        model_args.append(f"device={args.device}")
    if args.dtype:
        model_args.append(f"dtype={args.dtype}")
    if args.model_args:
        model_args.append(args.model_args)
    cmd = ["-m", "lmms_eval", "--model", "mgpt4", "--model_args", ",".join(model_args)]
    cmd += ["--tasks", args.tasks, "--batch_size", str(args.batch_size), "--log_samples"]
    cmd += ["--output_path", os.path.join(out, "lmms_eval")]
    for path in args.include_path:
        cmd += ["--include_path", path]
    if args.limit is not None:
        cmd += ["--limit", str(int(args.limit) if args.limit >= 1 else args.limit)]
    if args.num_processes <= 1:
        return [sys.executable, *cmd]
    from mgpt4.dist import free_port

    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(args.num_processes)]
    launch += ["--main_process_port", str(free_port()), "--num_machines", "1", "--mixed_precision", "no"]
    launch += ["--dynamo_backend", "no"]
    if (args.device or "").startswith("cpu") or not _cuda_visible():
        launch.append("--cpu")
    return [*launch, *cmd]


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def read_scores(results_file: str) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of lmms-eval's results JSON: the numbers only (no stderr, no lists);
    a metric under another filter than `none` is named `<metric>_<filter>`."""
    with open(results_file, encoding="utf-8") as f:
        results = json.load(f)["results"]
    scores: dict[str, dict[str, float]] = {}
    for task, values in results.items():
        for key, value in values.items():
            if "," not in key or "_stderr" in key:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            metric, filt = key.split(",", 1)
            scores.setdefault(task, {})[metric if filt == "none" else f"{metric}_{filt}"] = float(value)
    return scores


def newest_results(folder: str, since: float) -> str:
    """lmms-eval's results file written by this run (its name holds the date, its folder the model)."""
    found = [
        p
        for p in glob.glob(os.path.join(folder, "**", "*_results.json"), recursive=True)
        if RESULTS_NAME.fullmatch(os.path.basename(p)) and os.path.getmtime(p) >= since
    ]
    if not found:
        # lmms-eval logs an error during evaluation and still exits 0.
        raise ConfigError(f"lmms-eval wrote no *_results.json under {folder}; its messages above say why")
    return max(found, key=os.path.getmtime)


def log_to_tensorboard(folder: str, scores: dict[str, dict[str, float]], step: int) -> None:
    """`bench/<task>/<metric>` scalars at `step` in the TensorBoard folder (a run's `tensorboard/`)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(folder)
    try:
        for task, metrics in scores.items():
            for metric, value in metrics.items():
                writer.add_scalar(f"{TENSORBOARD_PREFIX}{task}/{metric}", value, step)
    finally:
        writer.close()
    log.info(f"bench: scores logged to {folder} at step {step}")


def run_bench(args: argparse.Namespace) -> int:
    """Check, run lmms-eval, write the scores; the exit status of lmms-eval when it fails."""
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ConfigError("--tasks: give at least one lmms-eval task")
    if args.batch_size < 1 or args.num_processes < 1:
        raise ConfigError("--batch-size and --num-processes must be at least 1")
    ckpt = resolve_checkpoint(args.checkpoint)
    layout = run_layout(ckpt)
    step = layout[1] if layout else 0
    out = args.out or (os.path.join(layout[0], "bench", f"step_{step:08d}") if layout else None)
    tensorboard = args.tensorboard or (os.path.join(layout[0], "tensorboard") if layout else None)
    if out is None or tensorboard is None:
        raise ConfigError(
            f"--checkpoint {ckpt} is not <run>/checkpoints/step_N: give --out DIR and --tensorboard DIR"
        )
    for path in args.include_path:
        if not os.path.isdir(path):
            raise ConfigError(f"--include-path {path}: no such folder")
    check_task_data(tasks, args.include_path)
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    cmd = lmms_eval_command(args, ckpt, out)
    log.info(f"bench: {' '.join(cmd)}")
    start = time.time()
    code = subprocess.call(cmd, env=env)
    if code != 0:
        print(f"error: lmms-eval failed (exit status {code}); its messages are above", file=sys.stderr)
        return code
    results_file = newest_results(os.path.join(out, "lmms_eval"), start)
    scores = read_scores(results_file)
    summary: dict[str, Any] = {
        "checkpoint": os.path.abspath(ckpt),
        "step": step,
        "tasks": tasks,
        "scores": scores,
        "lmms_eval_results": os.path.abspath(results_file),
    }
    with open(os.path.join(out, METRICS_FILE), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    log_to_tensorboard(tensorboard, scores, step)
    for task, metrics in scores.items():
        for metric, value in metrics.items():
            print(f"{task:24s} {metric:28s} {value:.4f}", flush=True)
    log.info(f"bench: wrote {os.path.join(out, METRICS_FILE)}")
    return 0
