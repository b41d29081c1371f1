"""The lmms-eval model `mgpt4`: any mgpt4 checkpoint (or the official weight files) on lmms-eval's
benchmarks, prompted in the model's own conversation template.

    python -m lmms_eval --model mgpt4 --model_args checkpoint=outputs/stage2,dtype=bf16 --tasks mme,pope

lmms-eval finds the model through the `lmms_eval.models` entry point (setup.py), which names
`manifest`; lmms-eval 0.7 reads that group in `lmms_eval.models.registry_v2.ModelRegistryV2`.
This module imports nothing heavy at import time: lmms-eval loads every entry point whatever model
it is asked for.

`--model_args` keys are the fields of `mgpt4.inference.ModelSource` (the model flags of chat, with
`_` for `-`: checkpoint, preset, eva_vit, blip2, blip2_hf, llm, proj, allow_random_weights, device,
llm_8bit, vision_device), `dtype` (the LLM's, fp32/bf16/fp16) and `batch_size`. The model is loaded by
`mgpt4.inference.load_model`, as chat loads it.

Requests (lmms-eval's `Instance.args`):
- `generate_until` (ctx, gen_kwargs, doc_to_visual, doc_id, task, split): greedy unless the task asks
  to sample, batched (left-padded context embeddings, `MiniGPT4.generate_from_embeds`), the task's
  `until` strings and `max_new_tokens` honoured. The prompt is the one chat builds: each image in its
  own `<Img><ImageHere></Img>` turn, the question joined to the last (`Conversation.ask`), in the
  model's template (Vicuna v0, Llama-2-Chat, or the tokenizer's chat template).
- `loglikelihood` (ctx, continuation, doc_to_visual, doc_id, task, split): how likely the continuation
  is as the reply to that prompt, tokenized as training tokenizes answers (on its own). lmms-eval's
  multiple-choice scoring takes the choice with the *smallest* value (`np.argmin`, api/task.py: its
  models return a loss), so the value returned is the negative log-probability, -log p(continuation),
  summed over its tokens: `acc` is then the most probable choice, `acc_norm` the most probable per
  character, as in lm-evaluation-harness.
Several processes (`accelerate launch`, torchrun): lmms-eval gives each rank every world_size-th
document and gathers the results; this model joins the process group through accelerate.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from lmms_eval.api.model import lmms

if TYPE_CHECKING:
    from PIL import Image

    from mgpt4.model.generation import GenerationSettings
    from mgpt4.model.minigpt4 import MiniGPT4

MODEL_NAME = "mgpt4"

# `--model_args` keys besides ModelSource's fields (`overrides` has no key: a list does not fit in
# lmms-eval's `key=value,key=value` string).
_OWN_KEYS = ("dtype", "batch_size")
_SOURCE_KEYS = (
    "checkpoint",
    "preset",
    "eva_vit",
    "blip2",
    "blip2_hf",
    "llm",
    "proj",
    "allow_random_weights",
    "device",
    "llm_8bit",
    "vision_device",
)
# Decoding keys of lmms-eval tasks' `generation_kwargs` that mgpt4's generation honours.
_GEN_KEYS = (
    "until",
    "max_new_tokens",
    "temperature",
    "top_p",
    "num_beams",
    "do_sample",
    "repetition_penalty",
)


def manifest():
    """The `lmms_eval.models` entry point: model id `mgpt4`, a simple (string-prompt) model."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.MiniGPT4Eval")


def filelock_compat() -> None:
    """lmms-eval 0.7.3's evaluator patches `filelock._api.FileLockMeta` (filelock 3's layout) right
    after it builds the model; filelock 4, which torch installs today, keeps that class elsewhere and
    has no `_api` module, so every run would stop there. The old name is pointed at the same class,
    and the evaluator's patch applies as written."""
    import importlib.util
    import sys
    import types

    import filelock

    if "filelock._api" in sys.modules or importlib.util.find_spec("filelock._api") is not None:
        return
    api = types.ModuleType("filelock._api")
    api.FileLockMeta = type(filelock.BaseFileLock)  # type: ignore[attr-defined]
    api.BaseFileLock = filelock.BaseFileLock  # type: ignore[attr-defined]
    sys.modules["filelock._api"] = api


class ModelArgsError(SystemExit):
    """A bad `--model_args` key or value: one line, before anything loads."""


def _parse_model_args(arg_string: str) -> dict[str, Any]:
    """`key=value,key=value` -> {key: value}, values typed as lmms-eval types them (True, 4, 0.5)."""
    from lmms_eval.utils import simple_parse_args_string

    try:
        return simple_parse_args_string(arg_string or "")
    except ValueError:
        raise ModelArgsError(
            f"--model_args {arg_string!r}: expected key=value pairs separated by commas"
        ) from None


class MiniGPT4Eval(lmms):
    """An mgpt4 model as lmms-eval asks for one: `generate_until` and `loglikelihood` on string prompts
    and the task's images (PIL images from `doc_to_visual`)."""

    is_simple = True

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> MiniGPT4Eval:
        """lmms-eval's constructor: `--model_args` plus its own `--batch_size` and `--device` (those of
        `--model_args` win, so `batch_size=8` there is not a duplicate keyword)."""
        args = _parse_model_args(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    def __init__(
        self,
        checkpoint: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        **source_args: Any,
    ) -> None:
        super().__init__()
        from mgpt4 import dist
        from mgpt4.config import DTYPES
        from mgpt4.inference import ModelSource, load_model
        from mgpt4.logs import get_logger

        self._log = get_logger(__name__)
        filelock_compat()
        unknown = sorted(set(source_args) - set(_SOURCE_KEYS))
        if unknown:
            raise ModelArgsError(
                f"--model_args: unknown key(s) {', '.join(unknown)}; mgpt4 takes "
                + ", ".join(("checkpoint", *_OWN_KEYS, *_SOURCE_KEYS[1:]))
            )
        if dtype is not None and dtype not in DTYPES:
            raise ModelArgsError(f"--model_args dtype={dtype}: expected one of {', '.join(DTYPES)}")
        if isinstance(batch_size, str) and batch_size.strip().isdigit():
            batch_size = int(batch_size)  # lmms-eval's --batch_size is a string ("auto" or N)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ModelArgsError(
                f"batch_size {batch_size!r}: mgpt4 takes a whole number of requests per batch (no 'auto')"
            )
        if max_batch_size is not None:
            raise ModelArgsError("--max_batch_size goes with --batch_size auto, which mgpt4 does not take")
        if checkpoint is not None:
            self._check_checkpoint(str(checkpoint))
        rank, world = dist.process_rank()
        device = str(source_args.pop("device", None) or ("cuda" if torch.cuda.is_available() else "cpu"))
        if world > 1:
            # One GPU per process; lmms-eval gathers through the accelerator's process group (gloo on
            # CPU, NCCL on GPUs), which accelerate builds from the launcher's variables.
            from accelerate import Accelerator

            self.accelerator = Accelerator(cpu=torch.device(device).type == "cpu")
            rank, world = self.accelerator.process_index, self.accelerator.num_processes
            device = dist.rank_device(
                device, dist.RankInfo(rank, world, self.accelerator.local_process_index)
            )
        self._rank, self._world_size = rank, world
        source = ModelSource(
            checkpoint=None if checkpoint is None else str(checkpoint),
            device=device,
            llm_dtype=dtype,
            **{
                k: (str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                for k, v in source_args.items()
            },
        )
        self.model: MiniGPT4 = load_model(source)
        self._device = torch.device(device)
        self.batch_size = batch_size
        self._said: set[str] = set()

    @staticmethod
    def _check_checkpoint(path: str) -> None:
        from mgpt4.checkpoints import find_checkpoint

        if not os.path.exists(path):
            raise ModelArgsError(f"--model_args checkpoint={path}: no such folder")
        if find_checkpoint(path) is None:
            raise ModelArgsError(
                f"--model_args checkpoint={path}: no complete mgpt4 checkpoint there (a run folder, its "
                "checkpoints/ folder or one step_N folder holding config.json and llama_proj.pth)"
            )

    # lmms-eval reads these.
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def _say_once(self, key: str, message: str) -> None:
        """A choice made for a kind of request, logged the first time it is made (per task, each rank)."""
        if key not in self._said:
            self._said.add(key)
            self._log.warning(message)

    # ------------------------------------------------------------------------------------------
    # Prompts and images

    def prompt(self, context: str, num_images: int) -> str:
        """The prompt chat builds for `context` asked about `num_images` images: each image a turn
        of its own (`Conversation.add_image`, as the official chat uploads them), the question joined
        to the last, the model's turn left open."""
        conv = self.model.new_conversation()
        for _ in range(num_images):
            conv.add_image()
        question = context.strip()
        if question or not num_images:
            conv.ask(question)
        return conv.prompt_for_reply()

    def _images(self, visuals: Any, task: str, doc_id: int) -> list[Image.Image]:
        from PIL import Image

        if visuals is None:
            visuals = []
        elif not isinstance(visuals, (list, tuple)):
            visuals = [visuals]
        for v in visuals:
            if not isinstance(v, Image.Image):
                raise ValueError(
                    f"task {task} doc {doc_id}: mgpt4 reads images, doc_to_visual gave a {type(v).__name__}"
                )
        if len(visuals) > 1:
            self._say_once(
                f"many:{task}",
                f"task {task}: requests with {len(visuals)} images; each image gets its own "
                "<Img><ImageHere></Img> turn before the question, as the official chat does",
            )
        elif not visuals:
            self._say_once(
                f"none:{task}", f"task {task}: requests without an image; the model answers from the text"
            )
        return list(visuals)

    def _embed(self, rows: Sequence[list[Image.Image]]) -> list[torch.Tensor]:
        """Image embeddings of rows with the same number of images: one [B, N, H] per placeholder."""
        from mgpt4.images import eval_transform

        size = self.model.cfg.vision.image_size
        out = []
        for k in range(len(rows[0])):
            pixels = torch.stack([eval_transform(r[k], size) for r in rows])
            out.append(self.model.encode_img(pixels.to(self._device)))
        return out

    def _requests(self, requests: list) -> list[tuple[str, Any, list[Image.Image], str, int]]:
        """(context, second argument, images, task, doc_id) of each request."""
        out = []
        for req in requests:
            context, second, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            visuals = doc_to_visual(doc) if doc_to_visual is not None else None
            if callable(second):  # loglikelihood tasks may give doc_to_target
                second = second(doc)
            out.append((context, second, self._images(visuals, task, doc_id), task, doc_id))
        return out

    def _batches(self, keys: list[tuple]) -> list[list[int]]:
        """Request indices in batches of `batch_size` with equal keys (decoding settings, image count),
        longest prompt first in each group."""
        groups: dict[tuple, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(key[:-1], []).append(i)
        batches = []
        for members in groups.values():
            members.sort(key=lambda i: -keys[i][-1])
            batches += [members[j : j + self.batch_size] for j in range(0, len(members), self.batch_size)]
        return batches

    # ------------------------------------------------------------------------------------------
    # lmms-eval's requests

    def generate_until(self, requests: list) -> list[str]:
        """Replies to (context, gen_kwargs, doc_to_visual, doc_id, task, split) requests, in their order."""
        from tqdm import tqdm

        items = self._requests(requests)
        settings = [self._settings(kwargs, task) for _, kwargs, _, task, _ in items]
        prompts = [self.prompt(ctx, len(images)) for ctx, _, images, _, _ in items]
        keys = [
            (
                json.dumps(dataclasses.asdict(s[0]), sort_keys=True),
                tuple(s[1]),
                len(items[i][2]),
                len(prompts[i]),
            )
            for i, s in enumerate(settings)
        ]
        replies: list[str] = [""] * len(items)
        with tqdm(total=len(items), desc="mgpt4 generate", disable=self.rank != 0) as bar:
            for batch in self._batches(keys):
                decoding, until = settings[batch[0]]
                replies_b = self._generate(
                    [items[i][2] for i in batch], [prompts[i] for i in batch], decoding, until
                )
                for i, reply in zip(batch, replies_b):
                    replies[i] = reply
                    self.cache_hook.add_partial("generate_until", (items[i][0], items[i][1]), reply)
                bar.update(len(batch))
        return replies

    @torch.no_grad()
    def _generate(
        self,
        images: list[list[Image.Image]],
        prompts: list[str],
        decoding: GenerationSettings,
        until: list[str],
    ) -> list[str]:
        from transformers import StoppingCriteria

        from mgpt4.model.generation import StopOnSequences, stop_sequences

        embeds = self._embed(images) if images[0] else []
        stops: list[StoppingCriteria] = []
        if until:
            stops.append(StopOnSequences(stop_sequences(self.model.tokenizer, until)))
        replies = self.model.generate_from_embeds(embeds, prompts, decoding, stopping_criteria=stops)
        return [cut_at(r, until) for r in replies]

    def _settings(self, kwargs: dict | None, task: str) -> tuple[GenerationSettings, list[str]]:
        """A task's `generation_kwargs` as mgpt4's decoding settings (greedy unless it samples), and its
        `until` strings."""
        from mgpt4.model.generation import GREEDY, GenerationError

        kwargs = dict(kwargs or {})
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        ignored = sorted(set(kwargs) - set(_GEN_KEYS))
        if ignored:
            self._say_once(
                f"gen:{task}",
                f"task {task}: generation_kwargs {', '.join(ignored)} are not settings of mgpt4's decoding; "
                "they are not applied",
            )
        temperature = float(kwargs.get("temperature", 0) or 0)
        sample = bool(kwargs.get("do_sample", False)) and temperature > 0
        changes: dict[str, Any] = {"sample": sample}
        if sample:
            changes.update(temperature=temperature, top_p=float(kwargs.get("top_p") or 1.0))
        for key in ("max_new_tokens", "num_beams"):
            if kwargs.get(key) is not None:
                changes[key] = int(kwargs[key])
        if kwargs.get("repetition_penalty") is not None:
            changes["repetition_penalty"] = float(kwargs["repetition_penalty"])
        settings = GREEDY.replace(**changes)
        try:
            settings.validate()
        except GenerationError as e:
            raise ValueError(f"task {task} generation_kwargs: {e}") from None
        return settings, until

    @torch.no_grad()
    def loglikelihood(self, requests: list) -> list:
        """(-log p(continuation), is greedy) of each continuation as the reply to its context and images
        (lower is likelier: lmms-eval's multiple-choice scoring takes the argmin).

        Each pair travels in a `GenerationResult`: lmms-eval 0.7.3's evaluator turns any other tuple
        a model returns into its string (`unwrap_generation_output`), which its multiple-choice
        scoring cannot read; a GenerationResult's `text` is handed on as it is."""
        from lmms_eval.api.instance import GenerationResult
        from tqdm import tqdm

        items = self._requests(requests)
        tok = self.model.tokenizer
        prompts, conts = [], []
        for ctx, continuation, images, _, _ in items:
            prompt = self.prompt(ctx, len(images))
            prompts.append(prompt)
            # The reply is tokenized on its own, as training encodes answers (mgpt4.tokenizer.encode_answers);
            # the space the open turn already ends with is not repeated.
            text = continuation.lstrip() if prompt[-1:].isspace() else continuation
            conts.append(tok(text, add_special_tokens=False)["input_ids"])
        keys = [("ll", len(items[i][2]), len(conts[i])) for i in range(len(items))]
        out: list[tuple[float, bool]] = [(0.0, False)] * len(items)
        with tqdm(total=len(items), desc="mgpt4 loglikelihood", disable=self.rank != 0) as bar:
            for batch in self._batches(keys):
                scores = self._score(
                    [items[i][2] for i in batch], [prompts[i] for i in batch], [conts[i] for i in batch]
                )
                for i, score in zip(batch, scores):
                    out[i] = score
                    self.cache_hook.add_partial("loglikelihood", (items[i][0], items[i][1]), score)
                bar.update(len(batch))
        return [GenerationResult(text=pair) for pair in out]  # type: ignore[arg-type]

    def _score(
        self, images: list[list[Image.Image]], prompts: list[str], conts: list[list[int]]
    ) -> list[tuple[float, bool]]:
        """Right-padded rows `context embeddings + continuation`; one LLM forward for the batch."""
        embeds = self._embed(images) if images[0] else []
        table = self.model.llm.get_input_embeddings()
        rows = []
        for i, (prompt, cont) in enumerate(zip(prompts, conts)):
            ctx = self.model.context_embeds(prompt, [e[i : i + 1] for e in embeds])[0]
            ids = torch.tensor(cont, dtype=torch.long, device=table.weight.device)
            rows.append((torch.cat([ctx, table(ids).to(ctx.dtype)]), ctx.shape[0]))
        length = max(r.shape[0] for r, _ in rows)
        inputs = torch.stack([torch.nn.functional.pad(r, (0, 0, 0, length - r.shape[0])) for r, _ in rows])
        mask = torch.stack(
            [torch.arange(length, device=inputs.device).lt(r.shape[0]).long() for r, _ in rows]
        )
        logits = self.model.llm(inputs_embeds=inputs, attention_mask=mask, use_cache=False).logits.float()
        out = []
        for i, ((_, n_ctx), cont) in enumerate(zip(rows, conts)):
            # The logits at position t predict token t + 1: the continuation's come from n_ctx - 1 on.
            pred = logits[i, n_ctx - 1 : n_ctx - 1 + len(cont)].log_softmax(-1)
            target = torch.tensor(cont, device=pred.device)
            logprob = pred.gather(1, target[:, None]).sum().item()
            out.append((-float(logprob), bool((pred.argmax(-1) == target).all())))
        return out

    def generate_until_multi_round(self, requests: list) -> list[str]:
        """Multi-round tasks feed the model's answers back into a task's own prompt function; mgpt4 does
        not run them (lmms-eval's abstract method, answered with one line)."""
        tasks = sorted({req.args[-2] for req in requests}) if requests else []
        raise NotImplementedError(
            f"task(s) {', '.join(tasks)}: generate_until_multi_round tasks are not supported by the mgpt4 model"
        )


def cut_at(text: str, until: Sequence[str]) -> str:
    """`text` before the first of the `until` strings (lmms-eval's stop strings), if any occurs."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text
