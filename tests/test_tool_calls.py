"""The reply parser: the paper's format rules, the JSON and pythonic call forms, hostile input."""

from __future__ import annotations

import builtins
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
from envtune.environments.tool_calls import (
    ANSWER_REPLY,
    MAX_CALLS_PER_STEP,
    MAX_NESTING_DEPTH,
    MAX_REPLY_CHARS,
    FormatError,
    ParsedReply,
    format_pythonic_call,
    format_reply,
    parse_json_calls,
    parse_pythonic_calls,
    parse_reply,
)
from envtune.environments.types import ToolCall
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CD = '[{"name": "cd", "arguments": {"folder": "document"}}]'


def reply(body: str, think: str = "plan") -> str:
    return f"<think>{think}</think><tool_call>{body}</tool_call>"


def failure(fn: Any, *args: Any, **kwargs: Any) -> FormatError:
    with pytest.raises(FormatError) as info:
        fn(*args, **kwargs)
    assert str(info.value).startswith("Error: ")
    return info.value


def same(a: Any, b: Any) -> bool:
    """Equality that also compares types (1 == 1.0 == True in plain Python)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def same_calls(a: tuple[ToolCall, ...], b: tuple[ToolCall, ...]) -> bool:
    if len(a) != len(b):
        return False
    return all(x.name == y.name and same(x.arguments, y.arguments) for x, y in zip(a, b, strict=True))


# --- the tagged reply ----------------------------------------------------------------------------


def test_format_reply_is_the_inverse_of_parse_reply() -> None:
    calls = (ToolCall("cd", {"folder": "document"}), ToolCall("mv", {"source": "a", "destination": "b"}))
    parsed = parse_reply(format_reply(calls))
    assert parsed.kind == "tool_call" and parsed.calls == calls
    assert parse_reply(ANSWER_REPLY).kind == "answer"


def test_tool_call_reply() -> None:
    parsed = parse_reply(f"  <think> go to document </think>\n<tool_call>\n{CD}\n</tool_call>\n")
    assert parsed == ParsedReply(
        kind="tool_call", think="go to document", calls=(ToolCall("cd", {"folder": "document"}),), answer=None
    )


def test_answer_reply() -> None:
    parsed = parse_reply("<think>done</think>\n<answer> The file is moved. </answer>")
    assert parsed == ParsedReply(kind="answer", think="done", calls=(), answer="The file is moved.")


def test_bytes_reply_is_decoded() -> None:
    parsed = parse_reply("<think>é</think><answer>ok ✓</answer>".encode())
    assert parsed.think == "é" and parsed.answer == "ok ✓"


def test_think_optional_when_not_required() -> None:
    assert parse_reply("<answer>hi</answer>", require_think=False).answer == "hi"
    assert parse_reply("<think>t</think><answer>hi</answer>", require_think=False).think == "t"
    # present but broken is still an error
    assert failure(parse_reply, "<think>t<answer>hi</answer>", require_think=False).reason == "missing_tag"


@pytest.mark.parametrize(
    ("text", "message", "reason"),
    [
        ("<answer>hi</answer>",
         "Error: Missing <think></think> tags: start the reply with <think>your reasoning</think>",
         "missing_tag"),
        ("<think>a</think><think>b</think><answer>x</answer>",
         "Error: Found 2 <think> tags; exactly one <think></think> pair is required", "duplicate_tag"),
        ("a</think><answer>x</answer>", "Error: Missing <think> opening tag (found </think> without <think>)",
         "missing_tag"),
        ("<think>a <answer>x</answer>", "Error: Missing </think> closing tag", "missing_tag"),
        (f"<think>a</think><tool_call>{CD}</tool_call><tool_call>{CD}</tool_call>",
         "Error: Found 2 <tool_call> tags; put all calls in one JSON list inside a single "
         "<tool_call></tool_call> pair", "duplicate_tag"),
        ("<think>a</think><answer>x</answer><answer>y</answer>",
         "Error: Found 2 <answer> tags; use a single <answer></answer> pair", "duplicate_tag"),
        (f"<think>a</think><tool_call>{CD}", "Error: Missing </tool_call> closing tag", "missing_tag"),
        (f"<think>a</think>{CD}</tool_call>",
         "Error: Missing <tool_call> opening tag (found </tool_call> without <tool_call>)", "missing_tag"),
        ("<think>a</think><answer>x", "Error: Missing </answer> closing tag", "missing_tag"),
        (f"<think>a</think><tool_call>{CD}</tool_call><answer>x</answer>",
         "Error: Use either <tool_call> or <answer> in one reply, not both", "both_tags"),
        ("<think>a</think>",
         "Error: Missing <tool_call></tool_call> or <answer></answer> tags: after </think>, either call "
         "tools or answer", "missing_tag"),
        ("</think>a<think><answer>x</answer>", "Error: </think> comes before <think>", "tag_order"),
        ("<think>a</think></answer>x<answer>", "Error: </answer> comes before <answer>", "tag_order"),
        ("<answer>x</answer><think>a</think>", "Error: <think></think> must come before <answer>",
         "tag_order"),
        ("<think>a <answer>x</answer></think>",
         "Error: <answer> must not be inside <think></think>; close </think> first", "tag_order"),
        ("Sure!<think>a</think><answer>x</answer>",
         "Error: Found text outside the tags: 'Sure!'; everything must be inside <think>, <tool_call> or "
         "<answer>", "stray_text"),
        ("<think>a</think> between <answer>x</answer>",
         "Error: Found text outside the tags: 'between'; everything must be inside <think>, <tool_call> or "
         "<answer>", "stray_text"),
        ("<think>a</think><answer>x</answer> trailing",
         "Error: Found text outside the tags: 'trailing'; everything must be inside <think>, <tool_call> or "
         "<answer>", "stray_text"),
        ("<think>a</think><answer>x</answer><tool_calls>[]</tool_calls>",
         "Error: Unknown tag '<tool_calls>'; only <think>, <tool_call> and <answer> are allowed",
         "stray_text"),
        ("<think>a\x00</think><answer>x</answer>", "Error: The reply contains a NUL character at position 8",
         "nul"),
    ],
)
def test_format_rules(text: str, message: str, reason: str) -> None:
    error = failure(parse_reply, text)
    assert str(error) == message
    assert error.reason == reason


def test_rules_apply_in_the_papers_order() -> None:
    # a missing think is reported before the duplicated tool_call and the stray text
    text = f"junk <tool_call>{CD}</tool_call><tool_call>{CD}</tool_call>"
    assert "Missing <think></think>" in str(failure(parse_reply, text))


def test_non_utf8_bytes() -> None:
    error = failure(parse_reply, b"<think>\xff</think><answer>x</answer>")
    assert str(error) == "Error: The reply is not valid UTF-8 (byte 0xff at offset 7)"
    assert error.reason == "encoding"


def test_lone_surrogate_text() -> None:
    assert failure(parse_reply, "<think>\ud800</think><answer>x</answer>").reason == "encoding"


def test_non_text_input() -> None:
    assert failure(parse_reply, 42).reason == "type"  # type: ignore[arg-type]


def test_megabyte_reply_is_rejected_cleanly() -> None:
    big = "<think>" + "x" * 1_000_000 + "</think><answer>a</answer>"
    error = failure(parse_reply, big)
    assert error.reason == "too_large"
    assert str(MAX_REPLY_CHARS) in str(error)
    assert failure(parse_reply, big.encode()).reason == "too_large"


def test_answer_and_tool_call_bodies_are_not_tag_checked_twice() -> None:
    # The body of the answer may contain JSON: it is text, not calls.
    assert parse_reply('<think>a</think><answer>[{"name": "cd"}]</answer>').calls == ()


# --- the JSON form -------------------------------------------------------------------------------


def test_json_calls_in_order_and_missing_arguments() -> None:
    calls = parse_json_calls(
        '[{"name": "pwd"}, {"name": "mv", "arguments": {"source": "a", "destination": "b"}}]'
    )
    assert calls == (ToolCall("pwd", {}), ToolCall("mv", {"source": "a", "destination": "b"}))


def test_single_object_is_wrapped() -> None:
    assert parse_json_calls('{"name": "ls", "arguments": {"a": true}}') == (ToolCall("ls", {"a": True}),)


@pytest.mark.parametrize(
    ("body", "message", "reason"),
    [
        ("", "Error: The <tool_call> block is empty; write a JSON list of calls", "no_calls"),
        ("[]", "Error: The <tool_call> list is empty: no calls. Call at least one function or use <answer>",
         "no_calls"),
        ('[{"name": "cd",}]',
         "Error: Invalid JSON inside <tool_call>: Expecting property name enclosed in double quotes at "
         "line 1 column 16 (char 15)", "invalid_json"),
        ('"cd"', 'Error: The <tool_call> body must be a JSON list of calls like [{"name": "...", '
         '"arguments": {}}], got a string', "bad_shape"),
        ('["cd"]', 'Error: Call #1 in <tool_call> must be an object {"name": ..., "arguments": {...}}, got a '
         "string", "bad_entry"),
        ('[{"name": "cd"}, {"arguments": {}}]', 'Error: Call #2 in <tool_call> has no "name"', "bad_entry"),
        ('[{"name": 7}]', 'Error: Call #1 in <tool_call>: "name" must be a string, got a number',
         "bad_entry"),
        ('[{"name": "inspect.os.getcwd"}]',
         "Error: Call #1 in <tool_call>: 'inspect.os.getcwd' is not a valid function name (use the bare "
         "name, e.g. 'cd')", "bad_name"),
        ('[{"name": "cd()"}]',
         "Error: Call #1 in <tool_call>: 'cd()' is not a valid function name (use the bare name, e.g. 'cd')",
         "bad_name"),
        ('[{"name": "class"}]',
         "Error: Call #1 in <tool_call>: 'class' is not a valid function name (use the bare name, e.g. 'cd')",
         "bad_name"),
        ('[{"name": "cd", "parameters": {"folder": "a"}}]',
         "Error: Call #1 in <tool_call> has unexpected key 'parameters'; a call has only \"name\" and "
         '"arguments"', "bad_entry"),
        ('[{"name": "cd", "arguments": "{\\"folder\\": \\"a\\"}"}]',
         'Error: Call #1 in <tool_call> (cd): "arguments" must be a JSON object, got a string', "bad_entry"),
        ('[{"name": "cd", "arguments": {"folder name": "a"}}]',
         "Error: argument name 'folder name' of cd() is not a valid parameter name", "bad_name"),
        ('[{"name": "cd", "arguments": {"folder": NaN}}]',
         "Error: Invalid JSON inside <tool_call>: NaN is not a JSON number", "invalid_json"),
        ('[{"name": "cd", "arguments": {"folder": 1e999}}]',
         "Error: argument 'folder' of cd() holds a number out of range", "invalid_json"),
        ('[{"name": "cd", "arguments": {"folder": "a\\u0000"}}]',
         "Error: argument 'folder' of cd() contains a NUL character", "nul"),
        ('[{"name": "cd", "arguments": {"folder": "\\ud800"}}]',
         "Error: argument 'folder' of cd() contains an invalid unicode escape (a lone surrogate)",
         "encoding"),
        ('[{"name": "cd", "arguments": {"folder": "a", "folder": "b"}}]',
         "Error: Invalid JSON inside <tool_call>: duplicate key 'folder' in an object", "invalid_json"),
    ],
)
def test_json_errors(body: str, message: str, reason: str) -> None:
    error = failure(parse_json_calls, body)
    assert str(error) == message
    assert error.reason == reason


def test_json_errors_reach_the_reply_parser() -> None:
    assert "Invalid JSON inside <tool_call>" in str(failure(parse_reply, reply("[{")))


def test_json_limits() -> None:
    too_many = json.dumps([{"name": "pwd"}] * (MAX_CALLS_PER_STEP + 1))
    assert failure(parse_json_calls, too_many).reason == "too_many_calls"
    assert len(parse_json_calls(json.dumps([{"name": "pwd"}] * MAX_CALLS_PER_STEP))) == MAX_CALLS_PER_STEP
    for depth in (MAX_NESTING_DEPTH + 1, 100_000):
        deep = '[{"name": "f", "arguments": {"a": ' + "[" * depth + "]" * depth + "}}]"
        assert failure(parse_json_calls, deep).reason == "too_deep"
    # brackets inside strings do not count
    assert parse_json_calls('[{"name": "echo", "arguments": {"content": "' + "[" * 100 + '"}}]')
    assert failure(parse_json_calls, '[{"name": "f", "arguments": {"a": ' + "9" * 5000 + "}}]").reason == (
        "invalid_json"
    )
    assert failure(parse_json_calls, "x" * (MAX_REPLY_CHARS + 1)).reason == "too_large"


# --- BFCL's pythonic form ------------------------------------------------------------------------


def test_pythonic_list_bare_call_and_literals() -> None:
    calls = parse_pythonic_calls(
        "[cd(folder='document'), mv(source=\"a b\", destination='c'), "
        "f(x=-1, y=-2.5, z=True, n=None, l=[1, (2, 3)], d={'k': [{'v': 0.5}]})]"
    )
    assert calls[0] == ToolCall("cd", {"folder": "document"})
    assert calls[1] == ToolCall("mv", {"source": "a b", "destination": "c"})
    assert same(calls[2].arguments, {"x": -1, "y": -2.5, "z": True, "n": None, "l": [1, [2, 3]],
                                     "d": {"k": [{"v": 0.5}]}})
    assert parse_pythonic_calls("  pwd()  ") == (ToolCall("pwd", {}),)


def test_positional_arguments_use_parameter_names() -> None:
    names = {"sort": ("file_name",), "post_tweet": ("content", "tags", "mentions")}
    assert parse_pythonic_calls("sort('final_report.pdf')", names) == (
        ToolCall("sort", {"file_name": "final_report.pdf"}),
    )
    assert parse_pythonic_calls("post_tweet('hi', tags=['#a'])", names) == (
        ToolCall("post_tweet", {"content": "hi", "tags": ["#a"]}),
    )
    assert str(failure(parse_pythonic_calls, "sort('a')")) == (
        "Error: sort() got positional arguments but its parameter names are unknown; use keyword arguments "
        "like name=value"
    )
    assert str(failure(parse_pythonic_calls, "cd('a')", names)).startswith("Error: cd() got positional")
    assert str(failure(parse_pythonic_calls, "sort('a', 'b')", names)) == (
        "Error: sort() takes at most 1 positional arguments (2 given)"
    )
    assert str(failure(parse_pythonic_calls, "sort('a', file_name='b')", names)) == (
        "Error: sort() got multiple values for argument 'file_name'"
    )


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("f(a=x)", "argument 'a' of f() must be a literal (string, number, True/False/None, list or dict), "
                   "not a variable name ('x')"),
        ("f(a=os.sep)", "not attribute access ('os.sep')"),
        ("f(a=open('/etc/passwd'))", "not a function call (\"open('/etc/passwd')\")"),
        ("f(a=lambda: 1)", "not a lambda ('lambda: 1')"),
        ("f(a=[x for x in 'ab'])", "not a comprehension"),
        ("f(a={k: 1 for k in 'ab'})", "not a comprehension"),
        ("f(a=(x for x in 'ab'))", "not a generator expression"),
        ("f(a=1 + 2)", "not an operator expression ('1 + 2')"),
        ("f(a='x' * 10**9)", "not an operator expression"),
        ("f(a=[1][0])", "not a subscript ('[1][0]')"),
        ("f(a=f'{x}')", "not an f-string"),
        ("f(a=-True)", "not a unary operator ('-True')"),
        ("f(a=not 1)", "not a unary operator"),
        ("f(a={1, 2})", "not a set literal"),
        ("f(a=1 if 2 else 3)", "not a conditional expression"),
        ("f(a=[*x])", "not a starred expression"),
        ("f(a=1j)", "must be a string, number, True/False/None, list or dict, not complex ('1j')"),
        ("f(a=b'x')", "not bytes"),
        ("f(a=...)", "not ellipsis"),
        ("f(a={1: 2})", "dictionary keys must be strings, got a number"),
        ("f(a={**x})", "must be a literal, not dict unpacking (**)"),
        ("f(*x)", "f() arguments must be literals, not a starred expression ('*x')"),
        ("f(**x)", "f() arguments must be literals, not **kwargs unpacking"),
        ("f(a=1e999)", "holds a number out of range"),
        ("f(a='\\x00')", "contains a NUL character"),
    ],
)
def test_pythonic_rejects_non_literals(source: str, message: str) -> None:
    error = failure(parse_pythonic_calls, source)
    assert message in str(error)


@pytest.mark.parametrize(
    ("source", "message", "reason"),
    [
        ("__import__('os').system('ls')",
         "Error: The called function must be a plain name, not attribute access "
         "(\"__import__('os').system\")", "bad_name"),
        ("os.system('ls')",
         "Error: The called function must be a plain name, not attribute access ('os.system')", "bad_name"),
        ("f()()", "Error: The called function must be a plain name, not a function call ('f()')", "bad_name"),
        ("ｃｄ(folder='a')", "Error: 'ｃｄ' is not a valid function name (ASCII letters, digits and _ only)",
         "bad_name"),
        ("cd(ｆolder='a')",
         "Error: an argument name of cd() is not a valid parameter name (ASCII letters, digits and _ only)",
         "bad_name"),
        ("x", "Error: Expected a function call like f(a=1), got a variable name ('x')", "bad_entry"),
        ("[cd(folder='a'), 3]",
         "Error: Expected a function call like f(a=1), got a constant ('3')", "bad_entry"),
        ("[]", "Error: The call list is empty: no calls", "no_calls"),
        ("   ", "Error: The call text is empty: no calls", "no_calls"),
        ("cd(folder='a'", "Error: Invalid call syntax: '(' was never closed (line 1, column 3)",
         "invalid_syntax"),
    ],
)
def test_pythonic_errors(source: str, message: str, reason: str) -> None:
    error = failure(parse_pythonic_calls, source)
    assert str(error) == message
    assert error.reason == reason


def test_pythonic_limits() -> None:
    calls = "[" + ", ".join(["pwd()"] * (MAX_CALLS_PER_STEP + 1)) + "]"
    assert failure(parse_pythonic_calls, calls).reason == "too_many_calls"
    ok_depth = MAX_NESTING_DEPTH - 1  # a bare call is level 1, its argument's outer list level 2
    assert parse_pythonic_calls("f(a=" + "[" * ok_depth + "]" * ok_depth + ")")
    deep = "f(a=" + "[" * (ok_depth + 1) + "]" * (ok_depth + 1) + ")"
    assert failure(parse_pythonic_calls, deep).reason == "too_deep"
    for hostile in (
        "f(a=" + "[" * 100_000 + "]" * 100_000 + ")",
        "f(a=" + "-" * 100_000 + "1)",
        "+".join(["1"] * 100_000),
        "a" + ".b" * 100_000,
        "f(a=" + "9" * 5000 + ")",
    ):
        assert failure(parse_pythonic_calls, hostile).reason in {"invalid_syntax", "not_literal", "too_deep"}
    assert failure(parse_pythonic_calls, "f(a='" + "x" * 1_000_000 + "')").reason == "too_large"


def test_nothing_runs_while_parsing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sentinel = tmp_path / "pwned"
    payloads = [
        f"__import__('os').system('touch {sentinel}')",
        f"os.system('touch {sentinel}')",
        f"f(a=__import__('os').system('touch {sentinel}'))",
        f"f(a=open('{sentinel}', 'w'))",
        f"[f(a=1), eval(\"open('{sentinel}', 'w')\")]",
        f"f(a=exec(\"open('{sentinel}', 'w')\"))",
        f"f(a=(lambda: open('{sentinel}', 'w'))())",
        f"f(a=[open('{sentinel}', 'w') for _ in 'x'])",
        f"getattr(__builtins__, 'open')('{sentinel}', 'w')",
        "f(a=().__class__.__base__.__subclasses__())",
        f"f(a={{'k': open('{sentinel}', 'w')}})",
    ]

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"parsing called a forbidden builtin with {args!r}")

    real_import = builtins.__import__

    def guarded_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name in {"os", "subprocess", "shutil", "pty"}:
            forbidden(name)
        return real_import(name, *args, **kwargs)

    with monkeypatch.context() as patch:
        for name in ("open", "eval", "exec"):
            patch.setattr(builtins, name, forbidden)
        patch.setattr(builtins, "__import__", guarded_import)
        patch.setattr(os, "system", forbidden)
        for payload in payloads:
            for parse in (parse_pythonic_calls, lambda p: parse_pythonic_calls(p, {"f": ("a",)})):
                with pytest.raises(FormatError):
                    parse(payload)
            with pytest.raises(FormatError):  # the same text as a JSON function name
                parse_reply(reply(json.dumps([{"name": payload}])))
    assert not sentinel.exists()


def test_format_pythonic_call() -> None:
    call = ToolCall("f", {"a": [1, -2.5, {"k": None}], "b": "it's", "c": True})
    assert format_pythonic_call(call) == "f(a=[1, -2.5, {'k': None}], b=\"it's\", c=True)"
    assert format_pythonic_call(ToolCall("pwd")) == "pwd()"
    for bad in (
        ToolCall("os.system", {}),
        ToolCall("f", {"a b": 1}),
        ToolCall("f", {"a": float("nan")}),
        ToolCall("f", {"a": {1: 2}}),
        ToolCall("f", {"a": object()}),
        ToolCall("f", {"a": {"x"}}),
    ):
        with pytest.raises(ValueError):
            format_pythonic_call(bad)


# --- properties ----------------------------------------------------------------------------------

_FRAGMENTS = st.sampled_from(
    ["<think>", "</think>", "<tool_call>", "</tool_call>", "<answer>", "</answer>", "[", "]", "{", "}",
     '"name"', '"arguments"', ":", ",", '"cd"', '"folder"', "1", "-", "null", " ", "\n", "x", "\x00", "é",
     "\ud800", "<tool_calls>", '"', "\\"]
)
_TAGGY_TEXT = st.lists(_FRAGMENTS, max_size=40).map("".join)


@FAST
@given(st.one_of(st.text(max_size=300), _TAGGY_TEXT))
def test_any_text_is_parsed_or_rejected_cleanly(text: str) -> None:
    for require_think in (True, False):
        try:
            parsed = parse_reply(text, require_think=require_think)
        except FormatError:
            continue
        assert parsed.kind in ("tool_call", "answer")
        assert (parsed.kind == "tool_call") == bool(parsed.calls)


@FAST
@given(st.binary(max_size=300))
def test_any_bytes_are_parsed_or_rejected_cleanly(data: bytes) -> None:
    try:
        parsed = parse_reply(data)
    except FormatError:
        return
    assert parsed.kind in ("tool_call", "answer")


_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)


@FAST
@given(
    st.one_of(_JSONISH, st.lists(st.fixed_dictionaries({"name": _JSONISH}, optional={"arguments": _JSONISH})))
)
def test_any_json_is_parsed_or_rejected_cleanly(value: Any) -> None:
    try:
        calls = parse_json_calls(json.dumps(value))
    except FormatError:
        return
    assert calls and all(isinstance(call.arguments, dict) for call in calls)


_NAMES = st.from_regex(r"[a-z_][A-Za-z0-9_]{0,10}", fullmatch=True).filter(
    lambda name: name not in {"None", "True", "False"} and not __import__("keyword").iskeyword(name)
)
_LITERALS = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10).filter(
        lambda s: "\x00" not in s and not any(0xD800 <= ord(c) <= 0xDFFF for c in s)
    ),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5).filter(
        lambda s: "\x00" not in s and not any(0xD800 <= ord(c) <= 0xDFFF for c in s)), children, max_size=3),
    max_leaves=12,
)
_CALLS = st.builds(ToolCall, name=_NAMES, arguments=st.dictionaries(_NAMES, _LITERALS, max_size=4))


@FAST
@given(st.lists(_CALLS, min_size=1, max_size=4))
def test_round_trips(calls: list[ToolCall]) -> None:
    expected = tuple(calls)
    for call in calls:
        assert same_calls(parse_pythonic_calls(format_pythonic_call(call)), (call,))
    listed = "[" + ", ".join(format_pythonic_call(call) for call in calls) + "]"
    assert same_calls(parse_pythonic_calls(listed), expected)
    body = json.dumps([{"name": call.name, "arguments": call.arguments} for call in calls])
    assert same_calls(parse_reply(reply(body)).calls, expected)


_PY_FRAGMENTS = st.sampled_from(
    ["f", "cd", "(", ")", "[", "]", "{", "}", ",", "=", "a", "'x'", '"y"', "1", "-", "2.5", "True", "None",
     ".", "*", "**", "lambda", ":", " ", "for", "in", "__import__", "os", "system", "+", "\n", "f'", "#"]
)


@FAST
@given(st.one_of(st.text(max_size=200), st.lists(_PY_FRAGMENTS, max_size=30).map("".join)))
def test_any_pythonic_text_is_parsed_or_rejected_cleanly(source: str) -> None:
    try:
        calls = parse_pythonic_calls(source, {"f": ("a", "b"), "cd": ("folder",)})
    except FormatError:
        return
    for call in calls:  # whatever was accepted is plain literal data that formats back to the same calls
        assert same_calls(parse_pythonic_calls(format_pythonic_call(call)), (call,))
