"""Generation: the Vicuna v0 template, stop words, greedy decoding equal to a hand-written loop."""

from __future__ import annotations

import torch

from mgpt4.model import apply_freeze, build_model
from mgpt4.model.generation import StopOnSequences, stop_sequences
from mgpt4.model.prompts import VICUNA_V0_SYSTEM, Conversation, clean_reply


def test_conversation_template_matches_the_official_format():
    conv = Conversation()
    conv.add_image()
    conv.ask("What is in the picture?")
    first = conv.prompt_for_reply()
    assert first == (
        VICUNA_V0_SYSTEM + "###Human: <Img><ImageHere></Img> What is in the picture?###Assistant: "
    )
    conv.add_reply("A red circle.")
    conv.ask("Where is it?")
    assert conv.prompt_for_reply() == first + "A red circle.###Human: Where is it?###Assistant: "
    assert conv.prompt_for_reply().count("<ImageHere>") == 1


def test_clean_reply():
    assert clean_reply(" A red circle.###Human: more") == "A red circle."
    assert clean_reply("Assistant: hello ###") == "hello"


def test_stop_sequences_and_criterion(tokenizer):
    seqs = stop_sequences(tokenizer)
    assert seqs and all(tokenizer.decode(s).strip() == "###" for s in seqs)
    crit = StopOnSequences([[7, 8], [9]])
    ids = torch.tensor([[1, 7, 8], [1, 8, 7], [5, 6, 9]])
    assert crit(ids, None).tolist() == [True, False, True]


def test_greedy_generation_equals_a_hand_written_loop(tiny_cfg, tokenizer):
    torch.manual_seed(0)
    model = build_model(tiny_cfg, tokenizer)
    apply_freeze(model)
    model.eval()
    image = torch.randn(1, 3, 56, 56)
    conv = Conversation()
    conv.add_image()
    conv.ask("Describe this image.")
    prompt = conv.prompt_for_reply()
    replies = model.generate(image, prompt, max_new_tokens=12)
    with torch.no_grad():
        embs = model.context_embeds(prompt, [model.encode_img(image)])
        embed = model.llm.get_input_embeddings()
        stops = stop_sequences(tokenizer)
        out: list[int] = []
        for _ in range(12):
            nxt = int(model.llm(inputs_embeds=embs).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == tokenizer.eos_token_id or any(out[-len(s) :] == s for s in stops):
                break
            embs = torch.cat([embs, embed(torch.tensor([[nxt]]))], dim=1)
    assert replies == [clean_reply(tokenizer.decode(out, skip_special_tokens=True))]


def test_context_is_cut_from_the_left(tiny_cfg, tokenizer):
    model = build_model(tiny_cfg, tokenizer)
    apply_freeze(model)
    model.eval()
    long_prompt = "###Human: <Img><ImageHere></Img> " + "describe the picture " * 200 + "###Assistant: "
    # The tiny LLM has 512 positions: without the cut this prompt would not fit.
    replies = model.generate(torch.randn(2, 3, 56, 56), long_prompt, max_new_tokens=4, max_context=500)
    assert len(replies) == 2


def test_sampling_runs_and_differs_from_greedy_sometimes(tiny_cfg, tokenizer):
    torch.manual_seed(0)
    model = build_model(tiny_cfg, tokenizer)
    apply_freeze(model)
    model.eval()
    image = torch.randn(1, 3, 56, 56)
    prompt = "###Human: <Img><ImageHere></Img> Describe.###Assistant: "
    greedy = model.generate(image, prompt, max_new_tokens=8)
    samples = {
        model.generate(image, prompt, max_new_tokens=8, sample=True, temperature=2.0, top_p=1.0)[0]
        for _ in range(5)
    }
    assert len(samples - set(greedy)) >= 1
