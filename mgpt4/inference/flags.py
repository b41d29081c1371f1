"""The flags of every tool that loads a model: the model (`ModelSource`'s fields) and decoding
(`GenerationSettings`' fields), both derived from their dataclasses so every tool spells and
documents them the same way.
"""

from __future__ import annotations

import argparse

from mgpt4.dataclass_flags import add_config_args, config_from_args
from mgpt4.inference.loader import ModelSource
from mgpt4.model.generation import GenerationError, GenerationSettings


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """One flag per `ModelSource` field, in the groups "model" and "low memory"."""
    add_config_args(parser, ModelSource)


def source_from_args(args: argparse.Namespace) -> ModelSource:
    """The `ModelSource` the flags of `add_model_args` give."""
    return config_from_args(ModelSource, args)


def add_decoding_args(
    parser: argparse.ArgumentParser, defaults: GenerationSettings, title: str = "decoding"
) -> None:
    """One flag per `GenerationSettings` field (`--max-new-tokens`, `--top-p`, ...; the yes/no field
    `sample` is `--do-sample` / `--greedy`), with `defaults` as the defaults --help shows."""
    add_config_args(parser.add_argument_group(title), GenerationSettings, defaults)


def settings_from_args(args: argparse.Namespace) -> GenerationSettings:
    """The decoding settings the flags give, checked; bad values exit with the problems named."""
    settings = config_from_args(GenerationSettings, args)
    try:
        settings.validate()
    except GenerationError as e:
        raise SystemExit(f"decoding flags: {e}") from None
    return settings
