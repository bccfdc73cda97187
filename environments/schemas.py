"""Checking a parsed call against BFCL's function docs, with hints derived from the schema alone.

``validate_call`` reports the first problem of a call (unknown function, unknown or missing parameter,
wrong type, value outside an enum) as a ``CallIssue``: a plain BFCL-style message plus an actionable
hint (closest names, the signature, an example of the expected type). The hints come from the docs the
model can already see, never from the ground truth.

The type rules follow what BFCL's Python classes accept for the ground truth of all 800 tasks (a test
checks every ground-truth call validates clean); each leniency below names the data that needs it.
Deliberately left out: anything about state (does the file exist?) — that is the environment's job.
"""

from __future__ import annotations

import difflib
import enum
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from envtune.environments.types import FunctionDoc, ToolCall

MAX_LISTED_FUNCTIONS = 12
"""How many available function names an unknown-function hint lists when none is close."""
MAX_COMPARED_NAME_CHARS = 256
"""Longest name compared for a "did you mean" hint (difflib's cost grows with it: 20 ms at 60,000)."""

_TYPE_NAMES: Mapping[str, str] = MappingProxyType(
    {
        "string": "string",
        "integer": "integer",
        "float": "float",
        "boolean": "boolean",
        "array": "array",
        "tuple": "array",
        "dict": "dict",
        "any": "any value",
    }
)
_EXAMPLES: Mapping[str, Any] = MappingProxyType(
    {
        "string": "text",
        "integer": 3,
        "float": 1.5,
        "boolean": True,
        "any": "text",
    }
)
_NONE_DEFAULTS = (None, "None")
"""BFCL renders a Python default of None as the string "None" in its docs."""


class CallIssueKind(enum.StrEnum):
    """Why a call does not fit its documentation."""

    UNKNOWN_FUNCTION = "unknown_function"
    """No visible function has this name."""
    MISSING_REQUIRED = "missing_required"
    """A parameter listed in ``required`` was not given."""
    UNKNOWN_PARAMETER = "unknown_parameter"
    """An argument name is not among the function's parameters."""
    WRONG_TYPE = "wrong_type"
    """An argument's value does not have the documented type."""
    ENUM_VIOLATION = "enum_violation"
    """An argument's value is not one of the documented ``enum`` values."""


@dataclass(frozen=True, slots=True)
class CallIssue:
    """The first problem found in a call."""

    kind: CallIssueKind
    """What kind of problem it is."""
    function: str
    """The function name as called."""
    parameter: str | None
    """The top-level parameter concerned (None for an unknown function)."""
    message: str
    """BFCL/Python-style plain error, e.g. ``cd() missing required argument 'folder'``."""
    hint: str
    """Actionable advice derived from the visible docs (names, signature, an example value)."""


# --- schema text ---------------------------------------------------------------------------------


def _type_of(schema: Mapping[str, Any]) -> str:
    kind = schema.get("type", "any")
    return kind if isinstance(kind, str) else "any"


def _type_label(schema: Mapping[str, Any]) -> str:
    kind = _type_of(schema)
    items = schema.get("items")
    if kind in ("array", "tuple") and isinstance(items, Mapping):
        return f"array[{_type_label(items)}]"
    return _TYPE_NAMES.get(kind, kind)


def _example_value(schema: Mapping[str, Any], depth: int = 0) -> Any:
    enum_values = schema.get("enum")
    if isinstance(enum_values, list | tuple) and enum_values:
        return enum_values[0]
    kind = _type_of(schema)
    if depth > 3:  # docs are shallow; this only bounds a pathological schema
        return None
    if kind in ("array", "tuple"):
        items = schema.get("items")
        item_schema = items if isinstance(items, Mapping) else {"type": "string"}
        return [_example_value(item_schema, depth + 1), _example_value(item_schema, depth + 1)]
    if kind == "dict":
        properties = schema.get("properties")
        if isinstance(properties, Mapping) and properties:
            return {
                str(name): _example_value(sub if isinstance(sub, Mapping) else {}, depth + 1)
                for name, sub in properties.items()
            }
        return {"key": "value"}
    return _EXAMPLES.get(kind, "text")


def type_example(schema: Mapping[str, Any]) -> str:
    """The expected type in words with a JSON example, e.g. ``a float such as 1.5``."""
    enum_values = schema.get("enum")
    if isinstance(enum_values, list | tuple) and enum_values:
        return "one of " + ", ".join(json.dumps(value) for value in enum_values)
    kind = _type_of(schema)
    example = json.dumps(_example_value(schema))
    if kind in ("array", "tuple"):
        items = schema.get("items")
        if isinstance(items, Mapping):
            return f"an array of {_type_label(items)} values such as {example}"
        return f"an array such as {example}"
    if kind == "dict":
        return f"an object such as {example}"
    if kind == "integer":
        return f"an integer such as {example}"
    if kind == "any":
        return "any JSON value"
    return f"a {_TYPE_NAMES.get(kind, kind)} such as {example}"


def _properties(doc: FunctionDoc) -> Mapping[str, Any]:
    properties = doc.parameters.get("properties") if isinstance(doc.parameters, Mapping) else None
    return properties if isinstance(properties, Mapping) else {}


def _required(doc: FunctionDoc) -> tuple[str, ...]:
    required = doc.parameters.get("required") if isinstance(doc.parameters, Mapping) else None
    if not isinstance(required, list | tuple):
        return ()
    return tuple(name for name in required if isinstance(name, str))


def signature_text(doc: FunctionDoc) -> str:
    """A one-line signature, e.g. ``tail(file_name: string, lines: integer = 10)``.

    Optional parameters show their documented default, or ``= optional`` when it is None.
    """
    required = set(_required(doc))
    parts = []
    for name, schema in _properties(doc).items():
        schema = schema if isinstance(schema, Mapping) else {}
        part = f"{name}: {_type_label(schema)}"
        if name not in required:
            default = schema.get("default", None)
            part += " = optional" if default in _NONE_DEFAULTS else f" = {json.dumps(default)}"
        parts.append(part)
    return f"{doc.name}({', '.join(parts)})"


def closest_functions(name: str, names: Iterable[str], limit: int = 3) -> list[str]:
    """Up to ``limit`` names most similar to ``name`` (case-insensitive difflib ratio >= 0.6)."""
    if len(str(name)) > MAX_COMPARED_NAME_CHARS:  # nothing that long is close to a documented name
        return []
    by_lower: dict[str, str] = {}
    for candidate in names:
        by_lower.setdefault(candidate.lower(), candidate)
    matches = difflib.get_close_matches(str(name).lower(), list(by_lower), n=limit, cutoff=0.6)
    return [by_lower[match] for match in matches]


# --- type checking -------------------------------------------------------------------------------


def _value_type(value: object) -> str:
    match value:
        case None:
            return "null"
        case bool():
            return "boolean"
        case int():
            return "integer"
        case float():
            return "float"
        case str():
            return "string"
        case list() | tuple():
            return "array"
        case Mapping():
            return "dict"
    return type(value).__name__


@dataclass(frozen=True, slots=True)
class _Mismatch:
    path: str
    schema: Mapping[str, Any]
    value: object
    enum: bool


def _accepts_string_id(path: str, schema: Mapping[str, Any]) -> bool:
    # Leniency: BFCL scenarios sometimes store an "integer" id as a string, and the classes compare ids
    # by equality, so a string id can be the right one. Ground truth needs it:
    # multi_turn_{base,miss_func,miss_param,long_context}_173 call close_ticket(ticket_id='ticket_001').
    return _type_of(schema) == "integer" and path.endswith("_id")


def _mismatch(value: object, schema: Mapping[str, Any], path: str, depth: int = 0) -> _Mismatch | None:
    """The first place where ``value`` does not fit ``schema`` (None when it fits)."""
    kind = _type_of(schema)
    ok: bool
    if kind == "string":
        ok = isinstance(value, str)
    elif kind == "integer":
        ok = (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, str) and _accepts_string_id(path, schema)
        )
    elif kind == "float":
        # JSON has one number type, and Python accepts an int wherever these methods take a float:
        # ground truth passes ints to float parameters, e.g. mean(numbers=[3, 16, 60]) in
        # multi_turn_base_15. A bool is not a number here, although Python's bool is an int.
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif kind == "boolean":
        ok = isinstance(value, bool)
    elif kind in ("array", "tuple"):
        ok = isinstance(value, list | tuple)
        items = schema.get("items")
        if isinstance(value, list | tuple) and isinstance(items, Mapping) and depth < 8:
            for index, item in enumerate(value):
                found = _mismatch(item, items, f"{path}[{index}]", depth + 1)
                if found is not None:
                    return found
    elif kind == "dict":
        ok = isinstance(value, Mapping)
        properties = schema.get("properties")
        if isinstance(value, Mapping) and isinstance(properties, Mapping) and depth < 8:
            # Keys of a nested dict are checked by the method itself (edit_ticket accepts 'title', which its
            # doc omits), and None values are allowed (edit_ticket's updates are Dict[str, Optional[...]]).
            for key, item in value.items():
                sub = properties.get(key)
                if item is not None and isinstance(sub, Mapping):
                    found = _mismatch(item, sub, f"{path}.{key}", depth + 1)
                    if found is not None:
                        return found
    else:  # "any" or a type the docs do not use: nothing to check
        ok = True
    if not ok:
        return _Mismatch(path, schema, value, enum=False)
    enum_values = schema.get("enum")
    if isinstance(enum_values, list | tuple) and enum_values:
        try:
            allowed = any(value == option and type(value) is type(option) for option in enum_values)
        except Exception:  # a hostile __eq__ must not escape the validator
            allowed = False
        if not allowed:
            return _Mismatch(path, schema, value, enum=True)
    return None


# --- validation ----------------------------------------------------------------------------------


def _unknown_function(call: ToolCall, visible: Mapping[str, FunctionDoc]) -> CallIssue:
    name = str(call.name)
    close = closest_functions(name, visible)
    if close:
        hint = "Did you mean " + " or ".join(f"'{option}'" for option in close) + "? "
        hint += f"Its signature: {signature_text(visible[close[0]])}."
    elif visible:
        listed = ", ".join(sorted(visible)[:MAX_LISTED_FUNCTIONS])
        more = len(visible) - MAX_LISTED_FUNCTIONS
        hint = f"Only the listed tools can be called: {listed}" + (f" and {more} more." if more > 0 else ".")
    else:
        hint = "No tools are available right now; answer with <answer> instead."
    return CallIssue(
        kind=CallIssueKind.UNKNOWN_FUNCTION,
        function=name,
        parameter=None,
        message=f"No function named '{name}' is available",
        hint=hint,
    )


_PLAIN_TYPES: Mapping[str, tuple[type, ...]] = MappingProxyType(
    {"string": (str,), "integer": (int,), "float": (int, float), "boolean": (bool,)}
)
"""Scalar schema types whose check is ``type(value) in ...`` (exact types: a bool is no int here)."""


def _plainly_valid(call: ToolCall, doc: FunctionDoc) -> bool:
    """The common case in a few dict operations: known keys, required present, plain scalar types.

    True only when the full check would find nothing; anything else (arrays, dicts, enums, ids given
    as strings, None for optional parameters) is left to the full check and its precise message.
    """
    parameters = doc.parameters
    if type(parameters) is not dict or type(call.arguments) is not dict:
        return False
    properties = parameters.get("properties", {})
    required = parameters.get("required", ())
    arguments = call.arguments
    if type(properties) is not dict or type(required) is not list:
        return False
    for key in required:
        if key not in arguments:
            return False
    for key, value in arguments.items():
        schema = properties.get(key)
        if type(schema) is not dict or "enum" in schema:
            return False
        plain = _PLAIN_TYPES.get(schema.get("type"))  # type: ignore[arg-type]
        if plain is None or type(value) not in plain:
            return False
    return True


def validate_call(call: ToolCall, visible: Mapping[str, FunctionDoc]) -> CallIssue | None:
    """The first problem of ``call`` against the visible docs, or None when it fits them.

    Order: unknown function, unknown parameter (before missing ones, as Python reports a misspelled
    keyword), missing required parameter, then each argument's type and enum in the doc's order.
    Never raises on odd input: any ToolCall gets None or an issue.
    """
    doc = visible.get(call.name) if isinstance(call.name, str) else None
    if doc is None:
        return _unknown_function(call, visible)
    if _plainly_valid(call, doc):
        return None
    name = doc.name
    properties = _properties(doc)
    arguments: Mapping[Any, Any] = call.arguments if isinstance(call.arguments, Mapping) else {}
    required = _required(doc)

    for key in arguments:
        if key not in properties:
            close = closest_functions(str(key), [str(p) for p in properties], limit=1)
            hint = f"Did you mean '{close[0]}'? " if close else ""
            hint += f"Call it as {signature_text(doc)}." if properties else f"{name}() takes no arguments."
            return CallIssue(
                kind=CallIssueKind.UNKNOWN_PARAMETER,
                function=name,
                parameter=str(key),
                message=f"{name}() got an unexpected keyword argument '{key}'",
                hint=hint,
            )

    for parameter in required:
        if parameter not in arguments:
            schema = properties.get(parameter)
            expected = type_example(schema) if isinstance(schema, Mapping) else "a value"
            return CallIssue(
                kind=CallIssueKind.MISSING_REQUIRED,
                function=name,
                parameter=parameter,
                message=f"{name}() missing required argument '{parameter}'",
                hint=f"Call it as {signature_text(doc)}; '{parameter}' is {expected}.",
            )

    for parameter, schema in properties.items():
        if parameter not in arguments or not isinstance(schema, Mapping):
            continue
        value = arguments[parameter]
        # Leniency: None for a parameter whose documented default is None is what omitting it means.
        if value is None and parameter not in required and schema.get("default") in _NONE_DEFAULTS:
            continue
        found = _mismatch(value, schema, parameter)
        if found is None:
            continue
        if found.enum:
            allowed = ", ".join(json.dumps(option, default=str) for option in found.schema.get("enum", ()))
            return CallIssue(
                kind=CallIssueKind.ENUM_VIOLATION,
                function=name,
                parameter=parameter,
                message=(
                    f"{name}() argument '{found.path}' must be one of {allowed}, not {_short(found.value)}"
                ),
                hint=f"Allowed values for '{found.path}': {allowed}.",
            )
        return CallIssue(
            kind=CallIssueKind.WRONG_TYPE,
            function=name,
            parameter=parameter,
            message=(
                f"{name}() argument '{found.path}' must be {_type_label(found.schema)}, "
                f"not {_value_type(found.value)}"
            ),
            hint=f"Pass {type_example(found.schema)} for '{found.path}'. Call it as {signature_text(doc)}.",
        )
    return None


def _short(value: object) -> str:
    try:
        text = json.dumps(value)
    except Exception:  # not JSON (only possible for a hand-built ToolCall): fall back to the type name
        text = type(value).__name__
    return text if len(text) <= 40 else text[:40] + "…"
