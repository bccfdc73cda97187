"""One ACEBench agent task: tool steps on the checkout's scenario classes, judged on the end state.

Multi-step: the user's request is the first message; the agent calls tools and ends with an
``<answer>``. Multi-turn: a simulated user (``tau2.user``'s protocol: an OpenAI-compatible endpoint
or a script) pursues the task's instruction; the conversation ends when it says
``finish conversation``. Either way at most ``max_messages`` messages (ACEBench's 40 dialogue turns).

A tool step sends its calls in order to the worker (ACEBench's executor semantics there); as in
ACEBench, the first call that raises ends the step. envtune accepts only the task's documented
functions, with arguments that fit their docs (``schemas.validate_call``); anything else is refused
without running (ACEBench would run any public method). Every tool step is recorded, rendered as
ACEBench records the agent's call message (``[f(a=1), g(b='x')]``), for process accuracy.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from envtune.environments import protocol
from envtune.environments.acebench.data import AceTask
from envtune.environments.acebench.judge import end_state, process_accuracy
from envtune.environments.episode import EpisodeStateError
from envtune.environments.schemas import validate_call
from envtune.environments.suite_api import TaskVerdict
from envtune.environments.tau2.user import UserSimulator, UserSimulatorError
from envtune.environments.tool_calls import FormatError, format_pythonic_call, parse_reply
from envtune.environments.types import (
    CallOutcome,
    EpisodeScore,
    FunctionDoc,
    Message,
    PromptStyle,
    StepCode,
    StepResult,
    ToolCall,
)
from envtune.environments.worker_process import WorkerError

if TYPE_CHECKING:
    from envtune.environments.acebench.environment import AceBenchEnvironment

FINISH = "finish conversation"
ERROR_PREFIX = "Error during execution: "

_USER_PROMPT = """\
You are playing a user who talks to an AI assistant that can use tools on your phone and accounts.
Your situation and goal:
{instruction}
Write one short message at a time, as this user would. Give information only when the assistant asks
for it. When your goal has been achieved (or cannot be), reply with exactly: finish conversation"""


@dataclass(frozen=True, slots=True)
class AceEpisodeConfig:
    """How an ACEBench agent episode is run."""

    prompt_style: PromptStyle = PromptStyle.BASIC
    """envtune's system-prompt variant (the format rules, then the task's functions)."""
    require_think: bool = True
    """Whether a reply must open with a <think> block (paper format)."""
    max_messages: int = 40
    """ACEBench's ``max_dialog_turns``: agent, tool-result and user messages all count."""
    tool_timeout_s: float = 20.0
    """Longest a single tool call may run in the scenario's child process."""


def render_step(calls: tuple[ToolCall, ...]) -> str:
    """A tool step as ACEBench records the agent's call message."""
    try:
        return "[" + ", ".join(format_pythonic_call(call) for call in calls) + "]"
    except ValueError:
        return json.dumps([{"name": c.name, "arguments": c.arguments} for c in calls])


class AceEpisode:
    def __init__(
        self,
        env: AceBenchEnvironment,
        task: AceTask,
        config: AceEpisodeConfig,
        session: str,
        user: UserSimulator | None,
    ) -> None:
        if task.category == "agent_multi_turn" and user is None:
            raise ValueError(f"{task.id} is multi-turn: it needs a user simulator (an endpoint or a script)")
        self.task = task
        self.config = config
        self._env = env
        self._session = session
        self._user = user
        self._docs: Mapping[str, FunctionDoc] = {doc.name: doc for doc in task.functions}
        self._messages = 0
        self._codes: list[int] = []
        self._steps: list[str] = []
        self._captured = False
        self._done = False
        self._open = False
        self._started = False
        self._verdict: TaskVerdict | None = None
        self._dialogue: list[dict[str, Any]] = []

    @property
    def done(self) -> bool:
        return self._done

    @property
    def process(self) -> tuple[str, ...]:
        """The agent's tool steps as ACEBench records them."""
        return tuple(self._steps)

    def visible_tools(self) -> tuple[FunctionDoc, ...]:
        return self.task.functions

    def start(self) -> tuple[Message, ...]:
        if self._started:
            raise EpisodeStateError("episode already started")
        self._started = True
        self._env.open_session(self._session, self.task)
        self._open = True
        system = Message("system", protocol.system_prompt(self.config.prompt_style, self.task.functions))
        if self.task.category == "agent_multi_step":
            self._messages = 1
            return (system, Message("user", self.task.question))
        first = self._user_says(None)
        return (system, Message("user", first)) if first is not None else (system,)

    def step(self, reply: str | bytes) -> StepResult:
        if not self._started:
            raise EpisodeStateError("call start() before step()")
        if self._done:
            raise EpisodeStateError("episode is done; no further step is accepted")
        self._messages += 1
        try:
            parsed = parse_reply(reply, require_think=self.config.require_think)
        except FormatError as exc:
            return self._result(
                StepCode.FORMAT_ERROR,
                [Message("user", protocol.format_error_message(str(exc)))],
                error=str(exc),
            )
        if parsed.kind == "tool_call":
            outcomes = self._execute(parsed.calls)
            self._messages += 1  # the execution results
            code = StepCode.TOOL_OK if all(o.ok for o in outcomes) else StepCode.TOOL_ERROR
            return self._result(code, [Message("tool", protocol.tool_feedback(outcomes))], calls=outcomes)
        text = parsed.answer or ""
        self._dialogue.append({"role": "user", "content": text})  # the agent, as the user sees it
        if self.task.category == "agent_multi_step" or FINISH in text:
            self._done = True
            return self._result(StepCode.TOOL_OK, [])
        said = self._user_says(text)
        return self._result(StepCode.TOOL_OK, [Message("user", said)] if said is not None else [])

    def score(self) -> EpisodeScore:
        codes = self._codes
        steps = len(codes)
        format_errors = codes.count(StepCode.FORMAT_ERROR)
        correct = codes.count(StepCode.TOOL_OK)
        errors = codes.count(StepCode.TOOL_ERROR)
        format_reward = (steps - format_errors) / steps if steps else 0.0
        tool_reward = correct / (correct + errors) if correct + errors else 0.0
        passed = (self._verdict is not None and self._verdict.passed,)
        return EpisodeScore(
            turn_passed=passed,
            progress=float(passed[0]),
            format_reward=format_reward,
            tool_reward=tool_reward,
            stage1_reward=(1.0 if correct + errors else 0.0) * (format_reward + tool_reward),
            step_codes=tuple(codes),
            turns_reached=1,
        )

    def verdict(self) -> TaskVerdict | None:
        return self._verdict

    def close(self) -> None:
        if self._started and not self._done:
            self._done = True
            self._finish()
        self._release()

    # --- mechanics -----------------------------------------------------------------------------

    def _release(self) -> None:
        if self._open:
            self._open = False
            self._env.worker.close_session(self._session)

    def _execute(self, calls: tuple[ToolCall, ...]) -> list[CallOutcome]:
        self._steps.append(render_step(calls))
        outcomes = []
        failed = False
        for call in calls:
            if failed:
                outcomes.append(
                    CallOutcome(
                        call, False, False, f"{ERROR_PREFIX}not run: an earlier call of this step failed"
                    )
                )
                continue
            issue = validate_call(call, self._docs)
            if issue is not None:
                outcomes.append(CallOutcome(call, False, False, f"{ERROR_PREFIX}{issue.message}", hint=None))
                continue
            try:
                result = self._env.worker.call(
                    self._session,
                    name=call.name,
                    arguments=dict(call.arguments),
                    timeout_s=self.config.tool_timeout_s,
                )
            except WorkerError as exc:
                result = {"executed": True, "result": None, "error": f"the tool did not complete ({exc})"}
            if result["error"] is not None:
                failed = True
                outcomes.append(CallOutcome(call, True, False, f"{ERROR_PREFIX}{result['error']}"))
            else:
                text = (
                    result["result"]
                    if result["executed"]
                    else f"{ERROR_PREFIX}No function named '{call.name}' ran"
                )
                ok = bool(result["executed"]) and not _is_error(text)
                outcomes.append(CallOutcome(call, bool(result["executed"]), ok, text))
        if not failed:
            self._captured = True  # ACEBench keeps the instances of any step that raised nothing
        return outcomes

    def _user_says(self, agent_text: str | None) -> str | None:
        assert self._user is not None
        if self._messages >= self.config.max_messages:
            self._done = True
            return None
        history = [
            {"role": "system", "content": _USER_PROMPT.format(instruction=self.task.question)},
            *self._dialogue,
        ]
        try:
            reply = self._user.reply(history, [])
        except UserSimulatorError:
            self._done = True
            return None
        text = reply.text if reply.text is not None else ""
        self._dialogue.append({"role": "assistant", "content": text})
        self._messages += 1
        if FINISH in text:
            self._done = True
        return text

    def _result(
        self, code: StepCode, observation: list[Message], *, calls: Any = (), error: str | None = None
    ) -> StepResult:
        if not self._done and self._messages >= self.config.max_messages:
            self._done = True
        if self._done and self._verdict is None:
            self._finish()
            code = (
                StepCode.TURN_PASS
                if self._verdict is not None and self._verdict.passed
                else StepCode.TURN_FAIL
            )
        self._codes.append(int(code))
        return StepResult(
            code=code,
            observation=tuple(observation),
            turn_ended=self._done,
            done=self._done,
            turn_index=0,
            calls=tuple(calls),
            error=error,
        )

    def _finish(self) -> None:
        try:
            state = self._env.worker.request("state", session=self._session) if self._captured else []
            verdict = end_state(state, self.task.ground_truth_json())
            detail: dict[str, Any] = {
                "errors": list(verdict.errors),
                "process_accuracy": process_accuracy(verdict.passed, self._steps, self.task.milestones),
                "process": list(self._steps),
                "end_state": state,
            }
            passed = verdict.passed
        except WorkerError as exc:
            passed, detail = False, {"error": f"environment check failed: {exc}"}
        if self._user is not None:
            detail["user_simulator"] = self._user.description
        self._verdict = TaskVerdict(
            task_id=self.task.id,
            suite=self._env.suite,
            category=self.task.category,
            passed=passed,
            reward=1.0 if passed else 0.0,
            detail=detail,
        )
        self._release()


def _is_error(text: str) -> bool:
    try:
        value = json.loads(text)
    except (ValueError, TypeError):
        return False
    return isinstance(value, dict) and (value.get("status") is False or "error" in value)
