"""ACEBench agent suite on a project-written fixture checkout (same layout and formats as ACEBench's)."""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from envtune.environments.acebench import AceBenchDataError, AceBenchEnvironment, AceEpisodeConfig, load_tasks
from envtune.environments.acebench.conformance import Plan, agreements, milestone_steps, plans_for, play
from envtune.environments.acebench.judge import end_state, process_accuracy
from envtune.environments.tau2.user import ScriptedUser, UserReply
from envtune.environments.types import StepCode, ToolCall

FIXTURE = Path(__file__).parent / "fixtures" / "acebench"


@pytest.fixture(scope="module")
def env() -> Iterator[AceBenchEnvironment]:
    environment = AceBenchEnvironment(FIXTURE)
    yield environment
    environment.close()


def _calls(*calls: ToolCall) -> str:
    body = json.dumps([{"name": c.name, "arguments": c.arguments} for c in calls])
    return f"<think>x</think><tool_call>{body}</tool_call>"


DONE = "<think>x</think><answer>Done.</answer>"


def test_the_layout_is_read_from_the_checkout_without_importing_it() -> None:
    tasks = load_tasks(FIXTURE)
    assert set(tasks) == {"agent_multi_step_0", "agent_multi_step_1", "agent_multi_turn_0"}
    assert tasks["agent_multi_step_1"].milestones == (
        ("[list_notes()]", "[delete_note(note_id=1)]"),
        ("[delete_note(note_id=1)]",),
    )
    assert not any("model_inference" in name for name in sys.modules)


def test_a_folder_that_is_not_a_checkout_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AceBenchDataError, match="ACEBench checkout"):
        AceBenchEnvironment(tmp_path)
    shutil.copytree(FIXTURE, tmp_path / "copy")
    (
        tmp_path / "copy" / "data_all" / "data_en" / "possible_answer" / "data_agent_multi_turn.json"
    ).write_text("")
    with pytest.raises(AceBenchDataError, match="no possible answer"):
        load_tasks(tmp_path / "copy")


def test_milestone_replay_reaches_the_ground_truth_and_perturbations_do_not(env: AceBenchEnvironment) -> None:
    rng = random.Random(0)
    results = [(plan, play(env, plan)[0]) for task in env.task_map.values() for plan in plans_for(task, rng)]
    truth = {plan.task_id: passed for plan, passed in results if plan.kind == "ground_truth"}
    assert truth == {"agent_multi_step_0": True, "agent_multi_step_1": True, "agent_multi_turn_0": True}
    failing = {plan.kind for plan, passed in results if not passed}
    assert {"drop_step", "stop_halfway", "wrong_argument"} <= failing


def test_process_accuracy_counts_milestones_in_order(env: AceBenchEnvironment) -> None:
    task = env.task_map["agent_multi_step_0"]
    steps = milestone_steps(task)
    assert steps is not None
    passed, _, process = play(env, Plan(task.id, "half", steps[:1]))
    assert not passed and process == 0.5
    assert (
        process_accuracy(False, ["[delete_note(note_id=1)]"], env.task_map["agent_multi_step_1"].milestones)
        == 1.0
    )
    assert (
        process_accuracy(False, ["[x()]", "[list_notes()]"], env.task_map["agent_multi_step_1"].milestones)
        == 0.5
    )


def test_a_method_runs_on_every_instance_that_has_it(env: AceBenchEnvironment) -> None:
    episode = env.make_episode("agent_multi_step_0")
    episode.start()
    episode.step(_calls(ToolCall("turn_on_wifi", {})))  # BaseApi's and NoteApi's Wi-Fi both turn on
    result = episode.step(_calls(ToolCall("add_note", {"title": "call mom", "text": "Sunday 5pm"})))
    assert '"status": true' in result.calls[0].result
    result = episode.step(DONE)
    assert result.done and result.code == StepCode.TURN_PASS
    verdict = episode.verdict()
    assert verdict is not None and verdict.passed and verdict.detail["process_accuracy"] == 1.0


def test_an_exception_ends_the_step_and_a_run_that_only_raised_has_no_end_state(
    env: AceBenchEnvironment,
) -> None:
    episode = env.make_episode("agent_multi_step_1")
    episode.start()
    result = episode.step(
        _calls(ToolCall("delete_note", {"note_id": 9}), ToolCall("delete_note", {"note_id": 1}))
    )
    assert result.code == StepCode.TOOL_ERROR
    assert [c.executed for c in result.calls] == [True, False]
    episode.step(DONE)
    verdict = episode.verdict()
    assert (
        verdict is not None and not verdict.passed and verdict.detail["errors"] == ["wrong number of class"]
    )


def test_multi_turn_needs_a_user_and_ends_on_finish_conversation(env: AceBenchEnvironment) -> None:
    with pytest.raises(ValueError, match="user simulator"):
        env.make_episode("agent_multi_turn_0")
    user = ScriptedUser(
        [UserReply(text="Please add a note 'gym': 7am."), UserReply(text="Great. finish conversation")]
    )
    episode = env.make_episode("agent_multi_turn_0", user=user)
    opening = episode.start()
    assert opening[-1].content == "Please add a note 'gym': 7am."
    assert "finish conversation" in user_prompt(user)
    episode.step(_calls(ToolCall("turn_on_wifi", {}), ToolCall("add_note", {"title": "gym", "text": "7am"})))
    result = episode.step("<think>x</think><answer>Your note is saved.</answer>")
    assert result.done and episode.verdict().passed  # type: ignore[union-attr]


def user_prompt(user: ScriptedUser) -> str:
    return str(user.seen[0][0]["content"])


def test_undocumented_private_and_unknown_methods_never_run(env: AceBenchEnvironment) -> None:
    episode = env.make_episode("agent_multi_step_1")
    episode.start()
    for name in ("reset_everything", "_load_scenario", "__init__", "__class__", "eval", "notes"):
        result = episode.step(_calls(ToolCall(name, {"scenario": {"notes": {}}})))
        assert result.code == StepCode.TOOL_ERROR and not result.calls[0].executed
    assert episode.step(_calls(ToolCall("os.system", {"command": "true"}))).code == StepCode.FORMAT_ERROR
    episode.step(_calls(ToolCall("list_notes", {})))
    episode.step(DONE)
    state = episode.verdict().detail["end_state"]  # type: ignore[union-attr]
    assert state[1]["NoteApi"]["notes"] == {"1": {"title": "groceries", "text": "milk, eggs"}}


def test_a_hung_tool_is_stopped_and_the_session_survives(env: AceBenchEnvironment) -> None:
    episode = env.make_episode("agent_multi_step_0", AceEpisodeConfig(tool_timeout_s=2))
    episode.start()
    episode.step(_calls(ToolCall("turn_on_wifi", {})))
    episode.step(_calls(ToolCall("add_note", {"title": "call mom", "text": "Sunday 5pm"})))
    restarts = env.worker.restarts
    result = episode.step(_calls(ToolCall("count_to", {"n": 10**13})))
    assert result.code == StepCode.TOOL_ERROR and "did not complete" in result.calls[0].result
    assert env.worker.restarts == restarts + 1
    episode.step(DONE)
    assert episode.verdict().passed  # type: ignore[union-attr]  # the notes were replayed on the new worker


def test_end_state_rules_match_acebench_semantics() -> None:
    truth = [{"A": {"d": {"x": 1}, "v": 2}}, {"B": {"w": 1}}]
    assert end_state([{"A": {"d": {"x": 1, "extra": 5}, "v": 2}}, {"B": {"w": 1}}], truth).passed
    assert not end_state([{"A": {"d": {"x": 2}, "v": 2}}, {"B": {"w": 1}}], truth).passed
    assert not end_state([{"A": {"d": {"x": 1}, "v": 2, "new": 1}}, {"B": {"w": 1}}], truth).passed
    assert not end_state([{"A": {"d": {"x": 1}, "v": 2}}], truth).passed


@pytest.mark.skipif(
    "ENVTUNE_ACEBENCH_CHECKOUT" not in os.environ, reason="set ENVTUNE_ACEBENCH_CHECKOUT to a checkout"
)
def test_agreement_with_a_real_acebench_checkout() -> None:
    real = AceBenchEnvironment(Path(os.environ["ENVTUNE_ACEBENCH_CHECKOUT"]))
    try:
        items = [a for a in agreements(real) if not isinstance(a, str)]
    finally:
        real.close()
    assert items and all(a.agree for a in items)
