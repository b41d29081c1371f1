"""Every checkpoint file name and the DeepSpeed-free helpers: the trainer writes, chat, curation and
evaluation read.

<output>/checkpoints/latest              name of the newest complete checkpoint folder
<output>/checkpoints/step_00000100/      one checkpoint
    config.json                          the resolved config tree (its "model" part rebuilds the model)
    llama_proj.pth                       the projection in the official MiniGPT-4 format
    run_state.pt                         the run's state on any number of ranks (rank 0 writes it)
    trainer_state_rank{r}.pt             rank r's data position and RNG
    done_rank{r}.json                    rank r finished writing: every rank writes its marker last
<output>/archive/<time>/                 an earlier run's files, moved aside by --no-resume

A checkpoint is complete when every rank of the run that wrote it left its marker. `latest` moves to a
checkpoint only after that, so it normally names the newest complete one; a resume trusts the markers,
not `latest` alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
CONFIG_FILE = "config.json"
PROJ_FILE = "llama_proj.pth"
# The run's state in a form that does not depend on the number of ranks (step, samples seen, data
# pass, sample images, the trainable weights in fp32 with their Adam moments and step, the schedule,
# the engine's counters, the fp16 loss scale); rank 0 writes it.
RUN_STATE = "run_state.pt"
# Each rank's part of the same state: its data position and RNG, which only the same number of
# ranks can continue.
RANK_STATE = "trainer_state_rank{rank}.pt"
# The layout of RUN_STATE and RANK_STATE, written into both and into every marker. A checkpoint of
# another version is refused (by `check_resume_point`, before anything is built, and again when read).
FORMAT_VERSION = 1
DONE_FILE = "done_rank{rank}.json"
ARCHIVE_DIR = "archive"
# What a run folder holds besides its checkpoints; --no-resume moves these aside with them.
RUN_FILES = (CHECKPOINTS_DIR, CONFIG_FILE, "engine.json", "metrics.jsonl", "tensorboard")

_STEP_DIR = re.compile(r"step_(\d{8})")
_DONE = re.compile(r"done_rank(\d+)\.json")


class ResumeError(ValueError):
    """The output folder holds checkpoints this run cannot continue; the message says what to do."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def find_checkpoint(path: str) -> str | None:
    """A checkpoint folder (its config and projection, what chat, curation and stage 2 read) from itself,
    its `checkpoints/` parent or the run's output folder: the one `latest` names, else the newest
    complete one."""

    def usable(folder: str) -> bool:
        return os.path.isfile(os.path.join(folder, CONFIG_FILE)) and os.path.isfile(
            os.path.join(folder, PROJ_FILE)
        )

    if usable(path):
        return path  # a checkpoint folder named by the user is taken as named
    for root in (os.path.join(path, CHECKPOINTS_DIR), path):
        named = latest_tag(root)
        # As a resume does: `latest` is followed to a complete checkpoint only (see find_resume_point).
        if named and usable(os.path.join(root, named)) and _trusted(os.path.join(root, named)):
            return os.path.join(root, named)
        found = newest_complete(root)
        if found is not None:
            return os.path.join(root, found[0])
    return None


def _trusted(folder: str) -> bool:
    """Complete by its markers, or not written by a run that leaves them (a checkpoint from before
    markers existed, or a config and projection put together by hand): only a save that a crash cut
    short is passed over."""
    if completeness(folder)[0] is not None:
        return True
    names = os.listdir(folder)
    return not (RUN_STATE in names or any(_DONE.fullmatch(n) for n in names))


def read_checkpoint_config(ckpt_dir: str) -> dict:
    with open(os.path.join(ckpt_dir, CONFIG_FILE), encoding="utf-8") as f:
        return json.load(f)


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINTS_DIR)


def latest_tag(root: str) -> str | None:
    """What `latest` names, whether or not that folder exists (None without a `latest` file)."""
    path = os.path.join(root, LATEST_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read().strip() or None


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_done(folder: str, rank: int, world_size: int, step: int) -> None:
    """Rank `rank` has written all of its files of this checkpoint (call it last, after them)."""
    record = {"rank": rank, "world_size": world_size, "step": step, "format_version": FORMAT_VERSION}
    write_atomic(os.path.join(folder, DONE_FILE.format(rank=rank)), json.dumps(record))


def step_dirs(root: str) -> list[str]:
    """Checkpoint folder names under `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    return sorted(
        d for d in os.listdir(root) if _STEP_DIR.fullmatch(d) and os.path.isdir(os.path.join(root, d))
    )


def completeness(folder: str) -> tuple[int | None, str]:
    """(world size of the run that wrote `folder`, "") when every rank left its marker; else (None, what
    is missing)."""
    records = []
    for name in os.listdir(folder):
        if _DONE.fullmatch(name):
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    records.append(json.load(f))
            except (OSError, ValueError):
                continue
    if not records:
        return None, "no rank finished writing it"
    world = {r.get("world_size") for r in records}
    if len(world) != 1 or not isinstance(next(iter(world)), int):
        return None, f"its ranks disagree on the world size ({sorted(map(str, world))})"
    size = world.pop()
    missing = sorted(set(range(size)) - {r.get("rank") for r in records})
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
        return None, f"rank(s) {shown} of {size} did not finish writing it"
    return size, ""


def newest_complete(root: str) -> tuple[str, int] | None:
    """(folder name, world size) of the newest complete checkpoint under `root`, or None."""
    for tag in reversed(step_dirs(root)):
        size, _ = completeness(os.path.join(root, tag))
        if size is not None:
            return tag, size
    return None


@dataclass
class ResumePoint:
    """The checkpoint a run continues from."""

    folder: str
    tag: str
    world_size: int  # of the run that wrote it
    recipe: str
    # Why this one and not what `latest` names ("" when `latest` named it).
    note: str = ""
    format_version: int | None = None  # from its markers; None: written before versions existed


def find_resume_point(output_dir: str) -> ResumePoint | None:
    """The checkpoint `output_dir` resumes from: the one `latest` names when it is complete, else the
    newest complete one (`note` says why). None when the folder holds no checkpoint folders.

    Raises ResumeError when it holds checkpoint folders but none is complete (a run must not start
    at step 0 over them).
    """
    root = checkpoint_root(output_dir)
    tags = step_dirs(root)
    if not tags:
        return None
    named = latest_tag(root)
    if named in tags and completeness(os.path.join(root, named))[0] is not None:
        return _point(root, named, "")
    if named in tags and _legacy_size(os.path.join(root, named)):
        return _point(root, named, "")
    found = newest_complete(root)
    if found is None:
        problems = "; ".join(f"{t}: {completeness(os.path.join(root, t))[1]}" for t in tags[-3:])
        raise ResumeError(
            f"{root} holds {len(tags)} checkpoint folder(s) but none is complete ({problems}). "
            f"Start over with --no-resume (the folders are moved to {os.path.join(output_dir, ARCHIVE_DIR)}/, "
            f"not deleted) or choose another train.output_dir"
        )
    if named is None:
        why = "checkpoints/latest is missing"
    elif named not in tags:
        why = f"checkpoints/latest names {named}, which does not exist"
    else:
        why = f"checkpoints/latest names {named}, which is incomplete ({completeness(os.path.join(root, named))[1]})"
    return _point(root, found[0], f"{why}; resuming from {found[0]}, the newest complete checkpoint")


def _legacy_size(folder: str) -> int:
    """Ranks of a checkpoint written before the markers existed (0 if it has markers or no rank state):
    those writers moved `latest` only after every rank had written, so `latest` vouches for it. A folder
    with `run_state.pt` was written by a writer that leaves markers: without them it is incomplete."""
    names = os.listdir(folder)
    if RUN_STATE in names or any(_DONE.fullmatch(n) for n in names):
        return 0
    return sum(1 for n in names if re.fullmatch(r"trainer_state_rank\d+\.pt", n))


def _point(root: str, tag: str, note: str) -> ResumePoint:
    folder = os.path.join(root, tag)
    size = completeness(folder)[0] or _legacy_size(folder)
    recipe = ""
    if os.path.isfile(os.path.join(folder, CONFIG_FILE)):
        recipe = read_checkpoint_config(folder).get("recipe", "")
    return ResumePoint(folder, tag, int(size or 0), recipe, note, marker_format_version(folder))


def marker_format_version(folder: str) -> int | None:
    """The format version rank 0's marker in `folder` names (None: no marker, or one without it)."""
    try:
        with open(os.path.join(folder, DONE_FILE.format(rank=0)), encoding="utf-8") as f:
            version = json.load(f).get("format_version")
    except (OSError, ValueError, AttributeError):
        return None
    return version if isinstance(version, int) else None


def format_refusal(folder: str, version: object) -> str:
    """Why a checkpoint of another format version cannot be resumed, and what to do instead."""
    found = "no format version" if version is None else f"format version {version!r}"
    return (
        f"{folder} is a checkpoint of {found} and this mgpt4 reads format version {FORMAT_VERSION}: it was "
        f"written by another mgpt4. Resume it with the mgpt4 that wrote it; or start from its projection in "
        f"a folder of its own (--set train.output_dir=<new folder> --set model.weights.proj={folder}); or "
        f"start over in this folder with --no-resume (its checkpoints are moved aside, not deleted)"
    )


def check_resume_point(
    point: ResumePoint, output_dir: str, recipe: str, world_size: int, fresh_data: bool
) -> None:
    """Refuse to continue a checkpoint of another recipe or another format version, or one written by
    another number of ranks unless a fresh data pass was asked for (`train.resume_data=fresh`). Raises
    ResumeError."""
    if point.recipe != recipe:
        raise ResumeError(
            f"{output_dir} holds checkpoints of recipe {point.recipe!r} (newest: {point.tag}) and this run "
            f"is {recipe!r}: it would continue another run. To start {recipe} from that projection, give it "
            f"its own folder: --set train.output_dir=<new folder> --set model.weights.proj={output_dir}. "
            f"To start over in this folder, --no-resume (the old checkpoints are moved aside, not deleted)"
        )
    if point.format_version != FORMAT_VERSION:
        raise ResumeError(format_refusal(point.folder, point.format_version))
    if point.world_size != world_size and not fresh_data:
        raise ResumeError(
            f"{point.folder} was written by {point.world_size} rank(s) and this run has {world_size}: each "
            f"rank's data position belongs to its rank. Resume with {point.world_size} rank(s), or "
            f"--set train.resume_data=fresh to keep the projection, its optimizer moments, the schedule, step "
            f"and samples seen, and start a fresh data pass for {world_size} rank(s)"
        )


def archive_run(output_dir: str) -> str | None:
    """Move an earlier run's files (checkpoints, config, metrics, TensorBoard) into
    `<output_dir>/archive/<UTC time>/`, so that a run started over never overwrites them; returns
    where they went, or None when there was nothing to move."""
    present = [n for n in RUN_FILES if os.path.exists(os.path.join(output_dir, n))]
    if not present:
        return None
    dest = os.path.join(output_dir, ARCHIVE_DIR, time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
    while os.path.exists(dest):
        dest += "+"
    os.makedirs(dest)
    for name in present:
        os.replace(os.path.join(output_dir, name), os.path.join(dest, name))
    return dest


def rotate(root: str, keep: int, newest: str) -> None:
    """Keep the `keep` newest complete checkpoints up to `newest`; older folders go, complete or not
    (an incomplete one is a crashed save). Folders newer than `newest` are left alone."""
    older = [d for d in step_dirs(root) if d <= newest]
    complete = [
        d for d in older if completeness(os.path.join(root, d))[0] or _legacy_size(os.path.join(root, d))
    ]
    kept = set(complete[-keep:])
    for old in older:
        if old not in kept:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
