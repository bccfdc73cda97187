"""Finished token-in/token-out trajectories: what rollouts hand to the learner.

A trajectory keeps exactly the ids the engine sampled and the ids appended for environment
messages, with a loss mask, behaviour logprobs and the policy version of every token, and for every
reply sampled under a grammar the constraint it was sampled under (``ConstraintSpan``): the engine's
behaviour logprobs are then those of the masked policy, and the learner replays the same masks. Its
``Transcript`` is the same episode as the environment saw it: the opening messages, and per reply
the decoded text, the environment's verdict, the calls it parsed and ran, and its answer. Turning
that into a chat-format dataset record is the trajectory log's business
(``runtime/recipe/trajectory_log.py``), done only for the episodes it writes.

Why plain tuples of strings and numbers inside ``Reply``: thousands of episodes are in flight and
each keeps its transcript until the learner is done with it. The environment's own records
(``StepResult``, ``Message``, ``CallOutcome``, argument dicts) are a dozen garbage-collected
containers per step; kept alive, every full collection walks them all (the runtime benchmark's GC
time doubled at 10,000 concurrent episodes). Tuples holding only atoms are dropped from the
collector's lists, so a reply costs it one object.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from envtune.agents.engine import Constraint
from envtune.environments.types import Message, StepResult


@dataclass(frozen=True, slots=True)
class ConstraintSpan:
    """One reply sampled under a grammar: tokens ``[start, end)`` of the trajectory."""

    start: int
    """Index of the reply's first token in ``Trajectory.token_ids``."""
    end: int
    """One past its last token."""
    constraint: Constraint
    """What the engine masked each of these tokens with (the same object for every reply that used
    it, so a trajectory holds references, not copies of the grammar text)."""


CALL_FIELDS = ("name", "arguments", "executed", "ok", "result", "hint", "fault")
"""The order of a logged call's fields in ``Reply.calls``."""

LoggedCall = tuple[str, str, bool, bool, str, str | None, str | None]
"""One call as the environment saw and ran it: name, arguments (JSON text), executed (a method
ran), ok (it ran without error), result (BFCL's string form, or the refusal), hint (the actionable
hint in augmented mode, else None), fault (a ``ToolFault`` value when the environment rather than
BFCL's class shaped the result: raised, limit, time_limit..., else None)."""


@dataclass(frozen=True, slots=True)
class Reply:
    """One model reply and the environment's answer to it."""

    text: str
    """The reply as decoded and handed to ``episode.step`` (tags included)."""
    code: int
    """The environment's verdict (a ``StepCode`` value)."""
    turn: int
    """Index of the user turn the reply belonged to."""
    calls: tuple[LoggedCall, ...]
    """The calls the environment parsed from it, in order (empty for answers and format errors)."""
    observation: tuple[tuple[str, str], ...]
    """The environment's answer: ``(role, content)`` of each message appended after the reply."""

    @classmethod
    def of(cls, text: str, result: StepResult) -> Reply:
        """The record of a reply from what ``episode.step`` returned."""
        calls = tuple(
            (
                outcome.call.name,
                json.dumps(outcome.call.arguments, ensure_ascii=False, default=repr),
                outcome.executed,
                outcome.ok,
                outcome.result,
                outcome.hint,
                outcome.fault.value if outcome.fault is not None else None,
            )
            for outcome in result.calls
        )
        observation = tuple((m.role, m.content) for m in result.observation)
        return cls(text, int(result.code), result.turn_index, calls, observation)


@dataclass(frozen=True, slots=True)
class Transcript:
    """An episode's conversation as played."""

    opening: tuple[tuple[str, str], ...]
    """``(role, content)`` of what ``episode.start()`` returned: the system prompt (tool listing) and
    the first user turn."""
    replies: tuple[Reply, ...]
    """Every reply in order, each with the messages that followed it."""

    @classmethod
    def of(cls, opening: tuple[Message, ...], replies: tuple[Reply, ...]) -> Transcript:
        return cls(tuple((m.role, m.content) for m in opening), replies)


@dataclass(frozen=True, slots=True)
class Trajectory:
    """One finished episode, token for token."""

    task_id: str
    """BFCL task id."""
    group_id: str
    """Id shared by the GRPO group (n episodes of the same task started together)."""
    token_ids: tuple[int, ...]
    """prompt + every sampled and appended token, in order (never re-tokenized)."""
    loss_mask: tuple[bool, ...]
    """True for tokens the model sampled (trained on); False for prompt and environment tokens."""
    behavior_logprobs: tuple[float, ...]
    """Engine logprob of each token under the policy that sampled it (0.0 where loss_mask is False)."""
    policy_versions: tuple[int, ...]
    """Policy version that sampled each token (-1 where loss_mask is False)."""
    reward: float
    """The scalar reward the stage trains on (progress, or the stage-1 syntax reward)."""
    progress: float
    """R_P of the episode (logged in every stage)."""
    format_reward: float
    """R_format of the episode."""
    tool_reward: float
    """R_tool of the episode."""
    turn_passed: tuple[bool, ...]
    """Per-turn verdicts (all turns of the task)."""
    step_codes: tuple[int, ...]
    """Per-step codes (docs/method.md §3.1)."""
    stage: int
    """Curriculum stage the episode started in (1-4; 0 outside a curriculum)."""
    start_version: int
    """Policy version when the group was dispatched (the staleness bound counts from it)."""
    truncated: bool = False
    """True when the episode hit a length cap before its last turn."""
    constraint_spans: tuple[ConstraintSpan, ...] = ()
    """The replies sampled under a grammar, in order (empty: every reply was sampled unconstrained).
    Each span covers exactly one reply, all of whose tokens are sampled (loss) tokens."""
    transcript: Transcript | None = None
    """The conversation as played (both episode loops record it; None for hand-built trajectories)."""

    def __post_init__(self) -> None:
        n = len(self.token_ids)
        if not (len(self.loss_mask) == len(self.behavior_logprobs) == len(self.policy_versions) == n):
            raise ValueError(
                "trajectory fields disagree in length: "
                f"ids={n} mask={len(self.loss_mask)} logprobs={len(self.behavior_logprobs)} "
                f"versions={len(self.policy_versions)}"
            )
        previous_end = 0
        for span in self.constraint_spans:
            if not previous_end <= span.start < span.end <= n:
                raise ValueError(
                    f"constraint span [{span.start}, {span.end}) is empty, out of order or outside "
                    f"the {n} tokens"
                )
            if not all(self.loss_mask[span.start : span.end]):
                raise ValueError(f"constraint span [{span.start}, {span.end}) covers non-sampled tokens")
            previous_end = span.end

    @property
    def num_model_tokens(self) -> int:
        return sum(self.loss_mask)

    @property
    def constrained(self) -> bool:
        """Some reply was sampled under a grammar."""
        return bool(self.constraint_spans)

    @property
    def min_policy_version(self) -> int:
        """Oldest policy version among sampled tokens (start_version when none was sampled)."""
        versions = [v for v, m in zip(self.policy_versions, self.loss_mask, strict=True) if m]
        return min(versions, default=self.start_version)
