"""Episodes of real BFCL tasks: isolation, visibility, protocol, rewards."""

from __future__ import annotations

import json

import pytest
from envtune.environments import (
    BfclEnvironment,
    EpisodeConfig,
    EpisodeStateError,
    FeedbackMode,
    PromptStyle,
    StepCode,
    ToolCall,
    ToolListing,
    load_split,
    load_tasks,
)
from envtune.environments.ground_truth import ground_truth_calls
from envtune.environments.tool_calls import ANSWER_REPLY, format_reply


def reply(*calls: ToolCall) -> str:
    return format_reply(calls)


@pytest.fixture(scope="module")
def env() -> BfclEnvironment:
    return BfclEnvironment()


def play_ground_truth(env: BfclEnvironment, task_id: str, config: EpisodeConfig | None = None):
    episode = env.make_episode(task_id, config)
    episode.start()
    for calls in ground_truth_calls(env.tasks[task_id]):
        if calls:
            episode.step(reply(*calls))
        episode.step(ANSWER_REPLY)
    return episode


def test_split_is_fixed_and_validation_comes_from_train() -> None:
    split = load_split()
    tasks = load_tasks()
    assert len(split.train) == len(split.test) == 400
    assert not set(split.train) & set(split.test)
    assert set(split.validation) <= set(split.train)
    assert not set(split.validation) & set(split.test)
    for part in (split.train, split.test):
        categories = [tasks[i].category for i in part]
        assert {c: categories.count(c) for c in set(categories)} == {
            "base": 100,
            "miss_func": 100,
            "miss_param": 100,
            "long_context": 100,
        }
    assert set(split.ids("train_minus_validation")) == set(split.train) - set(split.validation)
    with pytest.raises(ValueError, match="unknown split part"):
        split.ids("everything")


def test_ground_truth_replay_passes_every_turn(env: BfclEnvironment) -> None:
    for task_id in (
        "multi_turn_base_0",
        "multi_turn_miss_func_0",
        "multi_turn_miss_param_0",
        "multi_turn_long_context_0",
    ):
        score = play_ground_truth(env, task_id).score()
        assert score.all_passed, (task_id, score.turn_passed)
        assert score.progress == 1.0


def test_two_interleaved_episodes_of_one_task_do_not_share_state(env: BfclEnvironment) -> None:
    task = env.tasks["multi_turn_base_0"]
    gt = ground_truth_calls(task)
    a = env.make_episode(task.id)
    b = env.make_episode(task.id)
    a.start()
    b.start()
    # a follows ground truth; b makes a wrong first move; interleave their steps.
    a.step(reply(*gt[0]))
    b.step(reply(ToolCall("mkdir", {"dir_name": "elsewhere"})))
    b.step(ANSWER_REPLY)
    a.step(ANSWER_REPLY)
    for calls in gt[1:]:
        a.step(reply(*calls))
        a.step(ANSWER_REPLY)
        if not b.done:
            b.step(ANSWER_REPLY)
    assert a.score().all_passed
    assert b.score().turn_passed[0] is False
    assert b.score().progress < 1.0


def test_episodes_own_fresh_instances_and_task_config_is_never_mutated(env: BfclEnvironment) -> None:
    task = env.tasks["multi_turn_base_0"]
    before = json.dumps(task.initial_config, default=dict, sort_keys=True)
    play_ground_truth(env, task.id)
    assert json.dumps(task.initial_config, default=dict, sort_keys=True) == before
    with pytest.raises(TypeError):
        task.initial_config["GorillaFileSystem"] = {}  # type: ignore[index]


def test_missed_function_is_invisible_until_its_turn(env: BfclEnvironment) -> None:
    task = env.tasks["multi_turn_miss_func_0"]  # 'sort' is revealed at turn 3; turn 2 has empty ground truth
    assert dict(task.missed_function) == {3: ("sort",)}
    episode = env.make_episode(task.id)
    messages = episode.start()
    assert "sort" not in {d.name for d in episode.visible_tools()}
    assert '"name": "sort"' not in messages[0].content
    gt = ground_truth_calls(task)
    for turn in (0, 1):
        episode.step(reply(*gt[turn]))
        episode.step(ANSWER_REPLY)
    # turn 2: calling the hidden function is impossible; answering is the right move
    result = episode.step(ANSWER_REPLY)
    assert result.code is StepCode.TURN_PASS
    assert result.tools_changed
    assert "sort" in {d.name for d in episode.visible_tools()}
    assert '"name": "sort"' in result.observation[-1].content
    result = episode.step(reply(*gt[3]))
    assert result.code is StepCode.TOOL_OK


def test_hidden_function_call_is_refused_not_executed(env: BfclEnvironment) -> None:
    task = env.tasks["multi_turn_miss_func_0"]
    episode = env.make_episode(task.id)
    episode.start()
    result = episode.step(reply(ToolCall("sort", {"file_name": "final_report.pdf"})))
    assert result.code is StepCode.TOOL_ERROR
    (outcome,) = result.calls
    assert not outcome.executed and not outcome.ok
    assert outcome.result.startswith("Error during execution:")


def test_call_on_a_turn_that_must_not_call_closes_it_unexecuted_with_a_warning(env: BfclEnvironment) -> None:
    task = env.tasks["multi_turn_miss_param_0"]
    empty_turn = next(i for i, turn in enumerate(task.ground_truth) if not turn)
    episode = env.make_episode(task.id)
    episode.start()
    gt = ground_truth_calls(task)
    for turn in range(empty_turn):
        if gt[turn]:
            episode.step(reply(*gt[turn]))
        episode.step(ANSWER_REPLY)
    result = episode.step(reply(ToolCall("ls", {})))
    assert result.turn_ended and result.code is StepCode.TURN_FAIL
    assert result.calls == ()
    assert "[Warning]" in result.observation[-1].content
    assert episode.score().turn_passed[empty_turn] is False


def test_format_errors_until_the_forced_end_fail_a_turn_that_must_not_call(env: BfclEnvironment) -> None:
    task = env.tasks["multi_turn_miss_param_0"]
    empty_turn = next(i for i, turn in enumerate(task.ground_truth) if not turn)
    episode = env.make_episode(task.id)
    episode.start()
    gt = ground_truth_calls(task)
    for turn in range(empty_turn):
        if gt[turn]:
            episode.step(reply(*gt[turn]))
        episode.step(ANSWER_REPLY)
    codes = [episode.step("garbage").code for _ in range(episode.config.max_steps_per_turn)]
    assert codes[:-1] == [StepCode.FORMAT_ERROR] * (len(codes) - 1)
    assert codes[-1] is StepCode.TURN_FAIL
    assert episode.score().turn_passed[empty_turn] is False


def test_skipped_turn_is_not_over_rewarded_ground_truth_state_advances(env: BfclEnvironment) -> None:
    """docs/method.md §8.4: skipping a turn must not shift ground truth for the turns after it."""
    task = env.tasks["multi_turn_base_0"]
    gt = ground_truth_calls(task)
    episode = env.make_episode(task.id)
    episode.start()
    episode.step(ANSWER_REPLY)  # skip turn 0 (mkdir + mv never happen)
    for calls in gt[1:]:
        episode.step(reply(*calls))
        episode.step(ANSWER_REPLY)
    passed = episode.score().turn_passed
    assert passed[0] is False
    # later turns are compared against ground truth that did move the file: they cannot all pass
    assert not all(passed[1:])


def test_progress_counts_unreached_turns_as_zero(env: BfclEnvironment) -> None:
    task = env.tasks["multi_turn_base_0"]
    gt = ground_truth_calls(task)
    episode = env.make_episode(task.id)
    episode.start()
    episode.step(reply(*gt[0]))
    episode.step(ANSWER_REPLY)
    score = episode.score()  # the rollout stops here (e.g. a length cap)
    assert score.turns_reached == 2
    assert score.turn_passed[0] is True
    assert score.progress == pytest.approx(1 / task.num_turns)


def test_format_errors_and_step_limit_force_the_turn_to_end_with_a_notice(env: BfclEnvironment) -> None:
    episode = env.make_episode("multi_turn_base_0", EpisodeConfig(max_steps_per_turn=3))
    episode.start()
    first = episode.step("no tags at all")
    assert first.code is StepCode.FORMAT_ERROR and not first.turn_ended
    assert first.observation[0].role == "user" and "Format error" in first.observation[0].content
    second = episode.step(reply(ToolCall("pwd", {})))
    assert second.code is StepCode.TOOL_OK
    third = episode.step(reply(ToolCall("pwd", {})))
    assert third.turn_ended and third.code is StepCode.TURN_FAIL
    assert third.observation[0].role == "tool"  # the last step's results are shown, not dropped
    assert "[Notice]" in third.observation[-1].content
    assert episode.turn_index == 1


def test_error_dict_counts_as_tool_error_and_rewards_follow_the_step_codes(env: BfclEnvironment) -> None:
    episode = env.make_episode("multi_turn_base_0")
    episode.start()
    ok = episode.step(reply(ToolCall("cd", {"folder": "document"})))
    assert ok.code is StepCode.TOOL_OK
    bad = episode.step(reply(ToolCall("cd", {"folder": "no_such_dir"})))
    assert bad.code is StepCode.TOOL_ERROR
    assert '"error"' in bad.calls[0].result and bad.calls[0].executed
    episode.step("<answer>missing think</answer>")
    episode.step(ANSWER_REPLY)
    score = episode.score()
    assert score.step_codes == (-1, -2, -3, 0)
    assert score.format_reward == pytest.approx(3 / 4)
    assert score.tool_reward == pytest.approx(1 / 2)
    assert score.stage1_reward == pytest.approx(3 / 4 + 1 / 2)


def test_stage1_reward_is_zero_without_tool_calls(env: BfclEnvironment) -> None:
    episode = env.make_episode("multi_turn_base_0")
    episode.start()
    episode.step(ANSWER_REPLY)
    assert episode.score().stage1_reward == 0.0


def test_feedback_modes_differ_only_by_hints(env: BfclEnvironment) -> None:
    call = ToolCall("cd", {"folder": "workspace/document"})
    results = {}
    for mode in FeedbackMode:
        episode = env.make_episode("multi_turn_base_0", EpisodeConfig(feedback=mode))
        episode.start()
        results[mode] = episode.step(reply(call)).calls[0]
    standard, augmented = results[FeedbackMode.STANDARD], results[FeedbackMode.AUGMENTED]
    assert standard.result == augmented.result  # the real class's result, never edited
    assert standard.hint is None
    assert augmented.hint


def test_schema_violations_are_refused_with_schema_hints(env: BfclEnvironment) -> None:
    episode = env.make_episode("multi_turn_base_0", EpisodeConfig(feedback=FeedbackMode.AUGMENTED))
    episode.start()
    result = episode.step(reply(ToolCall("mkdirr", {"dir_name": "x"}), ToolCall("mkdir", {})))
    unknown, missing = result.calls
    assert not unknown.executed and not missing.executed
    assert "mkdir" in (unknown.hint or "")
    assert "dir_name" in missing.result


def test_system_prompts_per_stage_list_the_visible_tools(env: BfclEnvironment) -> None:
    basic = env.make_episode("multi_turn_base_0", EpisodeConfig(prompt_style=PromptStyle.BASIC)).start()
    resourceful = env.make_episode(
        "multi_turn_base_0", EpisodeConfig(prompt_style=PromptStyle.RESOURCEFUL)
    ).start()
    assert basic[0].role == "system" and basic[1].role == "user"
    assert "resourceful" not in basic[0].content.lower()
    assert "resourceful" in resourceful[0].content.lower()
    assert '"name": "mkdir"' in basic[0].content


def test_signature_listing_is_short_and_names_every_visible_tool(env: BfclEnvironment) -> None:
    full = env.make_episode("multi_turn_base_0").start()[0].content
    short_episode = env.make_episode("multi_turn_base_0", EpisodeConfig(tool_listing=ToolListing.SIGNATURES))
    short = short_episode.start()[0].content
    assert len(short) * 4 < len(full)
    assert '"description"' in full and '"description"' not in short
    assert "mkdir(dir_name: string)" in short
    assert "ls(a?: boolean)" in short  # optional arguments are marked
    listed = {line.split("(")[0] for line in short.splitlines() if line.endswith(")") and line[0] != "("}
    assert listed == {doc.name for doc in short_episode.visible_tools()}


def test_revealed_functions_use_the_episodes_listing(env: BfclEnvironment) -> None:
    config = EpisodeConfig(tool_listing=ToolListing.SIGNATURES, max_steps_per_turn=1)
    episode = env.make_episode("multi_turn_miss_func_0", config)
    episode.start()
    texts = []
    while not episode.done:
        result = episode.step(ANSWER_REPLY)
        texts.extend(m.content for m in result.observation)
    revealed = next(t for t in texts if "now available" in t)
    assert "sort(file_name: string)" in revealed and '"description"' not in revealed


def test_episode_state_errors(env: BfclEnvironment) -> None:
    episode = env.make_episode("multi_turn_base_0")
    with pytest.raises(EpisodeStateError):
        episode.step(ANSWER_REPLY)
    episode.start()
    with pytest.raises(EpisodeStateError):
        episode.start()
    with pytest.raises(KeyError, match="unknown task id"):
        env.make_episode("multi_turn_base_9999")
    with pytest.raises(ValueError):
        EpisodeConfig(max_steps_per_turn=0)


def test_ground_truth_is_computed_once_per_task(env: BfclEnvironment) -> None:
    fresh = BfclEnvironment()
    for _ in range(3):
        play_ground_truth(fresh, "multi_turn_base_1")
    assert len(fresh.ground_truth) == 1
