"""Hostile or broken model replies through a whole episode: clear errors, nothing run, no crash."""

from __future__ import annotations

import builtins
import decimal
import json
import os
from pathlib import Path

import mpmath
import pytest
from envtune.environments import BfclEnvironment, EpisodeConfig, StepCode
from envtune.environments.limits import MAX_RESULT_CHARS
from envtune.environments.types import ToolFault
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ENV = BfclEnvironment()
TASK = "multi_turn_base_0"
ENV.make_episode(TASK).start()  # import BFCL's modules now, before any tripwire is set

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def tool_reply(entries: object) -> str:
    return f"<think>x</think><tool_call>{json.dumps(entries)}</tool_call>"


def fresh_episode():
    episode = ENV.make_episode(TASK)
    episode.start()
    return episode


@pytest.fixture
def tripwires(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Fail loudly if anything tries to open files, spawn processes or import during a step."""
    sentinel = tmp_path / "pwned"

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"executed something it must not: {args!r}")

    monkeypatch.setattr(os, "system", forbidden)
    monkeypatch.setattr(os, "popen", forbidden)
    monkeypatch.setattr(builtins, "open", forbidden)
    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    return sentinel


HOSTILE_REPLIES = [
    "<think>x</think><tool_call>[__import__('os').system('touch /tmp/pwned')]</tool_call>",
    "<think>x</think><tool_call>[os.system('touch /tmp/pwned')]</tool_call>",
    "<think>x</think><tool_call>[(lambda: 1)()]</tool_call>",
    "<think>x</think><tool_call>[cd(folder=[x for x in ()])]</tool_call>",
    tool_reply([{"name": "inspect.os.getcwd", "arguments": {}}]),
    tool_reply([{"name": "__init__", "arguments": {}}]),
    tool_reply([{"name": "_load_scenario", "arguments": {"scenario": {}}}]),
    tool_reply([{"name": "__class__", "arguments": {}}]),
    tool_reply([{"name": "ls", "arguments": {"a": {"open": {"file": "/etc/hostname"}}}}]),
    tool_reply([{"name": "cd", "arguments": {"folder": {"open": {"file": "/etc/hostname"}}}}]),
    "<think>x</think><tool_call>" + "[" * 5000 + "]" * 5000 + "</tool_call>",
    "<think>x</think><tool_call>" + json.dumps([{"name": "echo", "arguments": {"content": "a" * 1_000_000}}]),
    "<think>x</think><tool_call>{not json</tool_call>",
    "<think>x</think><tool_call>[]</tool_call>",
    "<think>x</think><tool_call>" + json.dumps([{"name": "pwd"}] * 500) + "</tool_call>",
    "plain text, no tags",
    "<think>a</think><think>b</think><answer>c</answer>",
    "<think>x</think><answer>a</answer><tool_call>[]</tool_call>",
    "\x00<think>x</think><answer>y</answer>",
]


@pytest.mark.parametrize("reply", HOSTILE_REPLIES)
def test_hostile_replies_get_an_error_observation_and_run_nothing(reply: str, tripwires: Path) -> None:
    episode = fresh_episode()
    result = episode.step(reply)
    assert not tripwires.exists()
    assert result.code in (StepCode.FORMAT_ERROR, StepCode.TOOL_ERROR)
    assert not any(outcome.executed for outcome in result.calls)
    text = " ".join(m.content for m in result.observation)
    assert "rror" in text  # "Error ..." or "Format error"
    assert not episode.done


def test_non_utf8_bytes_are_a_format_error() -> None:
    result = fresh_episode().step(b"<think>\xff\xfe</think><answer>x</answer>")
    assert result.code is StepCode.FORMAT_ERROR
    assert "UTF-8" in (result.error or "")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("latin-1")))
def test_arbitrary_text_never_crashes_the_episode(text: str) -> None:
    episode = fresh_episode()
    result = episode.step(text)
    assert result.observation
    assert result.code in (
        StepCode.FORMAT_ERROR,
        StepCode.TURN_FAIL,
        StepCode.TURN_PASS,
        StepCode.TOOL_ERROR,
        StepCode.TOOL_OK,
    )


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "name": st.sampled_from(
                    ["cd", "ls", "mkdir", "rm", "mv", "echo", "post_tweet", "nope", "__init__"]
                )
                | st.text(max_size=10),
                "arguments": st.dictionaries(st.text(max_size=10), json_values, max_size=4),
            }
        ),
        min_size=1,
        max_size=4,
    )
)
def test_arbitrary_tool_calls_are_answered_never_raised(entries: list[dict[str, object]]) -> None:
    episode = fresh_episode()
    result = episode.step(tool_reply(entries))
    assert result.observation
    for outcome in result.calls:
        assert isinstance(outcome.result, str)
        if not outcome.executed:
            assert outcome.result.startswith("Error during execution:")
    # the episode keeps going after whatever happened
    follow = episode.step("<think>done</think><answer>ok</answer>")
    assert follow.turn_ended


# --- bounded work: whatever the numbers and however the file system is shaped ----------------------

MATH_TASK = next(t.id for t in ENV.tasks.values() if "MathAPI" in t.involved_classes and t.ground_truth[0])
huge_ints = st.integers(min_value=-(10**4299), max_value=10**4299) | st.sampled_from(
    [10**9, 10**7, 5000, -(10**9), 10**4299, 1001, 1000]
)
numbers = huge_ints | st.floats(allow_nan=False, allow_infinity=False)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("power"), st.fixed_dictionaries({"base": numbers, "exponent": numbers})),
            st.tuples(
                st.just("square_root"), st.fixed_dictionaries({"number": numbers, "precision": huge_ints})
            ),
            st.tuples(
                st.just("logarithm"),
                st.fixed_dictionaries({"value": numbers, "base": numbers, "precision": huge_ints}),
            ),
            st.tuples(
                st.just("round_number"),
                st.fixed_dictionaries({"number": numbers, "decimal_places": huge_ints}),
            ),
            st.tuples(st.just("multiply"), st.fixed_dictionaries({"a": numbers, "b": numbers})),
            st.tuples(st.just("mean"), st.fixed_dictionaries({"numbers": st.lists(numbers, max_size=5)})),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_math_with_any_numbers_is_answered_and_leaves_no_precision_behind(calls) -> None:
    before = (decimal.getcontext().prec, mpmath.mp.prec)
    episode = ENV.make_episode(MATH_TASK, EpisodeConfig(max_steps_per_turn=20))
    episode.start()
    body = json.dumps([{"name": name, "arguments": arguments} for name, arguments in calls])
    result = episode.step(f"<think>m</think><tool_call>{body}</tool_call>")
    assert len(result.calls) == len(calls)
    for outcome in result.calls:
        assert len(outcome.result) <= MAX_RESULT_CHARS + 64
        if not outcome.ok:
            assert outcome.result.startswith("Error during execution: ") or '"error"' in outcome.result
    assert (decimal.getcontext().prec, mpmath.mp.prec) == before
    assert not episode.done


FS_TASK = next(
    t.id
    for t in ENV.tasks.values()
    if t.category == "base" and "GorillaFileSystem" in t.involved_classes and t.ground_truth[0]
)
fs_names = st.sampled_from(["a", "b", "c", "..", ".", "a/b", "/"])
fs_calls = st.one_of(
    st.tuples(st.just("mkdir"), st.fixed_dictionaries({"dir_name": fs_names})),
    st.tuples(st.just("cd"), st.fixed_dictionaries({"folder": fs_names})),
    st.tuples(st.just("cp"), st.fixed_dictionaries({"source": fs_names, "destination": fs_names})),
    st.tuples(st.just("mv"), st.fixed_dictionaries({"source": fs_names, "destination": fs_names})),
    st.tuples(
        st.just("echo"), st.fixed_dictionaries({"content": st.text(max_size=50), "file_name": fs_names})
    ),
    st.tuples(st.just("find"), st.fixed_dictionaries({"path": fs_names, "name": fs_names})),
    st.tuples(st.just("du"), st.fixed_dictionaries({"human_readable": st.booleans()})),
    st.tuples(st.just("rm"), st.fixed_dictionaries({"file_name": fs_names})),
    st.tuples(st.just("pwd"), st.just({})),
    st.tuples(st.just("ls"), st.fixed_dictionaries({"a": st.booleans()})),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(fs_calls, min_size=1, max_size=30), min_size=1, max_size=4))
def test_any_file_system_graph_is_walked_within_bounds(steps) -> None:
    """cp/mv can make folders shared or cyclic; find/du are then refused, never recursed forever."""
    episode = ENV.make_episode(FS_TASK, EpisodeConfig(max_steps_per_turn=20, step_time_limit_s=None))
    episode.start()
    for calls in steps:
        body = json.dumps([{"name": name, "arguments": arguments} for name, arguments in calls])
        result = episode.step(f"<think>f</think><tool_call>{body}</tool_call>")
        for outcome in result.calls:
            assert outcome.fault in (None, ToolFault.LIMIT, ToolFault.RAISED, ToolFault.TRUNCATED)
            assert len(outcome.result) <= MAX_RESULT_CHARS + 64
    assert episode.step("<think>done</think><answer>ok</answer>").turn_ended
