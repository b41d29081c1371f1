"""The text conventions that belong to a model, resolved from `model.text` and its tokenizer: the
conversation template, the stage-2 instruction template, the end of an answer, BOS and stop text.

`model.text.template` names an official template (`vicuna_v0`, `llama2_chat`; `mgpt4.model.prompts`)
or `chat_template`: the Jinja chat template that the LLM folder's tokenizer brings (Llama 3, Mistral
Instruct, Qwen2, ...), rendered by transformers' `apply_chat_template`. Training, generated samples,
chat and the web demo all take their template from here, so each model is spoken to in its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mgpt4.config import TEMPLATE_NAMES, TextConfig
from mgpt4.model.conversation_text import SYSTEM_SLOT, USER_SLOT
from mgpt4.model.prompts import OFFICIAL_TEMPLATES, Template
from mgpt4.strict_config import ConfigError
from mgpt4.tokenizer import encode_like_slow_llama

CHAT_TEMPLATE = "chat_template"
# Stands for the instruction while a chat template is rendered; replaced by "{}" afterwards.
_SLOT = "MGPT4INSTRUCTIONSLOT"

if set(TEMPLATE_NAMES) != {*OFFICIAL_TEMPLATES, CHAT_TEMPLATE}:
    raise ImportError(f"mgpt4.config.TEMPLATE_NAMES {TEMPLATE_NAMES} and the templates defined here differ")


class TokenizerChatTemplate:
    """A tokenizer's own chat template, as a conversation template.

    Messages are (role, text) with the roles `user` and `assistant`; the image tag
    (`<Img><ImageHere></Img>`) is part of the first user message's text. No system message is added,
    so the template's own default (if any) applies.
    """

    name = CHAT_TEMPLATE
    roles = ("user", "assistant")
    echo = None
    # The tokenizer's own template is tokenized by the tokenizer as it is (`apply_chat_template`'s ids).
    slow_llama_pieces = False

    def __init__(self, tokenizer, stops: Sequence[str] = ()):
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "model.text.template: chat_template, but the LLM's tokenizer has no chat template "
                f"({type(tokenizer).__name__}); choose one of {[*OFFICIAL_TEMPLATES]}"
            )
        self.tokenizer = tokenizer
        self.stops = tuple(stops)

    def render(self, messages: Sequence[Sequence[str]]) -> str:
        """The prompt that asks for the next reply (the template's generation prompt at the end)."""
        chat = [{"role": role, "content": text} for role, text in messages]
        return self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)

    @property
    def instruction(self) -> str:
        """One user turn around "{}", then the open assistant turn: the stage-2 training prompt."""
        text = self.render([("user", _SLOT)])
        if text.count(_SLOT) != 1:
            raise ConfigError(
                "model.text.template: the tokenizer's chat template does not show a user message"
            )
        return text.replace("{", "{{").replace("}", "}}").replace(_SLOT, "{}")

    @property
    def end_sym(self) -> str:
        if self.tokenizer.eos_token is None:
            raise ConfigError(
                "model.text.end_sym: the tokenizer has no EOS token to end answers with; set it"
            )
        return self.tokenizer.eos_token


@dataclass(frozen=True)
class TextSpec:
    """`model.text` resolved against the tokenizer: what the model writes and reads.

    `instruction` has "{}" where a stage-2 instruction goes; `bos_id` is None when no BOS is added.
    """

    template: Template
    instruction: str
    end_sym: str
    bos_id: int | None
    stops: tuple[str, ...]


def conversation_template(text: TextConfig, tokenizer=None) -> Template:
    """The template `model.text.template` names, with `model.text.stop` when it is set."""
    if text.template == CHAT_TEMPLATE:
        if tokenizer is None:
            raise ConfigError(
                "model.text.template: chat_template needs the LLM folder's tokenizer "
                "(model.weights.llm or model.weights.tokenizer)"
            )
        return TokenizerChatTemplate(tokenizer, text.stop or ())
    if text.template not in OFFICIAL_TEMPLATES:
        raise ConfigError(f"model.text.template: expected one of {TEMPLATE_NAMES}, got {text.template!r}")
    official = OFFICIAL_TEMPLATES[text.template]
    return official if text.stop is None else dataclasses.replace(official, stops=tuple(text.stop))


def prompt_tokenizer(template: Template, tokenizer) -> Callable[[str], list[int]]:
    """How the text of a prompt in `template` becomes ids (no special tokens added), for
    `mgpt4.model.layout.layout`: an official template as the official slow LLaMA tokenizer does it
    (`encode_like_slow_llama`), a tokenizer's chat template by the tokenizer itself."""
    if template.slow_llama_pieces:
        return lambda text: encode_like_slow_llama(tokenizer, text)
    return lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])


def bos_token_id(add_bos: bool | None, tokenizer=None, fallback: int | None = None) -> int | None:
    """The BOS id put before the first text, or None: `add_bos` true needs one, false never adds one,
    None adds the tokenizer's when it has one (`fallback`, the LLM config's, without a tokenizer)."""
    if add_bos is False:
        return None
    bos = tokenizer.bos_token_id if tokenizer is not None else fallback
    if bos is None and add_bos:
        raise ConfigError(
            "model.text.add_bos: true, but the tokenizer has no BOS token; set it to false or null"
        )
    return bos


def _own(template: Template, key: str) -> str | None:
    """The template's own `instruction` or `end_sym` (None when it has none to give)."""
    try:
        return getattr(template, key)
    except ConfigError:
        return None


def check_template_fields(text: TextConfig, template: Template) -> None:
    """Refuse a `prompt_template` or `end_sym` that is another official template's own value: a recipe
    fills them from its template (`mgpt4.model.presets.stage2_text`), so `--set model.text.template=...`
    alone would train the new template's model with the old template's prompt and answer end."""
    wrong = []
    for name, official in OFFICIAL_TEMPLATES.items():
        if name == text.template:
            continue
        for key, attr in (("prompt_template", "instruction"), ("end_sym", "end_sym")):
            value = getattr(text, key)
            if value is not None and value == getattr(official, attr) and value != _own(template, attr):
                wrong.append(f"model.text.{key}={value!r} is the {name} template's")
    if wrong:
        raise ConfigError(
            f"model.text.template is {text.template!r}, but {' and '.join(wrong)} (a recipe made for "
            f"another template?); set them to null to take {text.template!r}'s own "
            "(--set model.text.prompt_template=null --set model.text.end_sym=null), or to values of yours"
        )


def conversation_wrappers(spec: TextSpec, prompt_template_set: bool) -> tuple[str, str, str]:
    """(first, first_system, later): how a conversation in `spec`'s template wraps its first user turn,
    its first with a system message, and each later one (`USER_SLOT` / `SYSTEM_SLOT` where the texts go;
    `mgpt4.model.conversation_text`).

    Official templates (and any `model.text.prompt_template` of yours) wrap every turn as the stage-2
    instruction, a system message written before the first (the official `system + sep` style); a
    tokenizer's chat template renders a system message as its own, and a later turn as it follows an
    answer (what it writes after the answer's end_sym, the next user turn and the open assistant turn).
    """
    first = spec.instruction.format(USER_SLOT)
    template = spec.template
    if not isinstance(template, TokenizerChatTemplate) or prompt_template_set:
        later = first
        if later.startswith(spec.end_sym):
            # Vicuna v0: `###Human: ` after an answer that ended with `###` is `Human: `, as the
            # official conversation writes it (`a1###Human: q2###Assistant: `).
            later = later[len(spec.end_sym) :]
        elif template.roles[0].startswith("<s>") and not later.startswith("<s>"):
            # Llama-2-Chat: each later turn opens with `<s>[INST] `, as the official conversation and
            # Meta's format write it (`a1</s><s>[INST] q2 [/INST] `).
            later = "<s>" + later
        return first, SYSTEM_SLOT + first, later
    first_system = template.render([("system", SYSTEM_SLOT), ("user", USER_SLOT)])
    answer = "MGPT4ANSWERSLOT"
    full = template.render([("user", USER_SLOT), ("assistant", answer), ("user", USER_SLOT)])
    later = full[full.index(answer) + len(answer) :]
    if later.startswith(spec.end_sym):
        later = later[len(spec.end_sym) :]
    if SYSTEM_SLOT not in first_system:  # a template that drops system messages
        first_system = first
    return first, first_system, later


def resolve_text(text: TextConfig, tokenizer=None, fallback_bos: int | None = None) -> TextSpec:
    """Fill what `model.text` leaves to the template (None fields) and pick BOS and stop text.

    ConfigError when `prompt_template` or `end_sym` is another official template's (`check_template_fields`).
    """
    template = conversation_template(text, tokenizer)
    check_template_fields(text, template)
    return TextSpec(
        template=template,
        instruction=text.prompt_template if text.prompt_template is not None else template.instruction,
        end_sym=text.end_sym if text.end_sym is not None else template.end_sym,
        bos_id=bos_token_id(text.add_bos, tokenizer, fallback_bos),
        stops=template.stops,
    )
