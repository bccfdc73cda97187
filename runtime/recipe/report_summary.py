"""What a run report says first: the headline, the warnings, and each stage's own reward curve.

``write_report`` (``report.py``) draws every metric; this module reads the same records and says what
they mean for the run as a whole, so a reader sees at once whether it learned:

* ``headline``: stages reached, learner steps, wall time, the last validation accuracy, episodes/s;
* ``warnings``: when the run could not have learned, in words, per stage: most groups had zero reward
  variance (all-zero advantages: no policy gradient), the gradient norm was mostly zero; and for the
  run: steps were skipped, the run failed;
* ``stage_reward_figure``: ``train/reward`` (the stage's own trained-on reward) over each stage's own
  steps, one panel per stage, titled with why the stage ended.

Left out: computing metrics (the run does), plotting every metric (``report.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ZERO_VARIANCE_WARNING = 0.5
"""Warn when more than this share of the run's groups had zero reward variance."""
ZERO_GRADIENT = 1e-8
"""A gradient norm at most this counts as zero."""


@dataclass(frozen=True, slots=True)
class StageReward:
    """One stage's ``train/reward``: the mean of the first and of the last quarter of its steps."""

    stage: str
    steps: int
    first: float
    last: float

    def text(self) -> str:
        if self.steps == 1:
            return f"{self.stage} {self.first:.3f} (1 step)"
        return f"{self.stage} {self.first:.3f} → {self.last:.3f} ({self.steps} steps)"


@dataclass(frozen=True, slots=True)
class Headline:
    """The run in one line."""

    stages: tuple[str, ...]
    """Names of the stages the run trained in, in order."""
    steps: int
    """Learner steps logged."""
    wall_s: float | None
    """Seconds from the run's start to its last step (None without steps)."""
    validation_accuracy: float | None
    """The last validation accuracy (None when the run never validated)."""
    episodes_per_s: float | None
    """Episodes completed per second of wall time."""
    stage_rewards: tuple[StageReward, ...] = ()
    """Each stage's own ``train/reward`` trend, in stage order (stages' rewards differ in kind and
    scale, so they are never averaged together)."""

    def text(self) -> str:
        parts = [
            f"{self.steps} learner steps",
            f"stages {' → '.join(self.stages) if self.stages else '-'}",
            f"wall time {_duration(self.wall_s)}",
            "validation accuracy "
            + (f"{self.validation_accuracy:.3f}" if self.validation_accuracy is not None else "not run"),
            f"{self.episodes_per_s:.2f} episodes/s" if self.episodes_per_s is not None else "- episodes/s",
        ]
        trends = [trend.text() for trend in self.stage_rewards]
        if trends:
            parts.append("train/reward, first → last quarter of each stage's steps: " + ", ".join(trends))
        return "; ".join(parts)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}:{rest:02d}"


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _values(steps: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    return [v for s in steps if (v := _number(s.get(key))) is not None]


def headline(steps: Sequence[Mapping[str, Any]]) -> Headline:
    """The headline of a run from its step records (in step order)."""
    stages: list[str] = []
    for record in steps:
        name = record.get("stage_name")
        if isinstance(name, str) and (not stages or stages[-1] != name):
            stages.append(name)
    wall = _values(steps, "time_s")
    completed = _values(steps, "rollout/episodes_completed")
    wall_s = wall[-1] if wall else None
    rate = completed[-1] / wall_s if completed and wall_s else None
    accuracy = _values(steps, "validation/accuracy")
    return Headline(
        stages=tuple(stages),
        steps=len(steps),
        wall_s=wall_s,
        validation_accuracy=accuracy[-1] if accuracy else None,
        episodes_per_s=rate,
        stage_rewards=_stage_rewards(steps),
    )


def _rewards_by_stage(steps: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """(step, ``train/reward``) of each stage's own steps, stages in the order they ran."""
    by_stage: dict[str, list[tuple[int, float]]] = {}
    for record in steps:
        name, value = record.get("stage_name"), _number(record.get("train/reward"))
        if isinstance(name, str) and value is not None:
            by_stage.setdefault(name, []).append((int(record["step"]), value))
    return by_stage


def _stage_rewards(steps: Sequence[Mapping[str, Any]]) -> tuple[StageReward, ...]:
    trends = []
    for name, points in _rewards_by_stage(steps).items():
        values = [value for _, value in points]
        n = max(1, len(values) // 4)
        trends.append(StageReward(name, len(values), sum(values[:n]) / n, sum(values[-n:]) / n))
    return tuple(trends)


def warnings(steps: Sequence[Mapping[str, Any]], events: Sequence[Mapping[str, Any]]) -> list[str]:
    """Why the run may not have learned, in words (empty when nothing looks wrong)."""
    out: list[str] = []
    for event in events:
        if event.get("event") == "run_failed":
            why = event.get("message", event.get("reason"))
            out.append(f"The run failed at step {event.get('step')}: {why}")
    by_stage: dict[str, list[Mapping[str, Any]]] = {}
    for record in steps:
        by_stage.setdefault(str(record.get("stage_name", "?")), []).append(record)
    for stage, records in by_stage.items():
        weighted = [
            (g, z)
            for r in records
            if (g := _number(r.get("train/groups"))) is not None
            and (z := _number(r.get("train/zero_variance_share"))) is not None
        ]
        total = sum(g for g, _ in weighted)
        share = sum(g * z for g, z in weighted) / total if total else 0.0
        if share > ZERO_VARIANCE_WARNING:
            out.append(
                f"Stage {stage}: {share:.0%} of its {int(total)} groups had zero reward variance: their "
                "GRPO advantages are all 0 and they carry no policy gradient (dropped or kept per stage). "
                "Larger groups, an easier stage or a reward with partial credit give the policy something "
                "to compare."
            )
        norms = _values(records, "learner/grad_norm")
        zero = sum(n <= ZERO_GRADIENT for n in norms)
        if norms and zero > len(norms) / 2:
            out.append(f"Stage {stage}: the gradient norm was zero in {zero} of {len(norms)} learner steps.")
    skipped = _values(steps, "learner/skipped")
    if skipped:
        out.append(f"{len(skipped)} learner steps applied no update (non-finite gradient or no tokens).")
    return out


def stage_reward_figure(
    steps: Sequence[Mapping[str, Any]], promotions: Sequence[Mapping[str, Any]], out: Path
) -> Path | None:
    """``train/reward`` over each stage's own steps, one panel per stage titled with why it ended."""
    by_stage = _rewards_by_stage(steps)
    if not by_stage:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ended = {p.get("from_name"): p for p in promotions}
    columns = min(2, len(by_stage))
    rows = -(-len(by_stage) // columns)
    fig = Figure(figsize=(5 * columns, 3 * rows), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False).flatten()
    for ax, (name, points) in zip(axes, by_stage.items(), strict=False):
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.plot(xs, ys, marker="o" if len(xs) < 40 else None, markersize=3)
        promotion = ended.get(name)
        why = f"ended: {promotion.get('reason')}" if promotion else "did not end"
        ax.set_title(f"{name}: train/reward ({why})", fontsize=9)
        ax.set_xlabel("learner step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[len(by_stage) :]:
        ax.set_visible(False)
    fig.tight_layout()
    path = out / "stage_rewards.png"
    fig.savefig(path, format="png")
    return path
