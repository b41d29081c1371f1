"""The launchers' command line: recipes, overrides, --dry-run and the DeepSpeed JSON filled from the recipe."""

from __future__ import annotations

import glob
import json
import os

import pytest

from mgpt4.strict_config import ConfigError
from mgpt4.train.cli import main
from mgpt4.train.ds_config import build_ds_config
from mgpt4.train.recipes import RECIPES, get_recipe
from tests.launch import REPO


def dry_run(capsys, monkeypatch, world: int, *args: str) -> dict:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    main(["--dry-run", *args])
    return json.loads(capsys.readouterr().out)


def test_dry_run_prints_resolved_config_and_deepspeed_config(capsys, monkeypatch):
    out = dry_run(capsys, monkeypatch, 4, "--recipe", "stage1_vicuna13b", "--deepspeed", "ds_configs/z3.json")
    cfg, ds = out["config"], out["deepspeed"]
    assert cfg["recipe"] == "stage1_vicuna13b" and cfg["model"]["llm"]["hidden_size"] == 5120
    assert cfg["data"]["batch_size"] == 64  # 256 global over 4 ranks, as the official 64 x 4 GPUs
    assert ds["train_batch_size"] == 256 and ds["train_micro_batch_size_per_gpu"] == 64
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"] == {"enabled": True}
    assert ds["gradient_clipping"] == 0.0 and "optimizer" not in ds


def test_official_hyper_parameters():
    s1, s2 = get_recipe("stage1_vicuna7b"), get_recipe("stage2_vicuna7b")
    assert (s1.optim.lr, s1.optim.min_lr, s1.optim.warmup_lr, s1.optim.warmup_steps) == (
        1e-4,
        8e-5,
        1e-6,
        5000,
    )
    assert (s1.train.steps, s1.train.global_batch_size, s1.model.text.max_txt_len) == (20000, 256, 32)
    assert [s.ratio for s in s1.data.sources] == [115.0, 14.0] and s1.data.mix == "batch"
    assert (s2.optim.lr, s2.optim.min_lr, s2.optim.warmup_steps) == (3e-5, 1e-5, 200)
    assert (s2.train.global_batch_size, s2.model.text.max_txt_len, s2.model.text.end_sym) == (12, 160, "###")
    assert len(s2.model.text.instructions) == 4 and s2.data.kind == "align"
    assert set(RECIPES) >= {"tiny_stage1", "tiny_stage2", "stage1_vicuna13b", "stage2_vicuna13b"}


def test_unknown_key_fails(capsys, monkeypatch):
    with pytest.raises(SystemExit, match=r"unknown key 'train\.stepz'; did you mean train\.steps\?$"):
        dry_run(capsys, monkeypatch, 1, "--recipe", "stage1_vicuna7b", "--set", "train.stepz=10")
    with pytest.raises(
        SystemExit, match=r"unknown key 'data\.sources\.1\.ratoi'; did you mean data\.sources\.1\.ratio\?"
    ):
        dry_run(capsys, monkeypatch, 1, "--recipe", "stage1_vicuna7b", "--set", "data.sources.1.ratoi=2")
    # A list index the recipe lacks passes the early check (any index may exist) and fails on the config.
    with pytest.raises(SystemExit, match=r"unknown key 'data\.sources\.5'"):
        dry_run(capsys, monkeypatch, 1, "--recipe", "stage1_vicuna7b", "--set", "data.sources.5.ratio=2")


def test_a_mistyped_key_stops_before_the_model_code_is_imported():
    """What a typo costs a rank under the deepspeed launcher: the config's import, not the recipes' and
    transformers' models (seconds more)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from mgpt4.train.cli import main\n"
        "try:\n"
        "    main(['--set', 'trian.steps=3'])\n"
        "except SystemExit as e:\n"
        "    print(e)\n"
        "print(sorted(m for m in ('mgpt4.model', 'mgpt4.train.recipes', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, check=True
    ).stdout.splitlines()
    assert out == [
        "config error: override 'trian.steps': unknown key 'trian'; did you mean train.steps?",
        "[]",
    ]


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.output_dir=", r"train\.output_dir: empty"),
        ("optim.lr=-1", r"optim\.lr: expected a positive learning rate, got -1\.0"),
        (
            "model.qformer.num_query_tokens=0",
            r"model\.qformer\.num_query_tokens: expected a positive integer",
        ),
        ("model.qformer=null", r"model\.weights\.blip2 is set, but model\.qformer is null"),
    ],
)
def test_the_dry_run_refuses_what_the_real_run_would_crash_on(override, message, capsys, monkeypatch):
    with pytest.raises(SystemExit, match=rf"^config error: {message}"):
        dry_run(capsys, monkeypatch, 1, "--recipe", "stage1_vicuna7b", "--set", override)


def test_a_multi_rank_error_line_names_its_rank(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(SystemExit, match=r"^\[rank 3\] config error: optim\.lr"):
        dry_run(capsys, monkeypatch, 4, "--recipe", "stage1_vicuna7b", "--set", "optim.lr=0")


def test_list_overrides_by_index(capsys, monkeypatch):
    out = dry_run(
        capsys, monkeypatch, 1, "--recipe", "stage1_vicuna7b", "--set", "data.sources.1.shards=/cc/{0..3}.tar"
    )
    assert out["config"]["data"]["sources"][1]["shards"] == "/cc/{0..3}.tar"


def test_deepspeed_json_that_disagrees_with_the_recipe_is_an_error(tmp_path):
    cfg = get_recipe("stage1_vicuna7b")
    cfg.data.batch_size = 8
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=4 disagrees with the recipe"):
        build_ds_config(str(bad), cfg, 1)
    bad.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="remove 'optimizer'"):
        build_ds_config(str(bad), cfg, 1)
    auto = tmp_path / "auto.json"
    auto.write_text(json.dumps({"train_batch_size": "auto", "zero_optimization": {"stage": 2}}))
    assert build_ds_config(str(auto), cfg, 2)["train_batch_size"] == 16


def test_schedule_is_linear_warmup_then_cosine_over_the_run():
    from mgpt4.train.optim import lr_at

    o = get_recipe("stage1_vicuna7b").optim
    assert lr_at(0, 20000, o) == pytest.approx(1e-6)
    assert lr_at(2500, 20000, o) == pytest.approx(1e-6 + (1e-4 - 1e-6) * 0.5)
    assert lr_at(10000, 20000, o) == pytest.approx(8e-5 + (1e-4 - 8e-5) * 0.5)
    assert lr_at(20000, 20000, o) == pytest.approx(8e-5)


# ---------------------------------------------------------------------------------------------
# --dry-run: every check that needs no weights, and nothing written


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_dry_run_writes_nothing(recipe, tmp_path, capsys, monkeypatch):
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    cache.mkdir()
    monkeypatch.setenv("MGPT4_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    out = dry_run(capsys, monkeypatch, 1, "--recipe", recipe, "--set", f"train.output_dir={run_dir}",
                  "--deepspeed", os.path.join(REPO, "ds_configs", "z2.json"))  # fmt: skip
    assert list(cache.iterdir()) == [] and not run_dir.exists()
    assert sorted(os.listdir(tmp_path)) == ["cache"]
    if recipe.startswith("tiny"):  # the demo paths are filled in, and generated only by a real run
        weights = out["config"]["model"]["weights"]
        assert weights["llm"].startswith(str(cache)) and out["missing_inputs"] == []
    else:  # the official layout is not on this machine: listed, not fatal
        # (a vision tower recipe reads its tower from a folder instead of eva_vit_g.pth)
        first = "model.vision.folder" if "tower" in recipe else "model.weights.eva_vit"
        assert any(first in m for m in out["missing_inputs"])


def test_dry_run_still_checks_shards_against_readers(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MGPT4_CACHE", str(tmp_path / "cache"))
    # 4 synthetic shards (not generated yet) split over 1 rank x 8 workers.
    with pytest.raises(SystemExit, match=r"has 4 shard\(s\), fewer than 1 rank\(s\) x 8 worker\(s\)"):
        dry_run(capsys, monkeypatch, 1, "--set", "data.resampled=false", "--set", "data.num_workers=8")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("ds_config", sorted(glob.glob(os.path.join(REPO, "ds_configs", "*.json"))))
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_recipe_resolves_against_every_shipped_deepspeed_config(
    recipe, ds_config, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("MGPT4_CACHE", str(tmp_path / "cache"))
    world = 4 if get_recipe(recipe).train.global_batch_size == 256 else 1
    with open(ds_config) as f:
        stage = json.load(f)["zero_optimization"]["stage"]
    out = dry_run(capsys, monkeypatch, world, "--recipe", recipe, "--deepspeed", ds_config)
    ds = out["deepspeed"]
    assert ds["zero_optimization"]["stage"] == stage
    assert (
        ds["train_batch_size"]
        == out["config"]["data"]["batch_size"] * out["config"]["train"]["grad_accum"] * world
    )
    precision = out["config"]["train"]["precision"]
    assert ds["bf16"]["enabled"] == (precision == "bf16") and ds["fp16"]["enabled"] == (precision == "fp16")
