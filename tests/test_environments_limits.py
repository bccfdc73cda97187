"""Environment faults: bounded arguments, a per-step time limit, tools that raise or return junk.

Each case is the reviewers' repro (or a tool made to misbehave) through a real episode: the answer is
an error observation, the episode goes on, and nothing of the process (precision) is left changed.
"""

from __future__ import annotations

import decimal
import json
import threading
import time

import mpmath
import pytest
from envtune.environments import BfclEnvironment, EpisodeConfig, StepCode, load_tasks
from envtune.environments.deadline import StepTimeLimitExceeded, Watchdog
from envtune.environments.ground_truth import ground_truth_calls, positional_names_for
from envtune.environments.instances import (
    Dispatcher,
    bfcl_class,
    build_instances,
    public_methods,
    result_to_string,
)
from envtune.environments.limits import (
    MAX_PRECISION,
    MAX_RESULT_CHARS,
    MAX_STEP_RESULT_CHARS,
    check_call,
)
from envtune.environments.tool_calls import ANSWER_REPLY, parse_pythonic_calls
from envtune.environments.types import ToolFault

ENV = BfclEnvironment()
TASKS = load_tasks()


def first_task_calling(class_name: str) -> str:
    """A task whose first turn expects calls and that involves ``class_name``."""
    return next(
        t.id
        for t in TASKS.values()
        if t.category == "base" and class_name in t.involved_classes and t.ground_truth[0]
    )


MATH_TASK = first_task_calling("MathAPI")
FS_TASK = first_task_calling("GorillaFileSystem")


def episode_of(task_id: str, **config: object):
    episode = ENV.make_episode(task_id, EpisodeConfig(max_steps_per_turn=20, **config))  # type: ignore[arg-type]
    episode.start()
    return episode


def step_calls(episode, *calls: tuple[str, dict[str, object]]):
    body = json.dumps([{"name": name, "arguments": arguments} for name, arguments in calls])
    return episode.step(f"<think>t</think><tool_call>{body}</tool_call>")


def assert_goes_on(episode) -> None:
    """The episode still answers a normal step after the fault."""
    assert not episode.done
    follow = episode.step(ANSWER_REPLY)
    assert follow.turn_ended


def numeric_state() -> tuple[int, int]:
    return decimal.getcontext().prec, mpmath.mp.prec


# --- D4 / D5: the reviewers' calls ---------------------------------------------------------------

UNBOUNDED = [
    ("power", {"base": 10, "exponent": 5000}),
    ("power", {"base": 10, "exponent": 10**9}),
    ("power", {"base": 10, "exponent": 10**7}),
    ("power", {"base": -3, "exponent": 10**4299}),
    ("square_root", {"number": 2, "precision": 10**9}),
    ("square_root", {"number": 2, "precision": 10**6}),
    ("logarithm", {"value": 2, "base": 3, "precision": 10**8}),
    ("logarithm", {"value": 2, "base": 3, "precision": 10**5}),
    ("round_number", {"number": 5, "decimal_places": -(10**9)}),
]


@pytest.mark.parametrize(
    ("name", "arguments"), UNBOUNDED, ids=[f"{n}-{i}" for i, (n, _) in enumerate(UNBOUNDED)]
)
def test_unbounded_math_is_refused_before_it_runs(name: str, arguments: dict[str, object]) -> None:
    before = numeric_state()
    episode = episode_of(MATH_TASK)
    result = step_calls(episode, (name, arguments))
    (outcome,) = result.calls
    assert result.code is StepCode.TOOL_ERROR
    assert not outcome.executed and not outcome.ok
    assert outcome.fault is ToolFault.LIMIT
    assert outcome.result.startswith("Error during execution: ") and "limit" in outcome.result
    assert numeric_state() == before
    assert_goes_on(episode)


def test_a_result_with_no_string_form_is_bfcls_error_not_a_crash() -> None:
    """multiply of two 4,000-digit ints: the product has no str (D4); BFCL's executor says the same."""
    episode = episode_of(MATH_TASK)
    big = int("9" * 4000)
    result = step_calls(episode, ("multiply", {"a": big, "b": big}))
    (outcome,) = result.calls
    assert outcome.executed and not outcome.ok
    assert outcome.fault is ToolFault.UNSERIALISABLE
    assert outcome.result.startswith("Error during execution: Exceeds the limit (4300 digits)")
    assert_goes_on(episode)


LEGITIMATE = [
    ("power", {"base": 2, "exponent": 100}),
    ("power", {"base": 1, "exponent": 10**9}),
    ("power", {"base": -1, "exponent": 10**9 + 1}),
    ("power", {"base": 3, "exponent": 9000}),  # 4,294 digits: printable, so computed
    ("power", {"base": 10.0, "exponent": 5000}),  # float overflow: BFCL's own error
    ("power", {"base": 10, "exponent": -(10**9)}),
    ("square_root", {"number": 2, "precision": MAX_PRECISION}),
    ("logarithm", {"value": 2, "base": 3, "precision": MAX_PRECISION}),
    ("round_number", {"number": 2.5, "decimal_places": -(10**9)}),
    ("round_number", {"number": 12345, "decimal_places": -3}),
]


@pytest.mark.parametrize(
    ("name", "arguments"), LEGITIMATE, ids=[f"{n}-{i}" for i, (n, _) in enumerate(LEGITIMATE)]
)
def test_calls_within_bounds_give_exactly_bfcls_result(name: str, arguments: dict[str, object]) -> None:
    """Bounds change nothing for calls BFCL can answer: same string as calling the class directly."""
    before = numeric_state()
    episode = episode_of(MATH_TASK)
    (outcome,) = step_calls(episode, (name, arguments)).calls
    try:
        expected = result_to_string(getattr(bfcl_class("MathAPI")(), name)(**arguments))
    except Exception as exc:
        expected = f"Error during execution: {exc}"
    finally:
        decimal.getcontext().prec, mpmath.mp.prec = before  # BFCL's class leaves them raised (D18)
    assert outcome.executed and outcome.fault in (None, ToolFault.RAISED)
    assert outcome.result == expected


def test_no_ground_truth_call_meets_a_bound() -> None:
    """All 800 tasks: every ground-truth call runs unbounded-free and every turn fits the step budget."""
    for task in TASKS.values():
        instances = build_instances(task)
        dispatcher = Dispatcher(instances, {m: c for c in task.involved_classes for m in public_methods(c)})
        positional = positional_names_for(task)
        for turn in task.ground_truth:
            turn_chars = 0
            for text in turn:
                (call,) = parse_pythonic_calls(text, positional)
                class_name = dispatcher.class_of(call.name)
                assert check_call(class_name, call.name, instances[class_name], call.arguments) is None
                result, _, _, fault = dispatcher.dispatch(
                    call.name, call.arguments, deadline=time.monotonic() + 60
                )
                assert fault in (None, ToolFault.RAISED), (task.id, text, result[:100])
                turn_chars += len(result)
            assert turn_chars <= MAX_STEP_RESULT_CHARS, task.id


# --- D18: process-wide precision -----------------------------------------------------------------


def test_math_calls_leave_decimal_and_mpmath_precision_unchanged() -> None:
    before = numeric_state()
    episode = episode_of(MATH_TASK)
    result = step_calls(
        episode,
        ("square_root", {"number": 2, "precision": 500}),
        ("logarithm", {"value": 2, "base": 3, "precision": 700}),
        ("square_root", {"number": 2, "precision": 0}),  # raises inside the class
    )
    assert [o.executed for o in result.calls] == [True, True, True]
    assert result.calls[2].fault is ToolFault.RAISED
    assert len(result.calls[0].result) > 500  # the precision did apply inside the call
    assert numeric_state() == before
    # and the context is the same object the thread had (not a stray copy left installed)
    assert decimal.getcontext().prec == before[0]


# --- environment faults: a tool that raises, hangs, or returns junk ------------------------------


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no string form")


class BadMessage(Exception):
    def __str__(self) -> str:
        raise ValueError("the message itself fails")


def _raise(exc: BaseException):
    def method(self, a=0, b=0):
        raise exc

    return method


def _return(value: object):
    def method(self, a=0, b=0):
        return value

    return method


FAULTY = [
    ("recursion", _raise(RecursionError("maximum recursion depth exceeded")), ToolFault.RAISED, "recursion"),
    ("memory", _raise(MemoryError()), ToolFault.RAISED, "Error during execution: "),
    ("type", _raise(TypeError("add() got an unexpected keyword")), ToolFault.RAISED, "unexpected keyword"),
    ("bad-message", _raise(BadMessage()), ToolFault.RAISED, "BadMessage"),
    ("unprintable", _return(Unprintable()), ToolFault.UNSERIALISABLE, "no string form"),
    ("huge-int-dict", _return({"result": 10**5000}), ToolFault.UNSERIALISABLE, "4300 digits"),
    ("surrogate", _return("\ud800"), ToolFault.UNSERIALISABLE, "not valid unicode"),
    ("not-a-str", _return(type("S", (), {"__str__": lambda self: 5})()), ToolFault.UNSERIALISABLE, "__str__"),
]


@pytest.mark.parametrize(("label", "method", "fault", "text"), FAULTY, ids=[f[0] for f in FAULTY])
def test_a_faulty_tool_becomes_an_error_observation(
    monkeypatch: pytest.MonkeyPatch, label: str, method, fault: ToolFault, text: str
) -> None:
    monkeypatch.setattr(bfcl_class("MathAPI"), "add", method)
    episode = episode_of(MATH_TASK)
    result = step_calls(episode, ("add", {"a": 1, "b": 2}), ("subtract", {"a": 5, "b": 3}))
    failed, fine = result.calls
    assert result.code is StepCode.TOOL_ERROR
    assert failed.executed and not failed.ok and failed.fault is fault
    assert failed.result.startswith("Error during execution: ") and text in failed.result
    assert fine.ok and fine.result == '{"result": 2}'  # the rest of the step still runs
    assert "Error during execution" in result.observation[0].content
    assert_goes_on(episode)


def test_a_huge_result_is_cut_for_the_model_and_the_step_stays_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bfcl_class("MathAPI"), "add", _return("x" * 1_000_000))
    episode = episode_of(MATH_TASK)
    result = step_calls(episode, *[("add", {"a": 1, "b": 2})] * 8)
    first = result.calls[0]
    assert first.ok and first.fault is ToolFault.TRUNCATED
    assert (
        first.result.startswith("x" * MAX_RESULT_CHARS) and "[cut: 1000000 characters in all]" in first.result
    )
    shown = sum(len(outcome.result) for outcome in result.calls)
    assert shown <= MAX_STEP_RESULT_CHARS + 8 * 64  # the budget plus the cut notes
    assert all(outcome.fault is ToolFault.TRUNCATED for outcome in result.calls)
    assert_goes_on(episode)


def test_keyboard_interrupt_in_a_tool_is_not_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bfcl_class("MathAPI"), "add", _raise(KeyboardInterrupt()))
    episode = episode_of(MATH_TASK)
    with pytest.raises(KeyboardInterrupt):
        step_calls(episode, ("add", {"a": 1, "b": 2}))


def _spin(self, a=0, b=0):
    mpmath.mp.dps = 5_000  # a tool that changed process state, then hangs in Python code
    decimal.getcontext().prec = 5_000
    while True:
        pass


def test_a_hanging_tool_is_stopped_at_the_step_time_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bfcl_class("MathAPI"), "add", _spin)
    before = numeric_state()
    limit = 0.2
    episode = episode_of(MATH_TASK, step_time_limit_s=limit)
    fired = ENV.watchdog.statistics().fired
    result = step_calls(episode, ("add", {"a": 1, "b": 2}), ("subtract", {"a": 5, "b": 3}))
    hung, skipped = result.calls
    assert hung.executed and not hung.ok and hung.fault is ToolFault.TIME_LIMIT
    assert "time limit" in hung.result
    assert not skipped.executed and skipped.fault is ToolFault.TIME_LIMIT  # the step's time was used up
    assert result.tool_seconds >= limit  # stopped no earlier than its deadline
    assert ENV.watchdog.statistics().fired == fired + 1
    assert numeric_state() == before  # restored although the call was interrupted
    # the next step has its own budget
    again = step_calls(episode, ("subtract", {"a": 5, "b": 3}))
    assert again.calls[0].ok
    assert_goes_on(episode)


def test_step_time_limit_is_validated() -> None:
    for bad in (0, -1.0, float("nan"), float("inf"), "2"):
        with pytest.raises(ValueError, match="step_time_limit_s"):
            EpisodeConfig(step_time_limit_s=bad)  # type: ignore[arg-type]
    assert EpisodeConfig(step_time_limit_s=None).step_time_limit_s is None


# --- file-system graphs that never end -----------------------------------------------------------


def test_a_folder_copied_into_itself_cannot_be_walked_forever() -> None:
    episode = episode_of(FS_TASK, step_time_limit_s=None)  # the bound alone must hold
    result = step_calls(
        episode,
        ("mkdir", {"dir_name": "loop"}),
        ("cp", {"source": "loop", "destination": "loop"}),
        ("find", {}),
        ("du", {"human_readable": True}),
        ("cd", {"folder": "loop"}),
        ("cd", {"folder": "loop"}),
        ("cd", {"folder": "loop"}),
        ("pwd", {}),
        ("find", {"path": ".", "name": "loop"}),
    )
    by_name = {o.call.name: o for o in result.calls}
    assert by_name["find"].fault is ToolFault.LIMIT and "contains itself" in by_name["find"].result
    assert by_name["du"].fault is ToolFault.LIMIT
    assert by_name["pwd"].ok
    finish = episode.step(ANSWER_REPLY)  # judging the turn compares the cyclic tree with ground truth
    assert finish.turn_ended


def test_find_repeating_a_huge_path_in_every_match_is_refused() -> None:
    episode = episode_of(FS_TASK)
    (outcome,) = step_calls(episode, ("find", {"path": "p" * 100_000})).calls
    assert outcome.fault is ToolFault.LIMIT and "path" in outcome.result


def test_exponentially_shared_folders_are_refused_not_walked() -> None:
    episode = episode_of(FS_TASK, step_time_limit_s=None)
    calls = [("mkdir", {"dir_name": "a"}), ("cd", {"folder": "a"}), ("mkdir", {"dir_name": "leaf"})]
    calls += [("cd", {"folder": ".."})]
    for i in range(18):  # each round: a holds two references to the previous level
        calls += [
            ("cp", {"source": "a", "destination": f"b{i}"}),
            ("mv", {"source": f"b{i}", "destination": "a"}),
        ]
    result = step_calls(episode, *calls, ("du", {}), ("find", {}))
    assert all(o.ok for o in result.calls[:-2])
    du, find = result.calls[-2:]
    assert du.fault is ToolFault.LIMIT and find.fault is ToolFault.LIMIT


# --- the watchdog itself -------------------------------------------------------------------------


def test_watchdog_interrupts_python_code_in_the_calling_thread() -> None:
    watchdog = Watchdog(poll_s=0.01)
    caught = False
    token = None
    try:
        try:
            token = watchdog.arm(time.monotonic() + 0.05)
            while True:
                pass
        finally:
            if token is not None:
                watchdog.disarm(token)
    except StepTimeLimitExceeded:
        caught = True
    assert caught
    assert watchdog.statistics().fired == 1 and watchdog.statistics().armed == 0


def _windows_at_their_deadline(watchdog: Watchdog, rounds: int, counts: dict[str, int]) -> None:
    for i in range(rounds):
        try:
            token = None
            try:
                try:
                    token = watchdog.arm(time.monotonic() + (i % 7) * 0.0002)
                    end = time.monotonic() + 0.0004
                    while time.monotonic() < end:
                        pass
                finally:
                    if token is not None:
                        watchdog.disarm(token)
                counts["completed"] += 1
            except StepTimeLimitExceeded:
                counts["stopped"] += 1
            for _ in range(200):  # outside every window: a late delivery would land here
                pass
        except StepTimeLimitExceeded:
            counts["escaped"] += 1


def test_watchdog_never_delivers_after_the_window_closed() -> None:
    """Windows that end right at their deadline, on two threads at once: each completes or is stopped
    inside its window; nothing arrives after one closed."""
    watchdog = Watchdog(poll_s=0.001)
    per_thread = [{"completed": 0, "stopped": 0, "escaped": 0} for _ in range(2)]
    helper = threading.Thread(target=_windows_at_their_deadline, args=(watchdog, 500, per_thread[1]))
    helper.start()
    _windows_at_their_deadline(watchdog, 500, per_thread[0])
    helper.join()
    for counts in per_thread:
        assert counts["escaped"] == 0
        assert counts["completed"] + counts["stopped"] == 500
    assert sum(c["stopped"] for c in per_thread) > 0
    assert watchdog.statistics().armed == 0


def test_watchdog_thread_ends_when_idle() -> None:
    watchdog = Watchdog(poll_s=0.01, idle_exit_s=0.05)
    watchdog.disarm(watchdog.arm(time.monotonic() + 10))
    deadline = time.monotonic() + 10
    while watchdog.statistics().thread_alive and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not watchdog.statistics().thread_alive
    # and the next window starts a new one
    token = watchdog.arm(time.monotonic() + 10)
    assert watchdog.statistics().thread_alive
    watchdog.disarm(token)


def test_ground_truth_still_passes_with_the_bounds_in_place() -> None:
    """A slice of the conformance replay (the benchmark runs all 800)."""
    for task_id in [t.id for t in TASKS.values()][::40]:
        episode = ENV.make_episode(task_id)
        episode.start()
        for calls in ground_truth_calls(TASKS[task_id]):
            if calls:
                body = json.dumps([{"name": c.name, "arguments": c.arguments} for c in calls])
                step = episode.step(f"<think>t</think><tool_call>{body}</tool_call>")
                assert all(o.fault is None or o.fault is ToolFault.RAISED for o in step.calls)
            episode.step(ANSWER_REPLY)
        assert episode.score().all_passed, task_id
