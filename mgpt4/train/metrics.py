"""The one metrics component: TensorBoard (rank 0 writes), a metrics.jsonl and the console progress line
(through `logging`)."""

from __future__ import annotations

import json
import os
import time

import torch

from mgpt4.images import CLIP_MEAN, CLIP_STD
from mgpt4.logs import get_logger
from mgpt4.train.tally import Window

log = get_logger(__name__)


def device_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def log_failure(what: str, error: Exception) -> None:
    """One warning line (each rank its own) for an auxiliary output that failed: sample captions,
    images, TensorBoard. The run goes on; the message is folded onto one line and cut at 300 chars."""
    message = " ".join(str(error).split())
    log.warning(f"{what} not written, the run goes on: {type(error).__name__}: {message[:300]}")


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Metrics:
    """Accumulates a log window of steps and writes its means; only rank 0 writes anything."""

    def __init__(
        self,
        output_dir: str,
        rank: int,
        world_size: int,
        total_steps: int,
        peak_tflops: float | None,
        start_step: int = 0,
    ):
        self.rank = rank
        self.world_size = world_size
        self.total_steps = total_steps
        self.peak_tflops = peak_tflops
        self.writer = None
        self.jsonl = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            # A run resumed from an older checkpoint (a crash after it, or a rollback) repeats the steps
            # after it: their earlier rows go, in TensorBoard (purge_step) and in metrics.jsonl alike.
            self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=start_step + 1)
            path = os.path.join(output_dir, "metrics.jsonl")
            drop_rows_after(path, start_step)
            self.jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115
        self._window_start = time.perf_counter()
        self._window_wait = 0.0
        self._window_steps = 0
        self._run_start = time.perf_counter()
        self._run_steps = 0
        # Validation: its scalars join the next row, its time is kept out of the throughput and ETA.
        self._pending: dict[str, float] = {}
        self._window_excluded = 0.0
        self._run_excluded = 0.0

    def add_step(self, data_wait_s: float) -> None:
        """Count one optimizer step; called on every rank (what it held is counted by `Tally`)."""
        self._window_wait += data_wait_s
        self._window_steps += 1
        self._run_steps += 1

    def add_eval(self, scalars: dict[str, float], seconds: float) -> None:
        """Scalars for the next row (`val/loss`, ...) from `seconds` of work that is not training."""
        self._pending.update(scalars)
        self._window_excluded += seconds
        self._run_excluded += seconds

    def write(
        self, step: int, scalars: dict[str, float], memory_gb: float, skipped: dict[str, int], window: Window
    ) -> dict[str, float]:
        """Close the window: throughput figures from the window's exact counts over all ranks (tokens
        are the samples' own, padding excluded), TensorBoard scalars, a JSON line and the console line."""
        elapsed = max(time.perf_counter() - self._window_start - self._window_excluded, 1e-9)
        samples_s = window.samples / elapsed
        tflops = window.flops / elapsed / self.world_size / 1e12
        row = dict(scalars)
        row.update(
            {
                "perf/samples_per_s": samples_s,
                "perf/samples_per_step": window.samples / max(self._window_steps, 1),
                "perf/tokens_per_s": window.tokens / elapsed,
                "perf/padding_fraction": window.padding_fraction,
                "perf/tflops_per_device": tflops,
                "perf/data_wait_s": self._window_wait / max(self._window_steps, 1),
                "perf/step_time_s": elapsed / max(self._window_steps, 1),
                "memory/device_gb": memory_gb,
            }
        )
        if self.peak_tflops:
            row["perf/mfu"] = tflops / self.peak_tflops
        for reason, count in skipped.items():
            row[f"data/skipped_{reason}"] = float(count)
        row.update(self._pending)
        if self.rank == 0:
            try:
                for key, value in row.items():
                    self.writer.add_scalar(key, value, step)
                self.writer.flush()
            except Exception as e:  # metrics.jsonl below still gets the row
                log_failure(f"step {step}: TensorBoard scalars", e)
            self.jsonl.write(json.dumps({"step": step, **row}) + "\n")
            self.jsonl.flush()
            rate = (time.perf_counter() - self._run_start - self._run_excluded) / max(self._run_steps, 1)
            mfu = f" | MFU {100 * row['perf/mfu']:.2f}%" if "perf/mfu" in row else ""
            log.info(
                f"step {step}/{self.total_steps} | loss {row['train/loss']:.4f} | lr {row['train/lr']:.2e}"
                f" | gnorm {row.get('train/grad_norm', float('nan')):.3f} | {samples_s:.1f} samples/s"
                f" ({row['perf/samples_per_step']:.1f}/step) | {row['perf/tokens_per_s']:.0f} tok/s"
                f" | pad {100 * window.padding_fraction:.1f}% | {tflops:.3g} TFLOP/s{mfu}"
                f" | wait {1000 * row['perf/data_wait_s']:.0f} ms | mem {memory_gb:.2f} GB"
                f" | skipped {sum(skipped.values())} | eta {_fmt_eta(rate * (self.total_steps - step))}"
            )
        self._window_start = time.perf_counter()
        self._window_wait = 0.0
        self._window_steps = 0
        self._pending = {}
        self._window_excluded = 0.0
        return row

    def write_samples(self, step: int, images: torch.Tensor | None, captions: list[str]) -> None:
        """Generated captions for the fixed sample images, as text and as an image grid (none when the
        run reads cached features: there are no pixels)."""
        if self.rank != 0:
            return
        if images is not None:
            from torchvision.utils import make_grid

            mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
            std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
            pixels = (images.detach().float().cpu() * std + mean).clamp(0, 1)
            self.writer.add_image("samples/images", make_grid(pixels, nrow=len(captions)), step)
        table = "\n".join(f"| {i} | {c.replace('|', '/') or '(empty)'} |" for i, c in enumerate(captions))
        self.writer.add_text("samples/captions", "| image | caption |\n|---|---|\n" + table, step)
        self.writer.flush()
        for i, c in enumerate(captions):
            log.info(f"  sample {i}: {c}")

    def close(self) -> None:
        if self.rank == 0:
            self.jsonl.close()
            try:
                self.writer.close()
            except Exception as e:
                log_failure("TensorBoard's last events", e)


def drop_rows_after(path: str, step: int) -> None:
    """Keep the rows of `path` (metrics.jsonl) up to `step`; a line cut short by a crash goes too."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)
