"""Exact counts of what a step held: samples, real tokens, computed positions and FLOPs, packed or not."""

from __future__ import annotations

import pytest
import torch

from mgpt4.data.packing import RowPacker
from mgpt4.model.layout import IMAGE_ONLY, layout
from mgpt4.model.presets import tiny, vicuna7b, vicuna13b
from mgpt4.train.flops import train_flops, train_flops_per_sample
from mgpt4.train.tally import Tally, batch_counts


def test_unpacked_batches_count_every_position_and_the_instruction_context():
    mask = torch.zeros(3, 10, dtype=torch.int64)
    mask[0, :4], mask[1, :10], mask[2, :1] = 1, 1, 1
    context = torch.tensor([9, 20])
    counts = batch_counts({"text_mask": mask, "instruction": torch.full((3,), 1)}, context)
    # samples, their tokens (20 context each + 15 answer), positions computed, FLOP tokens, squared lengths
    assert counts.tolist() == [3, 3 * 20 + 15, 3 * 30, 3 * 30, 3 * 30 * 30]
    assert batch_counts({"text_mask": mask}, context).tolist()[:2] == [3, 3 * 9 + 15]


def test_packed_batches_count_each_sample_and_its_own_attention():
    packer = RowPacker(rows=2, length=20, slots=5)
    for n in (7, 9, 12, 5):
        assert packer.place(n)
    slot, pos = packer.layout()
    mask = torch.zeros(5, 10, dtype=torch.int64)
    counts = batch_counts({"text_mask": mask, "pack_slot": slot, "pack_pos": pos}, torch.tensor([3]))
    assert counts.tolist() == [4, 33, 40, 33, 7 * 7 + 9 * 9 + 12 * 12 + 5 * 5]


def test_the_window_sums_steps_and_turns_them_into_flops():
    cfg = tiny()
    # A stage-1 sample of the tiny model: BOS and 8 image tokens before the answer.
    tally = Tally(cfg, (layout(IMAGE_ONLY, list, 1, 8),), cached=False, device=torch.device("cpu"))
    mask = torch.ones(2, 32, dtype=torch.int64)
    for _ in range(3):
        tally.add({"text_mask": mask})
    assert tally.sync() == 6
    window = tally.take_window()
    assert (window.samples, window.tokens, window.positions) == (6, 6 * 41, 6 * 41)
    assert window.flops == pytest.approx(6 * train_flops_per_sample(cfg, 41))
    assert tally.take_window().samples == 0  # a window ends when it is read


def test_flop_counts_match_the_issue_figures():
    """13B: 3.88 TFLOP at 65 tokens, 3.01 at 48, about 2.5 packed + cached; 7B: 2.26, 1.80, about 1.3."""
    for cfg, plain, packed, both in ((vicuna13b(), 3.88, 3.01, 2.47), (vicuna7b(), 2.26, 1.80, 1.27)):
        assert train_flops_per_sample(cfg, 65) / 1e12 == pytest.approx(plain, abs=0.005)
        assert train_flops_per_sample(cfg, 48) / 1e12 == pytest.approx(packed, abs=0.005)
        assert train_flops(cfg, 1, 48, 48 * 48, cached=True) / 1e12 == pytest.approx(both, abs=0.005)
