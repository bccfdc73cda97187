"""The trajectory log: episodes recorded as played, written with sampling, loaded as a dataset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from envtune.agents.trajectory import Reply, Trajectory, Transcript
from envtune.environments import BfclEnvironment, EpisodeConfig
from envtune.environments.ground_truth import ground_truth_calls
from envtune.environments.tool_calls import ANSWER_REPLY, format_reply
from envtune.environments.types import ToolCall
from envtune.runtime.recipe.trajectory_log import (
    FIELDS,
    SCHEMA_VERSION,
    EpisodeRecord,
    SampleMode,
    TrajectoryLog,
    TrajectorySampling,
    read_records,
)

TASKS = ("multi_turn_base_0", "multi_turn_miss_param_3")


@pytest.fixture(scope="module")
def env() -> BfclEnvironment:
    return BfclEnvironment()


def _play(env: BfclEnvironment, task_id: str, group: str) -> EpisodeRecord:
    """A scripted episode: a format error, a bad call, then the ground truth, answering each turn."""
    task = env.tasks[task_id]
    episode = env.make_episode(task_id, EpisodeConfig(max_steps_per_turn=20))
    opening = episode.start()
    played: list[Reply] = []
    replies = ["no tags here", format_reply([ToolCall("no_such_function", {"x": 1})])]
    for turn_calls in ground_truth_calls(task):
        if turn_calls:
            replies.append(format_reply(turn_calls))
        replies.append(ANSWER_REPLY)
    for reply in replies:
        if episode.done:
            break
        played.append(Reply.of(reply, episode.step(reply)))
    score = episode.score()
    n = 40
    trajectory = Trajectory(
        task_id=task_id,
        group_id=group,
        token_ids=tuple(range(n)),
        loss_mask=tuple(i >= 10 and i % 3 == 0 for i in range(n)),
        behavior_logprobs=(0.0,) * n,
        policy_versions=tuple(3 if i % 2 else 4 for i in range(n)),
        reward=score.progress,
        progress=score.progress,
        format_reward=score.format_reward,
        tool_reward=score.tool_reward,
        turn_passed=score.turn_passed,
        step_codes=score.step_codes,
        stage=2,
        start_version=3,
        transcript=Transcript.of(opening, tuple(played)),
    )
    return EpisodeRecord(trajectory, task.category)


def test_records_hold_the_conversation_and_the_calls(env: BfclEnvironment) -> None:
    record = _play(env, TASKS[0], "g0").to_json(5)
    assert list(record) == list(FIELDS)  # every documented field, in the documented order
    assert record["schema_version"] == SCHEMA_VERSION and record["drop_reason"] is None
    assert (record["task_id"], record["category"], record["stage"], record["step"]) == (
        TASKS[0],
        "base",
        2,
        5,
    )
    assert record["policy_versions"] == [3, 4]
    assert (record["prompt_tokens"], record["total_tokens"]) == (12, 40)
    assert record["completion_tokens"] == sum(1 for i in range(40) if i >= 10 and i % 3 == 0)
    messages = record["messages"]
    assert [m["role"] for m in messages[:2]] == ["system", "user"]
    first_reply = messages[2]
    assert first_reply == {
        "role": "assistant",
        "content": "no tags here",
        "tool_calls": None,
        "step_code": -3,
    }
    assistant = [m for m in messages if m["role"] == "assistant"]
    assert [m["step_code"] for m in assistant] == record["step_codes"]
    bad = assistant[1]
    assert bad["tool_calls"][0]["function"] == {"name": "no_such_function", "arguments": '{"x": 1}'}
    calls = record["tool_calls"]
    assert calls[0]["name"] == "no_such_function" and not calls[0]["executed"] and not calls[0]["ok"]
    assert calls[0]["hint"]  # augmented feedback names the available functions
    executed = [c for c in calls if c["executed"]]
    assert executed and all(isinstance(json.loads(c["arguments"]), dict) for c in executed)
    assert record["turn_passed"] == [True] * len(record["turn_passed"])
    # Every structured call on a message is in the flat list, in order.
    flat = [(c["name"], c["arguments"]) for c in calls]
    nested = [
        (t["function"]["name"], t["function"]["arguments"]) for m in assistant for t in m["tool_calls"] or []
    ]
    assert flat == nested


def test_sampling_modes() -> None:
    assert TrajectorySampling().select(1, 5) == [0, 1, 2, 3, 4]
    assert TrajectorySampling(SampleMode.PER_STEP, per_step=2).select(1, 5) == [0, 1]
    assert TrajectorySampling(SampleMode.NONE).select(1, 5) == []
    half = TrajectorySampling(SampleMode.FRACTION, fraction=0.5)
    picks = [half.select(step, 100, seed=3) for step in range(20)]
    assert picks == [half.select(step, 100, seed=3) for step in range(20)]  # resume logs the same
    assert picks != [half.select(step, 100, seed=4) for step in range(20)]  # the run's seed matters
    share = sum(map(len, picks)) / 2000
    assert 0.4 < share < 0.6
    assert picks[0] != picks[1]
    with pytest.raises(ValueError):
        TrajectorySampling(SampleMode.FRACTION, fraction=0.0)
    with pytest.raises(ValueError):
        TrajectorySampling(SampleMode.PER_STEP, per_step=0)


def test_log_loads_with_datasets(
    env: BfclEnvironment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    records = [_play(env, task_id, f"g{i}") for i, task_id in enumerate(TASKS)]
    records[1] = EpisodeRecord(records[1].trajectory, records[1].category, "zero_variance")
    path = tmp_path / "trajectories.jsonl"
    log = TrajectoryLog(path)
    assert log.write_step(5, records) == 2
    assert (
        TrajectoryLog(path, TrajectorySampling(SampleMode.PER_STEP, per_step=1)).write_step(6, records) == 1
    )
    table = datasets.load_dataset(
        "json", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache")
    )
    assert table.num_rows == 3
    assert table["task_id"] == [TASKS[0], TASKS[1], TASKS[0]]
    assert table["category"] == ["base", "miss_param", "base"]
    assert set(table.column_names) == set(FIELDS)
    assert table["drop_reason"] == [None, "zero_variance", None] and table["step"] == [5, 5, 6]
    row = table[1]
    original = records[1].to_json(5)
    assert row["step_codes"] == original["step_codes"] and row["turn_passed"] == original["turn_passed"]
    assert [m["content"] for m in row["messages"]] == [m["content"] for m in original["messages"]]
    assert [c["arguments"] for c in row["tool_calls"]] == [c["arguments"] for c in original["tool_calls"]]
    assert read_records(path)[2]["step"] == 6


def test_without_the_system_message(env: BfclEnvironment, tmp_path: Path) -> None:
    record = _play(env, TASKS[0], "g")
    log = TrajectoryLog(tmp_path / "t.jsonl", TrajectorySampling(include_system=False))
    log.write_step(1, [record])
    (written,) = read_records(tmp_path / "t.jsonl")
    messages: list[dict[str, Any]] = written["messages"]
    assert messages[0]["role"] == "user" and all(m["role"] != "system" for m in messages)
    assert len(messages) == len(record.to_json(1)["messages"]) - 1
