"""MFU's CPU peak is measured the way the step runs: the step's torch threads and the engine's dtype."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest
import torch

from mgpt4.bench import train as bench
from mgpt4.dist import DistInfo
from mgpt4.train import flops


@pytest.fixture
def mm_calls(monkeypatch):
    """Every torch.mm the peak measurement makes: (threads at the call, dtype)."""
    calls = []
    mm = torch.mm

    def spy(a, b):
        calls.append((torch.get_num_threads(), a.dtype))
        return mm(a, b)

    monkeypatch.setattr(torch, "mm", spy)
    before = torch.get_num_threads()
    yield calls
    torch.set_num_threads(before)


def test_the_peak_uses_the_threads_and_dtype_it_is_given_and_restores_the_callers(mm_calls):
    torch.set_num_threads(2)
    peak = flops.measure_matmul_tflops(torch.bfloat16, threads=1, sizes=(64, 128), seconds=0.01)
    assert peak > 0 and mm_calls and set(mm_calls) == {(1, torch.bfloat16)}
    assert torch.get_num_threads() == 2
    mm_calls.clear()
    flops.measure_matmul_tflops(torch.float32, sizes=(64,), seconds=0.01)  # default: the caller's threads
    assert set(mm_calls) == {(2, torch.float32)}


def test_the_trainer_peak_is_measured_with_the_steps_threads_and_dtype(mm_calls):
    torch.set_num_threads(2)
    flops.device_peak_tflops(torch.device("cpu"), torch.float64)
    assert set(mm_calls) == {(2, torch.float64)}


class _Engine:
    """A training step that runs with 2 threads whatever its caller had (as a library that sets its
    own thread count would), and records what it ran with."""

    def __init__(self):
        self.threads = []

    def __call__(self, **_):
        torch.set_num_threads(2)
        self.threads.append(torch.get_num_threads())
        return SimpleNamespace(loss=torch.zeros(()))

    def backward(self, loss):
        pass

    def step(self):
        pass


class _Model:
    def enable_gradient_checkpointing(self):
        pass

    llm = SimpleNamespace(gradient_checkpointing_disable=lambda: None)


class _Tally:
    def add(self, batch):
        pass

    def sync(self):
        return 0

    def take_window(self):
        return None


def test_the_bench_measures_the_peak_with_the_threads_its_steps_ran_with_in_every_round(
    mm_calls, monkeypatch
):
    torch.set_num_threads(1)
    engine = _Engine()
    cfg = SimpleNamespace(train=SimpleNamespace(grad_accum=1))
    jobs = [bench.Job("plain", False, cfg, [{}], _Tally()), bench.Job("packed", False, cfg, [{}], _Tally())]
    args = argparse.Namespace(rounds=3, steps=3, warmup=1)
    d = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    rounds = []
    measure = flops.measure_matmul_tflops

    def measured(dtype, threads):
        rounds.append((dtype, threads))
        return measure(dtype, threads, sizes=(64,), seconds=0.01)

    monkeypatch.setattr(bench, "measure_matmul_tflops", measured)
    torch.set_num_threads(1)
    peak = bench.time_jobs(engine, _Model(), jobs, d, args, torch.float32)
    assert peak > 0
    assert rounds == [(torch.float32, 2)] * 3  # one measurement per round, as the steps ran
    assert set(engine.threads) == {2} and set(mm_calls) == {(2, torch.float32)}
