"""Finished episodes as a dataset: one JSON line per episode, with a documented schema.

Every finished episode that reaches the learner (or a sample of them: all, a fraction, or N per
learner step) becomes one record of ``trajectories.jsonl`` that another trainer, an SFT script or
an analysis notebook can load directly, e.g. with
``datasets.load_dataset("json", data_files="runs/X/trajectories.jsonl")``. Every record has every
field of ``FIELDS`` (null where not applicable) and tool-call arguments are JSON *text*, so the
columns have one Arrow type across all tasks (arguments differ per function and would not).

Episodes of discarded groups (zero variance, stale, run ending) are logged too, with the reason in
``drop_reason``: they are rollouts like any other, and often the ones worth reading.

The episode loop records a ``Transcript`` (``agents/trajectory.py``: the opening messages, each
reply's text and the environment's ``StepResult``); the chat-format messages and the flat call list
are built here, only for the records actually written.

Left out: token ids and logprobs (the learner's business; large), parquet (``datasets`` converts).
"""

from __future__ import annotations

import enum
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envtune.agents.trajectory import CALL_FIELDS, Trajectory, Transcript

SCHEMA_VERSION = 1
"""Bumped when a field changes meaning or type."""

FIELDS: Mapping[str, str] = {
    "schema_version": f"{SCHEMA_VERSION}",
    "step": "learner steps completed when the record was written: the step that trained the episode, "
    "or for a discarded group the step after which it was discarded",
    "task_id": "BFCL task id, e.g. `multi_turn_base_12`",
    "category": "BFCL category (`base`, `miss_func`, `miss_param`, `long_context`)",
    "stage": "curriculum stage the episode started in (1-4; 0 outside a curriculum)",
    "group_id": "id shared by the GRPO group",
    "drop_reason": "null when the group went into a learner step, else why it was discarded "
    "(`zero_variance`, `stale`, `not_trained`, `run_ending`, ...)",
    "start_version": "policy version when the group was dispatched",
    "policy_versions": "sorted distinct policy versions that sampled its tokens",
    "reward": "the scalar the stage trained on",
    "progress": "R_P: passed turns / turns of the task",
    "format_reward": "R_format: share of steps that were well-formed",
    "tool_reward": "R_tool: share of tool steps whose calls all ran without error",
    "turn_passed": "per-turn verdicts (all turns of the task; unreached turns false)",
    "step_codes": "per-step codes (-3 format error, -2 tool error, -1 tool ok, 0 turn fail, 1 turn pass)",
    "prompt_tokens": "tokens of the opening prompt (system + first user message)",
    "completion_tokens": "tokens the model sampled (trained on)",
    "total_tokens": "all tokens of the episode (prompt, replies, environment messages)",
    "truncated": "the episode hit a length cap before its last turn",
    "messages": "the conversation, `{role, content, tool_calls, step_code}` each: an assistant "
    "message's content is the reply exactly as decoded, its tool_calls the calls the environment "
    "parsed from it in OpenAI's shape (`{id, type: function, function: {name, arguments: JSON "
    "text}}`; null for answers and format errors) and step_code the environment's verdict on it; "
    "other roles have null tool_calls and step_code. The system message (the tool listing) is left "
    "out when `run.trajectories.include_system = false`",
    "tool_calls": "every call, flat: `{turn, step, name, arguments (JSON text), executed, ok, result, hint, "
    "fault}` (fault: why the environment shaped the result, e.g. `limit`, `time_limit`; else null)",
}
"""Every field of a record and its meaning (the README's table is checked against this)."""


def _message(role: str, content: str) -> dict[str, Any]:
    return {"role": role, "content": content, "tool_calls": None, "step_code": None}


def transcript_messages(transcript: Transcript, *, include_system: bool = True) -> list[dict[str, Any]]:
    """The conversation in the schema's message shape (see ``FIELDS["messages"]``)."""
    messages = [_message(r, c) for r, c in transcript.opening if include_system or r != "system"]
    for step, reply in enumerate(transcript.replies):
        calls = [
            {
                "id": f"call_{step}_{position}",
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
            for position, (name, arguments, *_) in enumerate(reply.calls)
        ]
        messages.append(
            {"role": "assistant", "content": reply.text, "tool_calls": calls or None, "step_code": reply.code}
        )
        messages.extend(_message(r, c) for r, c in reply.observation)
    return messages


def transcript_calls(transcript: Transcript) -> list[dict[str, Any]]:
    """Every call of the episode, flat (see ``FIELDS["tool_calls"]``)."""
    return [
        {"turn": reply.turn, "step": step, **dict(zip(CALL_FIELDS, call, strict=True))}
        for step, reply in enumerate(transcript.replies)
        for call in reply.calls
    ]


@dataclass(frozen=True, slots=True)
class EpisodeRecord:
    """A finished episode waiting to be logged: the trajectory, its category, its group's fate."""

    trajectory: Trajectory
    """The episode (its transcript, scores and token counts are read when written)."""
    category: str
    """BFCL category of its task."""
    drop_reason: str | None = None
    """None when its group was trained on; else the ``DropReason`` value."""

    def to_json(self, step: int, *, include_system: bool = True) -> dict[str, Any]:
        """The record as written (the keys of ``FIELDS``, in that order)."""
        t = self.trajectory
        mask = t.loss_mask
        first = mask.index(True) if True in mask else len(mask)
        versions = sorted({v for v, m in zip(t.policy_versions, mask, strict=True) if m})
        transcript = t.transcript
        return {
            "schema_version": SCHEMA_VERSION,
            "step": step,
            "task_id": t.task_id,
            "category": self.category,
            "stage": t.stage,
            "group_id": t.group_id,
            "drop_reason": self.drop_reason,
            "start_version": t.start_version,
            "policy_versions": versions,
            "reward": float(t.reward),
            "progress": float(t.progress),
            "format_reward": float(t.format_reward),
            "tool_reward": float(t.tool_reward),
            "turn_passed": list(t.turn_passed),
            "step_codes": list(t.step_codes),
            "prompt_tokens": first,
            "completion_tokens": sum(mask),
            "total_tokens": len(mask),
            "truncated": t.truncated,
            "messages": (
                transcript_messages(transcript, include_system=include_system) if transcript else []
            ),
            "tool_calls": transcript_calls(transcript) if transcript else [],
        }


class SampleMode(enum.StrEnum):
    """Which finished episodes are logged."""

    ALL = "all"
    """Every episode."""
    FRACTION = "fraction"
    """Each episode with probability ``fraction`` (seeded by the run's seed and the step, so a resumed
    run logs the same ones)."""
    PER_STEP = "per_step"
    """The first ``per_step`` episodes of each learner step."""
    NONE = "none"
    """Nothing."""


@dataclass(frozen=True, slots=True)
class TrajectorySampling:
    """Which finished episodes go to ``trajectories.jsonl`` (config keys ``run.trajectories.*``)."""

    mode: SampleMode = SampleMode.ALL
    """``all``, ``fraction`` (each with probability ``fraction``), ``per_step`` (the first
    ``per_step`` of each learner step) or ``none``."""
    fraction: float = 1.0
    """For ``fraction``: the probability of logging an episode, in (0, 1]."""
    per_step: int = 8
    """For ``per_step``: episodes logged per learner step (>= 1)."""
    include_system: bool = True
    """Keep the system message (the tool listing: several KB per episode) in ``messages``."""

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError(f"trajectory sampling fraction must be in (0, 1], got {self.fraction}")
        if self.per_step < 1:
            raise ValueError(f"trajectory sampling per_step must be >= 1, got {self.per_step}")

    def select(self, step: int, count: int, seed: int = 0) -> list[int]:
        """Indices (of ``count`` episodes logged after learner step ``step``) to write."""
        match self.mode:
            case SampleMode.ALL:
                return list(range(count))
            case SampleMode.NONE:
                return []
            case SampleMode.PER_STEP:
                return list(range(min(count, self.per_step)))
            case SampleMode.FRACTION:
                rng = random.Random(f"{seed}:{step}")  # str seeds hash deterministically
                return [i for i in range(count) if rng.random() < self.fraction]
        raise AssertionError(self.mode)


class TrajectoryLog:
    """Appends sampled episode records to a JSONL file (one write per learner step)."""

    def __init__(self, path: Path, sampling: TrajectorySampling | None = None, *, seed: int = 0) -> None:
        self.path = Path(path)
        self.sampling = sampling or TrajectorySampling()
        self.seed = seed
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.written = 0
        """Records written so far."""

    def write_step(self, step: int, records: Sequence[EpisodeRecord]) -> int:
        """Log the sampled subset of the episodes finished by learner step ``step``; returns how many."""
        chosen = self.sampling.select(step, len(records), self.seed)
        if not chosen:
            return 0
        include = self.sampling.include_system
        lines = "".join(
            json.dumps(records[i].to_json(step, include_system=include), ensure_ascii=False) + "\n"
            for i in chosen
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
