"""One BFCL multi-turn episode: the protocol of docs/method.md §4, scored turn by turn.

An ``Episode`` owns its tool instances, walks the task's user turns, executes the model's calls on
its own instances through a whitelist, answers with standard or augmented feedback, and scores
each turn against the cached ground-truth trace when it closes. ``BfclEnvironment`` builds episodes
and holds the per-task ground-truth cache. Nothing here is shared between two episodes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass

import structlog
from envtune.environments import protocol
from envtune.environments.deadline import Watchdog
from envtune.environments.feedback import augment_result
from envtune.environments.ground_truth import GroundTruthCache, GroundTruthTrace
from envtune.environments.instances import ERROR_PREFIX, Dispatcher, build_instances
from envtune.environments.limits import MAX_RESULT_CHARS, MAX_STEP_RESULT_CHARS, fit_step_results
from envtune.environments.schemas import validate_call
from envtune.environments.scoring import TurnScorer
from envtune.environments.tasks import (
    Task,
    load_function_docs,
    load_tasks,
    visible_docs,
    visible_function_classes,
)
from envtune.environments.tool_calls import FormatError, ParsedReply, parse_reply
from envtune.environments.types import (
    CallOutcome,
    EpisodeScore,
    FeedbackMode,
    FunctionDoc,
    Message,
    PromptStyle,
    StepCode,
    StepResult,
    ToolCall,
    ToolFault,
    ToolListing,
)

TRAIN_MAX_STEPS_PER_TURN = 6
"""Paper/official code: a turn is force-ended after more than 5 attempts, i.e. 6 steps."""
EVAL_MAX_STEPS_PER_TURN = 20
"""BFCL's own inference limit per user turn."""
DEFAULT_STEP_TIME_LIMIT_S = 2.0
"""Wall time one step's tool calls may take; ground truth's slowest call takes about 3 ms."""

_CALLS_THAT_ALWAYS_FIT = MAX_STEP_RESULT_CHARS // (MAX_RESULT_CHARS + 64)
"""A step with at most this many calls fits the feedback budget whatever they return (each result is
already cut to ``MAX_RESULT_CHARS`` plus a short note)."""

_log = structlog.get_logger(__name__)


class EpisodeStateError(RuntimeError):
    """The episode was driven out of order (step before start, step after done)."""


@dataclass(frozen=True, slots=True)
class EpisodeConfig:
    """How an episode talks to the model."""

    feedback: FeedbackMode = FeedbackMode.AUGMENTED
    """Standard BFCL results, or results with actionable hints."""
    prompt_style: PromptStyle = PromptStyle.BASIC
    """System prompt of stages 1-2 (basic) or 3-4 (resourceful)."""
    tool_listing: ToolListing = ToolListing.FULL
    """How the system prompt lists the tools: BFCL's JSON docs (the paper) or one-line signatures."""
    max_steps_per_turn: int = TRAIN_MAX_STEPS_PER_TURN
    """Model replies allowed per user turn (tool steps and format errors share it)."""
    require_think: bool = True
    """Whether a reply must open with a <think> block (paper format)."""
    step_time_limit_s: float | None = DEFAULT_STEP_TIME_LIMIT_S
    """Wall time a step's calls may take: a call still running then is stopped and later calls of the
    step are not started (each becomes an error result). None: no limit (only argument bounds).
    The hints of augmented feedback are not interrupted (their inputs are bounded instead)."""

    def __post_init__(self) -> None:
        if self.max_steps_per_turn < 1:
            raise ValueError(f"max_steps_per_turn must be >= 1, got {self.max_steps_per_turn}")
        limit = self.step_time_limit_s
        if limit is not None and not (isinstance(limit, int | float) and 0 < limit < float("inf")):
            raise ValueError(f"step_time_limit_s must be a positive number of seconds or None, got {limit}")


class Episode:
    """One task, one model, one pass through its user turns."""

    def __init__(
        self, task: Task, config: EpisodeConfig, trace: GroundTruthTrace, watchdog: Watchdog | None = None
    ) -> None:
        """``watchdog`` stops a tool call at the step's time limit; without one the limit is only
        checked between calls."""
        if trace.task_id != task.id:
            raise ValueError(f"trace of {trace.task_id} given for task {task.id}")
        self.task = task
        self.config = config
        self._trace = trace
        self._instances = build_instances(task)
        # Shared, read-only maps from the cache; an episode copies them only when it reveals a function.
        hidden = task.hidden_functions(0)
        self._visible: Mapping[str, FunctionDoc] = visible_docs(task.involved_classes, hidden)
        self._watchdog = watchdog
        self._dispatcher = Dispatcher(
            self._instances, visible_function_classes(task.involved_classes, hidden), watchdog
        )
        self._scorer = TurnScorer(trace, self._instances)
        self._turn = -1
        self._steps_in_turn = 0
        self._calls_in_turn = 0
        self._turn_passed: list[bool] = [False] * task.num_turns
        self._step_codes: list[int] = []
        self._done = False

    # --- public API -------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._done

    @property
    def turn_index(self) -> int:
        """Index of the current user turn (-1 before ``start``)."""
        return self._turn

    def visible_tools(self) -> tuple[FunctionDoc, ...]:
        """The functions the model may call now."""
        return tuple(self._visible.values())

    def start(self) -> tuple[Message, ...]:
        """The system prompt and the first user turn."""
        if self._turn != -1:
            raise EpisodeStateError("episode already started")
        config = self.config
        system = Message(
            "system", protocol.system_prompt(config.prompt_style, self.visible_tools(), config.tool_listing)
        )
        user_text, _ = self._open_turn(0, notices=())
        return (system, Message("user", user_text))

    def step(self, reply: str | bytes) -> StepResult:
        """Consume one model reply (envtune's text format) and answer it."""
        self._check_steppable()
        try:
            parsed = parse_reply(reply, require_think=self.config.require_think)
        except FormatError as exc:
            return self.step_parsed(exc)
        return self.step_parsed(parsed)

    def step_parsed(self, reply: ParsedReply | FormatError) -> StepResult:
        """Answer one reply that ``tool_calls`` already parsed (or refused with a ``FormatError``).

        ``step`` is this after ``parse_reply``; ``environments/api.py`` comes here with structured
        (OpenAI-style) calls checked by the same parser, so both paths validate and run alike.
        """
        self._check_steppable()
        self._steps_in_turn += 1
        turn = self._turn
        if isinstance(reply, FormatError):
            return self._after_format_error(turn, str(reply))
        if reply.kind == "answer":
            return self._close_turn(turn, called_on_empty_turn=False, forced=False, extra=())
        return self._after_tool_call(turn, reply)

    def _check_steppable(self) -> None:
        if self._turn == -1:
            raise EpisodeStateError("call start() before step()")
        if self._done:
            raise EpisodeStateError("episode is done; no further step is accepted")

    def score(self) -> EpisodeScore:
        """Rewards so far (final once ``done``); unreached turns count 0."""
        codes = self._step_codes
        steps = len(codes)
        format_errors = codes.count(StepCode.FORMAT_ERROR)
        correct = codes.count(StepCode.TOOL_OK)
        errors = codes.count(StepCode.TOOL_ERROR)
        format_reward = (steps - format_errors) / steps if steps else 0.0
        tool_reward = correct / (correct + errors) if correct + errors else 0.0
        used_tools = 1.0 if correct + errors else 0.0
        passed = tuple(self._turn_passed)
        return EpisodeScore(
            turn_passed=passed,
            progress=sum(passed) / len(passed) if passed else 0.0,
            format_reward=format_reward,
            tool_reward=tool_reward,
            stage1_reward=used_tools * (format_reward + tool_reward),
            step_codes=tuple(int(c) for c in codes),
            turns_reached=self._turn + 1,
        )

    def close(self) -> None:
        """Drop the instances (episodes are single-use)."""
        self._instances = {}
        self._done = True

    # --- turn mechanics ---------------------------------------------------------------------

    def _open_turn(self, turn: int, notices: tuple[str, ...]) -> tuple[str, bool]:
        """Start user turn ``turn``; returns the user message text and whether tools changed."""
        self._turn = turn
        self._steps_in_turn = 0
        self._calls_in_turn = 0
        parts = list(notices)
        revealed = self._reveal(turn)
        if revealed:
            parts.append(protocol.revealed_functions_message(revealed, self.config.tool_listing))
        parts.extend(self.task.questions[turn])
        return "\n\n".join(parts), bool(revealed)

    def _reveal(self, turn: int) -> tuple[FunctionDoc, ...]:
        names = self.task.missed_function.get(turn, ())
        docs = load_function_docs()
        hidden = self.task.hidden_functions(turn)
        revealed = []
        for name in names:
            if name in self._visible or name in hidden:
                continue
            doc = docs[name]
            self._visible = {**self._visible, name: doc}
            self._dispatcher.allow(name, doc.class_name)
            revealed.append(doc)
        return tuple(revealed)

    def _after_format_error(self, turn: int, error: str) -> StepResult:
        message = protocol.format_error_message(error)
        if self._steps_in_turn >= self.config.max_steps_per_turn:
            return self._close_turn(
                turn, called_on_empty_turn=False, forced=True, extra=(message,), error=error
            )
        self._step_codes.append(StepCode.FORMAT_ERROR)
        return StepResult(
            code=StepCode.FORMAT_ERROR,
            observation=(Message("user", message),),
            turn_ended=False,
            done=False,
            turn_index=turn,
            error=error,
        )

    def _after_tool_call(self, turn: int, parsed: ParsedReply) -> StepResult:
        if not self._trace.turns[turn].calls_expected:
            # docs/method.md §4.4: on a turn that must not call, the first call closes the turn unexecuted.
            return self._close_turn(turn, called_on_empty_turn=True, forced=False, extra=())
        started = time.monotonic()
        limit = self.config.step_time_limit_s
        deadline = None if limit is None else started + limit
        outcomes = self._fit_feedback(tuple(self._execute(call, deadline) for call in parsed.calls))
        tool_seconds = time.monotonic() - started
        self._calls_in_turn += len(outcomes)
        feedback = protocol.tool_feedback(outcomes)
        code = StepCode.TOOL_OK if all(o.ok for o in outcomes) else StepCode.TOOL_ERROR
        if self._steps_in_turn >= self.config.max_steps_per_turn:
            return self._close_turn(
                turn,
                called_on_empty_turn=False,
                forced=True,
                extra=(),
                calls=outcomes,
                feedback=feedback,
                tool_seconds=tool_seconds,
            )
        self._step_codes.append(code)
        return StepResult(
            code=code,
            observation=(Message("tool", feedback),),
            turn_ended=False,
            done=False,
            turn_index=turn,
            calls=outcomes,
            tool_seconds=tool_seconds,
        )

    def _execute(self, call: ToolCall, deadline: float | None) -> CallOutcome:
        """Validate, then run one call on this episode's instances; refusals are results too."""
        augmented = self.config.feedback is FeedbackMode.AUGMENTED
        issue = validate_call(call, self._visible)
        if issue is None and call.name not in self._dispatcher:  # visible docs and dispatcher agree
            raise AssertionError(f"{call.name} validated but is not dispatchable")
        if issue is not None:
            result = f"{ERROR_PREFIX}{issue.message}"
            self._scorer.record(None, result)
            return CallOutcome(
                call=call, executed=False, ok=False, result=result, hint=issue.hint if augmented else None
            )
        class_name = self._dispatcher.class_of(call.name)
        result, ok, executed, fault = self._dispatcher.dispatch(call.name, call.arguments, deadline=deadline)
        self._scorer.record(class_name if executed else None, result)
        hint = None
        if augmented and executed:
            # Hints are envtune's own reads with bounded inputs (no watchdog window: it costs per call).
            hint = augment_result(call, class_name, result, self._instances[class_name])
        return CallOutcome(call=call, executed=executed, ok=ok, result=result, hint=hint, fault=fault)

    @staticmethod
    def _fit_feedback(outcomes: tuple[CallOutcome, ...]) -> tuple[CallOutcome, ...]:
        """Cut the results of a step whose feedback would be too long (each was scored whole)."""
        if len(outcomes) <= _CALLS_THAT_ALWAYS_FIT:
            return outcomes
        if sum(len(outcome.result) for outcome in outcomes) <= MAX_STEP_RESULT_CHARS:
            return outcomes
        fitted = fit_step_results([outcome.result for outcome in outcomes])
        return tuple(
            outcome if text is None else dataclasses.replace(outcome, result=text, fault=ToolFault.TRUNCATED)
            for outcome, text in zip(outcomes, fitted, strict=True)
        )

    def _close_turn(
        self,
        turn: int,
        *,
        called_on_empty_turn: bool,
        forced: bool,
        extra: tuple[str, ...],
        error: str | None = None,
        calls: tuple[CallOutcome, ...] = (),
        feedback: str | None = None,
        tool_seconds: float = 0.0,
    ) -> StepResult:
        passed = self._judge_turn(turn, called_on_empty_turn=called_on_empty_turn, forced=forced)
        self._turn_passed[turn] = passed
        code = StepCode.TURN_PASS if passed else StepCode.TURN_FAIL
        self._step_codes.append(code)
        observation: list[Message] = []
        if feedback is not None:
            observation.append(Message("tool", feedback))
        notices = list(extra)
        if forced:
            notices.append(protocol.forced_turn_end_notice(self.config.max_steps_per_turn))
        if called_on_empty_turn:
            notices.append(protocol.must_not_call_warning())
        tools_changed = False
        if turn + 1 < self.task.num_turns:
            text, tools_changed = self._open_turn(turn + 1, tuple(notices))
            observation.append(Message("user", text))
        else:
            self._done = True
            if notices:
                observation.append(Message("user", "\n\n".join(notices)))
        return StepResult(
            code=code,
            observation=tuple(observation),
            turn_ended=True,
            done=self._done,
            turn_index=turn,
            calls=calls,
            tools_changed=tools_changed,
            error=error,
            tool_seconds=tool_seconds,
        )

    def _judge_turn(self, turn: int, *, called_on_empty_turn: bool, forced: bool) -> bool:
        try:
            return self._scorer.judge(
                turn,
                calls_in_turn=self._calls_in_turn,
                called_on_empty_turn=called_on_empty_turn,
                forced=forced,
            )
        except Exception as exc:  # a state the model made incomparable (e.g. too deep) fails its turn
            _log.warning("episode.judge_failed", task=self.task.id, turn=turn, error=repr(exc)[:200])
            return False


class BfclEnvironment:
    """Builds episodes of BFCL V3 multi-turn tasks and owns their ground-truth cache."""

    def __init__(self, tasks: Mapping[str, Task] | None = None) -> None:
        self.tasks: Mapping[str, Task] = tasks if tasks is not None else load_tasks()
        self.ground_truth = GroundTruthCache()
        self.watchdog = Watchdog()
        """Enforces every episode's step time limit (one thread, started on first use)."""

    def make_episode(self, task_id: str, config: EpisodeConfig | None = None) -> Episode:
        """A fresh episode of a task (its own instances; the ground-truth trace is shared, read-only)."""
        try:
            task = self.tasks[task_id]
        except KeyError:
            raise KeyError(f"unknown task id {task_id!r}") from None
        return Episode(task, config or EpisodeConfig(), self.ground_truth.get(task), self.watchdog)
