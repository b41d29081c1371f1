"""An export folder loads back into mgpt4 (issue 23: the server loads "a run folder, checkpoint, official
files or an export"): `--checkpoint EXPORT_DIR` gives the model the export was made from, parameter for
parameter, with its template, tokenizer and greedy replies; a folder that is no mgpt4 export is refused
in one line naming the file and field.

The models are test_export_hf's: tiny fp32 Vicuna v0 (Q-Former, Blip2ForConditionalGeneration), the
LLaMA-2 variant (remote code) and a Qwen2 decoder with its tokenizer's chat template.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mgpt4.export.__main__ import main as export_main
from mgpt4.inference import ModelSource, load_model
from mgpt4.model import WeightsError
from mgpt4.model.generation import eos_token_ids
from mgpt4.strict_config import to_dict
from tests.chat_fixtures import write_image
from tests.serve_fixtures import ServerProcess, data_url, image_message
from tests.test_export_hf import QUESTIONS, _model, _reference, _write_run


@pytest.fixture(scope="module")
def cases(tmp_path_factory, tokenizer):
    """template -> (run folder, export folder), and the test image."""
    root = tmp_path_factory.mktemp("export_load")
    image = write_image(str(root / "image.png"), size=(90, 70))
    out = {}
    for template in QUESTIONS:
        case = root / template
        run = _write_run(_model(template, tokenizer, str(case)), str(case))
        folder = str(case / "hf")
        assert export_main(["hf", "--checkpoint", run, "--out", folder, "--device", "cpu"]) == 0
        out[template] = (run, folder)
    return out, image


def _load(path: str):
    return load_model(ModelSource(checkpoint=path, device="cpu"))


@pytest.mark.parametrize("template", list(QUESTIONS))
def test_an_export_loads_back_as_the_model_it_was_made_from(cases, template):
    (run, folder), image = cases[0][template], cases[1]
    ours, back = _load(run), _load(folder)
    assert type(back.llm) is type(ours.llm)
    want, got = ours.state_dict(), back.state_dict()
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    # ln_vision at the official eps again (a BLIP-2 export stores transformers' 1e-6 for it).
    assert back.ln_vision.eps == ours.ln_vision.eps == 1e-5
    assert back.num_image_tokens == ours.num_image_tokens
    assert (back.cfg.qformer is None) == (ours.cfg.qformer is None)
    for part in ("vision", "qformer", "precision", "text"):
        if getattr(ours.cfg, part) is not None:
            assert to_dict(getattr(back.cfg, part)) == to_dict(getattr(ours.cfg, part)), part
    assert back.llm.config.vocab_size == ours.llm.config.vocab_size
    spec, want_spec = back.text_spec, ours.text_spec
    assert (spec.instruction, spec.end_sym, spec.bos_id, spec.stops) == (
        want_spec.instruction,
        want_spec.end_sym,
        want_spec.bos_id,
        want_spec.stops,
    )
    assert set(eos_token_ids(back.tokenizer, back.llm.generation_config)) == set(
        eos_token_ids(ours.tokenizer, ours.llm.generation_config)
    )
    # The folder's tokenizer lays the prompt out as the run's does, and generate gives the same tokens.
    conv = ours.new_conversation()
    conv.add_image()
    conv.ask(QUESTIONS[template][0][0])
    prompt = conv.prompt_for_reply()
    assert back.layout(prompt) == ours.layout(prompt)
    ref, got_ref = _reference(ours, image, QUESTIONS[template]), _reference(back, image, QUESTIONS[template])
    assert got_ref["tokens"] == ref["tokens"] and len(ref["tokens"]) > 1
    assert got_ref["reply"] == ref["reply"]
    assert torch.equal(got_ref["logits"], ref["logits"])


def test_an_export_re_exports_to_the_same_weights_and_config(cases, tmp_path):
    folder = cases[0]["vicuna_v0"][1]
    again = str(tmp_path / "again")
    assert export_main(["hf", "--checkpoint", folder, "--out", again, "--device", "cpu"]) == 0
    first, second = (load_file(os.path.join(f, "model.safetensors")) for f in (folder, again))
    assert sorted(second) == sorted(first)
    for key, value in first.items():
        assert torch.equal(second[key], value), key

    def config(f: str) -> dict:
        with open(os.path.join(f, "config.json"), encoding="utf-8") as fh:
            data = json.load(fh)
        data["text_config"].pop("_name_or_path", None)  # where the LLM was read from
        return data

    assert config(again) == config(folder)
    for name in ("chat_template.jinja", "generation_config.json", "tokenizer.json"):
        with open(os.path.join(folder, name), encoding="utf-8") as a, open(os.path.join(again, name)) as b:
            assert b.read() == a.read(), name


def test_the_server_answers_from_an_export_as_from_the_run(cases):
    (run, folder), image = cases[0]["vicuna_v0"], cases[1]
    replies = []
    for path in (run, folder):
        server = ServerProcess("--checkpoint", path, "--device", "cpu", "--greedy", "--max-new-tokens", "8")
        try:
            r = server.client().chat.completions.create(
                model=server.name, messages=[image_message(data_url(image), "Describe this image in detail.")]
            )
            replies.append(r.choices[0].message.content)
        finally:
            server.stop()
    assert replies[1] == replies[0] != ""


def _one_line_exit(path: str, **source) -> str:
    with pytest.raises(SystemExit) as e:
        load_model(ModelSource(checkpoint=path, device="cpu", **source))
    message = str(e.value.code)
    assert "\n" not in message, message
    return message


def _copy_export(folder: str, dest: str, config=None, weights=None) -> str:
    """A copy of `folder` with its config.json and weights changed by the given functions."""
    shutil.copytree(folder, dest)
    if config is not None:
        path = os.path.join(dest, "config.json")
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        config(data)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f)
    if weights is not None:
        path = os.path.join(dest, "model.safetensors")
        state = load_file(path)
        weights(state)
        save_file(state, path, metadata={"format": "pt"})
    return dest


def test_a_folder_that_is_no_mgpt4_export_is_one_line_naming_file_and_field(cases, tmp_path):
    run, folder = cases[0]["vicuna_v0"]
    llm = os.path.join(os.path.dirname(run), "official", "llm")  # a plain LLaMA folder
    message = _one_line_exit(llm)
    assert os.path.join(llm, "config.json") in message and "model_type 'llama'" in message
    assert "--llm" in message

    def narrow_projection(state):
        state["language_projection.weight"] = state["language_projection.weight"][:, :32].contiguous()

    bad = _copy_export(folder, str(tmp_path / "narrow"), weights=narrow_projection)
    message = _one_line_exit(bad)
    assert os.path.join(bad, "model.safetensors") in message
    assert "language_projection.weight" in message and "[64, 64]" in message and "[64, 32]" in message

    def drop_record(data):
        del data["mgpt4"]

    bad = _copy_export(folder, str(tmp_path / "no_record"), config=drop_record)
    message = _one_line_exit(bad)
    assert os.path.join(bad, "config.json") in message and "'mgpt4'" in message

    def bad_template(data):
        data["mgpt4"]["text"]["template"] = "alpaca"

    bad = _copy_export(folder, str(tmp_path / "bad_template"), config=bad_template)
    message = _one_line_exit(bad)
    assert "config.json" in message and "model.text.template" in message and "alpaca" in message

    message = _one_line_exit(folder, llm=llm)
    assert "export" in message and "--llm" in message


def test_an_unexpected_or_missing_weight_is_an_error_naming_it(cases, tmp_path):
    folder = cases[0]["llama2_chat"][1]

    def extra(state):
        state["vision_model.encoder.layers.0.extra.weight"] = torch.zeros(2)

    bad = _copy_export(folder, str(tmp_path / "extra"), weights=extra)
    with pytest.raises(
        WeightsError, match=r"unexpected key 'vision_model\.encoder\.layers\.0\.extra\.weight'"
    ):
        _load(bad)

    def extra_llm(state):
        state["language_model.model.extra.weight"] = torch.zeros(2)

    bad = _copy_export(folder, str(tmp_path / "extra_llm"), weights=extra_llm)
    with pytest.raises(WeightsError, match=r"model\.extra\.weight"):
        _load(bad)

    def missing(state):
        del state["vision_model.post_layernorm.bias"]

    bad = _copy_export(folder, str(tmp_path / "missing"), weights=missing)
    with pytest.raises(WeightsError, match=r"missing key for ln_vision\.bias"):
        _load(bad)


def test_an_export_takes_overrides_and_the_low_memory_flags(cases):
    folder = cases[0]["vicuna_v0"][1]
    model = load_model(
        ModelSource(checkpoint=folder, device="cpu", overrides=["text.max_txt_len=7"], llm_dtype="bf16")
    )
    assert model.cfg.text.max_txt_len == 7
    assert model.llm.get_input_embeddings().weight.dtype == torch.bfloat16
    assert dataclasses.asdict(model.cfg.weights) == dataclasses.asdict(type(model.cfg.weights)())
    message = _one_line_exit(folder, llm_8bit=True)
    assert "--llm-8bit" in message
