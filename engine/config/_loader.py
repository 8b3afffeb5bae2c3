"""Generic TOML-table -> frozen dataclass conversion with errors that name key and file.

Every section dataclass is frozen; fields declare their type once, with a default. The
converter checks types from the annotations (int, float, str, bool, Enum, tuple[...],
nested dataclasses, ``X | None``) and rejects unknown keys by name.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any

from engine.errors import ConfigError

__all__ = ["build_section", "section_to_data", "ConfigContext"]


@dataclasses.dataclass(frozen=True)
class ConfigContext:
    """Where a value came from, for error messages."""

    file: str
    path: str  # dotted key path, e.g. "schema.sparse[3].rows"

    def child(self, key: str | int) -> "ConfigContext":
        if isinstance(key, int):
            return ConfigContext(self.file, f"{self.path}[{key}]")
        return ConfigContext(self.file, f"{self.path}.{key}" if self.path else key)

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.file}: [{self.path}] {message}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, ctx: ConfigContext) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, ctx)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ctx.error(f"value {value!r} matches none of {[_type_name(a) for a in args]}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ctx.error(f"expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, ctx.child(i)) for i, v in enumerate(value))
        if len(args) != len(value):
            raise ctx.error(f"expected a list of {len(args)} values, got {len(value)}")
        return tuple(_convert(a, v, ctx.child(i)) for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        key_t, val_t = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ctx.error(f"expected a table, got {value!r}")
        return types.MappingProxyType(
            {_convert(key_t, k, ctx): _convert(val_t, v, ctx.child(str(k))) for k, v in value.items()}
        )
    if dataclasses.is_dataclass(tp):
        return build_section(tp, value, ctx)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in tp)
            raise ctx.error(f"value {value!r} is not one of {allowed}") from None
    if tp is bool:
        if not isinstance(value, bool):
            raise ctx.error(f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ctx.error(f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ctx.error(f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ctx.error(f"expected a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise ctx.error(f"unsupported config type {tp!r} (a bug in headrace)")


def build_section(cls: type, data: Any, ctx: ConfigContext) -> Any:
    """Build frozen dataclass ``cls`` from a TOML table, rejecting unknown keys by name."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ctx.error(f"expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ctx.error(
            f"unknown key(s) {', '.join(repr(k) for k in unknown)}; "
            f"allowed: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], ctx.child(name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ctx.error(f"missing required key {name!r}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ctx.error(str(exc)) from None


def section_to_data(value: Any) -> Any:
    """The TOML-shaped data of a config value (the inverse of ``build_section``): dataclasses
    as tables of their init fields, enums as their values, tuples as lists, tables as dicts;
    ``build_section`` of the result gives back an equal value (None fields are kept, so
    write the result as JSON, not TOML)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: section_to_data(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [section_to_data(v) for v in value]
    if isinstance(value, (dict, types.MappingProxyType)):
        return {k: section_to_data(v) for k, v in value.items()}
    return value
