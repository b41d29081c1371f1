"""Validation loss: the held-out set is fixed, the loss is the token-weighted mean over it whatever the
ranks and batches, the schedule and its time stay out of training's figures."""

from __future__ import annotations

import json
import pathlib
import tarfile
from dataclasses import replace

import pytest
import torch

from mgpt4.config import Config, TrainConfig
from mgpt4.data.align import AlignDataset, load_align, split_holdout
from mgpt4.data.batches import BatchText
from mgpt4.data.config import DataConfig, SourceConfig, ValConfig
from mgpt4.data.heldout import heldout_batches, read_heldout, sample_instruction
from mgpt4.data.synthetic import ensure_synthetic
from mgpt4.data.transforms import ImageTransform, clean_caption, normalize_uint8
from mgpt4.model import apply_freeze, build_model
from mgpt4.model.presets import stage1_text, stage2_text, tiny
from mgpt4.model.prompts import STAGE2_INSTRUCTIONS
from mgpt4.strict_config import ConfigError
from mgpt4.tokenizer import encode_answers
from mgpt4.train.validation import Validation, loss_sums
from tests.data_fixtures import sample_files, write_tar

SIZE = 56


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return ensure_synthetic(str(root), shards=1, per_shard=2, align=9, min_size=64, max_size=96, val=7)


def _model(tokenizer, stage: int):
    torch.manual_seed(0)
    cfg = tiny()
    cfg.text = stage1_text() if stage == 1 else stage2_text()
    cfg.text.max_txt_len = 48
    model = build_model(cfg, tokenizer)
    apply_freeze(model)
    return model.eval()


def _direct_loss(model, samples) -> float:
    """The model's own loss, one sample at a time, weighted by each sample's answer tokens."""
    t = model.cfg.text
    transform = ImageTransform(SIZE, train=False)
    total, tokens = 0.0, 0
    for data, caption, instruction in samples:
        pixels = torch.empty(3, SIZE, SIZE, dtype=torch.uint8)
        transform(data, None, pixels)
        with torch.no_grad():
            loss = model.loss(normalize_uint8(pixels[None]), [caption], instruction=instruction)
        n = int(encode_answers(model.tokenizer, [caption], t.end_sym, t.max_txt_len)[1].sum())
        total += float(loss) * n
        tokens += n
    return total / tokens


def _validation_loss(model, cfg: DataConfig, world_size: int, batch_size: int) -> float:
    """What the trainer computes: each rank's share, then the sums added up (the all-reduce)."""
    t = model.cfg.text
    text = BatchText(model.tokenizer, t.max_txt_len, t.end_sym, len(t.instructions))
    sums, counts = torch.zeros(2, dtype=torch.float64), []
    for rank in range(world_size):
        held = read_heldout(cfg, len(t.instructions), rank, world_size)
        batches = heldout_batches(held, text, batch_size, rank, world_size)
        counts.append(len(batches))
        sums += loss_sums(model, batches, torch.device("cpu"))
    assert len(set(counts)) == 1, counts  # every rank runs as many forwards (ZeRO-3)
    return float(sums[0] / sums[1])


def _shard_samples(path: str, n: int):
    with tarfile.open(path) as tar:
        names = tar.getnames()
        keys = list(dict.fromkeys(name.split(".")[0] for name in names))[:n]
        return [
            (
                tar.extractfile(f"{k}.jpg").read(),
                clean_caption(tar.extractfile(f"{k}.txt").read().decode()),
                None,
            )
            for k in keys
        ]


@pytest.mark.parametrize("world_size,batch_size", [(1, 4), (2, 3), (3, 2)])
def test_stage1_validation_loss_equals_the_models_loss_over_the_same_samples(
    data, tokenizer, world_size, batch_size
):
    model = _model(tokenizer, 1)
    cfg = DataConfig(
        sources=[SourceConfig(shards=data.shards)],
        image_size=SIZE,
        val=ValConfig(samples=6, shards=data.val_shards),
    )
    expected = _direct_loss(model, _shard_samples(data.val_shards[0], 6))
    assert _validation_loss(model, cfg, world_size, batch_size) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("world_size,batch_size", [(1, 4), (2, 2)])
def test_stage2_instructions_are_fixed_per_sample(data, tokenizer, world_size, batch_size):
    model = _model(tokenizer, 2)
    cfg = DataConfig(
        kind="align",
        align_root=data.align_root,
        image_size=SIZE,
        val=ValConfig(samples=7, align_root=data.val_align_root),
    )
    held = read_heldout(cfg, 4)
    assert (
        held.instructions == [sample_instruction(i, 4) for i in range(7)] == read_heldout(cfg, 4).instructions
    )
    assert len(set(held.instructions)) > 1  # several instructions, so batches are grouped by them
    # A held-out folder smaller than data.val.samples is refused before the run, with what to set.
    from mgpt4.train.resolve import find_missing_val

    n = len(load_align(data.val_align_root))
    with pytest.raises(
        ValueError, match=rf"has {n} pairs, data.val.samples asks for 99; set data.val.samples={n} or fewer"
    ):
        find_missing_val(replace(cfg, val=ValConfig(samples=99, align_root=data.val_align_root)), set())
    data_root = pathlib.Path(data.val_align_root)
    anns = json.loads((data_root / "filter_cap.json").read_text())["annotations"]
    samples = [
        (
            (data_root / "image" / f"{a['image_id']}.jpg").read_bytes(),
            a["caption"],
            STAGE2_INSTRUCTIONS[ins],
        )
        for a, ins in zip(anns, held.instructions)
    ]
    expected = _direct_loss(model, samples)
    assert _validation_loss(model, cfg, world_size, batch_size) == pytest.approx(expected, abs=1e-6)


def test_unusable_samples_are_skipped_and_counted_and_too_few_is_an_error(tmp_path, tokenizer):
    shard = write_tar(
        str(tmp_path / "val.tar"),
        [
            ("0", sample_files("0", "a red circle", 0)),
            ("1", {"jpg": b"\xff\xd8\xff not a jpeg", "txt": b"broken"}),
            ("2", sample_files("2", None, 1)),
            ("3", sample_files("3", "a blue square", 2)),
        ],
    )
    cfg = DataConfig(
        sources=[SourceConfig(shards=shard)], image_size=SIZE, val=ValConfig(samples=2, shards=shard)
    )
    held = read_heldout(cfg)
    assert held.captions == ["a red circle", "a blue square"]
    assert held.skipped == {"corrupt_image": 1, "no_caption": 1}
    cfg.val.samples = 3
    with pytest.raises(
        ValueError,
        match=r"data.val.shards: the held-out source has 2 usable samples, .* asks for 3.*; "
        r"set data.val.samples=2 or fewer",
    ):
        read_heldout(cfg)


def test_a_holdout_slice_is_fixed_and_never_trained_on(data, tokenizer):
    pairs = load_align(data.align_root)
    train, held = split_holdout(pairs, 3)
    assert len(held) == 3 and len(train) == 6 and not {p.image_id for p in train} & {p.image_id for p in held}
    assert split_holdout(pairs, 3) == (train, held)  # no seed involved: every run holds out the same
    cfg = DataConfig(kind="align", align_root=data.align_root, image_size=SIZE, batch_size=2, num_workers=0)
    cfg.val = ValConfig(samples=3, holdout=3)
    dataset = AlignDataset(cfg, BatchText(tokenizer, 16, "###"))
    assert [p.image_id for p in dataset.pairs] == [p.image_id for p in train]
    assert read_heldout(cfg).captions == [p.caption for p in held]
    with pytest.raises(ValueError, match="leave none of the 9 to train on"):
        split_holdout(pairs, 9)


def test_config_refuses_what_it_cannot_honour():
    def check(**changes):
        cfg = Config(data=DataConfig(sources=[SourceConfig(shards="x.tar")]), train=TrainConfig(log_every=5))
        for key, value in changes.items():
            section, name = key.split("__")
            setattr(getattr(cfg, section), name, value)
        cfg.validate()

    check(data__val=ValConfig(samples=4, shards="v.tar"), train__eval_every=10)
    with pytest.raises(
        ConfigError,
        match=r"train.eval_every: \d+, but there is nothing to validate on; set data.val, or train.eval_every=0",
    ):
        check(train__eval_every=10)
    with pytest.raises(
        ConfigError, match=r"train.eval_every \(7\) must be a multiple of train.log_every \(5\)"
    ):
        check(data__val=ValConfig(samples=4, shards="v.tar"), train__eval_every=7)
    with pytest.raises(ConfigError, match=r"data.val.shards is set but data.val.samples is 0"):
        check(data__val=ValConfig(shards="v.tar"))
    with pytest.raises(ConfigError, match=r"data.val.shards: kind 'webdataset' validates on held-out shards"):
        check(data__val=ValConfig(samples=4))
    with pytest.raises(ConfigError, match=r"data.val.holdout: only for kind 'align'"):
        check(data__val=ValConfig(samples=4, shards="v.tar", holdout=3))
    cfg = DataConfig(kind="align", align_root="a", val=ValConfig(samples=4, holdout=2))
    with pytest.raises(ConfigError, match=r"data.val.samples: 4 is more than the 2 held-out pairs"):
        cfg.validate()


def test_schedule_is_a_function_of_the_step():
    v = Validation([], 4, every=20, steps=50, device=torch.device("cpu"), dtype=torch.float32)
    assert [s for s in range(1, 51) if v.due(s)] == [20, 40, 50]
    v.every = 0
    assert [s for s in range(1, 51) if v.due(s)] == [50]


def test_evaluation_time_is_reported_and_kept_out_of_the_throughput(tmp_path, monkeypatch):
    from mgpt4.train import metrics as metrics_mod
    from mgpt4.train.tally import Window

    clock = [100.0]
    monkeypatch.setattr(metrics_mod.time, "perf_counter", lambda: clock[0])
    m = metrics_mod.Metrics(str(tmp_path), 0, 1, 10, None)
    window = Window(samples=8, tokens=80, positions=80, flops=8e9)  # one step of 8 samples
    m.add_step(0.0)
    clock[0] += 10.0
    m.add_eval({"val/loss": 2.5, "perf/eval_s": 8.0}, 8.0)
    row = m.write(1, {"train/loss": 3.0, "train/lr": 1e-4}, 0.0, {}, window)
    assert row["val/loss"] == 2.5 and row["perf/eval_s"] == 8.0
    assert row["perf/samples_per_s"] == pytest.approx(8 / 2.0)  # 10 s of wall time, 8 s of it validation
    m.add_step(0.0)
    clock[0] += 4.0
    row = m.write(2, {"train/loss": 3.0, "train/lr": 1e-4}, 0.0, {}, window)
    assert "val/loss" not in row and row["perf/samples_per_s"] == pytest.approx(8 / 4.0)
    m.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [("val/loss" in r) for r in lines] == [True, False]


def test_held_out_synthetic_data_leaves_the_training_data_as_it_was(tmp_path):
    """The tiny recipes' loss curves and tokenizer depend on the training set alone."""
    small = dict(shards=1, per_shard=2, align=2, min_size=64, max_size=80)
    plain = ensure_synthetic(str(tmp_path / "a"), **small)
    with_val = ensure_synthetic(str(tmp_path / "b"), **small, val=3)
    assert plain.val_shards == [] and len(with_val.val_shards) == 1
    assert with_val.captions == plain.captions
    assert pathlib.Path(with_val.shards[0]).read_bytes() == pathlib.Path(plain.shards[0]).read_bytes()
    assert (pathlib.Path(with_val.align_root) / "filter_cap.json").read_text() == (
        pathlib.Path(plain.align_root) / "filter_cap.json"
    ).read_text()
    val_caps = [
        a["caption"]
        for a in json.loads((pathlib.Path(with_val.val_align_root) / "filter_cap.json").read_text())[
            "annotations"
        ]
    ]
    assert len(val_caps) == 3 and not set(val_caps) & set(with_val.captions)
