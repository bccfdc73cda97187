"""One BFCL V4 agentic episode: user turns, tool steps on one tool object, a judged final answer.

The protocol is BFCL V3's (``<think>`` then ``<tool_call>`` or ``<answer>``; see docs/method.md):
a tool step runs its calls through a ``ToolBox`` and answers with their results; an ``<answer>``
closes the user turn. BFCL's own rules on top:

- a question has one turn and is judged on the text of the ``<answer>`` that closed it
  (``answer_check``); a run that exhausts the step budget without answering fails, as BFCL's
  force-quit does;
- a memory prerequisite conversation is not judged; when its step budget runs out the conversation
  ends there (BFCL skips the remaining turns), and its memory is handed to ``on_finish`` once, when
  the episode ends or is closed.
"""

from __future__ import annotations

from collections.abc import Callable

from envtune.environments import protocol
from envtune.environments.bfcl_v4.answer_check import AnswerVerdict, check_answer
from envtune.environments.bfcl_v4.data import AgenticTask
from envtune.environments.episode import EpisodeConfig, EpisodeStateError
from envtune.environments.suite_api import TaskVerdict
from envtune.environments.tool_calls import FormatError, parse_reply
from envtune.environments.toolbox import ToolBox
from envtune.environments.types import (
    CallOutcome,
    EpisodeScore,
    FeedbackMode,
    FunctionDoc,
    Message,
    StepCode,
    StepResult,
    ToolCall,
)


class AgenticEpisode:
    """One task of BFCL V4 memory or web search."""

    def __init__(
        self,
        task: AgenticTask,
        suite: str,
        tools: ToolBox,
        context: str,
        config: EpisodeConfig,
        on_finish: Callable[[], None] | None = None,
    ) -> None:
        self.task = task
        self.suite = suite
        self.config = config
        self._tools = tools
        self._context = context
        self._on_finish = on_finish
        self._turn = -1
        self._steps_in_turn = 0
        self._step_codes: list[int] = []
        self._answer: str | None = None
        self._verdict: AnswerVerdict | None = None
        self._forced = False
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    @property
    def final_answer(self) -> str | None:
        """The text of the answer that closed a question (None before, or if none came)."""
        return self._answer

    def visible_tools(self) -> tuple[FunctionDoc, ...]:
        return tuple(self._tools.docs.values())

    def start(self) -> tuple[Message, ...]:
        if self._turn != -1:
            raise EpisodeStateError("episode already started")
        self._turn = 0
        system = protocol.system_prompt(self.config.prompt_style, self.visible_tools())
        return (
            Message("system", f"{system}\n\n{self._context}"),
            Message("user", "\n\n".join(self.task.turns[0])),
        )

    def step(self, reply: str | bytes) -> StepResult:
        if self._turn == -1:
            raise EpisodeStateError("call start() before step()")
        if self._done:
            raise EpisodeStateError("episode is done; no further step is accepted")
        self._steps_in_turn += 1
        turn = self._turn
        try:
            parsed = parse_reply(reply, require_think=self.config.require_think)
        except FormatError as exc:
            message = protocol.format_error_message(str(exc))
            if self._out_of_steps():
                return self._force_end(turn, (Message("user", message),), error=str(exc))
            self._step_codes.append(StepCode.FORMAT_ERROR)
            return StepResult(
                code=StepCode.FORMAT_ERROR,
                observation=(Message("user", message),),
                turn_ended=False,
                done=False,
                turn_index=turn,
                error=str(exc),
            )
        if parsed.kind == "answer":
            return self._close_turn(turn, parsed.answer or "")
        outcomes = tuple(self._execute(call) for call in parsed.calls)
        feedback = Message("tool", protocol.tool_feedback(outcomes))
        code = StepCode.TOOL_OK if all(o.ok for o in outcomes) else StepCode.TOOL_ERROR
        if self._out_of_steps():
            return self._force_end(turn, (feedback,), calls=outcomes)
        self._step_codes.append(code)
        return StepResult(
            code=code, observation=(feedback,), turn_ended=False, done=False, turn_index=turn, calls=outcomes
        )

    def score(self) -> EpisodeScore:
        codes = self._step_codes
        steps = len(codes)
        format_errors = codes.count(StepCode.FORMAT_ERROR)
        correct = codes.count(StepCode.TOOL_OK)
        errors = codes.count(StepCode.TOOL_ERROR)
        format_reward = (steps - format_errors) / steps if steps else 0.0
        tool_reward = correct / (correct + errors) if correct + errors else 0.0
        passed: tuple[bool, ...] = ()
        if self.task.scored:
            passed = (self._verdict is not None and self._verdict.passed,)
        return EpisodeScore(
            turn_passed=passed,
            progress=sum(passed) / len(passed) if passed else 0.0,
            format_reward=format_reward,
            tool_reward=tool_reward,
            stage1_reward=(1.0 if correct + errors else 0.0) * (format_reward + tool_reward),
            step_codes=tuple(int(c) for c in codes),
            turns_reached=self._turn + 1,
        )

    def verdict(self) -> TaskVerdict | None:
        if not self.task.scored or not self._done or self._verdict is None:
            return None
        return TaskVerdict(
            task_id=self.task.id,
            suite=self.suite,
            category=self.task.category,
            passed=self._verdict.passed,
            reward=1.0 if self._verdict.passed else 0.0,
            detail={
                "reason": self._verdict.reason,
                "matched": self._verdict.matched,
                "final_answer": self._answer,
                "possible_answers": list(self.task.answers),
                "forced_end": self._forced,
            },
        )

    def close(self) -> None:
        """End the episode (idempotent); a prerequisite conversation hands over its memory now."""
        self._done = True
        self._finish()

    # --- mechanics --------------------------------------------------------------------------

    def _out_of_steps(self) -> bool:
        return self._steps_in_turn >= self.config.max_steps_per_turn

    def _execute(self, call: ToolCall) -> CallOutcome:
        outcome = self._tools.call(call)
        hint = outcome.hint if self.config.feedback is FeedbackMode.AUGMENTED else None
        return CallOutcome(
            call=call, executed=outcome.executed, ok=outcome.ok, result=outcome.result, hint=hint
        )

    def _finish(self) -> None:
        callback, self._on_finish = self._on_finish, None
        if callback is not None:
            callback()

    def _close_turn(self, turn: int, answer: str) -> StepResult:
        if self.task.scored:
            self._answer = answer
            self._verdict = check_answer(answer, self.task.answers)
            code = StepCode.TURN_PASS if self._verdict.passed else StepCode.TURN_FAIL
        else:
            code = StepCode.TURN_PASS  # a prerequisite turn has nothing to fail
        self._step_codes.append(code)
        observation: tuple[Message, ...] = ()
        if turn + 1 < len(self.task.turns):
            self._turn = turn + 1
            self._steps_in_turn = 0
            observation = (Message("user", "\n\n".join(self.task.turns[turn + 1])),)
        else:
            self._done = True
            self._finish()
        return StepResult(
            code=code, observation=observation, turn_ended=True, done=self._done, turn_index=turn
        )

    def _force_end(
        self,
        turn: int,
        observation: tuple[Message, ...],
        *,
        error: str | None = None,
        calls: tuple[CallOutcome, ...] = (),
    ) -> StepResult:
        """The step budget ran out: BFCL force-quits the whole entry (no answer, remaining turns skipped)."""
        self._forced = True
        if self.task.scored:
            self._verdict = check_answer(None, self.task.answers)
        self._step_codes.append(StepCode.TURN_FAIL)
        self._done = True
        self._finish()
        notice = Message("user", protocol.forced_turn_end_notice(self.config.max_steps_per_turn))
        return StepResult(
            code=StepCode.TURN_FAIL,
            observation=(*observation, notice),
            turn_ended=True,
            done=True,
            turn_index=turn,
            calls=calls,
            error=error,
        )
