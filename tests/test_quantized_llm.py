"""A quantised frozen LLM (`model.precision.llm` int8 / nf4, bitsandbytes): refused at config time where it
cannot run (CPU, no bitsandbytes, no LLM folder, ZeRO-3); on a GPU (`gpu` marker) the LLM is loaded
quantised for training and chat while the projection keeps its own dtype and gets the gradient."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from mgpt4.config import Config, quantized_llm_refusal
from mgpt4.model.presets import tiny
from mgpt4.strict_config import ConfigError
from mgpt4.train.resolve import check_precision
from tests.official_files import write_official_files


def _cfg(quant: str, llm: str | None = "/models/llm") -> Config:
    cfg = Config(model=tiny())
    cfg.model.precision.llm = quant
    cfg.model.weights.llm = llm
    return cfg


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_refused_on_cpu_at_config_time(quant, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as err:
        _cfg(quant).validate()
    line = str(err.value)
    assert "\n" not in line
    assert (
        line.startswith(f"model.precision.llm={quant}:") and "CUDA GPU" in line and "none is visible" in line
    )


def test_refused_without_bitsandbytes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a)
    )
    with pytest.raises(ConfigError, match=r"^model.precision.llm=nf4: .*pip install bitsandbytes"):
        _cfg("nf4").validate()


def test_refused_without_an_llm_folder():
    with pytest.raises(ConfigError, match=r"^model.precision.llm=int8: .*set model.weights.llm"):
        _cfg("int8", llm=None).validate()


def test_other_names_are_refused_with_the_choices():
    cfg = _cfg("int4")
    with pytest.raises(
        ConfigError, match=r"model.precision.llm: expected one of .*'int8', 'nf4'.*got 'int4'"
    ):
        cfg.validate()
    cfg.model.precision.vit = "nf4"  # only the LLM may be quantised
    cfg.model.precision.llm = "bf16"
    with pytest.raises(ConfigError, match=r"model.precision.vit: expected one of \('fp32', 'bf16', 'fp16'\)"):
        cfg.validate()


def test_refused_under_zero3():
    with pytest.raises(ConfigError, match=r"^model.precision.llm=nf4: ZeRO-3 cannot partition"):
        check_precision(_cfg("nf4"), 3)
    check_precision(_cfg("nf4"), 2)  # ZeRO-2 keeps it whole on every rank


def test_the_meta_build_of_a_quantised_config_computes_in_bf16():
    # The planner builds on the meta device; a quantised LLM's unquantised parts are bf16.
    from mgpt4.model import build_model

    cfg = tiny()
    cfg.precision.llm = "nf4"
    cfg._validated_as = repr(cfg)  # as validated on a GPU machine: the build trusts it
    model = build_model(cfg, device="meta")
    assert model.llm.get_input_embeddings().weight.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# On a GPU


def _gpu_or_skip() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (gpu marker)")
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("needs bitsandbytes (pip install mgpt4[lowmem])")


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer):
    return write_official_files(str(tmp_path_factory.mktemp("quant")), tiny(), tokenizer)


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantised_llm_trains_the_projection(quant, files, tokenizer):
    _gpu_or_skip()
    import bitsandbytes as bnb

    from mgpt4.model import apply_freeze, build_model, from_config, load_weights

    def model(precision: str):
        cfg = tiny()
        cfg.weights = dataclasses.replace(
            cfg.weights, **{k: files[k] for k in ("eva_vit", "blip2", "llm", "proj")}
        )
        cfg.precision.llm = precision
        assert quantized_llm_refusal(cfg) is None or precision == "bf16"
        torch.manual_seed(0)
        if precision == "bf16":
            return from_config(cfg, tokenizer).cuda()
        m = build_model(cfg, tokenizer)
        load_weights(m)  # the LLM is read quantised onto the current GPU
        apply_freeze(m)
        for name in ("visual_encoder", "ln_vision", "qformer", "llama_proj"):
            getattr(m, name).cuda()
        m.query_tokens.data = m.query_tokens.data.cuda()
        return m

    quantised, reference = model(quant), model("bf16")
    layer = quantised.llm.model.layers[0].mlp.down_proj
    assert isinstance(layer, bnb.nn.Linear8bitLt if quant == "int8" else bnb.nn.Linear4bit)
    assert quantised.llama_proj.weight.dtype == torch.float32 and quantised.llama_proj.weight.requires_grad
    assert [n for n, p in quantised.named_parameters() if p.requires_grad] == [
        "llama_proj.weight",
        "llama_proj.bias",
    ]
    images = torch.randn(2, 3, 56, 56, device="cuda")
    ids = torch.randint(5, 300, (2, 16), device="cuda")
    mask = torch.ones_like(ids)
    losses = []
    for m in (quantised, reference):
        m.train()
        loss = m(images, ids, mask).loss
        loss.backward()
        assert torch.isfinite(m.llama_proj.weight.grad).all() and m.llama_proj.weight.grad.abs().sum() > 0
        losses.append(loss.item())
    # Quantisation perturbs the LLM a little, not the loss's scale.
    assert abs(losses[0] - losses[1]) < 0.1 * abs(losses[1]), losses
    q_bytes = sum(p.numel() * p.element_size() for p in quantised.llm.model.layers.parameters())
    r_bytes = sum(p.numel() * p.element_size() for p in reference.llm.model.layers.parameters())
    assert q_bytes < (0.6 if quant == "int8" else 0.35) * r_bytes, (q_bytes, r_bytes)


@pytest.mark.gpu
def test_chat_loads_a_quantised_llm(files, tokenizer):
    _gpu_or_skip()
    from mgpt4.inference import load_model
    from mgpt4.inference.loader import ModelSource

    names = ("eva_vit", "blip2", "llm", "proj")
    source = ModelSource(
        preset="tiny", device="cuda", overrides=["model.precision.llm=nf4"], **{n: files[n] for n in names}
    )
    model = load_model(source)
    assert type(model.llm.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    prompt = model.wrap_instruction("<Img><ImageHere></Img> What is it?")
    out = model.generate(torch.randn(1, 3, 56, 56, device="cuda"), prompt, max_new_tokens=4)
    assert isinstance(out[0], str)
