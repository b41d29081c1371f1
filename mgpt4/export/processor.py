"""The processor side of an export: the tokenizer with its `<image>` token, the image processor, the
chat template and the generation config, all reproducing what mgpt4 feeds its model.

- Images: transformers' `BlipImageProcessor` with mgpt4's eval transform (`mgpt4.images.eval_transform`):
  RGB, PIL bicubic resize to image_size x image_size, [0, 1], CLIP mean/std. Its PIL backend gives
  mgpt4's pixels exactly; the torchvision backend (transformers' default) differs by up to ~1/255 per
  pixel, so the folder is meant to be loaded with `AutoProcessor.from_pretrained(folder, backend="pil")`.
- Text: the model's tokenizer plus an added special `<image>` token; `Blip2Processor` with
  `num_query_tokens` unset, so it does not prepend image tokens: the chat template puts
  `<Img>` + `<image>` x num_image_tokens + `</Img>` where each image goes, and BOS where mgpt4's layout
  puts it (the tokenizer adds none). For the official templates the tokenizer cuts text as the official
  slow LLaMA tokenizer (`mgpt4.tokenizer.encode_like_slow_llama`): every piece between special tokens
  starts with sentencepiece's `▁` (`_legacy_tokenizer`).
- The LLaVA export (`mgpt4.export.hf_llava`) passes its own processor: `LlavaProcessor` with the tower's
  image processor, which expands each image's one `<image>` (`<Img><image></Img>` in the template).
- Decoding: `generation_config` with the official demo's defaults, stop strings and `<image>` suppressed.
- `check_prompt_tokens` renders probe conversations both ways and refuses an export whose prompt tokens
  differ from those `MiniGPT4.layout` gives.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence

from mgpt4.images import CLIP_MEAN, CLIP_STD
from mgpt4.model import MiniGPT4
from mgpt4.model.generation import GenerationSettings, eos_token_ids
from mgpt4.model.layout import IMAGE
from mgpt4.model.prompts import IMAGE_PLACEHOLDER, Conversation, ConversationTemplate
from mgpt4.model.templates import TokenizerChatTemplate

IMAGE_TOKEN = "<image>"


class ExportError(RuntimeError):
    """A model that cannot be exported as asked; the message says why and what to do."""


def _is_sentencepiece(backend) -> bool:
    """A tokenizers backend that writes spaces as sentencepiece's `▁` (LLaMA, Vicuna, Mistral)."""
    return "Metaspace" in str(backend.pre_tokenizer) or "Prepend" in str(backend.normalizer)


def _legacy_tokenizer(tokenizer):
    """`tokenizer` rebuilt to cut text as the official slow LLaMA tokenizer (sentencepiece, legacy): every
    piece between special tokens gets sentencepiece's dummy prefix, also one that starts with a space
    (` b` is `▁▁b`). transformers 5's LlamaTokenizer rebuilds its pre-tokenizer from its class (with
    `legacy` true it misses that last case), so the export is a plain `TokenizersBackend` whose
    tokenizer.json holds the rules: spaces as `▁`, a leading `▁` doubled, a `▁` put before any other piece.
    """
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.normalizer = normalizers.Sequence(
        [normalizers.Replace(" ", "▁"), normalizers.Replace(Regex("\\A▁"), "▁▁")]
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    backend.post_processor = None  # BOS comes from the chat template (see export_tokenizer)
    specials = {
        k: getattr(tokenizer, k)
        for k in ("bos_token", "eos_token", "unk_token", "pad_token")
        if getattr(tokenizer, k)
    }
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


def export_tokenizer(model: MiniGPT4, legacy: bool):
    """A copy of the model's tokenizer with `<image>` added as a special token (`tokenizer.image_token`),
    made legacy (`_legacy_tokenizer`) when asked and it is a sentencepiece tokenizer, adding no special
    tokens of its own around a text, and pad as mgpt4 sets it (EOS)."""
    from transformers import AutoTokenizer

    source = model.tokenizer
    if legacy and _is_sentencepiece(source.backend_tokenizer):
        source = _legacy_tokenizer(source)
    with tempfile.TemporaryDirectory() as tmp:
        source.save_pretrained(tmp)
        # BOS comes from the chat template, where mgpt4's layout puts it; the tokenizer adds none, so a
        # prompt gets one BOS whether it is tokenized with special tokens or without.
        tok = AutoTokenizer.from_pretrained(
            tmp,
            local_files_only=True,
            split_special_tokens=False,
            extra_special_tokens={"image_token": IMAGE_TOKEN},
            add_bos_token=False,
            add_eos_token=False,
        )
    tok.pad_token = model.tokenizer.pad_token
    tok.padding_side = "left"  # batched generation pads on the left, as mgpt4's generate does
    if tok.convert_tokens_to_ids(IMAGE_TOKEN) in (None, tok.unk_token_id):
        raise ExportError(f"could not add the {IMAGE_TOKEN} token to the tokenizer ({type(tok).__name__})")
    return tok


def image_processor(image_size: int):
    """mgpt4's eval transform as transformers' BLIP image processor (PIL backend for exact pixels)."""
    from transformers import BlipImageProcessor
    from transformers.image_utils import PILImageResampling

    return BlipImageProcessor(
        size={"height": image_size, "width": image_size},
        resample=PILImageResampling.BICUBIC,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )


def _literal(text: str) -> str:
    """`text` as a Jinja string literal (JSON's escapes are Jinja's)."""
    return json.dumps(text)


# Each message's content as mgpt4 writes a user turn: the image tag(s), then the text, joined by a space
# (`Conversation.ask` joins a question to the image's turn that way). `image_block` is set by the caller.
_CONTENT = """\
{%- macro mgpt4_content(content) -%}
{%- if content is string -%}{{- content -}}
{%- else -%}
{%- set ns = namespace(parts=[]) -%}
{%- for part in content -%}
{%- if part['type'] == 'image' or part['type'] == 'image_url' -%}{%- set ns.parts = ns.parts + [image_block] -%}
{%- elif part['type'] == 'text' -%}{%- set ns.parts = ns.parts + [part['text']] -%}
{%- endif -%}
{%- endfor -%}
{{- ns.parts | join(' ') -}}
{%- endif -%}
{%- endmacro -%}
"""


def _image_block(num_image_tokens: int, joiner: str) -> str:
    return (
        "{%- set image_block = "
        + _literal("<Img>")
        + " + "
        + _literal(IMAGE_TOKEN)
        + " * "
        + str(num_image_tokens)
        + " + "
        + _literal(joiner + "</Img>")
        + " -%}\n"
    )


def official_chat_template(
    template: ConversationTemplate, num_image_tokens: int, bos: bool, joiner: str = ""
) -> str:
    """A Jinja chat template that renders `template` as `ConversationTemplate.render` does: BOS (when
    `bos`), system + sep, role + message + sep per message, the model's role left open (with
    `add_generation_prompt`). A leading `system` message replaces the template's system text."""
    user, assistant = template.roles
    return (
        ("{{- bos_token -}}\n" if bos else "")
        + _image_block(num_image_tokens, joiner)
        + _CONTENT
        + "{%- set ns_sys = namespace(text="
        + _literal(template.system)
        + ", skip=false) -%}\n"
        + "{%- if messages and messages[0]['role'] == 'system' -%}"
        + "{%- set ns_sys.text = mgpt4_content(messages[0]['content']) -%}{%- set ns_sys.skip = true -%}"
        + "{%- endif -%}\n"
        + "{{- ns_sys.text + "
        + _literal(template.sep)
        + " -}}\n"
        + "{%- for message in messages -%}\n"
        + "{%- if not (loop.first and ns_sys.skip) -%}"
        + "{%- if message['role'] == 'user' -%}{{- "
        + _literal(user)
        + " -}}{%- else -%}{{- "
        + _literal(assistant)
        + " -}}{%- endif -%}"
        + "{{- mgpt4_content(message['content']) + "
        + _literal(template.sep)
        + " -}}{%- endif -%}\n"
        + "{%- endfor -%}\n"
        + "{%- if add_generation_prompt -%}{{- "
        + _literal(assistant)
        + " -}}{%- endif -%}"
    )


def wrapped_chat_template(tokenizer_template: str, num_image_tokens: int, bos: bool, joiner: str = "") -> str:
    """The tokenizer's own chat template, with each message's content first made text as mgpt4 writes
    it (the image tag where the image goes), so the template sees what it saw in training; with `bos`,
    BOS goes first unless the template writes it (as `mgpt4.model.layout` does)."""
    body = tokenizer_template
    if bos:
        body = (
            "{%- set mgpt4_rendered -%}"
            + tokenizer_template
            + "{%- endset -%}{%- if not mgpt4_rendered.startswith(bos_token) -%}{{- bos_token -}}"
            + "{%- endif -%}{{- mgpt4_rendered -}}"
        )
    return (
        _image_block(num_image_tokens, joiner)
        + _CONTENT
        + "{%- set ns_msgs = namespace(items=[]) -%}\n"
        + "{%- for message in messages -%}"
        + "{%- set ns_msgs.items = ns_msgs.items + [{'role': message['role'], "
        + "'content': mgpt4_content(message['content'])}] -%}"
        + "{%- endfor -%}\n"
        + "{%- set messages = ns_msgs.items -%}\n"
        + body
    )


def chat_template(model: MiniGPT4, joiner: str = "", image_tokens: int | None = None) -> str:
    """The export's chat template for the model's conversation template, writing `image_tokens`
    `<image>` tokens per image (default: the model's image tokens, for a processor that does not expand
    them; 1 for one that does, as `LlavaProcessor`)."""
    template, bos = model.text_spec.template, model.text_spec.bos_id is not None
    n = model.num_image_tokens if image_tokens is None else image_tokens
    if isinstance(template, TokenizerChatTemplate):
        return wrapped_chat_template(template.tokenizer.chat_template, n, bos, joiner)
    if isinstance(template, ConversationTemplate):
        return official_chat_template(template, n, bos, joiner)
    raise ExportError(f"no chat template for the conversation template {type(template).__name__}")


def generation_config(model: MiniGPT4, tokenizer, image_token_id: int, bos_token_id: int | None):
    """The official demo's decoding defaults (`GenerationSettings()`: sampling, temperature 1.0, top_p
    0.9, 300 new tokens, one beam, no repetition penalty; min_length 1), the template's stop strings
    (`###` for Vicuna v0), every EOS id mgpt4 stops on, and the `<image>` token suppressed."""
    from transformers import GenerationConfig

    defaults = GenerationSettings()
    stops = list(model.text_spec.stops)
    return GenerationConfig(
        **defaults.hf_kwargs(),  # with sampling on: temperature and top_p too
        min_length=1,
        length_penalty=1.0,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_ids(model.tokenizer, model.llm.generation_config),
        pad_token_id=tokenizer.pad_token_id,
        stop_strings=stops or None,
        suppress_tokens=[image_token_id],
    )


def probe_conversations(model: MiniGPT4) -> list[tuple[Conversation, list[dict]]]:
    """Conversations rendered both ways by `check_prompt_tokens`: mgpt4's `Conversation` and the
    transformers messages that say the same (an image with a question; and a reply and a second turn)."""
    out = []
    for turns in ([("What is in this image?", None)], [("Describe it.", "A red square."), ("Why?", None)]):
        conv = model.new_conversation()
        conv.add_image()
        messages: list[dict] = []
        for i, (question, reply) in enumerate(turns):
            conv.ask(question)
            content: list[dict] = [{"type": "text", "text": question}]
            if i == 0:
                content.insert(0, {"type": "image"})
            messages.append({"role": "user", "content": content})
            if reply is not None:
                conv.add_reply(reply)
                messages.append({"role": "assistant", "content": [{"type": "text", "text": reply}]})
        out.append((conv, messages))
    return out


def mgpt4_prompt_ids(
    model: MiniGPT4, prompt: str, image_token_id: int, image_tokens: int | None = None
) -> list[int]:
    """The ids of `prompt` as `MiniGPT4.layout` lays them out, each image position as `image_token_id`
    (`image_tokens` of them per image when given: the text of a processor that expands them)."""
    ids: list[int] = []
    for segment in model.layout(prompt).segments:
        if segment.kind == IMAGE:
            ids.extend([image_token_id] * (segment.length if image_tokens is None else image_tokens))
        else:
            ids.extend(segment.ids)
    return ids


def exported_prompt_ids(processor, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """The ids the exported processor gives `messages` (text only: the image is not needed for them),
    both ways a user gets them: the rendered text through the processor's tokenizer (special tokens
    added, as `processor(images=..., text=...)` does), and `apply_chat_template(tokenize=True)`."""
    tok = processor.tokenizer
    text = tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    direct = tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    direct = direct["input_ids"] if hasattr(direct, "keys") else direct
    return list(tok(text)["input_ids"]), list(direct)


def check_prompt_tokens(
    model: MiniGPT4, processor, image_token_id: int, image_tokens: int | None = None
) -> str | None:
    """None when the processor tokenizes the probe conversations as mgpt4 does (with `image_tokens`
    `<image>` tokens per image, see `chat_template`); else the first difference."""
    for conv, messages in probe_conversations(model):
        want = mgpt4_prompt_ids(model, conv.prompt_for_reply(), image_token_id, image_tokens)
        for got in exported_prompt_ids(processor, messages):
            if want == got:
                continue
            at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
            tok = processor.tokenizer
            return (
                f"prompt {conv.prompt_for_reply().replace(IMAGE_PLACEHOLDER, IMAGE_TOKEN)!r}: token {at} is "
                f"{tok.convert_ids_to_tokens(want[at : at + 3])} in mgpt4, "
                f"{tok.convert_ids_to_tokens(got[at : at + 3])} in the export"
            )
    return None


def blip2_processor(model: MiniGPT4, tokenizer):
    """transformers' `Blip2Processor` on mgpt4's eval transform, not expanding `<image>` (the chat
    template writes every image token)."""
    from transformers import Blip2Processor

    return Blip2Processor(
        image_processor=image_processor(model.cfg.vision.image_size),
        tokenizer=tokenizer,
        num_query_tokens=None,
    )


def build_processor(
    model: MiniGPT4,
    out_dir: str | None = None,
    make_processor: Callable = blip2_processor,
    image_tokens: int | None = None,
):
    """The processor (`make_processor(model, tokenizer)`, `Blip2Processor` by default) that reproduces
    mgpt4's inputs, checked against `MiniGPT4.layout`; its chat template writes `image_tokens` `<image>`
    tokens per image (default: all of the model's; 1 for a processor that expands each, as LLaVA's).

    The official templates get the legacy tokenizer; what joins the last `<image>` to `</Img>` is the
    first of "" and " " (a sentencepiece tokenizer whose pieces start with `▁` only at the start of the
    text needs the space that mgpt4's separate tokenization of the text after an image gives) with
    which the probe conversations tokenize as in mgpt4. Raises ExportError when none does.
    Returns (processor, image_token_id).
    """
    official = model.text_spec.template.slow_llama_pieces
    tokenizer = export_tokenizer(model, legacy=official)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    problem = None
    for joiner in ("", " "):
        processor = make_processor(model, tokenizer)
        # The tokenizer carries the template: Blip2Processor's constructor drops its own `chat_template`
        # when the folder is loaded. Both are set (the same text, saved once as chat_template.jinja).
        tokenizer.chat_template = processor.chat_template = chat_template(model, joiner, image_tokens)
        problem = check_prompt_tokens(model, processor, image_token_id, image_tokens)
        if problem is None:
            if out_dir is not None:
                processor.save_pretrained(out_dir)
            return processor, image_token_id
    raise ExportError(
        f"the exported tokenizer ({type(tokenizer).__name__}) cannot reproduce mgpt4's prompt tokens: {problem}"
    )


__all__ = [
    "IMAGE_TOKEN",
    "ExportError",
    "blip2_processor",
    "build_processor",
    "chat_template",
    "generation_config",
    "image_processor",
]
