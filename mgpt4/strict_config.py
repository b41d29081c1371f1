"""Strict, typed config trees: dataclasses from nested dicts, back to dicts, and dotted overrides.

A leaf module: it imports nothing from mgpt4, so every config (the training tree, the data side,
curation's rules) can use it without import circles.

`from_dict` fails on any unknown or mistyped key with the dotted path of the field, so a typo in a
recipe, a JSON file or a `--set` override never passes silently.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the dotted field path."""


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: unexpected value {value!r}")
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build dataclass `cls` (and every nested dataclass) from a nested dict.

    Raises ConfigError naming the dotted path for an unknown key or a value of the wrong type.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = path or cls.__name__
        meant = sorted({m for k in unknown for m in difflib.get_close_matches(k, names, n=3, cutoff=0.6)})
        hint = f" (did you mean {', '.join(meant)}?)" if meant else ""
        raise ConfigError(f"{where}: unknown key(s) {unknown}{hint}; known keys are {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass tree as plain dicts, lists and scalars (JSON-serialisable)."""
    return dataclasses.asdict(cfg)


def parse_value(text: str) -> Any:
    """A command-line value: JSON when it parses (numbers, lists, true/false, null), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        lowered = text.lower()
        if lowered in ("none", "null"):
            return None
        if lowered in ("true", "false"):
            return lowered == "true"
        return text


def override_dict(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides to nested dicts in place; lists are indexed by number (`sources.0`)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.steps=100")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node: Any = data
        for i, part in enumerate(parts):
            index: Any = int(part) if isinstance(node, list) and part.isdigit() else part
            known = index in node if isinstance(node, dict) else isinstance(index, int) and index < len(node)
            if not isinstance(node, (dict, list)) or not known:
                raise ConfigError(
                    f"override {key!r}: unknown key {'.'.join(parts[: i + 1])!r}"
                    + did_you_mean(key.strip(), list(_value_paths(data)))
                )
            if i == len(parts) - 1:
                node[index] = parse_value(raw)
            else:
                node = node[index]
    return data


def did_you_mean(key: str, candidates: list[str]) -> str:
    """ "; did you mean a.b.c?" with the candidate closest to dotted `key` by difflib's ratio (at least
    0.6: a typo, or a section mixed up, `optim.steps` for `train.steps`), and up to two more exactly
    as close, or ""."""
    scored = []
    for c in dict.fromkeys(candidates):
        m = difflib.SequenceMatcher(None, key, c)
        if m.real_quick_ratio() >= 0.6 and m.quick_ratio() >= 0.6 and m.ratio() >= 0.6:
            scored.append((m.ratio(), c))
    scored.sort(key=lambda rc: -rc[0])  # stable: ties keep the config's field order
    meant = [c for r, c in scored[:3] if r == scored[0][0]]
    return f"; did you mean {' or '.join(meant)}?" if meant else ""


def _value_paths(node: Any, prefix: str = "") -> typing.Iterator[str]:
    """Every dotted path of a nested dict/list tree, inner nodes included (`data`, `data.sources.0`)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        path = f"{prefix}.{k}" if prefix else str(k)
        yield path
        yield from _value_paths(v, path)


def _field_types(tp: Any) -> dict[str, Any] | None:
    """The fields of dataclass `tp` (or of the dataclass in `X | None`) with their types; None for
    anything else."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if _is_dataclass_type(a)]
        tp = inner[0] if len(inner) == 1 else tp
    return typing.get_type_hints(tp) if _is_dataclass_type(tp) else None


def _type_paths(tp: Any, prefix: str = "") -> typing.Iterator[str]:
    """Every dotted path a config of dataclass type `tp` can have, list items as `.0`."""
    hints = _field_types(tp) or {}
    for name, sub in hints.items():
        path = f"{prefix}.{name}" if prefix else name
        yield path
        args = typing.get_args(sub)
        if typing.get_origin(sub) in (list, tuple) and args:
            yield from _type_paths(args[0], f"{path}.0")
        else:
            yield from _type_paths(sub, path)


def check_override_keys(cls: type, overrides: list[str]) -> None:
    """Check the keys of `a.b.c=value` overrides against the fields of dataclass `cls` alone, without
    building a config: what a launcher can do in a fraction of a second, before it imports a model.
    List items may have any index and dict fields any key here; `apply_overrides` later checks both
    against the config itself, and every value. Raises ConfigError as `override_dict` does, with the
    nearest keys."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.steps=100")
        key = item.split("=", 1)[0].strip()
        parts = key.split(".")
        tp: Any = cls
        for i, part in enumerate(parts):
            hints = _field_types(tp)
            if hints is not None:
                known, nxt = part in hints, hints.get(part)
            elif typing.get_origin(tp) in (list, tuple):
                known, nxt = part.isdigit(), (typing.get_args(tp) or (Any,))[0]
            elif typing.get_origin(tp) is dict:
                known, nxt = True, (typing.get_args(tp) or (Any, Any))[-1]
            else:  # a scalar has no keys below it; Any may have any
                known, nxt = tp is Any, Any
            if not known:
                # Below the part that matched first, with the list indices as given (sources.1).
                near = [".".join([*parts[:i], p]) for p in _type_paths(tp)]
                raise ConfigError(
                    f"override {key!r}: unknown key {'.'.join(parts[: i + 1])!r}"
                    + did_you_mean(key, near + list(_type_paths(cls)))
                )
            tp = nxt


def apply_overrides(cfg: T, overrides: list[str]) -> T:
    """A copy of dataclass tree `cfg` with `a.b.c=value` overrides applied, every section still typed."""
    if not overrides:
        return cfg
    return from_dict(type(cfg), override_dict(to_dict(cfg), overrides))
