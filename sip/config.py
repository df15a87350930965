"""YAML recipes onto frozen dataclasses.

A recipe is plain data (``yaml.safe_load``): no import strings, no code. It maps onto a tree of frozen
dataclasses; an unknown key, a wrong type or a bad value is an error that names the key and the file.
``--set a.b=c`` overrides are parsed as YAML scalars and applied before validation, so they get the
same checks. The resolved config is written next to every output (``save_config``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe or override that does not fit its schema. The message names the key and the file."""


def _where(source: str | None) -> str:
    return f" in {source}" if source else ""


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str | None) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert containers; raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if tp is Any:
        _check_finite(value, key, source)
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1 and isinstance(value, dict):
            raise errors[0]  # ``Section | None`` given a mapping: the section's own error names the bad key
        if isinstance(value, float) and not math.isfinite(value):
            _check_finite(value, key, source)  # ``float | None`` given NaN: say so, not "expected float | None"
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}{_where(source)}")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{key}: must be one of {choices}, got {value!r}{_where(source)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}{_where(source)}")
        return from_dict(tp, value, source=source, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}{_where(source)}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}{_where(source)}")
            return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}{_where(source)}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, f"{key}.{k}", source): _coerce(v, vt, f"{key}.{k}", source) for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}{_where(source)}")
        _check_finite(value, key, source)
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}{_where(source)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}{_where(source)}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}{_where(source)}")
        return value
    if tp is Path:  # written by save_config as a string
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{key}: expected a path (string), got {value!r}{_where(source)}")
        return Path(value)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}{_where(source)}")
    _check_finite(value, key, source)  # a bare ``dict`` / ``list`` field holds free-form numbers
    return value


def _check_finite(value: Any, key: str, source: str | None) -> None:
    """Refuse NaN and ±inf anywhere in ``value`` (numbers inside free-form mappings and lists included): no recipe
    setting means anything at NaN or infinity, and NaN slips past every range check (``nan < 0`` is false)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {value!r}{_where(source)}")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, f"{key}.{k}", source)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite(v, f"{key}[{i}]", source)


def _check_not_empty(value: Any, field: dataclasses.Field, key: str, source: str | None) -> None:
    """Refuse an empty (or blank) string where the field's default is not itself empty: an empty name, path or
    choice would otherwise fall back to the default silently (``data.interpolation=`` ran as the model's own)."""
    blank = [i for i, v in enumerate(value if isinstance(value, (list, tuple)) else [value])
             if isinstance(v, str) and not v.strip()]
    if not blank or field.default == "":
        return
    if isinstance(value, (list, tuple)):
        where, hint = f"{key}[{blank[0]}]", "remove the empty item"
    elif field.default is None:
        where, hint = key, "set null (the default) or a value"
    else:
        where, hint = key, f"remove the key for the default ({field.default!r}) or set a value"
    raise ConfigError(f"{where}: an empty string is not a valid value; {hint}{_where(source)}")


def from_dict(cls: type[T], data: dict[str, Any], source: str | None = None, prefix: str = "") -> T:
    """Build the dataclass ``cls`` from a mapping, checking every key and type.

    Args:
        cls (type): a dataclass type (possibly nested).
        data (dict): plain data, e.g. from ``yaml.safe_load``.
        source (str, optional): the file the data came from, named in errors. Defaults to None.
        prefix (str, optional): dotted key of ``data`` inside the whole recipe. Defaults to "".

    Raises:
        ConfigError: on an unknown key, a wrong type, or a value the dataclass rejects.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        dotted = ", ".join(f"{prefix}.{k}" if prefix else str(k) for k in unknown)
        raise ConfigError(
            f"unknown key {dotted}{_where(source)}; valid keys{' of ' + prefix if prefix else ''}: "
            + ", ".join(sorted(fields))
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key, source)
        _check_not_empty(kwargs[name], fields[name], key, source)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        word = str(e).split(" ", 1)[0].rstrip(":,")  # a message about one field names it first: name its key
        key = f"{prefix}.{word}" if prefix and word in fields else prefix or cls.__name__
        raise ConfigError(f"{key}: {e}{_where(source)}") from e


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=c`` into (["a", "b"], value), the value parsed as a YAML scalar or flow list."""
    if "=" not in text:
        raise ConfigError(f"--set takes key=value (e.g. generate.strength=0.5), got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set: empty key in {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {e}") from e
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``a.b=c`` override written in (nested dicts created)."""
    out = copy.deepcopy(data) if data else {}
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {'.'.join(path)}: {part} is a value, not a section")
            node = child
        node[path[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a recipe file with ``yaml.safe_load``; an empty file is an empty recipe."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist; recipes live in pipelines/ (e.g. pipelines/fmnist_augment.yaml)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level of a recipe must be a mapping, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> T:
    """Load a recipe into ``cls``: YAML file (optional) + ``--set`` overrides, fully validated.

    Args:
        cls (type): the recipe's dataclass.
        path (str | Path, optional): YAML file. Defaults to None (dataclass defaults).
        overrides (Iterable[str], optional): ``a.b=c`` strings. Defaults to ().
    """
    data = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else None
    overrides = list(overrides)
    if overrides:
        data = apply_overrides(data, overrides)
        source = f"{source} + --set" if source else "--set"
    return from_dict(cls, data, source=source)


def to_dict(config: Any) -> Any:
    """A dataclass tree as plain data (tuples become lists), ready for YAML or JSON."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    if isinstance(config, Path):
        return str(config)
    return config


def save_config(config: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically: temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
    tmp.replace(path)
    return path
