"""Finished episodes as a dataset: one JSON line per episode, with a documented schema.

``trajectories.jsonl`` used to hold one or two decoded strings per sampled step. Here every finished
episode (or a sample: all, a fraction, or N per learner step) becomes one record that another
trainer, an SFT script or an analysis notebook can load directly, e.g. with
``datasets.load_dataset("json", data_files="runs/X/trajectories.jsonl")``. Every record has every
field (null where not applicable) and tool-call arguments are JSON *text*, so the columns have one
Arrow type across all tasks (arguments differ per function and would not).

Schema (``SCHEMA_VERSION`` 1), one object per episode:

==================  =========================================================================
field               meaning
==================  =========================================================================
schema_version      1
step                learner step after which the episode was logged
task_id             BFCL task id, e.g. ``multi_turn_base_12``
category            BFCL category (``base``, ``miss_func``, ``miss_param``, ``long_context``)
stage               curriculum stage the episode started in (1-4; 0 outside a curriculum)
group_id            id shared by the GRPO group
start_version       policy version when the group was dispatched
policy_versions     sorted distinct policy versions that sampled its tokens
reward              the scalar the stage trained on
progress            R_P: passed turns / turns of the task
format_reward       R_format
tool_reward         R_tool
turn_passed         per-turn verdicts (all turns of the task; unreached turns false)
step_codes          per-step codes (-3 format error, -2 tool error, -1 tool ok, 0 turn fail, 1 pass)
prompt_tokens       tokens of the opening prompt (system + first user message)
completion_tokens   tokens the model sampled (trained on)
total_tokens        all tokens of the episode (prompt, replies, environment messages)
truncated           the episode hit a length cap before its last turn
messages            the conversation: ``{"role", "content", "tool_calls", "step_code"}``; an
                    assistant message's content is the reply exactly as decoded, its tool_calls the
                    calls the environment parsed from it (OpenAI shape: ``{"id", "type":
                    "function", "function": {"name", "arguments": JSON text}}``; null for answers and
                    format errors) and step_code the environment's verdict on it; other roles have
                    null tool_calls and step_code. The system message (tool listing) is included
                    unless the log was opened with ``include_system=False`` (then it is omitted).
tool_calls          every call, flat: ``{"turn", "step", "name", "arguments" (JSON text),
                    "executed", "ok", "result", "hint"}``
==================  =========================================================================

What the episode loop must record for it (the current ``Trajectory`` has token ids and scores
only): the opening messages, and for each reply its decoded text and the environment's
``StepResult`` -- ``EpisodeTranscript`` is that recorder -- plus the task's category.

Left out: token ids and logprobs (the learner's business; large), parquet (``datasets`` converts).
"""

from __future__ import annotations

import enum
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from envtune.environments.types import Message, StepResult

SCHEMA_VERSION = 1
"""Bumped when a field changes meaning or type."""


@dataclass(frozen=True, slots=True)
class LoggedCall:
    """One tool call of an episode, as the environment saw and ran it."""

    turn: int
    """User turn it belonged to."""
    step: int
    """Index of the reply (0-based, across the episode) that made it."""
    name: str
    """Function name as written."""
    arguments: str
    """Arguments as JSON text."""
    executed: bool
    """A method actually ran."""
    ok: bool
    """It ran without error."""
    result: str
    """BFCL's string form of the result (or the refusal)."""
    hint: str | None
    """The actionable hint, in augmented mode."""


@dataclass(frozen=True, slots=True)
class Transcript:
    """An episode's conversation and calls, frozen when the episode ends."""

    messages: tuple[dict[str, Any], ...]
    """Messages in the schema's shape (see the module docstring)."""
    tool_calls: tuple[LoggedCall, ...]
    """Every call, in order."""


@dataclass(slots=True)
class EpisodeTranscript:
    """Records an episode as it is played: ``opening(messages)``, then ``reply(text, result)`` per step.

    Cheap: it keeps references to strings the loop has anyway; nothing is decoded twice.
    """

    messages: list[dict[str, Any]] = field(default_factory=list)
    calls: list[LoggedCall] = field(default_factory=list)
    steps: int = 0

    def opening(self, messages: Sequence[Message]) -> None:
        """The messages ``Episode.start()`` returned."""
        self.messages.extend(_plain(m) for m in messages)

    def reply(self, text: str, result: StepResult) -> None:
        """One model reply (decoded) and the environment's answer to it."""
        tool_calls = None
        if result.calls:
            tool_calls = []
            for position, outcome in enumerate(result.calls):
                arguments = json.dumps(outcome.call.arguments, ensure_ascii=False)
                tool_calls.append(
                    {
                        "id": f"call_{self.steps}_{position}",
                        "type": "function",
                        "function": {"name": outcome.call.name, "arguments": arguments},
                    }
                )
                self.calls.append(
                    LoggedCall(
                        turn=result.turn_index,
                        step=self.steps,
                        name=outcome.call.name,
                        arguments=arguments,
                        executed=outcome.executed,
                        ok=outcome.ok,
                        result=outcome.result,
                        hint=outcome.hint,
                    )
                )
        self.messages.append(
            {"role": "assistant", "content": text, "tool_calls": tool_calls, "step_code": int(result.code)}
        )
        self.messages.extend(_plain(m) for m in result.observation)
        self.steps += 1

    def freeze(self) -> Transcript:
        """The finished transcript."""
        return Transcript(messages=tuple(self.messages), tool_calls=tuple(self.calls))


def _plain(message: Message) -> dict[str, Any]:
    return {"role": message.role, "content": message.content, "tool_calls": None, "step_code": None}


@dataclass(frozen=True, slots=True)
class EpisodeRecord:
    """One line of ``trajectories.jsonl`` (fields as in the module docstring)."""

    step: int
    task_id: str
    category: str
    stage: int
    group_id: str
    start_version: int
    policy_versions: tuple[int, ...]
    reward: float
    progress: float
    format_reward: float
    tool_reward: float
    turn_passed: tuple[bool, ...]
    step_codes: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    truncated: bool
    transcript: Transcript

    @classmethod
    def from_trajectory(
        cls, trajectory: Any, transcript: Transcript, *, category: str, step: int
    ) -> EpisodeRecord:
        """Build from an ``agents.trajectory.Trajectory`` (duck-typed: its fields are read by name)."""
        mask = trajectory.loss_mask
        first = mask.index(True) if True in mask else len(mask)
        versions = sorted({v for v, m in zip(trajectory.policy_versions, mask, strict=True) if m})
        return cls(
            step=step,
            task_id=trajectory.task_id,
            category=category,
            stage=trajectory.stage,
            group_id=trajectory.group_id,
            start_version=trajectory.start_version,
            policy_versions=tuple(versions),
            reward=trajectory.reward,
            progress=trajectory.progress,
            format_reward=trajectory.format_reward,
            tool_reward=trajectory.tool_reward,
            turn_passed=tuple(trajectory.turn_passed),
            step_codes=tuple(trajectory.step_codes),
            prompt_tokens=first,
            completion_tokens=sum(mask),
            total_tokens=len(mask),
            truncated=trajectory.truncated,
            transcript=transcript,
        )

    def to_json(self, *, include_system: bool = True) -> dict[str, Any]:
        """The record as written (see the schema)."""
        messages = [m for m in self.transcript.messages if include_system or m["role"] != "system"]
        return {
            "schema_version": SCHEMA_VERSION,
            "step": self.step,
            "task_id": self.task_id,
            "category": self.category,
            "stage": self.stage,
            "group_id": self.group_id,
            "start_version": self.start_version,
            "policy_versions": list(self.policy_versions),
            "reward": float(self.reward),
            "progress": float(self.progress),
            "format_reward": float(self.format_reward),
            "tool_reward": float(self.tool_reward),
            "turn_passed": list(self.turn_passed),
            "step_codes": list(self.step_codes),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "truncated": self.truncated,
            "messages": messages,
            "tool_calls": [
                {
                    "turn": c.turn,
                    "step": c.step,
                    "name": c.name,
                    "arguments": c.arguments,
                    "executed": c.executed,
                    "ok": c.ok,
                    "result": c.result,
                    "hint": c.hint,
                }
                for c in self.transcript.tool_calls
            ],
        }


class SampleMode(enum.StrEnum):
    """Which finished episodes are logged."""

    ALL = "all"
    """Every episode."""
    FRACTION = "fraction"
    """Each episode with probability ``fraction`` (seeded, so a resumed run logs the same ones)."""
    PER_STEP = "per_step"
    """The first ``per_step`` episodes of each learner step."""
    NONE = "none"
    """Nothing."""


@dataclass(frozen=True, slots=True)
class TrajectorySampling:
    """The trajectory log's sampling (config keys ``run.trajectories.*``)."""

    mode: SampleMode = SampleMode.ALL
    """Which episodes are logged."""
    fraction: float = 1.0
    """For ``fraction``: the probability of logging an episode, in (0, 1]."""
    per_step: int = 8
    """For ``per_step``: episodes logged per learner step (>= 1)."""
    seed: int = 0
    """Seed of the ``fraction`` draw (combined with the step)."""
    include_system: bool = True
    """Keep the system message (the tool listing: several KB per episode) in ``messages``."""

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError(f"trajectory sampling fraction must be in (0, 1], got {self.fraction}")
        if self.per_step < 1:
            raise ValueError(f"trajectory sampling per_step must be >= 1, got {self.per_step}")

    def select(self, step: int, count: int) -> list[int]:
        """Indices (of ``count`` episodes finished in learner step ``step``) to log."""
        match self.mode:
            case SampleMode.ALL:
                return list(range(count))
            case SampleMode.NONE:
                return []
            case SampleMode.PER_STEP:
                return list(range(min(count, self.per_step)))
            case SampleMode.FRACTION:
                rng = random.Random(f"{self.seed}:{step}")  # str seeds hash deterministically
                return [i for i in range(count) if rng.random() < self.fraction]
        raise AssertionError(self.mode)


class TrajectoryLog:
    """Appends sampled episode records to a JSONL file (one flush per learner step)."""

    def __init__(self, path: Path, sampling: TrajectorySampling | None = None) -> None:
        self.path = Path(path)
        self.sampling = sampling or TrajectorySampling()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.written = 0
        """Records written so far."""

    def write_step(self, step: int, records: Sequence[EpisodeRecord]) -> int:
        """Log the sampled subset of a learner step's episodes; returns how many were written."""
        chosen = self.sampling.select(step, len(records))
        if not chosen:
            return 0
        include = self.sampling.include_system
        lines = "".join(
            json.dumps(records[i].to_json(include_system=include), ensure_ascii=False) + "\n" for i in chosen
        )
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(lines)
        self.written += len(chosen)
        return len(chosen)


def read_records(path: Path) -> list[Mapping[str, Any]]:
    """The records of a trajectory log (a line torn by a crash is skipped)."""
    records = []
    with Path(path).open(encoding="utf-8") as handle:
        for line in handle:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records
