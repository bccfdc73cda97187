"""The curriculum scheduler: which task to roll out next, and when a stage ends (docs/method.md §2).

``CurriculumScheduler.next_task()`` hands out a ``CurriculumTask`` (``episodes.CurriculumTaskSource``
serves it to the rollout) tagged with the *current* stage's conditions (reward, episode config,
constraint); groups come
back through ``record_group()`` (zero-variance groups are counted per stage and dropped or kept by
config); each learner step ends with ``end_step()``, which adds the stage's own train metrics to
the step metrics, feeds the promotion rule's window and returns a ``Promotion`` when the rule
fires. A promotion only changes what *new* dispatches get: an episode already handed out carries
its ``CurriculumTask`` and finishes under the stage it started in.

Pure and synchronous on purpose: every method returns at once, so the rollout calls it from the
event loop without an actor around it (one thread, no await inside, hence no interleaving), and
tests drive it step by step. Left out: rolling episodes out, learning, writing files.

Never hands out a test id: the stage pools come from the training side of the split, and that is
checked when the scheduler is built and again at every dispatch.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import structlog
from envtune.agents.trajectory import Trajectory
from envtune.environments.episode import EpisodeConfig
from envtune.environments.tasks import Split, Task, load_function_docs, load_split, load_tasks
from envtune.environments.types import RewardKind
from envtune.optim.advantages import is_zero_variance
from envtune.runtime.recipe.config import CurriculumConfig, PromotionConfig, StageConfig

log = structlog.get_logger(__name__)

STATE_VERSION = 2
"""Version of ``state_dict()``'s layout (checked by ``load_state_dict``; 1 lacks the plateau state)."""

GRAD_NORM_METRIC = "learner/grad_norm"
"""The step metric the plateau rule reads the gradient norm from."""

PromotionReason = Literal["threshold", "plateau", "budget"]
"""Why a stage ended (see ``config.PromotionConfig``)."""


class CurriculumError(RuntimeError):
    """The curriculum cannot go on: a bad pool, a finished curriculum, a mismatched state."""


class CurriculumFinished(CurriculumError):
    """``next_task()`` after the last stage ended."""


@dataclass(frozen=True, slots=True)
class CurriculumTask:
    """A task spec with the conditions of the stage it was dispatched in.

    The rollout carries it to the episode runner unchanged; an episode reads its conditions from
    here, never from the scheduler's current stage, which is how in-flight episodes finish under
    the stage they started in.
    """

    task_id: str
    """BFCL task id."""
    stage: int
    """Stage the task was dispatched in (from 1)."""
    stage_name: str
    """The stage's name."""
    reward: RewardKind
    """Which reward the episodes train on."""
    episode: EpisodeConfig
    """How the environment talks to the model (feedback, prompt, replies per turn)."""
    constrained: bool
    """Grammar-constrained decoding on or off."""
    max_replies: int = 0
    """The stage's reply budget per episode; 0: the run's ``sampling.max_replies``."""


@dataclass(frozen=True, slots=True)
class GroupOutcome:
    """What the scheduler needs from a finished group (one float per episode)."""

    task_id: str
    """The group's task."""
    stage: int
    """Stage the group was dispatched in (``CurriculumTask.stage``)."""
    rewards: tuple[float, ...]
    """The trained-on reward of each episode."""
    progress: tuple[float, ...] = ()
    """R_P of each episode (empty when unknown)."""
    format_rewards: tuple[float, ...] = ()
    """R_format of each episode (empty when unknown)."""
    tool_rewards: tuple[float, ...] = ()
    """R_tool of each episode (empty when unknown)."""

    @classmethod
    def from_trajectories(cls, trajectories: Sequence[Trajectory]) -> GroupOutcome:
        """From the trajectories of one group."""
        if not trajectories:
            raise ValueError("a group has at least one trajectory")
        first = trajectories[0]
        return cls(
            task_id=first.task_id,
            stage=first.stage,
            rewards=tuple(float(t.reward) for t in trajectories),
            progress=tuple(float(t.progress) for t in trajectories),
            format_rewards=tuple(float(t.format_reward) for t in trajectories),
            tool_rewards=tuple(float(t.tool_reward) for t in trajectories),
        )

    @property
    def zero_variance(self) -> bool:
        """All rewards equal: GRPO advantages are all zero, no policy-gradient signal (the learner's
        own test, so both sides agree on which groups carry none)."""
        return is_zero_variance(self.rewards)


@dataclass(frozen=True, slots=True)
class GroupVerdict:
    """The scheduler's answer to a finished group."""

    keep: bool
    """Send the group to the learner (False: a zero-variance group dropped by config)."""
    zero_variance: bool
    """All of the group's rewards were equal."""


@dataclass(frozen=True, slots=True)
class Promotion:
    """A stage ended (``to_stage`` None: the last stage ended and the curriculum is finished)."""

    step: int
    """Learner step at which the rule fired."""
    from_stage: int
    """The stage that ended (from 1)."""
    from_name: str
    """Its name."""
    to_stage: int | None
    """The stage new dispatches get from now on, or None when the curriculum is over."""
    to_name: str | None
    """Its name."""
    reason: PromotionReason
    """``threshold``: the metric's window mean passed it; ``plateau``: the metric stopped improving
    while the gradient norm was stable (the paper's rule); ``budget``: the step budget ran out."""
    metric: str
    """The rule's metric (empty for a budget-only rule)."""
    value: float | None
    """The window mean when the rule fired (None when the window was not full)."""
    steps_in_stage: int
    """Learner steps the ended stage ran."""
    detail: str = ""
    """Why, in words (the numbers the rule compared), for the log and the report."""

    def to_record(self) -> dict[str, Any]:
        """The promotion as a ``metrics.jsonl`` event record."""
        return {
            "event": "promotion",
            "step": self.step,
            "from_stage": self.from_stage,
            "from_name": self.from_name,
            "to_stage": self.to_stage,
            "to_name": self.to_name,
            "reason": self.reason,
            "metric": self.metric,
            "value": self.value,
            "steps_in_stage": self.steps_in_stage,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class StepSummary:
    """What ``end_step`` returns."""

    metrics: dict[str, float]
    """Curriculum metrics of the step (``train/*`` of the current stage, ``curriculum/*``)."""
    promotion: Promotion | None
    """The promotion this step triggered, if any."""


@dataclass(frozen=True, slots=True)
class CurriculumStatistics:
    """A snapshot for logs and the progress bar."""

    stage: int
    """Current stage (from 1; ``num_stages + 1`` once finished)."""
    stage_name: str
    """Its name (``finished`` once finished)."""
    steps_in_stage: int
    """Learner steps taken in the current stage."""
    dispatched: int
    """Training groups handed out so far."""
    zero_variance_groups: Mapping[str, int]
    """Stage name -> zero-variance groups seen."""
    dropped_groups: Mapping[str, int]
    """Stage name -> groups dropped."""
    groups: Mapping[str, int]
    """Stage name -> groups seen."""
    finished: bool
    """The last stage has ended."""


@dataclass(slots=True)
class _StageState:
    """Mutable per-stage state (owned by the scheduler, copied into ``state_dict``)."""

    epoch: int = 0
    cursor: int = 0
    steps: int = 0
    groups: int = 0
    zero_variance: int = 0
    dropped: int = 0
    window: deque[float] = field(default_factory=deque)
    means: list[float] = field(default_factory=list)
    """Every full window's mean, in order (the plateau rule's history)."""
    grad_norms: deque[float] = field(default_factory=deque)
    """The most recent gradient norms of updating steps."""


def _rank(seed: int, salt: str, task_id: str) -> str:
    return hashlib.sha256(f"{seed}:{salt}:{task_id}".encode()).hexdigest()


def stage_pool(stage: StageConfig, split: Split, tasks: Mapping[str, Task], seed: int) -> tuple[str, ...]:
    """The task ids of a stage: its split part, its categories, at most ``max_tasks`` of them."""
    if stage.data not in ("train", "train_minus_validation"):
        raise CurriculumError(f"stage {stage.name}: training data must be a train part, not {stage.data}")
    wanted = set(stage.categories)
    ids = [task_id for task_id in split.ids(stage.data) if tasks[task_id].category in wanted]
    if stage.max_tasks and len(ids) > stage.max_tasks:
        if stage.selection == "easiest":
            # Fewest ground-truth calls first, then fewest turns: short, plain tasks to learn syntax on.
            def difficulty(task_id: str) -> tuple[int, int, str]:
                task = tasks[task_id]
                return (sum(len(turn) for turn in task.ground_truth), task.num_turns, task_id)

            ids = sorted(ids, key=difficulty)[: stage.max_tasks]
        elif stage.selection == "shortest":
            docs_chars: dict[str, int] = {}
            for doc in load_function_docs().values():
                chars = len(json.dumps(doc.to_json()))
                docs_chars[doc.class_name] = docs_chars.get(doc.class_name, 0) + chars

            def length(task_id: str) -> tuple[int, str]:
                task = tasks[task_id]
                questions = sum(len(q) for turn in task.questions for q in turn)
                return (sum(docs_chars.get(c, 0) for c in task.involved_classes) + questions, task_id)

            ids = sorted(ids, key=length)[: stage.max_tasks]
        else:
            ids = sorted(ids, key=lambda i: _rank(seed, f"select:{stage.name}", i))[: stage.max_tasks]
    if not ids:
        raise CurriculumError(f"stage {stage.name}: no tasks in {stage.data} of {stage.categories}")
    leaked = set(ids) & set(split.test)
    if leaked:
        raise CurriculumError(f"stage {stage.name}: {len(leaked)} test ids in its pool, e.g. {min(leaked)}")
    return tuple(sorted(ids))


class CurriculumScheduler:
    """Stage state, task dispatch, zero-variance accounting and promotion rules."""

    def __init__(
        self,
        config: CurriculumConfig,
        *,
        seed: int = 0,
        split: Split | None = None,
        tasks: Mapping[str, Task] | None = None,
    ) -> None:
        self.config = config
        self.seed = seed
        self._split = split if split is not None else load_split()
        self._tasks = tasks if tasks is not None else load_tasks()
        self._test_ids = frozenset(self._split.test)
        self._pools = tuple(stage_pool(s, self._split, self._tasks, seed) for s in config.stages)
        self._validation_ids = self._pick_validation()
        self._index = 0  # 0-based index of the current stage; len(stages) once finished
        self._states = [
            _StageState(
                window=deque(maxlen=s.promotion.window), grad_norms=deque(maxlen=s.promotion.grad_norm_window)
            )
            for s in config.stages
        ]
        self._orders: dict[tuple[int, int], tuple[str, ...]] = {}
        self._dispatched = 0
        self._pending: list[GroupOutcome] = []
        self._promotions: list[Promotion] = []

    # --- dispatch -------------------------------------------------------------------------------

    @property
    def stage(self) -> int:
        """Current stage number, from 1 (``num_stages + 1`` once finished)."""
        return self._index + 1

    @property
    def finished(self) -> bool:
        return self._index >= len(self.config.stages)

    @property
    def stage_config(self) -> StageConfig:
        if self.finished:
            raise CurriculumFinished("the curriculum is finished")
        return self.config.stages[self._index]

    @property
    def promotions(self) -> tuple[Promotion, ...]:
        return tuple(self._promotions)

    def pool(self, stage: int) -> tuple[str, ...]:
        """Task ids of a stage (numbered from 1)."""
        return self._pools[stage - 1]

    def _order(self, index: int, epoch: int) -> tuple[str, ...]:
        key = (index, epoch)
        if key not in self._orders:
            order = list(self._pools[index])
            random.Random(f"{self.seed}:{self.config.stages[index].name}:{epoch}").shuffle(order)
            self._orders = {key: tuple(order)}  # only the current epoch's order is ever needed
        return self._orders[key]

    def next_task(self) -> CurriculumTask:
        """The next training task, under the current stage's conditions."""
        stage = self.stage_config
        state = self._states[self._index]
        order = self._order(self._index, state.epoch)
        task_id = order[state.cursor]
        state.cursor += 1
        if state.cursor >= len(order):
            state.epoch += 1
            state.cursor = 0
        assert task_id not in self._test_ids, f"test id {task_id} reached dispatch"
        spec = CurriculumTask(
            task_id=task_id,
            stage=self.stage,
            stage_name=stage.name,
            reward=stage.reward,
            episode=stage.episode,
            constrained=stage.constrained,
            max_replies=stage.max_replies,
        )
        self._dispatched += 1
        return spec

    # --- validation -----------------------------------------------------------------------------

    def _pick_validation(self) -> tuple[str, ...]:
        ids = list(self._split.validation)
        assert not set(ids) & self._test_ids, "validation ids overlap the test split"
        limit = self.config.validation_limit
        if not limit or limit >= len(ids):
            return tuple(ids)
        # Round-robin over categories so a small limit still covers every category.
        by_category: dict[str, list[str]] = {}
        for task_id in ids:
            by_category.setdefault(self._tasks[task_id].category, []).append(task_id)
        picked: list[str] = []
        queues = [deque(sorted(v)) for _, v in sorted(by_category.items())]
        while len(picked) < limit:
            for queue in queues:
                if queue and len(picked) < limit:
                    picked.append(queue.popleft())
        return tuple(picked)

    def validation_due(self, step: int) -> bool:
        """Whether validation should run after learner step ``step`` (from 1)."""
        every = self.config.validation_every
        return bool(every) and step > 0 and step % every == 0 and not self.finished

    def validation_tasks(self) -> tuple[CurriculumTask, ...]:
        """The validation episodes, under evaluation conditions and the current stage's prompt."""
        index = min(self._index, len(self.config.stages) - 1)
        stage = self.config.stages[index]
        return tuple(
            CurriculumTask(
                task_id=task_id,
                stage=index + 1,
                stage_name=stage.name,
                reward=RewardKind.PROGRESS,
                episode=replace(
                    stage.episode,
                    feedback=self.config.validation_feedback,
                    max_steps_per_turn=self.config.validation_max_steps_per_turn,
                ),
                constrained=stage.constrained,
            )
            for task_id in self._validation_ids
        )

    # --- results --------------------------------------------------------------------------------

    def record_group(self, outcome: GroupOutcome) -> GroupVerdict:
        """Count a finished training group under the stage it started in; keep or drop it."""
        if not 1 <= outcome.stage <= len(self.config.stages):
            raise CurriculumError(f"group of {outcome.task_id}: no stage {outcome.stage} in this run")
        if not outcome.rewards:
            raise CurriculumError(f"group of {outcome.task_id} has no rewards")
        stage = self.config.stages[outcome.stage - 1]
        state = self._states[outcome.stage - 1]
        state.groups += 1
        zero = outcome.zero_variance
        keep = not (zero and stage.zero_variance == "drop")
        if zero:
            state.zero_variance += 1
        if not keep:
            state.dropped += 1
        self._pending.append(outcome)
        return GroupVerdict(keep=keep, zero_variance=zero)

    def _stage_metrics(self) -> dict[str, float]:
        """``train/*`` over the groups recorded since the last step that belong to the current stage."""
        current = [g for g in self._pending if g.stage == self.stage]
        self._pending = []
        metrics: dict[str, float] = {}
        if not current:
            return metrics
        metrics["train/groups"] = float(len(current))
        metrics["train/zero_variance_share"] = sum(g.zero_variance for g in current) / len(current)
        for key, values in (
            ("train/reward", [r for g in current for r in g.rewards]),
            ("train/progress", [r for g in current for r in g.progress]),
            ("train/format_reward", [r for g in current for r in g.format_rewards]),
            ("train/tool_reward", [r for g in current for r in g.tool_rewards]),
        ):
            if values:
                metrics[key] = statistics.fmean(values)
        return metrics

    def end_step(self, step: int, metrics: Mapping[str, float] | None = None) -> StepSummary:
        """Close learner step ``step``: add the stage's metrics, feed the window, maybe promote.

        ``metrics`` are the step's other metrics (learner, validation); the rule's metric is read
        from them or from the stage's own ``train/*`` metrics, which take precedence.
        """
        if self.finished:
            raise CurriculumFinished("end_step after the curriculum finished")
        stage = self.stage_config
        state = self._states[self._index]
        own = self._stage_metrics()
        merged = {**(metrics or {}), **own}
        state.steps += 1
        rule = stage.promotion
        if rule.metric and rule.metric in merged and math.isfinite(merged[rule.metric]):
            state.window.append(float(merged[rule.metric]))
            if len(state.window) == rule.window:
                state.means.append(statistics.fmean(state.window))
        grad_norm = merged.get(GRAD_NORM_METRIC)
        if grad_norm is not None and math.isfinite(grad_norm) and not merged.get("learner/skipped"):
            state.grad_norms.append(float(grad_norm))
        window_mean = statistics.fmean(state.window) if len(state.window) == rule.window else None
        promotion: Promotion | None = None
        if rule.metric and window_mean is not None and state.steps >= rule.min_steps:
            at_least = rule.comparison == ">="
            if (window_mean >= rule.threshold) if at_least else (window_mean <= rule.threshold):
                detail = (
                    f"{rule.metric} mean {window_mean:.4g} over {rule.window} values "
                    f"{rule.comparison} threshold {rule.threshold:g}"
                )
                promotion = self._promote(step, "threshold", window_mean, detail)
            else:
                plateau = self._plateau(rule, state)
                if plateau is not None:
                    promotion = self._promote(step, "plateau", window_mean, plateau)
        if promotion is None and rule.max_steps and state.steps >= rule.max_steps:
            detail = f"step budget of {rule.max_steps} steps spent"
            if window_mean is not None:
                detail += f" ({rule.metric} mean {window_mean:.4g}, threshold {rule.threshold:g} not reached)"
            promotion = self._promote(step, "budget", window_mean, detail)
        out = {
            **own,
            "curriculum/stage": float(promotion.from_stage if promotion else self.stage),
            "curriculum/steps_in_stage": float(state.steps),
            f"curriculum/zero_variance_groups/{stage.name}": float(state.zero_variance),
            f"curriculum/dropped_groups/{stage.name}": float(state.dropped),
        }
        if window_mean is not None:
            out["curriculum/window_mean"] = window_mean
        cv = _coefficient_of_variation(state.grad_norms)
        if cv is not None:
            out["curriculum/grad_norm_cv"] = cv
        return StepSummary(metrics=out, promotion=promotion)

    @staticmethod
    def _plateau(rule: PromotionConfig, state: _StageState) -> str | None:
        """Why the plateau rule holds now, or None: the last ``plateau_patience`` window means rose no
        more than ``plateau_min_delta`` above the best one before them, and the gradient norm is stable."""
        patience = rule.plateau_patience
        if not patience or len(state.means) <= patience:
            return None
        best_before = max(state.means[:-patience])
        recent_best = max(state.means[-patience:])
        if recent_best > best_before + rule.plateau_min_delta:
            return None
        if len(state.grad_norms) < rule.grad_norm_window:
            return None
        cv = _coefficient_of_variation(state.grad_norms)
        if cv is None or cv > rule.grad_norm_max_cv:
            return None
        return (
            f"{rule.metric} plateaued: best mean of the last {patience} values {recent_best:.4g} is within "
            f"{rule.plateau_min_delta:g} of the best before {best_before:.4g}; {GRAD_NORM_METRIC} stable "
            f"(CV {cv:.3g} <= {rule.grad_norm_max_cv:g} over {len(state.grad_norms)} steps)"
        )

    def _promote(self, step: int, reason: PromotionReason, value: float | None, detail: str) -> Promotion:
        ended = self.config.stages[self._index]
        steps = self._states[self._index].steps
        self._index += 1
        following = None if self.finished else self.config.stages[self._index]
        promotion = Promotion(
            step=step,
            from_stage=self._index,
            from_name=ended.name,
            to_stage=None if following is None else self._index + 1,
            to_name=None if following is None else following.name,
            reason=reason,
            metric=ended.promotion.metric,
            value=value,
            steps_in_stage=steps,
            detail=detail,
        )
        self._promotions.append(promotion)
        log.info("curriculum_promotion", **{k: v for k, v in promotion.to_record().items() if k != "event"})
        return promotion

    # --- introspection and resume ------------------------------------------------------------------

    def statistics(self) -> CurriculumStatistics:
        names = [s.name for s in self.config.stages]
        return CurriculumStatistics(
            stage=self.stage,
            stage_name="finished" if self.finished else self.stage_config.name,
            steps_in_stage=0 if self.finished else self._states[self._index].steps,
            dispatched=self._dispatched,
            zero_variance_groups={n: s.zero_variance for n, s in zip(names, self._states, strict=True)},
            dropped_groups={n: s.dropped for n, s in zip(names, self._states, strict=True)},
            groups={n: s.groups for n, s in zip(names, self._states, strict=True)},
            finished=self.finished,
        )

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: stage, data cursors, windows, counters, promotions."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "stage_names": [s.name for s in self.config.stages],
            "index": self._index,
            "dispatched": self._dispatched,
            "stages": [
                {
                    "epoch": s.epoch,
                    "cursor": s.cursor,
                    "steps": s.steps,
                    "groups": s.groups,
                    "zero_variance": s.zero_variance,
                    "dropped": s.dropped,
                    "window": list(s.window),
                    "means": list(s.means),
                    "grad_norms": list(s.grad_norms),
                }
                for s in self._states
            ],
            "promotions": [p.to_record() for p in self._promotions],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``; the config's stage names must match the saved ones."""
        if state.get("version") not in (1, STATE_VERSION):
            raise CurriculumError(f"curriculum state version {state.get('version')} != {STATE_VERSION}")
        names = [s.name for s in self.config.stages]
        if list(state["stage_names"]) != names:
            raise CurriculumError(f"saved stages {state['stage_names']} differ from the config's {names}")
        if state["seed"] != self.seed:
            raise CurriculumError(f"saved seed {state['seed']} differs from the config's {self.seed}")
        self._index = int(state["index"])
        self._dispatched = int(state["dispatched"])
        for saved, stage, own in zip(state["stages"], self.config.stages, self._states, strict=True):
            own.epoch = int(saved["epoch"])
            own.cursor = int(saved["cursor"])
            own.steps = int(saved["steps"])
            own.groups = int(saved["groups"])
            own.zero_variance = int(saved["zero_variance"])
            own.dropped = int(saved["dropped"])
            own.window = deque((float(v) for v in saved["window"]), maxlen=stage.promotion.window)
            own.means = [float(v) for v in saved.get("means", ())]
            own.grad_norms = deque(
                (float(v) for v in saved.get("grad_norms", ())), maxlen=stage.promotion.grad_norm_window
            )
        self._pending = []
        self._promotions = [
            Promotion(**{k: v for k, v in record.items() if k != "event"}) for record in state["promotions"]
        ]


def _coefficient_of_variation(values: Sequence[float]) -> float | None:
    """std / mean of ``values`` (population std), None with fewer than two or a mean of 0."""
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    if mean <= 0:
        return None
    return statistics.pstdev(values) / mean
