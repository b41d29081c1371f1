"""Shared fixtures: a tiny sentencepiece tokenizer trained once per session, and tiny model configs."""

from __future__ import annotations

import os

import pytest
import torch

from mgpt4.model.presets import tiny
from mgpt4.model.prompts import STAGE2_INSTRUCTIONS, VICUNA_V0_SYSTEM

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from threads, and on a small shared machine threads only contend.
torch.set_num_threads(1)

TOKENIZER_CORPUS = [
    "a red circle on a blue background",
    "two green squares and a yellow triangle at the top left",
    "a small purple star in the bottom right corner of the picture",
    "###Human: <Img><ImageHere></Img> Describe this image in detail. ###Assistant: ",
    VICUNA_V0_SYSTEM,
    *STAGE2_INSTRUCTIONS,
] * 20


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from mgpt4.tokenizer import train_tiny_tokenizer

    return train_tiny_tokenizer(TOKENIZER_CORPUS, str(tmp_path_factory.mktemp("tokenizer")), vocab_size=400)


@pytest.fixture
def tiny_cfg():
    return tiny()


def pytest_collection_modifyitems(config, items):
    """`rehearsal` tests (the full-size rehearsal: ~20 GB of RAM, ~16 GB of disk, tens of minutes) run only
    when a -m expression names them (`python -m pytest -m rehearsal`); any other run, CI's included,
    deselects them."""
    if "rehearsal" in (config.getoption("markexpr") or ""):
        return
    kept = [item for item in items if item.get_closest_marker("rehearsal") is None]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept
