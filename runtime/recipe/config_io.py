"""Typed config records to and from TOML, with ``--set a.b.c=value`` overrides.

Generic over any tree of frozen dataclasses whose leaves are ``bool``, ``int``, ``float``, ``str``,
``Path`` (written as a string), ``StrEnum``s, ``Literal``s, tuples (``tuple[X, ...]`` or fixed
``tuple[X, Y]``), ``X | None`` (also for a table: ``"none"`` or the table) and tuples of dataclasses
(TOML arrays of tables, addressed by number, ``name`` or ``*`` in overrides). TOML has no null:
``"none"`` stands for None in files and overrides. A field with ``metadata={"config": False}`` is not
a config key (it keeps its default). Every field needs a default;
its docstring (the string under it in the class body) is its documentation in dumped TOML and in
``--list-keys``. A wrong key names the valid ones, a wrong type names the expected one, and a
record's own ``__post_init__`` checks come back as ``ConfigError`` naming the table.

Left out: anything that knows envtune's own schema (``config.py``).
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import functools
import inspect
import itertools
import json
import math
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")

NONE = "none"
"""How None is written in TOML and in overrides."""


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and what was expected."""


# --- types ----------------------------------------------------------------------------------------


def _is_record(tp: Any) -> bool:
    """A dataclass type (a config table); a plain bool, so ``tp`` keeps its static type."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


@functools.cache
def _hints(cls: Any) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cls: type) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(cls) if f.init and f.metadata.get("config", True)]


def _optional_record(tp: Any) -> Any | None:
    """The dataclass ``X`` when ``tp`` is ``X | None`` (an optional table), else None."""
    inner = _optional(tp)
    return inner if _is_record(inner) else None


def _optional(tp: Any) -> Any | None:
    """``X`` when ``tp`` is ``X | None``, else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def _item_types(tp: Any) -> tuple[Any, ...] | None:
    """Item types of a tuple type: ``(X, ...)`` for ``tuple[X, ...]``, ``(X, Y)`` when fixed."""
    if typing.get_origin(tp) is not tuple:
        return None
    return typing.get_args(tp)


def _is_table_array(tp: Any) -> bool:
    items = _item_types(tp)
    return items is not None and len(items) == 2 and items[1] is Ellipsis and _is_record(items[0])


def _type_name(tp: Any) -> str:
    inner = _optional(tp)
    if inner is not None:
        return f"{_type_name(inner)} | {json.dumps(NONE)}"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in typing.get_args(tp))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " | ".join(json.dumps(m.value) for m in tp)
    items = _item_types(tp)
    if items is not None:
        if len(items) == 2 and items[1] is Ellipsis:
            return f"list of {_type_name(items[0])}"
        return f"list of {len(items)}: " + ", ".join(_type_name(i) for i in items)
    if _is_record(tp):
        return "table"
    names = {bool: "true | false", int: "integer", float: "number", str: "string", Path: "path"}
    return names.get(tp, str(tp))


# --- typed conversion -------------------------------------------------------------------------------


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` (parsed TOML) as type ``tp``, or ``ConfigError`` naming ``key``."""
    inner = _optional(tp)
    if inner is not None:
        if isinstance(value, str) and value.lower() == NONE:
            return None
        return _coerce(value, inner, key)
    origin = typing.get_origin(tp)
    if _is_record(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__}")
        return _from_mapping(tp, value, key)
    items = _item_types(tp)
    if items is not None:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a {_type_name(tp)}, got {value!r}")
        if len(items) == 2 and items[1] is Ellipsis:
            return tuple(_coerce(item, items[0], f"{key}.{i + 1}") for i, item in enumerate(value))
        if len(value) != len(items):
            raise ConfigError(f"{key}: expected a {_type_name(tp)}, got {len(value)} values")
        pairs = enumerate(zip(value, items, strict=True))
        return tuple(_coerce(item, t, f"{key}.{i + 1}") for i, (item, t) in pairs)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: expected one of {list(allowed)}, got {value!r}")
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(f"{key}: expected one of {[m.value for m in tp]}, got {value!r}") from None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if math.isnan(value):
            raise ConfigError(f"{key}: expected a number, got nan")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: expected a path (a non-empty string), got {value!r}")
        return Path(value)
    raise TypeError(f"{key}: unsupported config field type {tp!r}")  # a bug in the schema


def _from_mapping(cls: type, raw: Mapping[str, Any], prefix: str) -> Any:
    hints = _hints(cls)
    valid = {f.name for f in _fields(cls)}
    for key in raw:
        if key not in valid:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"unknown key {where!r}; valid keys here: {sorted(valid)}")
    kwargs = {}
    for f in _fields(cls):
        if f.name in raw:
            value = raw[f.name]
            default = _default_of(cls, f.name)
            if _is_record(hints[f.name]) and isinstance(value, Mapping) and _is_record(type(default)):
                # A partial table completes from the field's own default, which may differ from its
                # class's (EvalConfig.sampling is greedy): missing keys keep the config's defaults.
                value = merge_tables(to_dict(default), value)
            kwargs[f.name] = _coerce(value, hints[f.name], f"{prefix}.{f.name}" if prefix else f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix or 'config'}: missing required key {f.name!r}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix or 'config'}: {exc}") from exc


def merge_tables(base: Mapping[str, Any], layer: Mapping[str, Any]) -> dict[str, Any]:
    """``layer`` laid over ``base``: tables merge key by key, anything else (values, arrays, arrays of
    tables such as ``curriculum.stages``) replaces what ``base`` had."""
    merged = dict(base)
    for key, value in layer.items():
        below = merged.get(key)
        if isinstance(value, Mapping) and isinstance(below, Mapping):
            merged[key] = merge_tables(below, value)
        else:
            merged[key] = value
    return merged


def to_dict(obj: Any) -> Any:
    """Plain TOML-able data: enums as values, tuples as lists, None as ``"none"``."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in _fields(type(obj))}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, tuple | list):
        return [to_dict(item) for item in obj]
    if obj is None:
        return NONE
    if isinstance(obj, Path):
        return str(obj)
    return obj


def from_dict(cls: type[T], raw: Mapping[str, Any]) -> T:
    """A ``cls`` from parsed TOML; missing keys take their defaults."""
    config = _from_mapping(cls, raw, "")
    assert isinstance(config, cls)
    return config


# --- overrides ----------------------------------------------------------------------------------


def _parse_scalar(text: str, tp: Any, key: str) -> Any:
    """An override's text as the field's type (strings need no quotes)."""
    inner = _optional(tp)
    text = text.strip()
    if inner is not None:
        return NONE if text.lower() == NONE else _parse_scalar(text, inner, key)
    origin = typing.get_origin(tp)
    if origin is tuple:
        if text.startswith("["):
            try:
                return tomllib.loads(f"v = {text}")["v"]
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{key}: cannot parse {text!r} as a TOML array: {exc}") from None
        items = [part.strip() for part in text.split(",") if part.strip()]
        item_type = typing.get_args(tp)[0]
        return [i if item_type is str else _parse_scalar(i, item_type, key) for i in items]
    if tp in (str, Path) or origin is Literal or (isinstance(tp, type) and issubclass(tp, enum.Enum)):
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
            return text[1:-1]
        return text
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        raise ConfigError(f"{key}: cannot parse {text!r} as {_type_name(tp)}") from None


def _table_indices(items: list[Any], selector: str, key: str) -> list[int]:
    if selector == "*":
        return list(range(len(items)))
    if selector.isdigit():
        number = int(selector)
        if not 1 <= number <= len(items):
            raise ConfigError(f"{key}: number {number} out of range 1..{len(items)}")
        return [number - 1]
    for index, item in enumerate(items):
        if item.get("name") == selector:
            return [index]
    names = [item.get("name") for item in items]
    raise ConfigError(f"{key}: no entry {selector!r}; use a number 1..{len(items)}, a name {names} or *")


def _default_of(cls: type, name: str) -> Any:
    """The field's default value (``dataclasses.MISSING`` when it has none)."""
    field = next(f for f in _fields(cls) if f.name == name)
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _apply(node: dict[str, Any], cls: type, parts: list[str], text: str, key: str) -> None:
    head, rest = parts[0], parts[1:]
    valid = {f.name for f in _fields(cls)}
    if head not in valid:
        done = key[: len(key) - len(".".join(parts))].rstrip(".")
        where = f"{done}.{head}" if done else head
        raise ConfigError(f"unknown key {where!r}; valid keys here: {sorted(valid)}")
    tp = _hints(cls)[head]
    if _is_record(tp):
        if not rest:
            raise ConfigError(f"{key} is a table; set one of its keys: {sorted(f.name for f in _fields(tp))}")
        _apply(node.setdefault(head, {}), tp, rest, text, key)
        return
    optional_record = _optional_record(tp)
    if optional_record is not None and rest:
        if not isinstance(node.get(head), dict):
            node[head] = {}  # setting a key of an absent ("none") optional table creates it
        _apply(node[head], optional_record, rest, text, key)
        return
    if _is_table_array(tp) and rest:
        item_cls = typing.get_args(tp)[0]
        if head not in node:
            # Overriding one entry of a default array of tables needs the array written out first.
            node[head] = to_dict(_default_of(cls, head))
        if len(rest) < 2:
            raise ConfigError(f"{key}: name a field, e.g. {key}.{rest[0] if rest else '1'}.<field>")
        for index in _table_indices(node[head], rest[0], key):
            _apply(node[head][index], item_cls, rest[1:], text, key)
        return
    if rest:
        raise ConfigError(f"{key}: {head} is a {_type_name(tp)}, it has no sub-keys")
    node[head] = _parse_scalar(text, tp, key)


def apply_overrides(cls: type, raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to parsed TOML for a ``cls`` (in place; also returned).

    Entries of an array of tables are addressed as ``<array>.<number|name|*>.<field>`` (from 1).
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        _apply(raw, cls, key.split("."), text, key)
    return raw


# --- files ----------------------------------------------------------------------------------------


def read_toml(path: Path) -> dict[str, Any]:
    """Parsed TOML, or ``ConfigError`` naming the file and what is wrong with it."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder; give a .toml file") from None
    except PermissionError:
        raise ConfigError(f"config file {path} cannot be read (permission denied)") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def load(cls: type[T], path: Path | None = None, overrides: Sequence[str] = ()) -> T:
    """A ``cls`` from ``path`` (defaults when None) with ``overrides`` applied, validated."""
    raw = read_toml(path) if path is not None else {}
    return from_dict(cls, apply_overrides(cls, raw, overrides))


def load_layers(cls: type[T], paths: Sequence[Path], overrides: Sequence[str] = ()) -> T:
    """A ``cls`` from TOML files laid over each other in order (a preset, then the user's file), then
    ``overrides``, validated."""
    raw: dict[str, Any] = {}
    for path in paths:
        raw = merge_tables(raw, read_toml(path))
    return from_dict(cls, apply_overrides(cls, raw, overrides))


def with_overrides(config: T, overrides: Sequence[str]) -> T:
    """``config`` with ``a.b.c=value`` overrides applied."""
    cls = type(config)
    return from_dict(cls, apply_overrides(cls, to_dict(config), overrides))


@functools.cache
def field_docs(cls: Any) -> dict[str, str]:
    """Field name -> the docstring written under it in the class body."""
    tree = ast.parse(inspect.getsource(cls))
    node = tree.body[0]
    assert isinstance(node, ast.ClassDef)
    docs: dict[str, str] = {}
    for field, following in itertools.pairwise(node.body):
        if (
            isinstance(field, ast.AnnAssign)
            and isinstance(field.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[field.target.id] = inspect.cleandoc(following.value.value)
    return docs


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def _comment(text: str) -> list[str]:
    return [f"# {line}".rstrip() for line in text.splitlines()]


def _dump_table(obj: Any, header: str, array: bool, doc: str, out: list[str]) -> None:
    cls: Any = type(obj)
    docs = field_docs(cls)
    scalars = []
    tables = []
    for f in _fields(cls):
        tp = _hints(cls)[f.name]
        if _is_record(tp) or (_optional_record(tp) is not None and getattr(obj, f.name) is not None):
            tables.append((f.name, False))
        elif _is_table_array(tp):
            tables.append((f.name, True))
        else:
            scalars.append(f.name)
    if header:
        out.extend(["", *_comment(doc), f"[[{header}]]" if array else f"[{header}]"])
    for name in scalars:
        out.extend(_comment(docs.get(name, "")))
        out.append(f"{name} = {_toml_value(to_dict(getattr(obj, name)))}")
    for name, is_array in tables:
        sub = f"{header}.{name}" if header else name
        value = getattr(obj, name)
        if is_array:
            for index, item in enumerate(value):
                _dump_table(item, sub, True, docs.get(name, "") if index == 0 else "", out)
        else:
            _dump_table(value, sub, False, docs.get(name, ""), out)


def dump_toml(config: Any, title: str) -> str:
    """The whole config as TOML under a ``title`` comment, every field commented with its docstring
    (it round-trips exactly)."""
    out = _comment(title)
    _dump_table(config, "", False, "", out)
    return "\n".join(out).strip() + "\n"


def describe_keys(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, type, docstring) of every settable key, for ``--list-keys``."""
    rows: list[tuple[str, str, str]] = []
    docs = field_docs(cls)
    for f in _fields(cls):
        tp = _hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        optional_record = _optional_record(tp)
        if _is_record(tp):
            rows.extend(describe_keys(tp, f"{key}."))
        elif optional_record is not None:
            rows.append((key, f"table | {json.dumps(NONE)}", docs.get(f.name, "")))
            rows.extend(describe_keys(optional_record, f"{key}."))
        elif _is_table_array(tp):
            rows.extend(describe_keys(typing.get_args(tp)[0], f"{key}.<n|name|*>."))
        else:
            rows.append((key, _type_name(tp), docs.get(f.name, "")))
    return rows
