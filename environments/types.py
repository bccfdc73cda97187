"""Plain records that cross the boundary of ``envtune.environments``.

Everything another package needs from an environment travels in these frozen dataclasses: the
messages an episode emits, the result of one model step, the final score. No dicts of dicts.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message, as the environment emits it (agents render it with a chat template)."""

    role: Role
    """``system`` (protocol and tools), ``user`` (a user turn or a protocol notice), ``tool``
    (feedback after a tool step), ``assistant`` (the model's own text)."""
    content: str
    """The message text, already rendered (a tool message is one JSON object; each result inside it
    is BFCL's own result string, so a dict result appears as escaped JSON text)."""


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A parsed call: a function name and keyword arguments built from literals only."""

    name: str
    """Function name as the model wrote it (not yet checked against the visible tools)."""
    arguments: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments; values are JSON-like literals (str, int, float, bool, None, list, dict)."""


@dataclass(frozen=True, slots=True)
class FunctionDoc:
    """One tool's documentation, as BFCL ships it in ``multi_turn_func_doc``."""

    name: str
    """The method name on its class (unique across BFCL's classes)."""
    class_name: str
    """The BFCL class that owns the method, e.g. ``GorillaFileSystem``."""
    description: str
    """BFCL's description text."""
    parameters: dict[str, Any]
    """BFCL's parameter schema (``type: dict`` with ``properties`` and ``required``)."""

    def to_json(self) -> dict[str, Any]:
        """The doc as shown to the model (name, description, parameters)."""
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


class FeedbackMode(enum.StrEnum):
    """What the environment says after a tool step."""

    STANDARD = "standard"
    """Exactly what BFCL's classes return (the evaluation condition)."""
    AUGMENTED = "augmented"
    """BFCL's results plus actionable hints layered over them (never an edit of the classes)."""


class PromptStyle(enum.StrEnum):
    """Which system prompt (docs/method.md §4.1) an episode uses."""

    BASIC = "basic"
    """Stages 1-2: the two output formats and when to use each."""
    RESOURCEFUL = "resourceful"
    """Stages 3-4: adds 'be resourceful' and 'prioritize clarity over assumptions'."""


class ToolListing(enum.StrEnum):
    """How the system prompt lists the visible tools."""

    FULL = "full"
    """BFCL's docs as JSON, one line per tool: descriptions and parameter schemas (the paper)."""
    SIGNATURES = "signatures"
    """One ``name(arg: type, optional?: type)`` line per tool, about a tenth of the tokens: for small
    models on small budgets, where BFCL's descriptions cost most of the context and teach nothing."""


class RewardKind(enum.StrEnum):
    """Which ``EpisodeScore`` field is the scalar a stage trains on."""

    PROGRESS = "progress"
    """R_P: passed turns over all turns of the task (stages 2-4)."""
    STAGE1 = "stage1"
    """I_tool * (R_format + R_tool), the syntax reward of stage 1 (docs/method.md §3.2)."""


class StepCode(enum.IntEnum):
    """Per-step integer codes, the values of docs/method.md §3.1."""

    FORMAT_ERROR = -3
    """The reply broke the output format; the turn continues (a call to an unknown or hidden
    function is a refused call, ``TOOL_ERROR``)."""
    TOOL_ERROR = -2
    """A tool step in which at least one call failed (exception, error dict, or invalid call)."""
    TOOL_OK = -1
    """A tool step in which every call succeeded; the turn continues."""
    TURN_FAIL = 0
    """The turn ended and did not pass."""
    TURN_PASS = 1
    """The turn ended and passed."""


class ToolFault(enum.StrEnum):
    """Why the environment, rather than BFCL's class, shaped a call's result (see ``limits.py``)."""

    RAISED = "raised"
    """The method raised; the result is BFCL's ``Error during execution: ...`` text."""
    LIMIT = "limit"
    """Refused before running: an argument would make the method work without bound."""
    TIME_LIMIT = "time_limit"
    """Interrupted at, or not started after, the step's time limit."""
    UNSERIALISABLE = "unserialisable"
    """The method returned a value that has no string form (or one that is not valid UTF-8)."""
    TRUNCATED = "truncated"
    """The result string was cut to ``limits.MAX_RESULT_CHARS`` for the observation."""


@dataclass(frozen=True, slots=True)
class CallOutcome:
    """What happened to one call of a tool step."""

    call: ToolCall
    """The call as parsed."""
    executed: bool
    """True when a method of the episode's instances actually ran."""
    ok: bool
    """True when it ran and returned no error (no exception, no ``{"error": ...}`` result)."""
    result: str
    """BFCL's string form of the result: the str, ``json.dumps`` of a dict, ``str`` otherwise, or
    ``"Error during execution: ..."`` for an exception or a call refused before execution."""
    hint: str | None = None
    """The actionable hint added in augmented mode (None in standard mode or when none applies)."""
    fault: ToolFault | None = None
    """Set when the call raised, was refused by a bound, timed out, or its result had to be rendered
    or cut by the environment; None for a call BFCL's class answered normally (or a schema refusal)."""


@dataclass(frozen=True, slots=True)
class StepResult:
    """The environment's answer to one model reply."""

    code: StepCode
    """The step code (docs/method.md §3.1)."""
    observation: tuple[Message, ...]
    """Messages to append after the model's reply: feedback, notices, the next user turn."""
    turn_ended: bool
    """True when this reply closed the current user turn (answer, forced end)."""
    done: bool
    """True when the episode is over (last turn closed); no further ``step`` is accepted."""
    turn_index: int
    """Index of the user turn this reply belonged to."""
    calls: tuple[CallOutcome, ...] = ()
    """Per-call outcomes of a tool step (empty for answers and format errors)."""
    tools_changed: bool = False
    """True when the visible tools changed (a missed function was revealed)."""
    error: str | None = None
    """The format or protocol error shown to the model, when there was one."""
    tool_seconds: float = 0.0
    """Wall time spent running this step's calls (with their hints); the calls alone are held to
    ``EpisodeConfig.step_time_limit_s``."""


@dataclass(frozen=True, slots=True)
class EpisodeScore:
    """Rewards of a whole episode, as docs/method.md §3 defines them (with the fixes of §8)."""

    turn_passed: tuple[bool, ...]
    """Pass/fail of every user turn of the task; unreached turns are False."""
    progress: float
    """R_P = passed turns / all turns of the task."""
    format_reward: float
    """R_format = (N - C_format) / N over the N steps of the episode (0 when N = 0)."""
    tool_reward: float
    """R_tool = C_correct / (C_correct + C_error) over tool steps (0 when there were none)."""
    stage1_reward: float
    """I_tool * (R_format + R_tool), in [0, 2]."""
    step_codes: tuple[int, ...]
    """Every step's code, in order (values of ``StepCode``)."""
    turns_reached: int
    """How many user turns were started (the rest count 0 in ``progress``)."""

    @property
    def all_passed(self) -> bool:
        """BFCL's verdict for the whole task: every turn passed."""
        return all(self.turn_passed)

    def reward(self, kind: RewardKind) -> float:
        """The scalar a stage trains on."""
        return self.stage1_reward if kind is RewardKind.STAGE1 else self.progress
