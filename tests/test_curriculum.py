"""The curriculum scheduler: pools, dispatch, zero-variance groups, promotions, resume."""

from __future__ import annotations

import dataclasses
import json

import pytest
from envtune.environments.episode import EpisodeConfig
from envtune.environments.tasks import Split, load_split, load_tasks
from envtune.environments.types import FeedbackMode, PromptStyle, RewardKind
from envtune.runtime.recipe.config import Config, CurriculumConfig, PromotionConfig, StageConfig
from envtune.runtime.recipe.curriculum import (
    CurriculumError,
    CurriculumFinished,
    CurriculumScheduler,
    GroupOutcome,
    stage_pool,
)


def _stage(name: str, feedback: FeedbackMode = FeedbackMode.AUGMENTED, **kwargs: object) -> StageConfig:
    promotion = kwargs.pop("promotion", PromotionConfig(max_steps=2))
    episode = EpisodeConfig(feedback=feedback)
    return StageConfig(name=name, promotion=promotion, episode=episode, **kwargs)  # type: ignore[arg-type]


def _group(spec_stage: int, rewards: tuple[float, ...], task_id: str = "multi_turn_base_0") -> GroupOutcome:
    return GroupOutcome(task_id=task_id, stage=spec_stage, rewards=rewards, format_rewards=rewards)


def test_paper_pools_come_from_the_training_side_only() -> None:
    split = load_split()
    scheduler = CurriculumScheduler(Config().curriculum)
    test_ids = set(split.test)
    validation = set(split.validation)
    pools = [set(scheduler.pool(n)) for n in range(1, 5)]
    assert all(not pool & test_ids for pool in pools)
    assert all(not pool & validation for pool in pools)  # train_minus_validation
    assert len(pools[0]) == 75 and all(i.startswith("multi_turn_base_") for i in pools[0])
    assert len(pools[1]) == 90 and all(i.startswith("multi_turn_base_") for i in pools[1])
    assert len(pools[2]) == len(pools[3]) == 360
    # Validation episodes come from the held-out validation ids, under standard feedback.
    specs = scheduler.validation_tasks()
    assert {s.task_id for s in specs} == validation
    assert all(s.episode.feedback is FeedbackMode.STANDARD for s in specs)
    assert all(s.episode.max_steps_per_turn == 20 and s.reward is RewardKind.PROGRESS for s in specs)


def test_dispatch_never_hands_out_test_ids_and_cycles_through_the_pool() -> None:
    scheduler = CurriculumScheduler(CurriculumConfig(stages=(_stage("only", categories=("miss_param",)),)))
    pool = scheduler.pool(1)
    first_epoch = [scheduler.next_task().task_id for _ in pool]
    second_epoch = [scheduler.next_task().task_id for _ in pool]
    assert sorted(first_epoch) == sorted(second_epoch) == sorted(pool)
    assert first_epoch != second_epoch  # reshuffled per epoch
    assert not set(first_epoch) & set(load_split().test)


def test_a_pool_that_would_leak_test_ids_is_refused() -> None:
    split = load_split()
    leaky = Split(train=split.train, test=(*split.test, split.train[0]), validation=split.validation)
    with pytest.raises(CurriculumError, match="test ids"):
        stage_pool(_stage("s", categories=(load_tasks()[split.train[0]].category,)), leaky, load_tasks(), 0)


def test_easiest_selection_prefers_few_ground_truth_calls() -> None:
    tasks = load_tasks()
    stage = _stage("syntax", categories=("base",), max_tasks=10, selection="easiest")
    easy = stage_pool(stage, load_split(), tasks, seed=0)
    everything = stage_pool(dataclasses.replace(stage, max_tasks=0), load_split(), tasks, seed=0)

    def calls(task_id: str) -> int:
        return sum(len(turn) for turn in tasks[task_id].ground_truth)

    assert max(calls(i) for i in easy) <= min(calls(i) for i in set(everything) - set(easy))


def test_task_spec_carries_the_stage_conditions() -> None:
    scheduler = CurriculumScheduler(Config().curriculum)
    spec = scheduler.next_task()
    assert (spec.stage, spec.stage_name, spec.reward) == (1, "syntax", RewardKind.STAGE1)
    assert (spec.episode.feedback, spec.episode.prompt_style, spec.constrained) == (
        FeedbackMode.STANDARD,
        PromptStyle.BASIC,
        False,
    )
    assert spec.episode.max_steps_per_turn == 6


def test_promotion_by_threshold_over_a_window() -> None:
    rule = PromotionConfig(metric="train/format_reward", window=3, threshold=0.9, max_steps=100)
    scheduler = CurriculumScheduler(CurriculumConfig(stages=(_stage("a", promotion=rule), _stage("b"))))
    fired = []
    for step, value in enumerate([0.5, 1.0, 1.0, 1.0], start=1):
        spec = scheduler.next_task()
        scheduler.record_group(_group(spec.stage, (value, value - 0.1)))
        summary = scheduler.end_step(step)
        fired.append(summary.promotion)
    # Window means: (n/a, n/a, 0.8333, 0.95): fires at step 4, not before.
    assert fired[:3] == [None, None, None]
    promotion = fired[3]
    assert promotion is not None
    assert (promotion.from_stage, promotion.to_stage, promotion.reason) == (1, 2, "threshold")
    assert promotion.value == pytest.approx(0.95)
    assert promotion.steps_in_stage == 4
    assert scheduler.stage == 2
    assert json.loads(json.dumps(promotion.to_record()))["event"] == "promotion"


def test_promotion_by_budget_and_a_validation_metric_from_outside() -> None:
    rules = (
        PromotionConfig(metric="validation/progress", window=1, threshold=0.5, max_steps=3),
        PromotionConfig(max_steps=1),
    )
    scheduler = CurriculumScheduler(
        CurriculumConfig(stages=(_stage("a", promotion=rules[0]), _stage("b", promotion=rules[1])))
    )
    assert scheduler.end_step(1, {"validation/progress": 0.2}).promotion is None
    assert scheduler.end_step(2).promotion is None
    budget = scheduler.end_step(3, {"validation/progress": 0.4}).promotion
    assert budget is not None and budget.reason == "budget" and budget.to_name == "b"
    last = scheduler.end_step(4).promotion
    assert last is not None and last.to_stage is None and scheduler.finished
    with pytest.raises(CurriculumFinished):
        scheduler.next_task()
    assert [p.from_name for p in scheduler.promotions] == ["a", "b"]


def test_min_steps_and_less_than_comparison() -> None:
    rule = PromotionConfig(
        metric="train/zero_variance_share", window=1, threshold=0.0, comparison="<=", min_steps=2, max_steps=9
    )
    scheduler = CurriculumScheduler(CurriculumConfig(stages=(_stage("a", promotion=rule), _stage("b"))))
    scheduler.record_group(_group(1, (0.0, 1.0)))
    assert scheduler.end_step(1).promotion is None  # min_steps not reached
    scheduler.record_group(_group(1, (0.0, 1.0)))
    promotion = scheduler.end_step(2).promotion
    assert promotion is not None and promotion.reason == "threshold"


def test_zero_variance_groups_are_counted_per_stage_and_dropped_or_kept() -> None:
    stages = (_stage("drop", zero_variance="drop"), _stage("keep", zero_variance="keep"))
    scheduler = CurriculumScheduler(CurriculumConfig(stages=stages))
    assert scheduler.record_group(_group(1, (1.0, 1.0, 1.0))).keep is False
    verdict = scheduler.record_group(_group(1, (0.0, 1.0, 1.0)))
    assert verdict.keep and not verdict.zero_variance
    summary = scheduler.end_step(1)
    assert summary.metrics["train/zero_variance_share"] == pytest.approx(0.5)
    assert summary.metrics["curriculum/zero_variance_groups/drop"] == 1
    assert summary.metrics["curriculum/dropped_groups/drop"] == 1
    scheduler.end_step(2)  # budget: promoted to "keep"
    assert scheduler.stage == 2
    kept = scheduler.record_group(_group(2, (0.0, 0.0)))
    assert kept.keep and kept.zero_variance
    stats = scheduler.statistics()
    assert dict(stats.zero_variance_groups) == {"drop": 1, "keep": 1}
    assert dict(stats.dropped_groups) == {"drop": 1, "keep": 0}
    assert dict(stats.groups) == {"drop": 2, "keep": 1}


def test_in_flight_groups_keep_their_stage_after_a_promotion() -> None:
    stages = (
        _stage(
            "a",
            reward=RewardKind.STAGE1,
            feedback=FeedbackMode.STANDARD,
            promotion=PromotionConfig(max_steps=1),
        ),
        _stage("b", feedback=FeedbackMode.AUGMENTED),
    )
    scheduler = CurriculumScheduler(CurriculumConfig(stages=stages))
    in_flight = scheduler.next_task()
    promotion = scheduler.end_step(1).promotion
    assert promotion is not None
    after = scheduler.next_task()
    # The spec handed out before the promotion still says stage 1 and its conditions.
    assert (in_flight.stage, in_flight.reward, in_flight.episode.feedback) == (
        1,
        RewardKind.STAGE1,
        FeedbackMode.STANDARD,
    )
    assert (after.stage, after.reward) == (2, RewardKind.PROGRESS)
    assert after.episode.feedback is FeedbackMode.AUGMENTED
    # Its group is counted under stage 1 and does not feed stage 2's train metrics.
    scheduler.record_group(_group(in_flight.stage, (1.0, 1.0)))
    summary = scheduler.end_step(2)
    assert "train/reward" not in summary.metrics
    assert scheduler.statistics().groups["a"] == 1
    with pytest.raises(CurriculumError, match="no stage 7"):
        scheduler.record_group(_group(7, (1.0,)))


def test_resume_restores_stage_cursor_windows_and_counters() -> None:
    rule = PromotionConfig(metric="train/format_reward", window=3, threshold=2.0, max_steps=3)
    config = CurriculumConfig(stages=(_stage("a", promotion=rule), _stage("b"), _stage("c")))
    original = CurriculumScheduler(config, seed=7)
    for step in range(1, 5):
        spec = original.next_task()
        original.record_group(_group(spec.stage, (0.25 * step, 0.0)))
        original.end_step(step)
    state = json.loads(json.dumps(original.state_dict()))  # what a checkpoint stores
    restored = CurriculumScheduler(config, seed=7)
    restored.load_state_dict(state)
    assert restored.statistics() == original.statistics()
    assert restored.promotions == original.promotions
    assert [restored.next_task() for _ in range(5)] == [original.next_task() for _ in range(5)]
    assert restored.end_step(5) == original.end_step(5)
    with pytest.raises(CurriculumError, match="seed"):
        CurriculumScheduler(config, seed=8).load_state_dict(state)
    renamed = CurriculumConfig(stages=(_stage("x", promotion=rule), _stage("b"), _stage("c")))
    with pytest.raises(CurriculumError, match="differ"):
        CurriculumScheduler(renamed, seed=7).load_state_dict(state)


def test_validation_schedule_and_limit_covers_categories() -> None:
    config = dataclasses.replace(Config().curriculum, validation_every=3, validation_limit=4)
    scheduler = CurriculumScheduler(config)
    assert [scheduler.validation_due(s) for s in range(1, 7)] == [False, False, True, False, False, True]
    categories = {load_tasks()[s.task_id].category for s in scheduler.validation_tasks()}
    assert len(scheduler.validation_tasks()) == 4 and len(categories) == 4


def test_group_outcome_from_trajectories() -> None:
    class FakeTrajectory:
        def __init__(self, reward: float) -> None:
            self.task_id, self.stage, self.reward = "t", 2, reward
            self.progress, self.format_reward, self.tool_reward = reward, 1.0, 0.5

    outcome = GroupOutcome.from_trajectories([FakeTrajectory(0.0), FakeTrajectory(1.0)])
    assert (outcome.task_id, outcome.stage, outcome.rewards, outcome.tool_rewards) == (
        "t",
        2,
        (0.0, 1.0),
        (0.5, 0.5),
    )
    assert not outcome.zero_variance
    with pytest.raises(ValueError):
        GroupOutcome.from_trajectories([])


def test_stage_one_does_not_promote_a_policy_that_only_answers() -> None:
    """Issue 10 (4): answering every turn is well formed (R_format 1) but never calls a tool, so the
    stage-1 reward is 0; the paper preset's stage 1 promotes on that reward, not on the format."""
    stages = (dataclasses.replace(Config().curriculum.stages[0], categories=("base",)), _stage("b"))
    answers_only = CurriculumScheduler(CurriculumConfig(stages=stages))
    for step in range(1, 80):
        spec = answers_only.next_task()
        answers_only.record_group(
            GroupOutcome(task_id=spec.task_id, stage=1, rewards=(0.0, 0.0), format_rewards=(1.0, 1.0))
        )
        summary = answers_only.end_step(step)
        assert summary.promotion is None, step
        assert summary.metrics["train/format_reward"] == 1.0
    budget = answers_only.end_step(80).promotion
    assert budget is not None and budget.reason == "budget"
    calls = CurriculumScheduler(CurriculumConfig(stages=stages))
    fired = None
    for step in range(1, 10):
        spec = calls.next_task()
        calls.record_group(
            GroupOutcome(task_id=spec.task_id, stage=1, rewards=(1.9, 2.0), format_rewards=(1.0, 1.0))
        )
        fired = fired or calls.end_step(step).promotion
    assert fired is not None and (fired.reason, fired.step, fired.metric) == ("threshold", 5, "train/reward")
    assert "train/reward mean 1.95" in fired.detail


def _plateau_rule(**changes: object) -> PromotionConfig:
    fields: dict[str, object] = dict(
        metric="validation/progress", window=2, threshold=0.9, max_steps=50, plateau_patience=3,
        plateau_min_delta=0.01, grad_norm_window=4, grad_norm_max_cv=0.5,
    )
    fields.update(changes)
    return PromotionConfig(**fields)  # type: ignore[arg-type]


def _drive(rule: PromotionConfig, values: list[float], grad_norms: list[float]) -> list[object]:
    scheduler = CurriculumScheduler(CurriculumConfig(stages=(_stage("a", promotion=rule), _stage("b"))))
    out = []
    for step, (value, norm) in enumerate(zip(values, grad_norms, strict=True), start=1):
        metrics = {"validation/progress": value, "learner/grad_norm": norm}
        promotion = scheduler.end_step(step, metrics).promotion
        out.append(promotion)
        if promotion is not None:
            break
    return out


def test_plateau_with_a_stable_gradient_promotes_and_says_why() -> None:
    # Window means: 0.15, 0.25, 0.3, 0.3, 0.305, 0.3 -> the last three never beat 0.3 by > 0.01.
    values = [0.1, 0.2, 0.3, 0.3, 0.3, 0.31, 0.29]
    fired = _drive(_plateau_rule(), values, [0.4, 0.42, 0.38, 0.41, 0.4, 0.39, 0.4])
    promotion = fired[-1]
    assert len(fired) == 7 and promotion is not None
    assert promotion.reason == "plateau"  # type: ignore[attr-defined]
    assert "plateaued" in promotion.detail and "CV" in promotion.detail  # type: ignore[attr-defined]
    # Still improving: no plateau (the budget ends it).
    rising = [0.1 * k for k in range(1, 9)]
    assert all(p is None for p in _drive(_plateau_rule(), rising, [0.4] * 8))
    # Flat, but the gradient norm is exploding (paper Fig. 6): no plateau promotion either.
    exploding = [0.4, 0.4, 0.4, 0.4, 0.4, 1.5, 2.9]
    assert all(p is None for p in _drive(_plateau_rule(), values, exploding))
    # Patience 0 turns the rule off; the threshold still bounds it from above.
    assert all(p is None for p in _drive(_plateau_rule(plateau_patience=0), values, [0.4] * 7))
    early = _drive(_plateau_rule(threshold=0.25), values, [0.4] * 7)[-1]
    assert early is not None and early.reason == "threshold"  # type: ignore[attr-defined]


def test_plateau_rule_skips_steps_that_did_not_update_and_survives_a_resume() -> None:
    rule = _plateau_rule()
    config = CurriculumConfig(stages=(_stage("a", promotion=rule), _stage("b")))
    original = CurriculumScheduler(config)
    for step, value in enumerate([0.1, 0.2, 0.3, 0.3], start=1):
        # A step that applied no update (its norm here is huge) never reaches the stability window.
        original.end_step(step, {"validation/progress": value, "learner/grad_norm": 0.4})
    original.end_step(5, {"learner/grad_norm": 50.0, "learner/skipped": 1.0})
    state = json.loads(json.dumps(original.state_dict()))
    restored = CurriculumScheduler(config)
    restored.load_state_dict(state)
    assert state["stages"][0]["grad_norms"] == [0.4] * 4 and len(state["stages"][0]["means"]) == 3
    for step, value in ((6, 0.3), (7, 0.3), (8, 0.3)):
        metrics = {"validation/progress": value, "learner/grad_norm": 0.4}
        assert restored.end_step(step, metrics) == original.end_step(step, metrics)
    assert restored.promotions == original.promotions and restored.promotions[0].reason == "plateau"
    old = {**state, "version": 1, "stages": [{k: v for k, v in s.items() if k not in ("means", "grad_norms")}
                                             for s in state["stages"]]}
    CurriculumScheduler(config).load_state_dict(old)  # a version-1 checkpoint still loads
