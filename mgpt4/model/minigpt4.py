"""MiniGPT-4: frozen EVA ViT -> ln_vision -> frozen Q-Former -> trainable llama_proj -> frozen LLM.

The vision path is three declared parts (`mgpt4.model.towers`): the tower (EVA ViT-g, or a transformers
CLIP / SigLIP / DINOv2), the connector (Q-Former, N tokens concatenated, or none) and the projector
(`llama_proj`: Linear, or LLaVA-1.5's mlp2x_gelu).

Single-device model code: no DeepSpeed, no ranks. The forward pass follows the official
MiniGPT-4 (see shared/reference/README.md, "The forward pass"), in the layout of `mgpt4.model.layout`:
`[BOS] [prompt before <ImageHere>] [32 image embeddings] [prompt after] [answer + end_sym] [pad]`.
Without a Q-Former (`model.qformer: null`, the official LLaMA-2 variant) the image embeddings are
the ViT's patch tokens concatenated 4 by 4; the LLM is any Hugging Face decoder (`mgpt4.model.llm`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from mgpt4.config import DTYPES, ModelConfig
from mgpt4.model.conversation_text import ConversationEncoder
from mgpt4.model.generation import (
    GREEDY,
    GenerationSettings,
    StopOnSequences,
    eos_token_ids,
    stop_sequences,
)
from mgpt4.model.layout import IMAGE, IMAGE_ONLY, Layout, layout, sample_prompts, wrap_instruction
from mgpt4.model.llm import build_llm, llm_class, resolve_llm_config
from mgpt4.model.packing import pack_sequences, use_packed_attention
from mgpt4.model.prompts import Conversation, clean_reply
from mgpt4.model.qformer import build_qformer
from mgpt4.model.templates import TextSpec, conversation_wrappers, prompt_tokenizer, resolve_text
from mgpt4.model.towers import HFVisionTower, TimmVisionTower, build_projector, connect_tokens
from mgpt4.model.vision import FP32LayerNorm, build_eva_vit
from mgpt4.tokenizer import encode_answers

IGNORE_INDEX = -100


class MiniGPT4(nn.Module):
    """Build with random weights from a config; `mgpt4.model.loading` fills in the official weights.

    `device="meta"` builds every part without memory (for shape checks and partitioned loading).
    When `cfg.weights.llm` names a folder, the LLM is built on the meta device from the folder's
    config.json: its weights come from that folder in the load step, so a 13B model is never
    initialised twice, and its width (the projection's output) is the folder's.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        tokenizer=None,
        device: str | torch.device | None = None,
    ):
        super().__init__()
        cfg.validate_once()  # a config validated at config time (the trainer's) is not checked again
        self.cfg = cfg
        self.tokenizer = tokenizer
        ctx = torch.device(device) if device is not None else contextlib.nullcontext()
        # The folder's config.json when there is a folder, checked against cfg.llm here, once: before any
        # part is built, and the load step trusts it.
        hf_llm = resolve_llm_config(cfg, check=True)
        n_img, img_width = cfg.image_token_shape()
        with ctx:
            self.ln_vision = None
            if cfg.vision.kind == "hf":
                # A transformers tower (CLIP, SigLIP, DINOv2): its weights come from its folder.
                self.visual_encoder = HFVisionTower(cfg.vision)
            elif cfg.vision.kind == "timm":
                # A timm ViT by name: its weights come from model.weights.timm.
                self.visual_encoder = TimmVisionTower(cfg.vision)
            else:
                self.visual_encoder = build_eva_vit(cfg.vision)
                # Without a Q-Former no file provides ln_vision: it stays freshly initialised (weight 1,
                # bias 0), as in the official LLaMA-2 variant.
                self.ln_vision = FP32LayerNorm(cfg.vision.width, eps=cfg.vision.ln_vision_eps)
            self.qformer = self.query_tokens = None
            if cfg.qformer is not None:
                self.qformer = build_qformer(cfg.qformer, encoder_width=cfg.vision.width)
                self.query_tokens = nn.Parameter(torch.zeros(1, n_img, img_width))
                nn.init.normal_(self.query_tokens, std=0.02)
            self.llama_proj = build_projector(cfg.projector, img_width, hf_llm.hidden_size)
        if cfg.weights.llm is not None and device is None:
            # Only a skeleton: the load step replaces it with the folder's weights.
            with torch.device("meta"):
                self.llm = llm_class(hf_llm)(hf_llm)
        else:
            with ctx:
                self.llm = build_llm(hf_llm, dtype=cfg.precision.llm_dtype())
        p = cfg.precision
        self.visual_encoder.to(DTYPES[p.vit])
        if self.qformer is not None:
            self.qformer.to(DTYPES[p.qformer])
            self.query_tokens.data = self.query_tokens.data.to(DTYPES[p.qformer])
        self.llama_proj.to(DTYPES[p.proj])
        self.num_image_tokens = n_img
        # The tokenizer, `cfg.text` resolved against it, and the layouts of training prompts made with it
        # (they repeat every step: the tokenizer stays off the hot path).
        self._text: tuple[object, TextSpec, dict[str, Layout]] | None = None

    # ------------------------------------------------------------------------------------------
    # Modes

    def train(self, mode: bool = True) -> MiniGPT4:
        """Frozen children stay in eval mode (no dropout, no drop-path) whatever mode is asked.

        With gradient checkpointing on, the LLM's decoder layers themselves (not their contents) take
        the mode: transformers recomputes a layer only while that layer is training, and everything
        inside it still runs in eval mode, so the recompute has no dropout either.
        """
        super().train(mode)
        for child in self.children():
            if not any(p.requires_grad for p in child.parameters()):
                child.train(False)
        if getattr(self, "_checkpoint_llm", False):
            for layer in self.llm.modules():
                if isinstance(layer, GradientCheckpointingLayer) and layer.gradient_checkpointing:
                    layer.training = mode
        return self

    def _vision_needs_grad(self) -> bool:
        parts = [m for m in (self.visual_encoder, self.ln_vision, self.qformer) if m is not None]
        return (self.query_tokens is not None and self.query_tokens.requires_grad) or any(
            p.requires_grad for m in parts for p in m.parameters()
        )

    def enable_gradient_checkpointing(self) -> None:
        """Recompute LLM activations in the backward pass; the projection's output carries the grad."""
        # Newer transformers renamed the call; non-reentrant checkpointing works with frozen weights.
        enable = getattr(self.llm, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._checkpoint_llm = True  # the frozen LLM stays in eval mode: see `train`
        self.train(self.training)

    # ------------------------------------------------------------------------------------------
    # Images

    def encode_img(self, image: torch.Tensor) -> torch.Tensor:
        """Normalised images [B,3,S,S] -> LLM input embeddings [B, num_image_tokens, llm hidden]."""
        return self.project_features(self.image_features(image))

    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        """Normalised images [B,3,S,S] -> the image tokens before the projection, [B, num_image_tokens,
        width]: the Q-Former's queries (what a feature cache holds, `mgpt4.features`), or without a
        Q-Former the ViT's patch tokens concatenated 4 by 4 (official LLaMA-2 variant: 256 x 1408 ->
        64 x 5632 at 224 px)."""
        # The frozen vision path runs without autograd: no activations are kept for it.
        with torch.set_grad_enabled(torch.is_grad_enabled() and self._vision_needs_grad()):
            # The vision path may sit on another device than the LLM (chat's --vision-device cpu).
            if self.ln_vision is None:  # a transformers or timm tower (model.vision.kind hf, timm)
                return connect_tokens(self.cfg, self.visual_encoder(image))
            w = self.visual_encoder.patch_embed.proj.weight
            feats = self.ln_vision(
                self.visual_encoder.forward_features(image.to(device=w.device, dtype=w.dtype))
            )
            if self.qformer is None:
                return connect_tokens(self.cfg, feats)
            q_dtype = self.query_tokens.dtype
            queries = self.query_tokens.expand(feats.shape[0], -1, -1)
            feats = feats.to(q_dtype)
            atts = torch.ones(feats.shape[:-1], dtype=torch.long, device=feats.device)
            return self.qformer(
                query_embeds=queries, encoder_hidden_states=feats, encoder_attention_mask=atts
            ).last_hidden_state

    def project_features(self, features: torch.Tensor) -> torch.Tensor:
        """Image tokens [B, N, W] (from `image_features` or a feature cache) -> LLM input embeddings
        [B, N, llm hidden], in the dtype and on the device of the LLM's embedding table."""
        w = next(self.llama_proj.parameters())
        img = self.llama_proj(features.to(device=w.device, dtype=w.dtype))
        table = self.llm.get_input_embeddings().weight
        return img.to(device=table.device, dtype=table.dtype)

    # ------------------------------------------------------------------------------------------
    # Text

    def _tok(self):
        if self.tokenizer is None:
            raise RuntimeError("this MiniGPT4 has no tokenizer: pass tokenizer= when building it")
        return self.tokenizer

    @property
    def text_spec(self) -> TextSpec:
        """`cfg.text` resolved against the tokenizer: templates, end_sym, BOS and stop text."""
        return self._resolved_text()[0]

    def _resolved_text(self) -> tuple[TextSpec, dict[str, Layout]]:
        if self._text is None or self._text[0] is not self.tokenizer:
            spec = resolve_text(self.cfg.text, self.tokenizer, self.llm.config.bos_token_id)
            self._text = (self.tokenizer, spec, {})
        return self._text[1], self._text[2]

    def new_conversation(self) -> Conversation:
        """An empty conversation in the template that belongs to this model."""
        return Conversation(self.text_spec.template)

    def wrap_instruction(self, instruction: str) -> str:
        """An instruction such as `<Img><ImageHere></Img> What is this?` wrapped in the template."""
        return wrap_instruction(self.text_spec.instruction, instruction)

    def layout(self, prompt: str, answer_tokens: int = 0) -> Layout:
        """The layout (`mgpt4.model.layout`) of `prompt`, each `<ImageHere>` taking `num_image_tokens`,
        followed by `answer_tokens` answer tokens."""
        spec, tok = self.text_spec, self._tok()
        return layout(
            prompt,
            prompt_tokenizer(spec.template, tok),
            spec.bos_id,
            self.num_image_tokens,
            answer_tokens,
        )

    def sample_prompts(self) -> list[str]:
        """The prompt of each instruction of `cfg.text.instructions`, in the order the loader draws
        their indices; stage 1: one prompt, the image alone (`<ImageHere>`)."""
        return sample_prompts(self.text_spec.instruction, self.cfg.text.instructions)

    def sample_layouts(self, answer_tokens: int | None = None) -> tuple[Layout, ...]:
        """The layout of a training sample under each instruction, in the order the loader draws their
        indices (stage 1: one). Answers take `answer_tokens` (default `cfg.text.max_txt_len`, the
        longest); `Layout.context_length` is what the loader packs and the tally counts before them."""
        n = self.cfg.text.max_txt_len if answer_tokens is None else answer_tokens
        return tuple(self.layout(p, n) for p in self.sample_prompts())

    def conversation_encoder(self, max_tokens: int) -> ConversationEncoder:
        """How the loader turns a conversation into this model's training sequence, at most `max_tokens`
        text positions (`mgpt4.model.conversation_text`); picklable, for data workers."""
        spec = self.text_spec
        first, first_system, later = conversation_wrappers(spec, self.cfg.text.prompt_template is not None)
        return ConversationEncoder(
            self._tok(),
            first,
            first_system,
            later,
            spec.end_sym,
            spec.bos_id,
            spec.template.slow_llama_pieces,
            max_tokens,
            self.num_image_tokens,
        )

    def build_conversation_inputs(
        self,
        img_embeds: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        text_labels: torch.Tensor,
        image_at: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Splice image embeddings [B, n, H] into whole conversations: text_ids / text_mask / text_labels
        int64 [B, T] (`ConversationEncoder`: ids, 1 for real tokens, 1 where the loss reads), image_at
        int64 [B] (the text position the image goes before). Returns (inputs_embeds [B, T + n, H],
        attention_mask [B, T + n], labels [B, T + n]); static shapes, one gather per sample row."""
        bsz, n_img, hidden = img_embeds.shape
        device = img_embeds.device
        text_ids, text_mask = text_ids.to(device), text_mask.to(device=device, dtype=torch.long)
        text_labels, at = text_labels.to(device), image_at.to(device).view(-1, 1)
        embeds = self.llm.get_input_embeddings()(text_ids)
        pos = torch.arange(text_ids.shape[1] + n_img, device=device).view(1, -1)
        is_image = (pos >= at) & (pos < at + n_img)
        text_index = torch.where(pos < at, pos, pos - n_img).clamp(0, text_ids.shape[1] - 1)
        image_index = (pos - at).clamp(0, n_img - 1)
        inputs = torch.where(
            is_image.unsqueeze(-1),
            img_embeds.gather(1, image_index.unsqueeze(-1).expand(bsz, -1, hidden)),
            embeds.gather(1, text_index.unsqueeze(-1).expand(bsz, -1, hidden)),
        )
        real = text_mask.gather(1, text_index).bool() | is_image
        reads = text_labels.gather(1, text_index).bool() & ~is_image & real
        labels = torch.where(reads, text_ids.gather(1, text_index), IGNORE_INDEX)
        return inputs, real.long(), labels

    def _prompt_layout(self, prompt: str) -> Layout:
        """The layout of a training prompt (one image, no answer), made once per prompt."""
        _, layouts = self._resolved_text()
        if prompt not in layouts:
            made = self.layout(prompt)
            if made.num_images != 1:
                raise ValueError(f"a training prompt holds one image, {made.num_images} in {prompt!r}")
            layouts[prompt] = made
        return layouts[prompt]

    def build_inputs(
        self,
        img_embeds: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        prompt: str | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Splice image embeddings [B, num_image_tokens, H] into `prompt` (one `<ImageHere>`; None: the
        image alone, stage 1) and append the answers (ids, mask int64 [B, T]), as `self.layout` lays
        them out: (inputs_embeds [B, L, H], attention_mask [B, L], labels [B, L]), L = context + T."""
        bsz, n_img, _ = img_embeds.shape
        device = img_embeds.device
        lay = self._prompt_layout(IMAGE_ONLY if prompt is None else prompt)
        if lay.count(IMAGE) != n_img:
            raise ValueError(f"the layout has {lay.count(IMAGE)} image tokens, the image embeddings {n_img}")
        prefix, suffix = lay.text_runs()
        ctx_ids = torch.tensor(prefix + suffix, dtype=torch.long, device=device).expand(bsz, -1)
        text_ids = text_ids.to(device)
        # One embedding call: under ZeRO-3 each call gathers the embedding table.
        embeds = self.llm.get_input_embeddings()(torch.cat([ctx_ids, text_ids], dim=1))
        n_pre, n_suf = len(prefix), len(suffix)
        inputs = torch.cat(
            [embeds[:, :n_pre], img_embeds, embeds[:, n_pre : n_pre + n_suf], embeds[:, n_pre + n_suf :]],
            dim=1,
        )
        n_ctx = lay.context_length
        text_mask = text_mask.to(device=device, dtype=torch.long)
        attention_mask = torch.cat(
            [torch.ones(bsz, n_ctx, dtype=torch.long, device=device), text_mask], dim=1
        )
        labels = torch.cat(
            [
                torch.full((bsz, n_ctx), IGNORE_INDEX, dtype=torch.long, device=device),
                text_ids.masked_fill(text_mask == 0, IGNORE_INDEX),
            ],
            dim=1,
        )
        return inputs, attention_mask, labels

    # ------------------------------------------------------------------------------------------
    # Training

    def forward(
        self,
        image: torch.Tensor | None = None,
        text_ids: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        instruction: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        pack_slot: torch.Tensor | None = None,
        pack_pos: torch.Tensor | None = None,
        text_labels: torch.Tensor | None = None,
        image_at: torch.Tensor | None = None,
    ) -> CausalLMOutputWithPast:
        """Loss on a batch of normalised images and answer ids (from `mgpt4.tokenizer.encode_answers`).

        With instructions (stage 2), `instruction` is the index into `cfg.text.instructions` that the
        loader drew for the batch (int64 [B], one value per batch); stage 1 has none. `features`
        [B, Q, W] (a feature cache) replace `image`: the frozen vision path is skipped.
        `pack_slot` / `pack_pos` [rows, length] (the loader's packed layout, `mgpt4.model.packing`) lay the
        B samples side by side into rows; the loss stays the mean over all answer tokens.
        Conversations (`image_at` and `text_labels` given, `build_conversation_inputs`): text_ids are the
        whole conversation, the loss on its answers; the batch has no instruction.
        """
        if text_ids is None or text_mask is None or (image is None) == (features is None):
            raise ValueError("MiniGPT4.forward needs text_ids, text_mask and one of image or features")
        if (image_at is None) != (text_labels is None):
            raise ValueError("a conversation batch needs both image_at and text_labels")
        img_embeds = self.project_features(features) if features is not None else self.encode_img(image)
        if image_at is not None:
            built = self.build_conversation_inputs(img_embeds, text_ids, text_mask, text_labels, image_at)
            return self._run_llm(*built, pack_slot, pack_pos)
        prompt = self.instruction_prompt(instruction)
        return self._loss(img_embeds, text_ids, text_mask, prompt, pack_slot, pack_pos)

    def _loss(
        self,
        img_embeds: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        prompt: str | None,
        pack_slot: torch.Tensor | None = None,
        pack_pos: torch.Tensor | None = None,
    ) -> CausalLMOutputWithPast:
        inputs, attention_mask, labels = self.build_inputs(img_embeds, text_ids, text_mask, prompt)
        return self._run_llm(inputs, attention_mask, labels, pack_slot, pack_pos)

    def _run_llm(
        self,
        inputs: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        pack_slot: torch.Tensor | None,
        pack_pos: torch.Tensor | None,
    ) -> CausalLMOutputWithPast:
        per_sample = use_packed_attention(self.llm)
        if pack_slot is not None:
            rows = pack_sequences(inputs, labels, pack_slot, pack_pos)
            return self.llm(
                inputs_embeds=rows.inputs_embeds,
                position_ids=rows.position_ids,
                labels=rows.labels,
                use_cache=False,
                **(rows.attention_kwargs() if per_sample else {}),
            )
        return self.llm(inputs_embeds=inputs, attention_mask=attention_mask, labels=labels, use_cache=False)

    def instruction_prompt(self, instruction: torch.Tensor | None) -> str | None:
        """The prompt of a batch's instruction index (int64 [B], all equal, as the loader draws), or
        None for a model without instructions (stage 1). ValueError for a missing or bad index."""
        t = self.cfg.text
        if instruction is None:
            if t.instructions:
                raise ValueError(
                    f"this model trains with {len(t.instructions)} instructions (model.text.instructions): "
                    "the batch must carry its instruction index (`instruction`, int64 [B]), as the loader draws it"
                )
            return None
        first = int(instruction.reshape(-1)[0])
        if not bool((instruction == first).all()):
            raise ValueError("one instruction per batch: the batch's instruction indices differ")
        if not 0 <= first < len(t.instructions):
            raise ValueError(f"instruction index {first} is outside the {len(t.instructions)} instructions")
        return self.sample_prompts()[first]

    def loss(
        self,
        images: torch.Tensor,
        captions: Sequence[str],
        instruction: str | None = None,
        pad_to_max_len: bool | None = None,
    ) -> torch.Tensor:
        """Mean token loss for (images, captions, optional instruction) as the official training computes it.

        `instruction` is unwrapped (`<Img><ImageHere></Img> Describe this image in detail.`), any text
        with `<ImageHere>` once; it is put into the config's prompt template. A model with
        `cfg.text.instructions` (stage 2) needs one; without one, the sample is the image alone (stage 1).
        """
        t = self.cfg.text
        pad = t.pad_to_max_len if pad_to_max_len is None else pad_to_max_len
        ids, mask = encode_answers(self._tok(), list(captions), self.text_spec.end_sym, t.max_txt_len, pad)
        if instruction is None and t.instructions:
            raise ValueError(
                f"this model trains with {len(t.instructions)} instructions (model.text.instructions): "
                "pass instruction=, e.g. model.cfg.text.instructions[0]"
            )
        prompt = self.wrap_instruction(instruction) if instruction is not None else None
        return self._loss(self.encode_img(images), ids, mask, prompt).loss

    # ------------------------------------------------------------------------------------------
    # Generation

    def context_embeds(self, prompt: str, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """Embed a prompt whose `<ImageHere>` placeholders take `images` ([B, num_image_tokens, H] each),
        as `self.layout` lays it out (BOS before the first text): [B, context length, H]."""
        lay = self.layout(prompt)
        if lay.num_images != len(images):
            raise ValueError(
                f"prompt has {lay.num_images} <ImageHere> placeholders but {len(images)} images were given"
            )
        for img in images:
            if img.shape[1] != self.num_image_tokens:
                raise ValueError(f"an image has {img.shape[1]} tokens, the model {self.num_image_tokens}")
        bsz = images[0].shape[0] if images else 1
        device = self.llm.get_input_embeddings().weight.device if not images else images[0].device
        embed = self.llm.get_input_embeddings()
        parts: list[torch.Tensor] = []
        for i, ids in enumerate(lay.text_runs()):
            if ids:
                parts.append(embed(torch.tensor(ids, device=device)).unsqueeze(0).expand(bsz, -1, -1))
            if i < len(images):
                parts.append(images[i])
        return torch.cat(parts, dim=1)

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor | Sequence[torch.Tensor],
        prompt: str,
        settings: GenerationSettings | None = None,
        **kwargs,
    ) -> list[str]:
        """Replies (text before the first stop, `###` in the official templates) for a prompt with
        `<ImageHere>` placeholders.

        `images` are normalised image batches [B,3,S,S], one per placeholder; every row of the batch
        gets the same prompt. `settings` defaults to greedy decoding (`GREEDY`); keyword arguments
        are its fields (`max_new_tokens=20, sample=True`) or those of `generate_from_embeds`.
        """
        if isinstance(images, torch.Tensor):
            images = [images]
        return self.generate_from_embeds([self.encode_img(im) for im in images], prompt, settings, **kwargs)

    @torch.no_grad()
    def generate_from_embeds(
        self,
        img_embeds: Sequence[torch.Tensor],
        prompt: str | Sequence[str],
        settings: GenerationSettings | None = None,
        streamer=None,
        synced_gpus: bool = False,
        stopping_criteria: Sequence[StoppingCriteria] = (),
        logits_processor: Sequence[LogitsProcessor] = (),
        **fields,
    ) -> list[str]:
        """As `generate`, on image embeddings already computed (chat encodes an image once).

        `prompt` may also be a list, one per row (left-padded into one batch; curation's "Continue"
        turn repeats each row's own answer). Each context is cut from the left to
        `max_context - max_new_tokens`; `stopping_criteria` are added to the stop text of the
        template (`###`) and EOS (the tokenizer's and the LLM's generation config's), and
        `logits_processor` after transformers' own (the server's per-row sampling, `RowSampler`).
        `fields` change single settings (`max_new_tokens=8`). Raises GenerationError for settings
        out of range.
        """
        settings = (settings or GREEDY).replace(**fields) if fields else (settings or GREEDY)
        settings.validate()
        llm_device = self.llm.get_input_embeddings().weight.device
        img_embeds = [e.to(llm_device) for e in img_embeds]
        keep = settings.max_context - settings.max_new_tokens
        if isinstance(prompt, str):
            rows = [self.context_embeds(prompt, img_embeds)]
        else:
            rows = [self.context_embeds(p, [e[i : i + 1] for e in img_embeds]) for i, p in enumerate(prompt)]
        rows = [r[:, max(0, r.shape[1] - keep) :] for r in rows]
        length = max(r.shape[1] for r in rows)
        embs = torch.cat([torch.nn.functional.pad(r, (0, 0, length - r.shape[1], 0)) for r in rows])
        mask = torch.cat(
            [
                torch.arange(length, device=llm_device).ge(length - r.shape[1]).long().expand(r.shape[0], -1)
                for r in rows
            ]
        )
        tok, spec = self._tok(), self.text_spec
        out = self.llm.generate(
            inputs_embeds=embs,
            attention_mask=mask,
            min_length=1,
            stopping_criteria=StoppingCriteriaList(
                [StopOnSequences(stop_sequences(tok, spec.stops)), *stopping_criteria]
            ),
            pad_token_id=tok.pad_token_id,
            eos_token_id=eos_token_ids(tok, self.llm.generation_config),
            logits_processor=LogitsProcessorList(logits_processor),
            streamer=streamer,
            synced_gpus=synced_gpus,
            **settings.hf_kwargs(),
        )
        echo = spec.template.echo
        return [clean_reply(tok.decode(row, skip_special_tokens=True), spec.stops, echo) for row in out]
