"""The model card (README.md) of an export: what the model is made of, what it was trained on and how
far, how well it did, and how to load it; the licence fields are left for the user to fill in.

Facts come from the checkpoint the export was made from: its saved config (base weights, data
sources), its run state (step, samples seen), the run's metrics.jsonl (last training loss and
validation loss) and any metrics.json of `python -m mgpt4.eval captions` (caption scores). A fact
that is not there is written as "not recorded", never guessed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mgpt4.checkpoints import CONFIG_FILE, RUN_STATE, read_checkpoint_config
from mgpt4.model import MiniGPT4
from mgpt4.tower_folder import read_tower_folder

NOT_RECORDED = "not recorded"
SCORE_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")


@dataclass
class ExportFacts:
    """Where the exported model came from: its checkpoint folder (None for official files) and the
    metrics.json files of caption evaluations to report."""

    checkpoint: str | None = None
    eval_metrics: list[str] = field(default_factory=list)


def _run_dir(checkpoint: str) -> str:
    """The run's output folder of `checkpoint` (`<run>/checkpoints/step_N`)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))


def training_state(checkpoint: str) -> dict:
    """Step and samples seen from the checkpoint's run state (empty when it has none)."""
    path = os.path.join(checkpoint, RUN_STATE)
    if not os.path.isfile(path):
        return {}
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: int(state[k]) for k in ("step", "samples_seen") if k in state}


def last_metrics(run_dir: str, step: int | None) -> dict[str, float]:
    """The last `train/loss` and `val/loss` in the run's metrics.jsonl at or before `step`."""
    path = os.path.join(run_dir, "metrics.jsonl")
    found: dict[str, float] = {}
    if not os.path.isfile(path):
        return found
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if step is not None and row.get("step", 0) > step:
                continue
            for key in ("train/loss", "val/loss"):
                if key in row:
                    found[key] = float(row[key])
                    found[key + "@step"] = int(row.get("step", 0))
    return found


def eval_scores(paths: list[str]) -> list[tuple[str, dict]]:
    """(file, metrics.json contents) of each caption evaluation; ValueError naming a file that is not one."""
    out = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"--eval-metrics {path}: not a readable metrics.json ({e})") from None
        if not isinstance(data, dict) or not any(k in data for k in SCORE_KEYS):
            raise ValueError(
                f"--eval-metrics {path}: no caption scores in it (expected {', '.join(SCORE_KEYS)})"
            )
        out.append((path, data))
    return out


def _data_lines(config: dict) -> list[str]:
    data = config.get("data") or {}
    if not data:
        return [f"- {NOT_RECORDED}"]
    lines = []
    if data.get("kind") == "align":
        lines.append(f"- `{data.get('align_root')}` (cc_sbu_align layout: filter_cap.json + image/)")
    for src in data.get("sources") or []:
        shards = src.get("shards")
        shards = shards if isinstance(shards, list) else [shards]
        shown = shards[:3] + ([f"... {len(shards) - 3} more"] if len(shards) > 3 else [])
        try:
            from mgpt4.data.shard_lists import expand_shards

            count = f"{len(expand_shards(src.get('shards')))} shards"
        except Exception:
            count = "shard count unknown"
        lines.append(
            f"- {src.get('name') or 'source'}: `{', '.join(map(str, shown))}` ({count}, ratio {src.get('ratio')})"
        )
    return lines or [f"- {NOT_RECORDED}"]


def model_card(model: MiniGPT4, facts: ExportFacts, model_class: str, notes: Sequence[str] = ()) -> str:
    """The README.md text of the export; `notes` are the export's own remarks (the ln_vision eps)."""
    cfg = model.cfg
    config: dict = {}
    state: dict = {}
    metrics: dict[str, float] = {}
    if facts.checkpoint and os.path.isfile(os.path.join(facts.checkpoint, CONFIG_FILE)):
        config = read_checkpoint_config(facts.checkpoint)
        state = training_state(facts.checkpoint)
        metrics = last_metrics(_run_dir(facts.checkpoint), state.get("step"))
    scores = eval_scores(facts.eval_metrics)
    w = cfg.weights
    llava = model_class == "LlavaForConditionalGeneration"
    variant = "LLaMA-2 variant (no Q-Former)" if cfg.qformer is None else "Q-Former variant"
    if llava:
        tower = read_tower_folder(cfg.vision.folder).model_type
        variant = f"with a transformers `{tower}` tower and LLaVA-1.5's mlp2x_gelu projector (LLaVA's layout)"
    remote = cfg.qformer is None and not llava
    load_class = "AutoModelForImageTextToText" if remote else model_class
    trust = ", trust_remote_code=True" if remote else ""
    train = config.get("train") or {}

    def fmt(key: str) -> str:
        if key not in metrics:
            return NOT_RECORDED
        return f"{metrics[key]:.4f} (step {metrics[key + '@step']})"

    lines = [
        "---",
        "license:  # fill in: the licences of the base weights (LLaMA/Vicuna, EVA-CLIP, BLIP-2) bind this model",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        "tags: [minigpt4, mgpt4]",
        "---",
        "",
        "# MiniGPT-4 model (exported by mgpt4)",
        "",
        f"A MiniGPT-4 {variant} as `{model_class}`, exported with `python -m mgpt4.export hf`.",
        "",
        "## Base weights",
        "",
        f"- vision: {w.blip2_hf or w.eva_vit or cfg.vision.folder or NOT_RECORDED}"
        + (f" + {w.blip2}" if w.blip2 else ""),
        f"- language model: {w.llm or NOT_RECORDED}",
        f"- projection (`llama_proj`, the trained part): {w.proj or NOT_RECORDED}",
        f"- conversation template: `{cfg.text.template}`; {model.num_image_tokens} image tokens per image, "
        f"images {cfg.vision.image_size} px",
        "",
        "## Training",
        "",
        f"- checkpoint: {facts.checkpoint or NOT_RECORDED}",
        f"- steps: {state.get('step', NOT_RECORDED)}"
        + (f" of {train['steps']} planned" if "steps" in train else ""),
        f"- samples seen: {state.get('samples_seen', NOT_RECORDED)}",
        f"- last training loss: {fmt('train/loss')}",
        f"- validation loss: {fmt('val/loss')}",
        "- data:",
        *["  " + line for line in _data_lines(config)],
        "",
        "## Evaluation",
        "",
    ]
    if scores:
        for path, data in scores:
            shown = ", ".join(f"{k} {float(data[k]):.4f}" for k in SCORE_KEYS if k in data)
            lines.append(
                f"- {path}: {shown} ({data.get('images', '?')} images, step {data.get('step', '?')})"
            )
    else:
        lines.append(
            f"- {NOT_RECORDED} (run `python -m mgpt4.eval captions`, then export with --eval-metrics)"
        )
    lines += [
        "",
        "## Export notes",
        "",
        *[f"- {note}" for note in notes],
        "",
        "## How to load",
        "",
        "```python",
        "from PIL import Image",
        f"from transformers import AutoProcessor, {load_class}",
        "",
        'processor = AutoProcessor.from_pretrained("path/to/this/folder", backend="pil")',
        f'model = {load_class}.from_pretrained("path/to/this/folder"{trust})',
        'messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]',
        "prompt = processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)",
        'inputs = processor(images=Image.open("photo.jpg"), text=prompt, return_tensors="pt")',
        "out = model.generate(**inputs, generation_config=model.generation_config, tokenizer=processor.tokenizer)",
        'print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "",
        '- `backend="pil"`: the pixels the model was trained on (PIL bicubic resize; the torchvision backend',
        "  differs by up to about 1/255 per pixel).",
        *(
            [
                "- The chat template writes one `<image>` per image; `LlavaProcessor` expands it into the image's",
                f"  {model.num_image_tokens} tokens, which the `<Img>` ... `</Img>` of mgpt4's prompt surround.",
            ]
            if llava
            else [
                "- The chat template is the tokenizer's: transformers' `Blip2Processor` drops its own when loaded."
            ]
        ),
        "- `generation_config=model.generation_config`: the official decoding defaults (sampling, top_p 0.9,",
        "  300 new tokens), the stop strings (they need `tokenizer=`) and the suppressed `<image>` token;",
        "  BLIP-2's `generate` does not read the folder's generation config by itself.",
        "",
        "## Licence",
        "",
        "- licence: ",
        "- licence of the training data: ",
        "- intended use and limitations: ",
        "",
    ]
    return "\n".join(lines)


def write_model_card(
    folder: str, model: MiniGPT4, facts: ExportFacts, model_class: str, notes: Sequence[str] = ()
) -> None:
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(model, facts, model_class, notes))
