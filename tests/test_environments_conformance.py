"""A sample of benchmarks/conformance.py in CI: envtune's verdicts against BFCL's own checker."""

from __future__ import annotations

import random

from envtune.environments import BfclEnvironment, FeedbackMode, load_tasks
from envtune.environments.conformance import (
    PERTURBATIONS,
    ground_truth_run,
    judge,
    perturbed_runs,
    play_envtune,
)


def test_ground_truth_replay_passes_all_800_tasks() -> None:
    env = BfclEnvironment()
    failing = [
        t.id
        for t in load_tasks().values()
        if not all(play_envtune(env, ground_truth_run(t), FeedbackMode.STANDARD))
    ]
    assert failing == []


def test_perturbed_verdicts_agree_with_bfcl_checker_on_a_sample() -> None:
    env = BfclEnvironment()
    tasks = list(load_tasks().values())
    sample = random.Random(1).sample(tasks, 120)
    verdicts = [
        judge(env, trajectory, serial, FeedbackMode.AUGMENTED)
        for serial, trajectory in enumerate(perturbed_runs(sample, per_task=3, seed=7))
    ]
    kinds = {v.trajectory.kind for v in verdicts}
    assert kinds == set(PERTURBATIONS)
    # the sample must exercise both verdicts, or agreement would be trivial
    assert sum(v.bfcl_pass for v in verdicts) > 20
    assert sum(not v.bfcl_pass for v in verdicts) > 100
    disagreements = [(v.trajectory.task_id, v.trajectory.kind) for v in verdicts if not v.agree]
    assert disagreements == []


def test_bfcl_judge_sees_a_broken_trajectory() -> None:
    """The comparison is live: a trajectory that skips all calls fails in both judges."""
    env = BfclEnvironment()
    task = load_tasks()["multi_turn_base_3"]
    trajectory = ground_truth_run(task)
    empty = type(trajectory)(task_id=task.id, kind="nothing", turns=tuple(() for _ in trajectory.turns))
    verdict = judge(env, empty, 0, FeedbackMode.STANDARD)
    assert not verdict.envtune_pass and not verdict.bfcl_pass
