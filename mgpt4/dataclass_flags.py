"""Command-line flags derived from a config dataclass: one flag per field, so a tool's flags, their
defaults and which of them are required follow the config they fill, and never drift from it.

    add_config_args(parser, DescribeConfig)        # --images (required), --batch-size N (default: 8), ...
    cfg = config_from_args(DescribeConfig, args)   # the flags' values, the dataclass's defaults elsewhere

A field's `metadata` says how it is spelt (all optional):
    help      the flag's help; the default is appended to it (`(default: 8)`)
    flag      the flag's name (default: `--` + the field name with `-` for `_`)
    dest      the argparse destination (default: the field name)
    flags     a (yes, no) pair for a yes/no field: `("--do-sample", "--greedy")`
    choices, metavar, nargs, const     as in argparse
    append    a list field given as a repeated flag (`--set K=V --set K2=V2`)
    group     the title of the argument group the flag is shown under
    derived   no flag: the tool computes the field (the text says from what)
A yes/no field without `flags` is one switch that changes its default: `--no-progress` for a field that
is True by default (or the `flag` named), `--name` for one that is False. A field that is itself a
dataclass (decoding settings) gives its own fields' flags, in a group of its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


class OneLineErrors(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (what is wrong, and where to look), not the usage block."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class HelpWithDefaults(argparse.HelpFormatter):
    """--help shows each option's default, unless its help already says it or there is none to say."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        nothing = default is None or default is False or default == [] or default == argparse.SUPPRESS
        switch = action.nargs == 0  # a store_true/false flag: its help says what giving it does
        if "default" in text or nothing or switch or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def flag_of(f: dataclasses.Field) -> str:
    """The flag that sets field `f`."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def dest_of(f: dataclasses.Field) -> str:
    """The argparse destination of field `f`."""
    return f.metadata.get("dest", f.name)


def field_type(cls: type, f: dataclasses.Field) -> type:
    """The type of field `f` of `cls`, without `| None`: str, int, float, bool, list, or a dataclass."""
    hint = typing.get_type_hints(cls)[f.name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kinds = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(kinds) != 1:
            raise TypeError(f"{cls.__name__}.{f.name}: a flag needs one type, got {hint}")
        hint = kinds[0]
    return typing.get_origin(hint) or hint


def has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _default(f: dataclasses.Field, defaults: Any) -> Any:
    if defaults is not None:
        return getattr(defaults, f.name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def add_config_args(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    defaults: Any = None,
    *,
    titles: dict[str, str] | None = None,
    required: bool = True,
    unset: bool = False,
) -> None:
    """One flag per field of the dataclass `cls` (see the module docstring).

    defaults: an instance whose values are the flags' defaults (default: the dataclass's own). Fields
        without a dataclass default are required flags (unless `required` is False).
    titles: argument-group titles of nested dataclass fields, by field name.
    unset: every flag defaults to None, with the dataclass default said in its help, so that a tool
        can tell a flag given from one left out (`given_flags`); `config_from_args` fills the rest.
    """
    groups: dict[str, Any] = {}

    def target(f: dataclasses.Field):
        title = f.metadata.get("group")
        if title is None or not hasattr(parser, "add_argument_group"):
            return parser
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        return groups[title]

    for f in dataclasses.fields(cls):
        if f.metadata.get("derived"):
            continue
        kind = field_type(cls, f)
        value = _default(f, defaults) if has_default(f) else None
        if dataclasses.is_dataclass(kind):
            title = (titles or {}).get(f.name, f.name)
            group = parser.add_argument_group(title) if hasattr(parser, "add_argument_group") else parser
            add_config_args(group, kind, value, required=required, unset=unset)
            continue
        g = target(f)
        text = f.metadata.get("help", "")
        if kind is bool:
            _add_switch(g, f, bool(value), text)
            continue
        options: dict[str, Any] = {"dest": dest_of(f), "help": text}
        for key in ("choices", "metavar", "nargs", "const"):
            if key in f.metadata:
                options[key] = f.metadata[key]
        if "choices" not in options:  # the flag's name, not the field's: --timeout TIMEOUT
            options.setdefault("metavar", flag_of(f).lstrip("-").replace("-", "_").upper())
        if kind is list:
            if f.metadata.get("append"):
                options["action"] = "append"
            else:
                options.setdefault("nargs", "+")
        else:
            options["type"] = kind
        if not has_default(f):
            options["required"] = required
        elif unset:
            options["default"] = None
            if value is not None and "default" not in text:
                options["help"] = f"{text} (default: {value})"
        else:
            options["default"] = list(value) if isinstance(value, list) else value
            if value not in (None, []) and "default" not in text:
                options["help"] = f"{text} (default: %(default)s)"
        g.add_argument(flag_of(f), **options)


def _add_switch(g, f: dataclasses.Field, value: bool, text: str) -> None:
    if "flags" in f.metadata:
        yes, no = f.metadata["flags"]
        g.add_argument(
            yes,
            dest=dest_of(f),
            action="store_true",
            default=value,
            help=f"{text} (default: {yes if value else no})",
        )
        g.add_argument(no, dest=dest_of(f), action="store_false", help=argparse.SUPPRESS)
    elif value:
        name = f.metadata.get("flag") or "--no-" + f.name.replace("_", "-")
        g.add_argument(name, dest=dest_of(f), action="store_false", default=True, help=text)
    else:
        g.add_argument(flag_of(f), dest=dest_of(f), action="store_true", default=False, help=text)


def config_from_args(cls: type[T], args: argparse.Namespace, **given: Any) -> T:
    """The `cls` the flags describe: each field from its flag, from `given` (derived fields), or, for a
    flag left out (None), the dataclass default. A required field without a value raises TypeError."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in given:
            values[f.name] = given[f.name]
            continue
        if f.metadata.get("derived"):
            continue
        kind = field_type(cls, f)
        if dataclasses.is_dataclass(kind):
            values[f.name] = config_from_args(kind, args)
            continue
        value = getattr(args, dest_of(f), None)
        if value is not None:
            values[f.name] = list(value) if isinstance(value, list) else value
    return cls(**values)


def given_flags(cls: type, args: argparse.Namespace, skip: tuple[str, ...] = ()) -> list[str]:
    """The flags of `cls` given on the command line (added with `unset=True`), but those of `skip` fields."""
    return [
        flag_of(f)
        for f in dataclasses.fields(cls)
        if f.name not in skip
        and not f.metadata.get("derived")
        and getattr(args, dest_of(f), None) is not None
    ]


def leaf_fields(cls: type, prefix: str = "") -> list[tuple[str, type, dataclasses.Field]]:
    """(dotted name, owning dataclass, field) of every field, nested dataclasses expanded: what a test
    walks to check that every field has a flag that reaches the config."""
    out = []
    for f in dataclasses.fields(cls):
        kind = field_type(cls, f)
        if dataclasses.is_dataclass(kind) and not f.metadata.get("derived"):
            out += leaf_fields(kind, f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, cls, f))
    return out
