"""Every tool's flags are derived from the config dataclasses they fill: each field has a flag (or says
what derives it), required fields are required flags, defaults are shown in --help, and a value given
on the command line reaches the config the tool builds from it."""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from mgpt4.dataclass_flags import HelpWithDefaults, dest_of, field_type, has_default, leaf_fields
from mgpt4.inference import ModelSource
from mgpt4.inference.flags import settings_from_args, source_from_args
from mgpt4.model.generation import GenerationSettings
from tests.launch import REPO


@dataclass
class Entry:
    """One command line: its parser, the least it needs, and what it builds from the flags."""

    parser: Callable[[], argparse.ArgumentParser]
    sub: str | None  # the subcommand
    argv: list[str]  # the required flags, with placeholder values
    configs: dict[type, Callable[[argparse.Namespace], Any]]  # dataclass -> the tool's own builder
    optional: tuple[str, ...] = ()  # required fields that this command line leaves optional (see below)


def _tiny_model_config():
    from mgpt4.model.presets import tiny

    return tiny()


def _entries() -> dict[str, Entry]:
    from mgpt4.chat.terminal import build_parser as terminal
    from mgpt4.chat.web import build_parser as web
    from mgpt4.curate import __main__ as curate
    from mgpt4.curate.chat_api import ChatAPIConfig
    from mgpt4.curate.describe import DescribeConfig
    from mgpt4.curate.filter import FilterConfig
    from mgpt4.curate.fix import FixConfig
    from mgpt4.curate.hf_rewriter import HFRewriterConfig
    from mgpt4.eval import __main__ as evaluation
    from mgpt4.eval.captions import CaptionEvalConfig
    from mgpt4.export import __main__ as export
    from mgpt4.features import __main__ as features
    from mgpt4.features.extract import ExtractOptions
    from mgpt4.serve import __main__ as serve

    model = {ModelSource: source_from_args, GenerationSettings: settings_from_args}
    fix = ["--input", "i", "--out", "o"]
    return {
        "chat": Entry(terminal, None, ["--image", "x.png"], model),
        "demo": Entry(web, None, [], model),
        "describe": Entry(
            curate.build_parser,
            "describe",
            ["--images", "d", "--out", "o"],
            {DescribeConfig: curate.describe_config, ModelSource: source_from_args},
        ),
        # Each back end's flags are optional: the back end is chosen by which of them are given.
        "fix (endpoint)": Entry(
            curate.build_parser,
            "fix",
            [*fix, "--base-url", "http://host/v1", "--model", "m"],
            {FixConfig: curate.fix_config, ChatAPIConfig: lambda a: curate.fix_config(a).api},
            optional=("base_url", "model", "model_path"),
        ),
        "fix (local model)": Entry(
            curate.build_parser,
            "fix",
            [*fix, "--hf-model", "folder"],
            {HFRewriterConfig: lambda a: curate.fix_config(a).hf},
            optional=("base_url", "model", "model_path"),
        ),
        # --print-rules needs neither --input nor --out, so filter checks them itself.
        "filter": Entry(
            curate.build_parser,
            "filter",
            ["--input", "i", "--out", "o"],
            {FilterConfig: curate.filter_config},
            optional=("input", "out"),
        ),
        "captions": Entry(
            evaluation.build_parser,
            "captions",
            ["--images", "d", "--references", "r.json", "--out", "o"],
            {
                CaptionEvalConfig: lambda a: evaluation.caption_config(a, _tiny_model_config()),
                ModelSource: source_from_args,
            },
        ),
        "extract": Entry(
            features.build_parser, "extract", ["--out", "o"], {ExtractOptions: features.extract_options}
        ),
        "serve": Entry(serve.build_parser, None, [], model),
        "export": Entry(export.build_parser, "hf", ["--out", "o"], {ModelSource: source_from_args}),
    }


def test_every_tool_with_flags_is_covered():
    """Every `python -m` tool but training and the planner (a recipe with --set overrides) is an entry
    below."""
    tools = {
        os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(REPO, "mgpt4/*/__main__.py"))
    }
    covered = {"chat", "curate", "eval", "features", "serve", "export"}
    assert tools - {"plan"} == covered


def _subparser(entry: Entry) -> argparse.ArgumentParser:
    parser = entry.parser()
    if entry.sub is None:
        return parser
    return parser._subparsers._group_actions[0].choices[entry.sub]


def _argv(entry: Entry, *extra: str) -> list[str]:
    return ([entry.sub] if entry.sub else []) + entry.argv + list(extra)


def _another(
    f: dataclasses.Field, kind: type, default: Any, action: argparse.Action
) -> tuple[list[str], Any]:
    """Flag arguments that give field `f` a value other than `default`, and that value."""
    if action.choices:
        value = next(c for c in action.choices if c != default)
        return [str(value)], value
    if kind is int:
        value = (default or 0) + 3
    elif kind is float:  # inside every range the tools check (top_p in (0, 1])
        value = default / 2 if default else 0.5
    else:
        value = f"given-{f.name}"
    return [str(value)], value


@pytest.mark.parametrize("tool", list(_entries()))
def test_each_config_field_has_a_flag_whose_value_reaches_the_config(tool):
    entry = _entries()[tool]
    parser = entry.parser()
    sub = _subparser(entry)
    formatter = HelpWithDefaults("x")
    by_dest: dict[str, list[argparse.Action]] = {}
    for action in sub._actions:
        by_dest.setdefault(action.dest, []).append(action)
    base = parser.parse_args(_argv(entry))
    for cls, build in entry.configs.items():
        built_default = build(base)
        for name, owner, f in leaf_fields(cls):
            if f.metadata.get("derived"):
                continue
            actions = by_dest.get(dest_of(f))
            assert actions, f"{tool}: {cls.__name__}.{name} has no flag"
            kind = field_type(owner, f)
            default = _get(built_default, name)
            if kind is bool:
                # The switch that changes the default.
                action = next(a for a in actions if a.const is not default)
                args = parser.parse_args(_argv(entry, action.option_strings[0]))
                assert _get(build(args), name) is (not default), (tool, name)
                continue
            action = actions[0]
            if not has_default(f) and f.name not in entry.optional:
                assert action.required, f"{tool}: {action.option_strings[0]} should be required"
            elif has_default(f) and default is not None and default != []:
                help_text = formatter._get_help_string(action)
                assert "default" in help_text, f"{tool}: {action.option_strings[0]} --help shows no default"
            if action.nargs == "?":
                argv = [action.option_strings[0], "given-dir"]
                value: Any = "given-dir"
            elif action.nargs == "+":
                argv, value = [action.option_strings[0], "a", "b"], ["a", "b"]
            elif isinstance(action, argparse._AppendAction):
                argv = [action.option_strings[0], "a=1", action.option_strings[0], "b=2"]
                value = ["a=1", "b=2"]
            else:
                extra, value = _another(f, kind, default, action)
                argv = [action.option_strings[0], *extra]
            args = parser.parse_args(_argv(entry, *argv))
            assert _get(build(args), name) == value, (tool, name, argv)


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def test_flags_left_out_keep_the_dataclass_defaults():
    """A tool's config from its required flags alone is the dataclass's own defaults (or the tool's
    stated ones: greedy decoding for describe and captions)."""
    from mgpt4.curate.chat_api import ChatAPIConfig
    from mgpt4.curate.describe import DescribeConfig
    from mgpt4.features.extract import ExtractOptions
    from mgpt4.model.generation import GREEDY

    entries = _entries()

    def built(tool: str, cls: type):
        entry = entries[tool]
        return entry.configs[cls](entry.parser().parse_args(_argv(entry)))

    assert built("describe", DescribeConfig) == DescribeConfig(images=["d"], out="o", decoding=GREEDY)
    assert built("fix (endpoint)", ChatAPIConfig) == ChatAPIConfig(base_url="http://host/v1", model="m")
    assert built("extract", ExtractOptions) == ExtractOptions(out="o")
    assert built("chat", ModelSource) == ModelSource()
    assert built("chat", GenerationSettings) == GenerationSettings()
