"""`train.compile`: compiled steps give the eager losses, and compile once: no recompilation over 20 steps,
plain or packed, nor after a resume."""

from __future__ import annotations

import copy

import pytest
import torch

from mgpt4.data.packing import RowPacker
from mgpt4.model import apply_freeze, build_model
from mgpt4.model.presets import stage1_text, tiny
from mgpt4.strict_config import ConfigError
from mgpt4.tokenizer import encode_answers
from mgpt4.train.compiled import check_compile, compile_model, compiled_graphs

CAPTIONS = [
    "a red circle",
    "two green squares and a yellow triangle at the top left",
    "a small purple star in the bottom right corner of the picture",
    "a red circle on a blue background",
]


def _model(tokenizer):
    cfg = tiny()
    cfg.text = stage1_text()
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer)
    apply_freeze(model)
    return model.train()


def _batches(tokenizer, model, packed: bool, count: int) -> list[dict]:
    """`count` batches of one shape (the loader's static shapes), each with other images and captions."""
    out = []
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        captions = [CAPTIONS[(i + j) % len(CAPTIONS)] for j in range(len(CAPTIONS))]
        ids, mask = encode_answers(tokenizer, captions, model.text_spec.end_sym, model.cfg.text.max_txt_len)
        batch = {
            "image": torch.randn(len(CAPTIONS), 3, 56, 56, generator=g),
            "text_ids": ids,
            "text_mask": mask,
        }
        if packed:
            packer = RowPacker(2, 96, len(CAPTIONS))
            for n in (model.sample_layouts()[0].context_length + mask.sum(1)).tolist():
                assert packer.place(n)
            batch["pack_slot"], batch["pack_pos"] = packer.layout()
        out.append(batch)
    return out


def _train(model, batches, optimizer) -> list[float]:
    losses = []
    for batch in batches:
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_compiled_steps_equal_eager_and_compile_once_resume_included(tokenizer, packed):
    torch._dynamo.reset()
    eager = _model(tokenizer)
    compiled = copy.deepcopy(eager)
    batches = _batches(tokenizer, eager, packed, 20)
    opt_e = torch.optim.AdamW([p for p in eager.parameters() if p.requires_grad], lr=1e-3)
    opt_c = torch.optim.AdamW([p for p in compiled.parameters() if p.requires_grad], lr=1e-3)
    compile_model(compiled, torch.device("cpu"))

    first = _train(compiled, batches[:1], opt_c)
    graphs = compiled_graphs()
    assert graphs > 0  # the step was compiled
    losses = first + _train(compiled, batches[1:], opt_c)
    assert compiled_graphs() == graphs, "a later step recompiled"
    with torch.no_grad():  # validation and generation run eager: they compile nothing
        compiled(**batches[0])
        compiled.generate(batches[0]["image"][:1], "<Img><ImageHere></Img>", max_new_tokens=3)
    assert compiled_graphs() == graphs, "a call without gradients compiled"
    torch.testing.assert_close(losses, _train(eager, batches, opt_e), rtol=1e-5, atol=1e-5)

    # A resume: a fresh compiled model takes the saved trainable state and optimizer, and goes on.
    state = {"model": compiled.state_dict(), "optimizer": opt_c.state_dict()}
    resumed = _model(tokenizer)
    resumed.load_state_dict(state["model"])
    opt_r = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-3)
    opt_r.load_state_dict(state["optimizer"])
    compile_model(resumed, torch.device("cpu"))
    more = _batches(tokenizer, eager, packed, 25)[20:]
    after = _train(resumed, more, opt_r)
    assert compiled_graphs() == graphs, "the resumed model compiled again"
    torch.testing.assert_close(after, _train(eager, more, opt_e), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (gpu marker)")
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_cuda_graphs_steps_equal_eager_and_compile_once(tokenizer, packed):
    """On CUDA the compiled parts replay as CUDA graphs ("reduce-overhead")."""
    torch._dynamo.reset()
    eager = _model(tokenizer).cuda()
    compiled = copy.deepcopy(eager)
    batches = [{k: v.cuda() for k, v in b.items()} for b in _batches(tokenizer, eager, packed, 8)]
    opt_e = torch.optim.AdamW([p for p in eager.parameters() if p.requires_grad], lr=1e-3)
    opt_c = torch.optim.AdamW([p for p in compiled.parameters() if p.requires_grad], lr=1e-3)
    assert compile_model(compiled, torch.device("cuda")).cuda_graphs
    losses = _train(compiled, batches[:2], opt_c)
    graphs = compiled_graphs()
    losses += _train(compiled, batches[2:], opt_c)
    assert compiled_graphs() == graphs
    torch.testing.assert_close(losses, _train(eager, batches, opt_e), rtol=1e-5, atol=1e-5)


def test_compile_is_refused_under_zero3_only():
    with pytest.raises(ConfigError, match=r"train\.compile: not under ZeRO-3"):
        check_compile(True, 3)
    check_compile(True, 2)
    check_compile(False, 3)
