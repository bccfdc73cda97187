"""One τ²-bench conversation: the agent, a simulated user, and tau2's tools in the worker.

The flow is tau2's orchestrator (docs/method.md, OOD evaluation): the agent opens with tau2's greeting,
the user answers; an agent reply is either tool calls (run in the worker session as the agent's) or
a message to the user, after which the user simulator speaks — possibly first calling its own tools
(telecom). The conversation ends when the agent says ``###STOP###``, the user says a stop token, or a
limit is hit: ``max_steps`` messages (tau2 counts every message and every batch of tool results) or
``max_errors`` failed tool calls. Limits are checked as tau2 checks them, so a conversation that
reaches the step limit on the user's stop counts as ``max_steps``.

envtune's side adds its reply format (``<think>`` + ``<tool_call>``/``<answer>``; a format error is
shown to the agent and counts as one step) and bounds: a call whose JSON arguments exceed
``MAX_ARGUMENT_BYTES``, or a ``calculate`` expression that Python's ``eval`` (tau2 uses it) could
not finish (an exponent, a huge or deeply nested expression), is refused before reaching tau2 and
counts as a failed call; a tool that overruns ``tool_timeout_s`` gets the worker restarted. Refused
calls are not part of the exported trajectory, which stays exactly what tau2's evaluator can replay.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from envtune.environments import protocol
from envtune.environments.episode import EpisodeStateError
from envtune.environments.suite_api import TaskVerdict
from envtune.environments.tau2.data import DomainInfo, Tau2Task, thaw
from envtune.environments.tau2.user import (
    EndpointConfig,
    UserReply,
    UserSimulator,
    UserSimulatorError,
    system_prompt,
)
from envtune.environments.tau2.worker import WorkerError
from envtune.environments.tool_calls import FormatError, parse_reply
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

if TYPE_CHECKING:
    from envtune.environments.tau2.environment import Tau2Environment

GREETING = "Hi! How can I help you today?"
"""tau2's fixed first agent message."""
AGENT_STOP = "###STOP###"
MAX_ARGUMENT_BYTES = 64 * 1024
MAX_EXPRESSION_CHARS = 256
MAX_EXPRESSION_DEPTH = 32

_AGENT_INSTRUCTION = """\
You are a customer service agent. Help the user according to the policy below. In each reply either
call tools or write one message to the user, never both. Follow the policy at all times. When the
conversation is over, include ###STOP### in your message."""


@dataclass(frozen=True, slots=True)
class Tau2EpisodeConfig:
    """How a τ² conversation is run."""

    prompt_style: PromptStyle = PromptStyle.BASIC
    """envtune's system-prompt variant (the format rules); the domain policy follows it."""
    require_think: bool = True
    """Whether a reply must open with a <think> block (paper format)."""
    max_steps: int = 200
    """tau2's default ``max_steps`` (every message and tool-result batch counts)."""
    max_errors: int = 10
    """tau2's default ``max_errors`` (failed tool calls)."""
    tool_timeout_s: float = 20.0
    """Longest a single tool call may run in the worker."""

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.max_errors < 1:
            raise ValueError("max_steps and max_errors must be >= 1")


def refusal(call: ToolCall) -> str | None:
    """Why envtune will not send this call to tau2 (None: send it)."""
    try:
        size = len(json.dumps(call.arguments))
    except (TypeError, ValueError):
        return "arguments are not JSON"
    if size > MAX_ARGUMENT_BYTES:
        return f"arguments of {size} bytes; the limit is {MAX_ARGUMENT_BYTES}"
    if call.name == "calculate":
        expression = call.arguments.get("expression")
        if isinstance(expression, str):
            depth = deepest = 0
            for char in expression:
                depth += (char == "(") - (char == ")")
                deepest = max(deepest, depth)
            if "**" in expression or len(expression) > MAX_EXPRESSION_CHARS or deepest > MAX_EXPRESSION_DEPTH:
                return (
                    "the expression is too large to evaluate safely (no '**', at most "
                    f"{MAX_EXPRESSION_CHARS} characters and {MAX_EXPRESSION_DEPTH} nested parentheses)"
                )
    return None


class Tau2Episode:
    """One conversation of a τ² task."""

    def __init__(
        self,
        env: Tau2Environment,
        task: Tau2Task,
        domain: DomainInfo,
        user: UserSimulator,
        config: Tau2EpisodeConfig,
        session: str,
        judge_endpoint: EndpointConfig | None = None,
    ) -> None:
        if task.has_message_history:
            raise ValueError(
                f"task {task.id} starts from a message history, which envtune's τ² episode does not support"
            )
        self.task = task
        self.config = config
        self._env = env
        self._domain = domain
        self._user = user
        self._session = session
        self._judge_endpoint = judge_endpoint
        self._messages: list[dict[str, Any]] = []
        self._ids = itertools.count()
        self._steps = 0
        self._errors = 0
        self._codes: list[int] = []
        self._termination: str | None = None
        self._verdict: TaskVerdict | None = None
        self._started = False
        self._open = False
        self._user_turns = 0

    # --- API ------------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._termination is not None

    @property
    def termination_reason(self) -> str | None:
        return self._termination

    def visible_tools(self) -> tuple[FunctionDoc, ...]:
        return self._domain.tools

    def trajectory(self) -> list[dict[str, Any]]:
        """The conversation as tau2 messages (JSON-ready; what tau2's evaluator replays)."""
        return json.loads(json.dumps(self._messages))

    def start(self) -> tuple[Message, ...]:
        if self._started:
            raise EpisodeStateError("episode already started")
        self._started = True
        self._env.worker.open_session(self._session, self.task.domain, self.task.id)
        self._open = True
        self._messages.append({"role": "assistant", "content": GREETING})
        system = protocol.system_prompt(self.config.prompt_style, self._domain.tools)
        policy = f"{_AGENT_INSTRUCTION}\n\n<policy>\n{self._domain.policy}\n</policy>"
        opening = [Message("system", f"{system}\n\n{policy}"), Message("assistant", GREETING)]
        user_text = self._user_turn()
        if user_text is not None:
            opening.append(Message("user", user_text))
        if self.done:  # the user stopped, failed or hit a limit before the agent's first turn
            self._finish()
        return tuple(opening)

    def step(self, reply: str | bytes) -> StepResult:
        if not self._started:
            raise EpisodeStateError("call start() before step()")
        if self.done:
            raise EpisodeStateError("episode is done; no further step is accepted")
        try:
            parsed = parse_reply(reply, require_think=self.config.require_think)
        except FormatError as exc:
            self._steps += 1
            self._check_limits()
            return self._result(
                StepCode.FORMAT_ERROR,
                [Message("user", protocol.format_error_message(str(exc)))],
                error=str(exc),
            )
        if parsed.kind == "tool_call":
            outcomes = self._agent_calls(parsed.calls)
            code = StepCode.TOOL_OK if all(o.ok for o in outcomes) else StepCode.TOOL_ERROR
            return self._result(code, [Message("tool", protocol.tool_feedback(outcomes))], calls=outcomes)
        text = parsed.answer or ""
        self._messages.append({"role": "assistant", "content": text})
        self._steps += 1
        if AGENT_STOP in text:
            self._termination = "agent_stop"
        self._check_limits()
        observation = []
        if not self.done:
            user_text = self._user_turn()
            if user_text is not None:
                observation.append(Message("user", user_text))
        return self._result(StepCode.TOOL_OK, observation)

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
            progress=self._verdict.reward if self._verdict is not None else 0.0,
            format_reward=format_reward,
            tool_reward=tool_reward,
            stage1_reward=(1.0 if correct + errors else 0.0) * (format_reward + tool_reward),
            step_codes=tuple(codes),
            turns_reached=self._user_turns,
        )

    def verdict(self) -> TaskVerdict | None:
        return self._verdict

    def close(self) -> None:
        """End the conversation (a run cut short by the caller counts as ``agent_error``)."""
        if self._started and self._termination is None:
            self._termination = "agent_error"
            self._finish()
        self._release()

    # --- mechanics ------------------------------------------------------------------------------

    def _release(self) -> None:
        if self._open:
            self._open = False
            self._env.worker.close_session(self._session)

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids)}"

    def _check_limits(self) -> None:
        if self._steps >= self.config.max_steps:
            self._termination = "max_steps"
        if self._errors >= self.config.max_errors:
            self._termination = "too_many_errors"

    def _run_call(
        self, call: ToolCall, requestor: str, call_id: str
    ) -> tuple[dict[str, Any] | None, str, bool]:
        """(tool message or None if refused, result text, ok)."""
        reason = refusal(call)
        if reason is not None:
            return None, f"Error: envtune refused this call: {reason}", False
        try:
            result = self._env.worker.call(
                self._session,
                call.name,
                dict(call.arguments),
                requestor=requestor,
                call_id=call_id,
                timeout_s=self.config.tool_timeout_s,
            )
        except WorkerError as exc:
            return None, f"Error: the tool did not complete ({exc})", False
        message = {
            "role": "tool",
            "id": call_id,
            "content": result["content"],
            "requestor": requestor,
            "error": bool(result["error"]),
        }
        return message, result["content"], not result["error"]

    def _execute(self, calls: tuple[ToolCall, ...], requestor: str) -> list[CallOutcome]:
        """Run calls; the message with the calls that reached tau2 and their results join the trajectory."""
        sent: list[dict[str, Any]] = []
        results: list[dict[str, Any]] = []
        outcomes = []
        for call in calls:
            call_id = self._new_id("a" if requestor == "assistant" else "u")
            message, text, ok = self._run_call(call, requestor, call_id)
            if message is not None:
                sent.append(
                    {
                        "id": call_id,
                        "name": call.name,
                        "arguments": dict(call.arguments),
                        "requestor": requestor,
                    }
                )
                results.append(message)
            self._errors += 0 if ok else 1
            outcomes.append(CallOutcome(call=call, executed=message is not None, ok=ok, result=text))
        if sent:
            self._messages.append({"role": requestor, "content": None, "tool_calls": sent})
            self._messages.extend(results)
        return outcomes

    def _agent_calls(self, calls: tuple[ToolCall, ...]) -> list[CallOutcome]:
        self._steps += 1  # the agent's tool-call message (to the environment: no limit check)
        outcomes = self._execute(calls, "assistant")
        self._steps += 1  # the environment's results, back to the agent
        self._check_limits()
        return outcomes

    def _user_view(self) -> list[dict[str, Any]]:
        guidelines = (
            self._domain.guidelines_with_tools if self._domain.user_tools else self._domain.guidelines
        )
        view: list[dict[str, Any]] = [
            {"role": "system", "content": system_prompt(guidelines, self.task.user_instructions)}
        ]
        for message in self._messages:
            role = message["role"]
            if role == "assistant" and message.get("content") is not None:
                view.append({"role": "user", "content": message["content"]})
            elif role == "user" and message.get("tool_calls"):
                view.append(
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": c["id"],
                                "type": "function",
                                "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])},
                            }
                            for c in message["tool_calls"]
                        ],
                    }
                )
            elif role == "user":
                view.append({"role": "assistant", "content": message["content"]})
            elif role == "tool" and message.get("requestor") == "user":
                view.append({"role": "tool", "tool_call_id": message["id"], "content": message["content"]})
        return view

    def _user_turn(self) -> str | None:
        """Let the user act until it speaks to the agent; its text (None if the conversation ended first)."""
        tools = [thaw(schema) for schema in self._domain.user_tool_schemas]
        while not self.done:
            try:
                reply: UserReply = self._user.reply(self._user_view(), tools)
            except UserSimulatorError:
                self._termination = "user_error"
                break
            if reply.tool_calls:
                self._steps += 1  # the user's tool-call message (to the environment)
                self._execute(reply.tool_calls, "user")
                self._steps += 1  # results back to the user
                self._check_limits()
                continue
            assert reply.text is not None
            self._messages.append({"role": "user", "content": reply.text})
            self._user_turns += 1
            self._steps += 1
            if reply.is_stop:
                self._termination = "user_stop"
            self._check_limits()
            return reply.text
        return None

    def _result(
        self,
        code: StepCode,
        observation: list[Message],
        *,
        calls: list[CallOutcome] | tuple[CallOutcome, ...] = (),
        error: str | None = None,
    ) -> StepResult:
        if self.done and self._verdict is None:
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
            turn_ended=self.done,
            done=self.done,
            turn_index=0,
            calls=tuple(calls),
            error=error,
        )

    def _finish(self) -> None:
        """Judge the finished conversation on the live session, then free the session."""
        assert self._termination is not None
        verdict = self._env.judge_conversation(
            self.task, self._session, self._messages, self._termination, self._judge_endpoint
        )
        detail = {"user_simulator": self._user.description, "steps": self._steps, "errors": self._errors}
        self._verdict = TaskVerdict(
            task_id=verdict.task_id,
            suite=verdict.suite,
            category=verdict.category,
            passed=verdict.passed,
            reward=verdict.reward,
            detail={**verdict.detail, **detail},
        )
        self._release()
