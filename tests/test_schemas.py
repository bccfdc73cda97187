"""Call validation against BFCL's function docs, its hints, and the ground truth of all 800 tasks."""

from __future__ import annotations

import functools
import importlib
import inspect
import json
from collections.abc import Mapping
from typing import Any

import pytest
from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_utils import CLASS_FILE_PATH_MAPPING
from envtune.environments.schemas import (
    CallIssue,
    CallIssueKind,
    closest_functions,
    signature_text,
    type_example,
    validate_call,
)
from envtune.environments.tasks import load_function_docs, load_tasks
from envtune.environments.tool_calls import format_pythonic_call, parse_pythonic_calls, parse_reply
from envtune.environments.types import FunctionDoc, ToolCall
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

DOCS = load_function_docs()
MODE = FunctionDoc(
    name="setMode",
    class_name="Fake",
    description="",
    parameters={
        "type": "dict",
        "properties": {
            "mode": {"type": "string", "enum": ["auto", "cool"]},
            "level": {"type": "integer", "enum": [1, 2], "default": 1},
        },
        "required": ["mode"],
    },
)


@functools.cache
def positional_names() -> Mapping[str, tuple[str, ...]]:
    """Function -> parameter names in order, read with inspect from BFCL's own classes."""
    names: dict[str, tuple[str, ...]] = {}
    for class_name, module_name in CLASS_FILE_PATH_MAPPING.items():
        cls = getattr(importlib.import_module(module_name), class_name)
        for method_name, method in inspect.getmembers(cls, inspect.isfunction):
            if not method_name.startswith("_"):
                names[method_name] = tuple(p for p in inspect.signature(method).parameters if p != "self")
    return names


def issue(call: ToolCall, visible: Mapping[str, FunctionDoc] = DOCS) -> CallIssue:
    found = validate_call(call, visible)
    assert found is not None
    return found


# --- the ground truth ----------------------------------------------------------------------------


def test_every_ground_truth_call_validates_clean() -> None:
    checked = 0
    expected = 0
    problems = []
    for task in load_tasks().values():
        for turn_index, turn in enumerate(task.ground_truth):
            expected += len(turn)
            if not turn:
                continue
            calls = parse_pythonic_calls("[" + ", ".join(turn) + "]", positional_names())
            assert len(calls) == len(turn)
            for call in calls:
                checked += 1
                found = validate_call(call, DOCS)
                if found is not None:
                    problems.append(f"{task.id}/{turn_index}: {format_pythonic_call(call)}: {found.message}")
                # what the model writes (JSON in a tagged reply) parses to the same call
                body = json.dumps([{"name": call.name, "arguments": call.arguments}])
                assert parse_reply(f"<think>t</think><tool_call>{body}</tool_call>").calls == (call,)
                # and the keyword form that feeds BFCL's checker parses back to it too
                assert parse_pythonic_calls(format_pythonic_call(call)) == (call,)
    assert problems == []
    assert checked == expected == 4700


def test_ground_truth_calls_validate_against_only_their_tasks_tools() -> None:
    # Ground truth only calls functions of the task's own classes: visible-set validation passes too.
    for task in list(load_tasks().values())[::40]:
        visible = {name: doc for name, doc in DOCS.items() if doc.class_name in task.involved_classes}
        for turn in task.ground_truth:
            for call in parse_pythonic_calls("[" + ", ".join(turn) + "]", positional_names()) if turn else ():
                assert validate_call(call, visible) is None


# --- each kind of issue --------------------------------------------------------------------------


def test_valid_calls() -> None:
    assert validate_call(ToolCall("cd", {"folder": "document"}), DOCS) is None
    assert validate_call(ToolCall("tail", {"file_name": "a.txt"}), DOCS) is None  # optional omitted
    assert validate_call(ToolCall("pwd", {}), DOCS) is None


def test_unknown_function_with_close_names() -> None:
    found = issue(ToolCall("cdd", {"folder": "x"}))
    assert found == CallIssue(
        kind=CallIssueKind.UNKNOWN_FUNCTION,
        function="cdd",
        parameter=None,
        message="No function named 'cdd' is available",
        hint="Did you mean 'cd' or 'add'? Its signature: cd(folder: string).",
    )


def test_unknown_function_lists_visible_tools_when_nothing_is_close() -> None:
    visible = {name: doc for name, doc in DOCS.items() if doc.class_name == "MathAPI"}
    found = issue(ToolCall("list_files", {}), visible)
    assert found.kind is CallIssueKind.UNKNOWN_FUNCTION
    assert found.hint == (
        "Only the listed tools can be called: absolute_value, add, divide, imperial_si_conversion, "
        "logarithm, max_value, mean, min_value, multiply, percentage, power, round_number and 5 more."
    )
    no_tools = issue(ToolCall("cd", {}), {})
    assert no_tools.hint == "No tools are available right now; answer with <answer> instead."


def test_hidden_function_is_unknown() -> None:
    # A function that exists in BFCL but is not visible (a missed function) is not suggested.
    visible = {name: doc for name, doc in DOCS.items() if name != "mkdir"}
    found = issue(ToolCall("mkdir", {"dir_name": "x"}), visible)
    assert found.kind is CallIssueKind.UNKNOWN_FUNCTION
    assert "mkdir" not in found.hint


def test_missing_required() -> None:
    assert issue(ToolCall("cd", {})) == CallIssue(
        kind=CallIssueKind.MISSING_REQUIRED,
        function="cd",
        parameter="folder",
        message="cd() missing required argument 'folder'",
        hint="Call it as cd(folder: string); 'folder' is a string such as \"text\".",
    )


def test_unknown_parameter_is_reported_before_missing_ones() -> None:
    found = issue(ToolCall("mv", {"source": "a", "destnation": "b"}))
    assert found == CallIssue(
        kind=CallIssueKind.UNKNOWN_PARAMETER,
        function="mv",
        parameter="destnation",
        message="mv() got an unexpected keyword argument 'destnation'",
        hint="Did you mean 'destination'? Call it as mv(source: string, destination: string).",
    )
    assert issue(ToolCall("pwd", {"path": "."})).hint == "pwd() takes no arguments."


@pytest.mark.parametrize(
    ("call", "message", "hint"),
    [
        (ToolCall("tail", {"file_name": "a", "lines": 2.0}),
         "tail() argument 'lines' must be integer, not float",
         "Pass an integer such as 3 for 'lines'. Call it as tail(file_name: string, lines: integer = 10)."),
        (ToolCall("tail", {"file_name": "a", "lines": True}),
         "tail() argument 'lines' must be integer, not boolean",
         "Pass an integer such as 3 for 'lines'. Call it as tail(file_name: string, lines: integer = 10)."),
        (ToolCall("cd", {"folder": 3}), "cd() argument 'folder' must be string, not integer",
         "Pass a string such as \"text\" for 'folder'. Call it as cd(folder: string)."),
        (ToolCall("cd", {"folder": None}), "cd() argument 'folder' must be string, not null",
         "Pass a string such as \"text\" for 'folder'. Call it as cd(folder: string)."),
        (ToolCall("ls", {"a": "true"}), "ls() argument 'a' must be boolean, not string",
         "Pass a boolean such as true for 'a'. Call it as ls(a: boolean = false)."),
        (ToolCall("add", {"a": True, "b": 1}), "add() argument 'a' must be float, not boolean",
         "Pass a float such as 1.5 for 'a'. Call it as add(a: float, b: float)."),
        (ToolCall("mean", {"numbers": [1, "2"]}), "mean() argument 'numbers[1]' must be float, not string",
         "Pass a float such as 1.5 for 'numbers[1]'. Call it as mean(numbers: array[float])."),
        (ToolCall("post_tweet", {"content": "x", "tags": "#a"}),
         "post_tweet() argument 'tags' must be array[string], not string",
         "Pass an array of string values such as [\"text\", \"text\"] for 'tags'. Call it as "
         "post_tweet(content: string, tags: array[string] = [], mentions: array[string] = [])."),
        (ToolCall("edit_ticket", {"ticket_id": 1, "updates": "closed"}),
         "edit_ticket() argument 'updates' must be dict, not string",
         "Pass an object such as {\"description\": \"text\", \"status\": \"text\", \"priority\": 3} for "
         "'updates'. Call it as edit_ticket(ticket_id: integer, updates: dict)."),
        (ToolCall("edit_ticket", {"ticket_id": 1, "updates": {"priority": "high"}}),
         "edit_ticket() argument 'updates.priority' must be integer, not string",
         "Pass an integer such as 3 for 'updates.priority'. Call it as "
         "edit_ticket(ticket_id: integer, updates: dict)."),
    ],
)
def test_wrong_type(call: ToolCall, message: str, hint: str) -> None:
    found = issue(call)
    assert found.kind is CallIssueKind.WRONG_TYPE
    assert found.function == call.name
    assert found.parameter == message.split("'")[1].split(".")[0].split("[")[0]
    assert found.message == message
    assert found.hint == hint


def test_enum_violation() -> None:
    visible = {"setMode": MODE}
    assert issue(ToolCall("setMode", {"mode": "hot"}), visible) == CallIssue(
        kind=CallIssueKind.ENUM_VIOLATION,
        function="setMode",
        parameter="mode",
        message="setMode() argument 'mode' must be one of \"auto\", \"cool\", not \"hot\"",
        hint="Allowed values for 'mode': \"auto\", \"cool\".",
    )
    # enum membership is type-exact: 1.0 and True are not the enum's integer 1
    for level in (1.0, True, 3):
        assert issue(ToolCall("setMode", {"mode": "auto", "level": level}), visible).parameter == "level"
    assert validate_call(ToolCall("setMode", {"mode": "cool", "level": 2}), visible) is None
    assert issue(ToolCall("setMode", {}), visible).hint == (
        "Call it as setMode(mode: string, level: integer = 1); 'mode' is one of \"auto\", \"cool\"."
    )


# --- the documented leniencies -------------------------------------------------------------------


def test_float_accepts_integers() -> None:
    assert validate_call(ToolCall("mean", {"numbers": [3, 16, 60]}), DOCS) is None
    assert validate_call(ToolCall("add", {"a": 1, "b": 2.5}), DOCS) is None


def test_integer_ids_accept_strings() -> None:
    # multi_turn_*_173: close_ticket(ticket_id='ticket_001') against a scenario with string ticket ids
    assert validate_call(ToolCall("close_ticket", {"ticket_id": "ticket_001"}), DOCS) is None
    assert issue(ToolCall("tail", {"file_name": "a", "lines": "3"})).kind is CallIssueKind.WRONG_TYPE


def test_none_for_parameters_whose_default_is_none() -> None:
    assert validate_call(ToolCall("find", {"path": ".", "name": None}), DOCS) is None
    assert issue(ToolCall("tail", {"file_name": "a", "lines": None})).kind is CallIssueKind.WRONG_TYPE


def test_nested_dict_keys_and_none_values_are_left_to_the_method() -> None:
    # edit_ticket accepts 'title' (its doc omits it) and ignores None values (Dict[str, Optional[...]])
    call = ToolCall("edit_ticket", {"ticket_id": 1, "updates": {"title": "t", "status": None}})
    assert validate_call(call, DOCS) is None


# --- schema text ---------------------------------------------------------------------------------


def test_signature_text() -> None:
    assert signature_text(DOCS["mv"]) == "mv(source: string, destination: string)"
    assert signature_text(DOCS["find"]) == "find(path: string = \".\", name: string = optional)"
    assert signature_text(DOCS["pwd"]) == "pwd()"
    assert signature_text(DOCS["mean"]) == "mean(numbers: array[float])"


def test_closest_functions() -> None:
    assert closest_functions("Cd", DOCS) == ["cd"]
    assert closest_functions("get_stok_info", DOCS, limit=1) == ["get_stock_info"]
    assert closest_functions("zzzzzz", DOCS) == []


@pytest.mark.parametrize(
    ("schema", "text"),
    [
        ({"type": "float"}, "a float such as 1.5"),
        ({"type": "integer"}, "an integer such as 3"),
        ({"type": "string"}, 'a string such as "text"'),
        ({"type": "boolean"}, "a boolean such as true"),
        ({"type": "array", "items": {"type": "float"}}, "an array of float values such as [1.5, 1.5]"),
        ({"type": "array"}, 'an array such as ["text", "text"]'),
        ({"type": "dict"}, 'an object such as {"key": "value"}'),
        ({"type": "any"}, "any JSON value"),
        ({"type": "string", "enum": ["a", "b"]}, 'one of "a", "b"'),
    ],
)
def test_type_example(schema: dict[str, Any], text: str) -> None:
    assert type_example(schema) == text


def test_every_hint_example_is_a_valid_value() -> None:
    # The example a hint shows, plugged into the call, must pass validation: hints are actionable.
    for doc in DOCS.values():
        properties = doc.parameters["properties"]
        required = set(doc.parameters.get("required", ()))
        arguments = {}
        for name in required:
            text = type_example(properties[name])
            arguments[name] = json.loads(text.split(" such as ", 1)[1])
        assert validate_call(ToolCall(doc.name, arguments), DOCS) is None, (doc.name, arguments)


# --- never raises --------------------------------------------------------------------------------

_ODD = st.sampled_from([object(), {1, 2}, b"x", float("nan"), float("inf"), (1, 2), 10**40, -0.0])
_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6) | _ODD,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    | st.dictionaries(st.sampled_from(["description", "status", "priority", "title"]), inner, max_size=3),
    max_leaves=10,
)
_PARAMETERS = sorted({p for doc in DOCS.values() for p in doc.parameters["properties"]})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.one_of(st.sampled_from([*sorted(DOCS), "setMode"]), st.text(max_size=12)),
    arguments=st.dictionaries(
        st.one_of(st.sampled_from([*_PARAMETERS, "mode", "level"]), st.text(max_size=6)), _VALUES, max_size=5
    ),
    visible_all=st.booleans(),
)
def test_validator_never_raises(name: str, arguments: dict[str, Any], visible_all: bool) -> None:
    visible = {**DOCS, "setMode": MODE} if visible_all else {"setMode": MODE, "cd": DOCS["cd"]}
    found = validate_call(ToolCall(name, arguments), visible)
    if found is not None:
        assert isinstance(found.kind, CallIssueKind)
        assert found.message and found.hint
        assert found.function == name
