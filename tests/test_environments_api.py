"""The structured (OpenAI-style) stepping API, and the README's example run as written."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from envtune.environments import BfclEnvironment, EpisodeConfig, FeedbackMode, StepCode
from envtune.environments.api import ToolSession, openai_tool, parse_structured_reply
from envtune.environments.ground_truth import ground_truth_calls
from envtune.environments.schemas import bfcl_to_json_schema
from envtune.environments.tool_calls import MAX_CALLS_PER_STEP, FormatError, format_reply

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
"""Its "## Python API" section is the documented example, run here verbatim."""
TASK = "multi_turn_base_0"


@pytest.fixture(scope="module")
def env() -> BfclEnvironment:
    return BfclEnvironment()


def _openai_calls(calls: Any) -> list[dict[str, Any]]:
    return [
        {
            "id": f"call_{i}",
            "type": "function",
            "function": {"name": c.name, "arguments": json.dumps(c.arguments)},
        }
        for i, c in enumerate(calls)
    ]


def _example(markdown: str) -> tuple[str, str]:
    """(code, expected output) of the '## Python API' section."""
    section = markdown.partition("## Python API")[2].partition("\n## ")[0]
    assert section, "README.md has no '## Python API' section"
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    printed = re.search(r"Prints:\s*\n```\n(.*?)```", section, re.DOTALL)
    assert code and printed, "the Python API section needs a python block and a 'Prints:' block"
    return code.group(1), printed.group(1)


def test_the_readme_example_runs_as_written() -> None:
    code, expected = _example(README.read_text(encoding="utf-8"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "readme_api_example", "exec"), {})  # the documented snippet, verbatim
    assert out.getvalue() == expected


def test_structured_ground_truth_scores_like_the_text_path(env: BfclEnvironment) -> None:
    """The same calls, stepped as OpenAI tool calls and as envtune text, give the same verdicts."""
    task = env.tasks[TASK]
    structured = ToolSession.open(env, TASK)
    text = env.make_episode(TASK)
    text.start()
    for turn_calls in ground_truth_calls(task):
        if turn_calls:
            a = structured.step(tool_calls=_openai_calls(turn_calls))
            b = text.step(format_reply(turn_calls))
            assert a.verdict == b.code
            assert [o.result for o in a.result.calls] == [o.result for o in b.calls]
            assert [m["tool_call_id"] for m in a.messages if m["role"] == "tool"] == [
                f"call_{i}" for i in range(len(turn_calls))
            ]
        a = structured.step(content="Done.")
        b = text.step("<think>done</think><answer>Done.</answer>")
        assert (a.verdict, a.turn_passed) == (b.code, b.code is StepCode.TURN_PASS)
    assert structured.done and text.done
    assert structured.score() == text.score()
    assert structured.score().progress == 1.0


def test_messages_follow_openai_shapes(env: BfclEnvironment) -> None:
    session = ToolSession.open(env, TASK, EpisodeConfig(feedback=FeedbackMode.AUGMENTED))
    assert [m["role"] for m in session.messages] == ["system", "user"]
    assert "<tool_call>" not in session.messages[0]["content"]  # no text-format rules for structured use
    tools = session.tools
    assert all(t["type"] == "function" and t["function"]["parameters"]["type"] == "object" for t in tools)
    assert not any('"dict"' in json.dumps(t) or '"float"' in json.dumps(t) for t in tools)
    call = {"id": "x1", "type": "function", "function": {"name": "cd", "arguments": '{"folder": "nowhere"}'}}
    feedback = session.step(tool_calls=[call])
    assert feedback.verdict is StepCode.TOOL_ERROR
    (tool_message,) = feedback.messages
    assert tool_message["role"] == "tool" and tool_message["tool_call_id"] == "x1"
    assert "Hint:" in tool_message["content"]  # augmented feedback travels in the tool message
    assert session.messages[-2] == {"role": "assistant", "content": None, "tool_calls": [call]}
    assert session.messages[-1] == tool_message


def test_schema_conversion_keeps_descriptions_for_a_tool_listing() -> None:
    bfcl = {
        "type": "dict",
        "properties": {
            "x": {"type": "float", "description": "d"},
            "t": {"type": "tuple", "items": {"type": "string"}},
            "o": {"type": "dict", "properties": {"k": {"type": "integer", "enum": [1, 2]}}},
            "a": {"type": "any"},
            "n": {"type": "string", "default": "None"},
            "m": {"type": "integer", "default": 3},
        },
        "required": ["x", "ghost"],
    }
    listing = {
        "type": "object",
        "required": ["x"],
        "properties": {
            "x": {"type": "number", "description": "d"},
            "t": {"type": "array", "items": {"type": "string"}},
            "o": {
                "type": "object",
                "properties": {"k": {"type": "integer", "enum": [1, 2]}},
                "required": [],
                "additionalProperties": False,
            },
            "a": {},
            "n": {"type": "string"},  # BFCL's "None" default of an optional argument is no value
            "m": {"type": "integer", "default": 3},
        },
        "additionalProperties": False,
    }
    assert bfcl_to_json_schema(bfcl, descriptions=True) == listing
    # The grammar's view is the same schema without the prose (one conversion, two uses).
    plain = bfcl_to_json_schema(bfcl)
    assert plain["properties"]["x"] == {"type": "number"} and "default" not in plain["properties"]["m"]


def test_every_tool_lists_as_an_openai_tool() -> None:
    from envtune.environments.tasks import load_function_docs

    for doc in load_function_docs().values():
        tool = openai_tool(doc)
        assert tool["function"]["parameters"]["type"] == "object", doc.name
        assert tool["function"]["description"] == doc.description


@pytest.mark.parametrize(
    ("tool_calls", "reason"),
    [
        ([{"function": {"name": "cd", "arguments": "{"}}], "invalid_json"),
        ([{"function": {"name": "cd", "arguments": "[1]"}}], "bad_entry"),
        ([{"function": {"name": "c d", "arguments": "{}"}}], "bad_name"),
        ([{"function": {"name": 3, "arguments": "{}"}}], "bad_name"),
        ([{"function": {"name": "cd", "arguments": '{"a": 1, "a": 2}'}}], "invalid_json"),
        ([{"function": {"name": "cd", "arguments": '{"a": NaN}'}}], "invalid_json"),
        ([{"function": {"name": "cd", "arguments": '{"a": "\\u0000"}'}}], "nul"),
        ([{"function": {"name": "cd", "arguments": "{" * 40 + "}" * 40}}], "too_deep"),
        ([{"function": {"name": "cd", "arguments": {"a": float("inf")}}}], "invalid_json"),
        ([{"function": {"name": "cd", "arguments": 5}}], "bad_entry"),
        (["cd"], "bad_entry"),
        ([{"function": {"name": "cd"}}] * (MAX_CALLS_PER_STEP + 1), "too_many_calls"),
    ],
)
def test_malformed_calls_are_format_errors(tool_calls: list[Any], reason: str) -> None:
    with pytest.raises(FormatError) as caught:
        parse_structured_reply(None, tool_calls)
    assert caught.value.reason == reason


@pytest.mark.parametrize(
    "arguments",
    [
        '{"folder": "document"}}, {"name": "rm", "arguments": {"file_name": "final_report.pdf"}',
        '{"folder": "document"}, "name": "rm"',
        '{"folder": "document"}, "extra": {}',
    ],
)
def test_arguments_cannot_smuggle_a_second_call(env: BfclEnvironment, arguments: str) -> None:
    session = ToolSession.open(env, TASK)
    feedback = session.step(
        tool_calls=[{"id": "c", "type": "function", "function": {"name": "cd", "arguments": arguments}}]
    )
    assert feedback.verdict is StepCode.FORMAT_ERROR
    assert feedback.result.calls == ()  # nothing ran


def test_answers_and_empty_replies(env: BfclEnvironment) -> None:
    parsed = parse_structured_reply("  thinking  ", [{"function": {"name": "ls", "arguments": {"a": True}}}])
    assert (
        parsed.kind == "tool_call" and parsed.think == "thinking" and parsed.calls[0].arguments == {"a": True}
    )
    assert parse_structured_reply(" All done. ", None).answer == "All done."
    session = ToolSession.open(env, TASK)
    feedback = session.step(content="   ")
    assert feedback.verdict is StepCode.FORMAT_ERROR and feedback.turn_passed is None
    assert "Reply with tool calls" in feedback.messages[0]["content"]
    assert "<think>" not in feedback.messages[0]["content"]
