"""Device feeder: on-device normalisation, data-wait metric, and when a batch counts as consumed."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision import transforms

from mgpt4.data import CLIP_MEAN, CLIP_STD, DataConfig, DeviceFeeder, SourceConfig, build_loader
from tests.data_fixtures import numbered_shards, tiny_tokenizer


class _Clock:
    """A clock the batches below advance instead of sleeping: the feeder's wait measurement is then
    checked exactly, whatever else the (shared) machine is doing."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = _Clock()
    monkeypatch.setattr("mgpt4.data.feeder.time", fake)
    return fake


def _batches(n: int, delay: float = 0.0, clock: _Clock | None = None):
    gen = torch.Generator().manual_seed(0)
    for i in range(n):
        if delay:
            clock.now += delay  # the loader is slow: this much time passes inside next()
        yield {
            "image": torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=gen),
            "text_ids": torch.full((2, 4), i, dtype=torch.int64),
            "text_mask": torch.ones(2, 4, dtype=torch.int64),
        }


def test_feeder_normalises_like_the_official_transform():
    official = transforms.Compose([transforms.ToTensor(), transforms.Normalize(CLIP_MEAN, CLIP_STD)])
    raw = list(_batches(3))
    fed = list(DeviceFeeder(_batches(3), "cpu"))
    assert len(fed) == 3
    for got, src in zip(fed, raw):
        ref = torch.stack([official(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in src["image"]])
        assert got["image"].dtype == torch.float32 and got["image"].is_contiguous()
        torch.testing.assert_close(got["image"], ref, atol=1e-6, rtol=1e-6)
        assert torch.equal(got["text_ids"], src["text_ids"]) and torch.equal(
            got["text_mask"], src["text_mask"]
        )
    bf16 = next(iter(DeviceFeeder(_batches(1), "cpu", dtype=torch.bfloat16)))
    assert bf16["image"].dtype == torch.bfloat16


def test_feeder_measures_the_data_wait(clock):
    feeder = DeviceFeeder(_batches(3, delay=0.05, clock=clock), "cpu")
    waits = []
    for _ in feeder:
        waits.append(feeder.last_wait_s)
    # The clock moves only inside the loader's next(): each step waited exactly that long.
    assert waits == pytest.approx([0.05] * 3)
    assert feeder.steps == 3 and feeder.total_wait_s == pytest.approx(0.15)
    fast = DeviceFeeder(_batches(3), "cpu")
    for _ in fast:
        assert fast.last_wait_s == 0.0  # a loader that is always ready costs no wait
    assert fast.steps == 3 and fast.total_wait_s == 0.0


def test_feeder_marks_batches_consumed_in_the_loader(tmp_path):
    paths = numbered_shards(str(tmp_path), 2, 4)
    cfg = DataConfig(sources=[SourceConfig(shards=paths)], batch_size=2, num_workers=0, image_size=16)
    loader = build_loader(cfg, tiny_tokenizer(), 8, "\n")
    feeder = DeviceFeeder(loader, "cpu")
    it = iter(feeder)
    for step in range(1, 4):
        next(it)
        assert feeder.state_dict()["batches"] == step == loader.state_dict()["batches"]
    assert feeder.stats() == loader.stats()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_feeder_prefetches_and_matches_the_cpu_path(tmp_path):
    paths = numbered_shards(str(tmp_path), 2, 4)
    cfg = DataConfig(sources=[SourceConfig(shards=paths)], batch_size=2, num_workers=0, image_size=16)
    cpu = [
        b["image"]
        for _, b in zip(range(3), DeviceFeeder(build_loader(cfg, tiny_tokenizer(), 8, "\n"), "cpu"))
    ]
    loader = build_loader(cfg, tiny_tokenizer(), 8, "\n")
    feeder = DeviceFeeder(loader, "cuda", dtype=torch.float32)
    it = iter(feeder)
    for step in range(3):
        batch = next(it)
        assert batch["image"].is_cuda and batch["text_ids"].is_cuda
        torch.testing.assert_close(batch["image"].cpu(), cpu[step], atol=1e-6, rtol=0)
        # One more batch has been taken from the loader already, but the position counts what was handed out.
        assert loader.state_dict()["batches"] == step + 1
