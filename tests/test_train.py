"""Training through the real launchers on CPU: quickstart, 2 ranks under ZeRO-2/3, exact resume, bad input."""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil

import pytest
import torch

from tests.launch import REPO, deepspeed_cmd, on_free_port, read_jsonl, readme_block, run

pytestmark = pytest.mark.slow

SCALARS = {
    "train/loss",
    "train/lr",
    "train/grad_norm",
    "perf/samples_per_s",
    "perf/samples_per_step",
    "perf/padding_fraction",
    "perf/tokens_per_s",
    "perf/tflops_per_device",
    "perf/mfu",
    "perf/data_wait_s",
    "memory/device_gb",
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("mgpt4-cache"))


def readme_quickstart() -> list[str]:
    """The shell lines of the README's quickstart block that start a training run."""
    return [p for p in readme_block("quickstart") if p.startswith("deepspeed ")]


def tensorboard_tags(folder: str) -> tuple[set[str], set[str], set[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(folder, size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    return set(tags["scalars"]), set(tags["images"]), set(tags["tensors"])


def test_readme_quickstart_trains_end_to_end(tmp_path, cache):
    """The README's command, as written, in a fresh folder: checkpoint, export and TensorBoard."""
    for folder in ("launchers", "ds_configs"):
        shutil.copytree(os.path.join(REPO, folder), tmp_path / folder)
    commands = readme_quickstart()
    assert commands == ["deepspeed launchers/pretrain.py --deepspeed ds_configs/z2.json"]
    proc = run(on_free_port(commands[0]), cache, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-4000:]
    out = tmp_path / "outputs" / "tiny_stage1"
    latest = (out / "checkpoints" / "latest").read_text().strip()
    ckpt = out / "checkpoints" / latest
    assert latest == "step_00000040" and (ckpt / "config.json").is_file()
    # The export is in the official format and loads through the strict loader.
    exported = torch.load(ckpt / "llama_proj.pth", weights_only=True)
    assert set(exported) == {"model"} and set(exported["model"]) == {"llama_proj.weight", "llama_proj.bias"}
    from mgpt4.config import ModelConfig
    from mgpt4.model import build_model
    from mgpt4.model.loading import load_proj
    from mgpt4.strict_config import from_dict

    cfg = from_dict(ModelConfig, json.loads((ckpt / "config.json").read_text())["model"], "model")
    model = build_model(cfg)
    load_proj(model, str(ckpt / "llama_proj.pth"))
    assert torch.equal(model.llama_proj.weight, exported["model"]["llama_proj.weight"])
    # No frozen weights in the checkpoint: everything in it is small.
    assert sum(os.path.getsize(f) for f in glob.glob(str(ckpt / "*"))) < 2_000_000
    scalars, images, texts = tensorboard_tags(str(out / "tensorboard"))
    assert scalars >= SCALARS, SCALARS - scalars
    assert "samples/images" in images and any("samples/captions" in t for t in texts)
    rows = read_jsonl(str(out / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30, 35, 40]
    # The recipe validates on held-out synthetic shards halfway and at the end.
    assert [r["step"] for r in rows if "val/loss" in r] == [20, 40] and "val/loss" in scalars
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    assert "eta" in proc.stdout and "MFU" in proc.stdout


@pytest.mark.multirank
@pytest.mark.parametrize("ds_json,precision", [("z2.json", "fp32"), ("z3.json", "fp32"), ("z3.json", "bf16")])
def test_two_ranks(tmp_path, cache, ds_json, precision):
    """bf16 under ZeRO-3 is the GPU default: the pre-partitioned LLM makes mgpt4 cast the rest itself."""
    out = tmp_path / "run"
    bf16 = ["model.precision.vit=bf16", "model.precision.qformer=bf16", "model.precision.llm=bf16"]
    extra = [a for kv in (bf16 if precision == "bf16" else []) for a in ("--set", kv)]
    cmd = deepspeed_cmd(
        "launchers/pretrain.py",
        2,
        "--deepspeed",
        f"ds_configs/{ds_json}",
        "--set", f"train.output_dir={out}",
        "--set", "train.steps=3",
        "--set", "train.log_every=1",
        "--set", f"train.precision={precision}",
        *extra,
    )  # fmt: skip
    proc = run(cmd, cache)
    assert proc.returncode == 0, proc.stdout[-4000:]
    # DeepSpeed's CPU all-reduce leaves a 64 MiB /dev/shm segment per rank and run unless mgpt4
    # unlinks it: a few hundred runs used to fill the machine's memory.
    port = cmd[cmd.index("--master_port") + 1]
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
    report = json.loads((out / "engine.json").read_text())
    proj_numel = 64 * 64 + 64
    assert report["world_size"] == 2 and report["trainable_params"] == proj_numel
    # Adam's state covers exactly the projection, split over the ranks.
    assert sum(report["optimizer_state_numel_per_rank"]) == proj_numel
    per_rank = report["llm_params_per_rank"]
    if ds_json == "z3.json":
        assert report["zero_stage"] == 3
        assert all(abs(n - report["llm_params"] / 2) <= 0.02 * report["llm_params"] for n in per_rank), (
            per_rank
        )
    else:
        assert report["zero_stage"] == 2 and per_rank == [report["llm_params"]] * 2
    assert [r["step"] for r in read_jsonl(str(out / "metrics.jsonl"))] == [1, 2, 3]


def test_z3_offload_trains_two_steps(tmp_path, cache):
    """Every shipped DeepSpeed config trains: ZeRO-3 with parameters offloaded to the CPU, tiny size."""
    out = tmp_path / "run"
    proc = run(
        ["python", "launchers/pretrain.py", "--deepspeed", "ds_configs/z3_offload.json",
         "--set", f"train.output_dir={out}", "--set", "train.steps=2", "--set", "train.log_every=1"],
        cache,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert json.loads((out / "engine.json").read_text())["zero_stage"] == 3
    rows = read_jsonl(str(out / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["train/loss"]) for r in rows)
    assert (out / "checkpoints" / "step_00000002" / "llama_proj.pth").is_file()


# Rows of 96 tokens hold about three tiny samples (9 context + 10-20 answer tokens), so two rows often fill
# before the 8 slots: batches hold varying numbers of samples and samples wait for the next batch.
PACKED = ["--set", "data.pack_length=96", "--set", "data.pack_rows=2"]


def extract_cache(tmp_path, cache) -> list[str]:
    """The tiny recipe's synthetic shards as a feature cache; the overrides that train from it."""
    out = tmp_path / "features"
    proc = run(["python", "-m", "mgpt4.features", "extract", "--out", str(out), "--num-workers", "1"], cache)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return ["--set", "data.kind=features", "--set", f"data.features_root={out}"]


@pytest.mark.multirank
@pytest.mark.parametrize("mode", ["plain", "packed", "packed+cached"])
def test_resume_continues_the_same_loss_curve(tmp_path, cache, mode):
    common = ["--deepspeed", "ds_configs/z2.json", "--set", "train.steps=6", "--set", "train.log_every=1",
              "--set", "train.save_every=3", "--set", "data.num_workers=2"]  # fmt: skip
    common += (PACKED if "packed" in mode else []) + (
        extract_cache(tmp_path, cache) if "cached" in mode else []
    )
    full, parts = tmp_path / "full", tmp_path / "parts"
    proc = run(deepspeed_cmd("launchers/pretrain.py", 2, *common, "--set", f"train.output_dir={full}"), cache)
    assert proc.returncode == 0, proc.stdout[-4000:]
    first = run(
        deepspeed_cmd(
            "launchers/pretrain.py",
            2,
            *common,
            "--set",
            f"train.output_dir={parts}",
            "--set",
            "train.stop_at=3",
        ),
        cache,
    )
    assert first.returncode == 0, first.stdout[-4000:]
    assert (parts / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    second = run(
        deepspeed_cmd("launchers/pretrain.py", 2, *common, "--set", f"train.output_dir={parts}"), cache
    )
    assert second.returncode == 0, second.stdout[-4000:]
    assert "resumed from step 3" in second.stdout
    a = read_jsonl(str(full / "metrics.jsonl"))
    b = read_jsonl(str(parts / "metrics.jsonl"))
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        assert ra["train/loss"] == rb["train/loss"], (ra["step"], ra["train/loss"], rb["train/loss"])
        assert ra["train/lr"] == rb["train/lr"]
        # Samples seen are counted exactly and restored with the checkpoint.
        assert ra["train/samples_seen"] == rb["train/samples_seen"]
    seen = [r["train/samples_seen"] for r in a]
    if mode == "plain":
        assert seen == [16 * step for step in range(1, 7)]
    else:  # packed steps hold a varying number of samples, never more than the 2 x 8 slots
        steps = [b - a for a, b in zip([0, *seen], seen)]
        assert all(0 < n <= 16 for n in steps) and len(set(steps)) > 1, steps
    pa = torch.load(full / "checkpoints" / "step_00000006" / "llama_proj.pth")["model"]
    pb = torch.load(parts / "checkpoints" / "step_00000006" / "llama_proj.pth")["model"]
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_a_packed_run_counts_its_samples_exactly(tmp_path, cache):
    """samples_seen, samples per step and the padding fraction equal what the loader packed, step by step."""
    out = tmp_path / "run"
    proc = run(
        ["python", "launchers/pretrain.py", "--set", f"train.output_dir={out}", "--set", "train.steps=6",
         "--set", "train.log_every=2", *PACKED],
        cache,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert re.search(r"samples/s \([0-9.]+/step\) \| [0-9]+ tok/s \| pad [0-9.]+%", proc.stdout), proc.stdout[
        -2000:
    ]
    from mgpt4.config import Config
    from mgpt4.data import build_loader
    from mgpt4.model import build_model
    from mgpt4.strict_config import from_dict

    cfg = from_dict(Config, json.loads((out / "config.json").read_text())["config"])
    model = build_model(cfg.model)
    contexts = [lay.context_length for lay in model.sample_layouts()]
    text = cfg.model.text
    loader = build_loader(cfg.data, model.tokenizer, text.max_txt_len, text.end_sym, context_lengths=contexts)
    it = iter(loader)
    samples, tokens = [], []
    for _ in range(6):
        batch = next(it)
        used = int((batch["sample_id"] >= 0).sum())
        samples.append(used)
        tokens.append(used * contexts[0] + int(batch["text_mask"].sum()))
    loader.close()
    rows = read_jsonl(str(out / "metrics.jsonl"))
    assert [r["train/samples_seen"] for r in rows] == [sum(samples[:2]), sum(samples[:4]), sum(samples)]
    for i, r in enumerate(rows):
        window = slice(2 * i, 2 * i + 2)
        assert r["perf/samples_per_step"] == pytest.approx(sum(samples[window]) / 2)
        assert r["perf/padding_fraction"] == pytest.approx(1 - sum(tokens[window]) / (2 * 2 * 96))
    assert len(set(samples)) > 1 and max(samples) <= 8


def _fails_before_training(tmp_path, cache, *overrides: str) -> str:
    proc = run(
        ["python", "launchers/pretrain.py", "--set", f"train.output_dir={tmp_path / 'bad'}", *overrides],
        cache,
    )
    assert proc.returncode != 0
    assert "step 1/" not in proc.stdout and "Traceback" not in proc.stdout, proc.stdout[-3000:]
    return proc.stdout


def test_missing_weight_file_is_named(tmp_path, cache):
    out = _fails_before_training(tmp_path, cache, "--set", "model.weights.eva_vit=/nonexistent/eva_vit_g.pth")
    assert "/nonexistent/eva_vit_g.pth" in out and "does not exist" in out


def test_wrong_size_projection_says_which_llm(tmp_path, cache):
    path = tmp_path / "pretrained_minigpt4_7b.pth"
    torch.save(
        {"model": {"llama_proj.weight": torch.zeros(4096, 64), "llama_proj.bias": torch.zeros(4096)}}, path
    )
    out = _fails_before_training(tmp_path, cache, "--set", f"model.weights.proj={path}")
    assert "LLaMA/Vicuna-7B" in out and "[4096, 64]" in out and "[64, 64]" in out


def test_data_path_without_shards(tmp_path, cache):
    sources = json.dumps([{"name": "laion", "shards": "/nonexistent/laion/{00000..00003}.tar"}])
    out = _fails_before_training(tmp_path, cache, "--set", f"data.sources={sources}")
    assert "none of the 4 shard(s) of source 'laion' exist" in out and "/nonexistent/laion/00000.tar" in out


def test_a_source_whose_shards_are_all_damaged_stops_with_one_line(tmp_path, cache):
    """Failed downloads saved as shards: the run stops with mgpt4's one-line error, not a worker traceback."""
    folder = tmp_path / "laion"
    folder.mkdir()
    for i in range(2):
        (folder / f"{i:05d}.tar").write_bytes(b"<html><body>503 Service Unavailable</body></html>\n" * 60)
    sources = json.dumps([{"name": "laion", "shards": str(folder / "{00000..00001}.tar")}])
    out = _fails_before_training(tmp_path, cache, "--set", f"data.sources={sources}")
    [line] = [ln for ln in out.splitlines() if "mgpt4: error:" in ln]
    assert line.startswith("mgpt4: error: source 'laion': ") and "00000.tar" in line, line
    assert "not a tar archive" in line and "<html>" in line


def test_global_batch_not_divisible(tmp_path, cache):
    out = _fails_before_training(
        tmp_path, cache, "--set", "train.global_batch_size=5", "--set", "train.grad_accum=2"
    )
    assert "train.global_batch_size=5 is not divisible" in out


def test_stage2_starts_from_a_stage1_run(tmp_path, cache):
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    first = run(
        ["python", "launchers/pretrain.py", "--set", f"train.output_dir={stage1}", "--set", "train.steps=4"],
        cache,
    )
    assert first.returncode == 0, first.stdout[-3000:]
    second = run(
        ["python", "launchers/finetune.py", "--set", f"train.output_dir={stage2}", "--set", "train.steps=4",
         "--set", f"model.weights.proj={stage1}"],
        cache,
    )  # fmt: skip
    assert second.returncode == 0, second.stdout[-3000:]
    cfg = json.loads((stage2 / "config.json").read_text())["config"]
    assert cfg["recipe"] == "tiny_stage2" and cfg["model"]["text"]["end_sym"] == "###"
    assert cfg["model"]["weights"]["proj"] == str(stage1 / "checkpoints" / "step_00000004" / "llama_proj.pth")
    assert (stage2 / "checkpoints" / "step_00000004" / "llama_proj.pth").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (gpu marker)")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_one_gpu_mixed_precision(tmp_path, cache, precision):
    """On the lent GPU machine: the quickstart recipe under bf16, and fp16 with loss scaling."""
    out = tmp_path / "run"
    proc = run(
        deepspeed_cmd(
            "launchers/pretrain.py", 1, "--deepspeed", "ds_configs/z2.json",
            "--set", f"train.output_dir={out}", "--set", "train.steps=6", "--set", "train.log_every=2",
            "--set", f"train.precision={precision}", "--set", f"model.precision.llm={precision}",
        ),
        cache,
        cpu=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:]
    rows = read_jsonl(str(out / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [2, 4, 6] and all(math.isfinite(r["train/loss"]) for r in rows)
    assert rows[-1]["memory/device_gb"] > 0
