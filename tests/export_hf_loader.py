"""Loads exported folders as a user without mgpt4 would (run by tests/test_export_hf.py as `python -I`).

Any import of mgpt4 fails here (it is pip-installed on this machine, so a meta-path finder refuses it).
For each job of the JSON file given: AutoProcessor (PIL backend) and the model class load the folder;
the chat template renders the messages, the processor makes the inputs, and the prompt logits,
greedy tokens and reply are saved with torch.save; the loaded processor and model are saved again and
compared file by file with the folder.
"""

from __future__ import annotations

import importlib.abc
import json
import os
import sys


class _NoMgpt4(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "mgpt4" or fullname.startswith(("mgpt4.", "tests")):
            raise ImportError(f"{fullname} must not be imported by an exported folder's user")
        return None


sys.meta_path.insert(0, _NoMgpt4())
# End of the mgpt4 blocker (test_export_hf runs the README snippet after the lines above).

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForImageTextToText,
    AutoProcessor,
    Blip2ForConditionalGeneration,
    LlavaForConditionalGeneration,
)


def _mgpt4_importable() -> bool:
    try:
        import mgpt4  # noqa: F401
    except ImportError:
        return False
    return True


def _differences(a: str, b: str) -> list[str]:
    """Files of folder `a` (but its model card) missing from `b` or different there, and files only in `b`."""
    names = sorted(n for n in os.listdir(a) if n != "README.md")
    out = [f"{n}: only in the resaved folder" for n in sorted(set(os.listdir(b)) - set(names))]
    for name in names:
        pa, pb = os.path.join(a, name), os.path.join(b, name)
        if not os.path.isfile(pb):
            out.append(f"{name}: missing after save")
            continue
        with open(pa, "rb") as fa, open(pb, "rb") as fb:
            if fa.read() != fb.read():
                out.append(f"{name}: differs")
    return out


def run(job: dict) -> None:
    torch.manual_seed(0)
    processor = AutoProcessor.from_pretrained(job["folder"], backend="pil")
    if job["remote"]:
        model = AutoModelForImageTextToText.from_pretrained(job["folder"], trust_remote_code=True)
    elif job.get("llava"):
        model = LlavaForConditionalGeneration.from_pretrained(job["folder"])
    else:
        model = Blip2ForConditionalGeneration.from_pretrained(job["folder"])
    model.eval()
    tok = processor.tokenizer
    prompt = tok.apply_chat_template(job["messages"], add_generation_prompt=True, tokenize=False)
    inputs = processor(images=Image.open(job["image"]), text=prompt, return_tensors="pt")
    image_id = model.config.image_token_index
    with torch.no_grad():
        logits = model(**inputs).logits[0].float()
    greedy = model.generation_config.__class__.from_dict(model.generation_config.to_dict())
    greedy.do_sample, greedy.max_new_tokens = False, job["new_tokens"]
    out = model.generate(**inputs, generation_config=greedy, tokenizer=tok)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    reply = tok.decode(new, skip_special_tokens=True)
    for stop in model.generation_config.stop_strings or []:
        reply = reply.split(stop)[0]
    reply = reply.strip()
    direct = {}
    if job.get("pixels"):  # given pixels (the model's own normalisation): image embeddings and greedy tokens
        pixels = torch.load(job["pixels"], weights_only=True)
        with torch.no_grad():
            direct["direct_image_embeds"] = torch.stack(
                model.get_image_features(pixel_values=pixels).pooler_output
            )
        ids = {k: v for k, v in inputs.items() if k != "pixel_values"}
        out_direct = model.generate(**ids, pixel_values=pixels, generation_config=greedy, tokenizer=tok)
        direct["direct_tokens"] = out_direct[0, inputs["input_ids"].shape[1] :].tolist()
    # Saved again as loaded by default: transformers keeps a `backend` argument among the tokenizer's
    # settings, so the PIL-backed processor would write `"backend": "pil"` into tokenizer_config.json.
    AutoProcessor.from_pretrained(job["folder"]).save_pretrained(job["resaved"])
    model.save_pretrained(job["resaved"])
    # The <image> logit made ten times the greedy winner's: the generation config still never picks it,
    # and without its suppress_tokens greedy decoding does.
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[image_id] = head[new[0]] * 10
    one = model.generation_config.__class__.from_dict(greedy.to_dict())
    one.max_new_tokens = 1
    first = model.generate(**inputs, generation_config=one, tokenizer=tok)[0, -1].item()
    one.suppress_tokens = []  # not None: GenerationMixin.generate fills a None from the model's own config
    unsuppressed = model.generate(**inputs, generation_config=one, tokenizer=tok)[0, -1].item()
    torch.save(
        {
            "mgpt4_importable": _mgpt4_importable(),
            "processor_class": type(processor).__name__,
            "model_class": type(model).__name__,
            "pixel_values": inputs["pixel_values"],
            "logits": logits,
            "tokens": new,
            "reply": reply,
            "image_token_suppressed": first == new[0] and unsuppressed == image_id,
            "resaved_files": sorted(os.listdir(job["resaved"])),
            "resaved_differences": _differences(job["folder"], job["resaved"]),
            "input_ids": inputs["input_ids"][0].tolist(),
            **direct,
        },
        job["result"],
    )


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        jobs = json.load(f)
    for job in jobs:
        run(job)


if __name__ == "__main__":
    main()
