"""Strict YAML <-> dataclass conversion, dotted overrides, and the resolved-config dump.

Unknown keys and wrong types are errors naming the dotted path and the offending value:
``model.decoder.num_layer: unknown key (did you mean num_layers?)``. Ints are accepted where a
float is expected; nothing else is coerced (``"4"`` is not an int, ``1`` is not a bool).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from typing import Any, Dict, Iterable, List, Literal, Optional, Union

import yaml

from .schema import Config


class ConfigError(ValueError):
    """A config that cannot be used; the message names the dotted path and the value."""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union:
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, List):
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, path)
    if origin is Union:
        errors = []
        for option in typing.get_args(tp):
            try:
                return _convert(value, option, path)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp) or isinstance(value, bool) != any(
            isinstance(a, bool) for a in typing.get_args(tp)
        ):
            raise ConfigError(f"{path}: expected one of {_type_name(tp)}, got {value!r}")
        return value
    if origin in (list, List):
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{path}: expected null, got {value!r}")
        return None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected float, got {value!r}")
        return float(value)
    if tp in (int, str, bool):
        if type(value) is not tp:
            raise ConfigError(f"{path}: expected {tp.__name__}, got {value!r}")
        return value
    raise TypeError(f"{path}: unsupported field type {tp!r} in the schema")


def _build(cls: type, data: Dict[str, Any], path: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {near[0]}?)" if near else f" (known: {', '.join(names)})"
            raise ConfigError(f"{_join(path, key)}: unknown key{hint}")
    kwargs = {k: _convert(v, hints[k], _join(path, k)) for k, v in data.items()}
    return cls(**kwargs)


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def config_from_dict(data: Optional[Dict[str, Any]]) -> Config:
    """Build a ``Config`` from nested plain data (missing keys take their defaults)."""
    return _build(Config, data or {}, "")


def config_to_dict(config: Any) -> Dict[str, Any]:
    return dataclasses.asdict(config)


def apply_overrides(data: Dict[str, Any], overrides: Iterable[str]) -> Dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to nested plain data; values are parsed as YAML scalars
    (``4`` -> int, ``1e-4`` -> float, ``null`` -> None, ``[1, 0]`` -> list)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        value = yaml.safe_load(raw) if raw.strip() else None
        value = _fix_floats(value)  # YAML 1.1 reads "1e-4" as a string, also inside [..]/{..}
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(parts[: depth + 1])}: is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return any(c in text.lower() for c in ".e") and not text.lower().lstrip("+-").isalpha()


def read_yaml(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path, "r", encoding="utf-8") as handle:
        try:
            data = yaml.safe_load(handle)
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path!r} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r}: top level must be a mapping, got {data!r}")
    return _fix_floats(data)


def _fix_floats(node: Any) -> Any:
    """PyYAML follows YAML 1.1, where ``1e-4`` (no dot) is a string: read it as the float a
    user meant."""
    if isinstance(node, dict):
        return {k: _fix_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_floats(v) for v in node]
    if isinstance(node, str) and _looks_like_float(node):
        return float(node)
    return node


def load_config(path: Optional[str] = None, overrides: Iterable[str] = ()) -> Config:
    """Read a YAML config (or the defaults), apply dotted overrides, build and validate it."""
    from .validate import validate

    data = read_yaml(path) if path else {}
    config = config_from_dict(apply_overrides(data, overrides))
    validate(config)
    return config


def dump_config(config: Config, path: Optional[str] = None) -> str:
    """The resolved config as YAML (written to ``path`` when given)."""
    text = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
    return text
