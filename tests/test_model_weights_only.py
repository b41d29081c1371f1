"""Weight files load with `weights_only=True`: official checkpoints do, a file that would run code is refused."""

from __future__ import annotations

import argparse
import dataclasses
import os

import pytest
import torch

from mgpt4.model import WeightsError, build_model
from mgpt4.model.loading import load_proj
from tests.official_files import proj_state


class _RunsCode:
    """Unpickling this calls os.mkdir on `path`: a stand-in for a file that executes anything."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _official_checkpoint(cfg) -> dict:
    """The layout the official runner saves: model, optimizer and scaler states, the config as a plain
    dict (`OmegaConf.to_container`), the epoch."""
    state = proj_state(cfg)
    w = state["llama_proj.weight"]
    return {
        "model": state,
        "optimizer": {
            "state": {
                0: {
                    "step": torch.tensor(200.0),
                    "exp_avg": torch.zeros_like(w),
                    "exp_avg_sq": torch.ones_like(w),
                }
            },
            "param_groups": [
                {"lr": 3e-5, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.05, "params": [0]}
            ],
        },
        "config": {
            "model": {"arch": "mini_gpt4", "freeze_vit": True, "max_txt_len": 160, "end_sym": "###"},
            "run": {"init_lr": 3e-5, "warmup_steps": 200, "amp": True},
            "datasets": {"cc_sbu_align": {"vis_processor": {"train": {"name": "blip2_image_train"}}}},
        },
        "scaler": {
            "scale": 65536.0,
            "growth_factor": 2.0,
            "backoff_factor": 0.5,
            "growth_interval": 2000,
            "_growth_tracker": 17,
        },
        "epoch": 4,
    }


def test_official_checkpoint_with_config_optimizer_and_scaler_loads(tmp_path, tiny_cfg):
    path = tmp_path / "pretrained_minigpt4.pth"
    saved = _official_checkpoint(tiny_cfg)
    torch.save(saved, path)
    model = build_model(tiny_cfg)
    load_proj(model, str(path))
    assert torch.equal(model.llama_proj.weight, saved["model"]["llama_proj.weight"])
    assert torch.equal(model.llama_proj.bias, saved["model"]["llama_proj.bias"])


def test_file_that_runs_code_is_refused_and_the_code_does_not_run(tmp_path, tiny_cfg):
    marker = tmp_path / "code-ran"
    path = tmp_path / "stranger_proj.pth"
    torch.save({"model": proj_state(tiny_cfg), "extra": _RunsCode(str(marker))}, path)
    model = build_model(tiny_cfg)
    with pytest.raises(WeightsError) as err:
        load_proj(model, str(path))
    message = str(err.value)
    assert str(path) in message and "posix.mkdir" in message and "model.weights.allow_pickle" in message
    assert not marker.exists()


def test_explicit_opt_in_unpickles_a_trusted_file(tmp_path, tiny_cfg):
    path = tmp_path / "old_run.pth"
    torch.save({"model": proj_state(tiny_cfg), "args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(WeightsError, match=r"carries argparse\.Namespace"):
        load_proj(build_model(tiny_cfg), str(path))
    trusting = dataclasses.replace(tiny_cfg, weights=dataclasses.replace(tiny_cfg.weights, allow_pickle=True))
    model = build_model(trusting)
    load_proj(model, str(path))
    assert torch.equal(model.llama_proj.weight, proj_state(tiny_cfg)["llama_proj.weight"])


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path, tiny_cfg):
    path = tmp_path / "download.pth"
    path.write_text("<html><body>403 Forbidden</body></html>")
    with pytest.raises(WeightsError, match=rf"{path}: not a readable torch file"):
        load_proj(build_model(tiny_cfg), str(path))
    # A real weight file cut short at any length (a copy or download that stopped) is named the same way.
    whole = tmp_path / "whole.pth"
    torch.save({"model": proj_state(tiny_cfg)}, whole)
    data = whole.read_bytes()
    for cut in (100, 1000, 5000, len(data) // 2, len(data) - 10):
        path.write_bytes(data[:cut])
        with pytest.raises(WeightsError, match=rf"{path}: not a readable torch file"):
            load_proj(build_model(tiny_cfg), str(path))
