"""The CPU preset cut down so one learner step takes seconds, for smoke runs of ``envtune-run``.

One list for every place that starts a real run to check its plumbing (the CLI and reliability
tests, the faults benchmark): when the preset changes in a way a smoke run must undo, it changes here.
"""

from __future__ import annotations

SMOKE_OVERRIDES: tuple[str, ...] = (
    "curriculum.stages.*.promotion.max_steps=1",
    "curriculum.stages.*.episode.max_steps_per_turn=1",
    # 16-token replies never score: keep the zero-variance groups (the preset drops them), step anyway.
    "curriculum.stages.*.zero_variance=keep",
    "curriculum.validation_every=0",
    "rollout.group_size=2",
    "rollout.groups_per_step=1",
    "rollout.max_concurrent_episodes=2",
    "rollout.max_staleness=0",  # on-policy: no rollout competes with the learner for the 2 cores
    "sampling.max_new_tokens=16",
    "run.progress_bar=false",
    "logging.format=json",
)
"""``--set`` overrides of the CPU preset, in order."""


def smoke_args(*more: str) -> list[str]:
    """``--set`` arguments for ``envtune-run``: the smoke overrides, then ``more``."""
    return [arg for item in (*SMOKE_OVERRIDES, *more) for arg in ("--set", item)]
