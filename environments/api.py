"""A small public API: step a BFCL episode with OpenAI-style messages and structured tool calls.

``Episode.step`` takes envtune's text format (``<think>…</think><tool_call>[…]</tool_call>``). Other
trainers and agent frameworks speak OpenAI's chat format instead: tools as JSON Schema, an assistant
message with ``tool_calls`` (``{"id", "type": "function", "function": {"name", "arguments"}}``,
arguments as JSON text) or with plain ``content`` as the final answer, and one ``tool`` message per
call in return. ``ToolSession`` is that view of an ``Episode``::

    session = ToolSession.open(BfclEnvironment(), "multi_turn_base_0")
    session.messages, session.tools          # the conversation so far, the tools as JSON Schema
    feedback = session.step(tool_calls=[...]) # or session.step(content="final answer")
    feedback.messages, feedback.verdict, feedback.score

Same checks, same safety as the text path: each call's name and arguments go through
``tool_calls.parse_json_calls`` (the one parser: size, nesting, duplicate keys, names, non-finite
numbers, NUL and lone surrogates), then the episode validates them against the visible docs and
runs them through its whitelist (``Episode.step_parsed``). A malformed call is a format error step,
exactly as a malformed text reply is; nothing of it runs.

Left out: the environment's own text protocol (``protocol.py``) beyond reusing its feedback, and
any model or chat template (the caller renders ``messages`` and ``tools`` as it likes).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from envtune.environments import protocol
from envtune.environments.episode import BfclEnvironment, Episode, EpisodeConfig
from envtune.environments.schemas import bfcl_to_json_schema
from envtune.environments.tool_calls import (
    MAX_CALLS_PER_STEP,
    MAX_REPLY_CHARS,
    FormatError,
    ParsedReply,
    parse_json_calls,
)
from envtune.environments.types import EpisodeScore, FunctionDoc, Message, PromptStyle, StepCode, StepResult

_BASIC_SYSTEM = (
    "You are an expert at composing function calls. You are given a user request and a set of functions. "
    "Make one or more function calls to fulfil the request. If none of the functions fits, say so and "
    "refuse. If the request lacks a parameter that a function needs, say so and ask for it.\n\n"
    "Call the tools you are given; after each call you receive its result and may call again. Reply "
    "with a message without tool calls only when the request is fulfilled, or when you need more "
    "information from the user, or must refuse."
)
_RESOURCEFUL_SYSTEM = (
    f"{_BASIC_SYSTEM}\n"
    "- Be resourceful: before asking the user for a missing value, check whether a function can look it up.\n"
    "- Prefer clarity to assumptions: if a required function is not available, or a required parameter is "
    "missing and no function can retrieve it, do NOT call a tool with invented values; ask instead."
)
"""System prompts for the structured format: the envtune prompt's rules without its text format."""

_POSITION = re.compile(r" at line \d+ column \d+ \(char \d+\)")

def openai_tool(doc: FunctionDoc) -> dict[str, Any]:
    """A BFCL function as an OpenAI tool (``{"type": "function", "function": {...}}``)."""
    return {
        "type": "function",
        "function": {
            "name": doc.name,
            "description": doc.description,
            "parameters": bfcl_to_json_schema(doc.parameters, doc.name, descriptions=True),
        },
    }


def parse_structured_reply(content: str | None, tool_calls: Sequence[Any] | None) -> ParsedReply:
    """An OpenAI-style assistant turn as the episode's ``ParsedReply``; ``FormatError`` when malformed.

    Tool calls make a tool step (``content``, if any, is kept as the reasoning); no tool calls make
    ``content`` the final answer. Each call's name and arguments (JSON text, or a dict) go through
    ``parse_json_calls`` on their own, so no call can smuggle in another.
    """
    if tool_calls:
        if not isinstance(tool_calls, Sequence) or isinstance(tool_calls, str | bytes):
            raise FormatError("Error: tool_calls must be a list of calls", "bad_shape")
        if len(tool_calls) > MAX_CALLS_PER_STEP:
            raise FormatError(
                f"Error: Too many calls in one reply ({len(tool_calls)}; the limit is {MAX_CALLS_PER_STEP})",
                "too_many_calls",
            )
        calls = []
        budget = MAX_REPLY_CHARS
        for index, raw in enumerate(tool_calls):
            name, arguments = _call_parts(raw, index)
            body = f'{{"name": {json.dumps(name)}, "arguments": {arguments}}}'
            budget -= len(body)
            if budget < 0:
                raise FormatError(f"Error: the tool calls exceed {MAX_REPLY_CHARS} characters", "too_large")
            try:
                (call,) = parse_json_calls(body)
            except FormatError as exc:
                raise _about_call(exc, index, name) from None
            if call.name != name:  # cannot happen: one object, duplicate keys refused; kept as a guard
                raise FormatError(f"Error: call #{index + 1} is malformed", "bad_entry")
            calls.append(call)
        think = content if isinstance(content, str) else ""
        return ParsedReply(kind="tool_call", think=think.strip(), calls=tuple(calls), answer=None)
    if not isinstance(content, str) or not content.strip():
        raise FormatError("Error: the reply has neither tool calls nor content", "missing_tag")
    return ParsedReply(kind="answer", think="", calls=(), answer=content.strip())


def _about_call(error: FormatError, index: int, name: str) -> FormatError:
    """The parser's message, about this call rather than the ``<tool_call>`` text it never saw
    (positions in the text the call was checked as would only mislead)."""
    message = (
        str(error).removeprefix("Error: ").replace(" inside <tool_call>", "").replace("<tool_call> ", "")
    )
    message = _POSITION.sub("", message)
    return FormatError(f"Error: call #{index + 1} ({name}): {message}", error.reason)


def _call_parts(raw: Any, index: int) -> tuple[str, str]:
    """(name, arguments as JSON text) of one OpenAI tool call; shape errors are ``FormatError``."""
    where = f"Call #{index + 1}"
    if not isinstance(raw, Mapping):
        raise FormatError(f"Error: {where} must be an object with a 'function'", "bad_entry")
    function = raw.get("function", raw)  # {"function": {...}} (OpenAI) or the function object itself
    if not isinstance(function, Mapping):
        raise FormatError(f"Error: {where}: 'function' must be an object", "bad_entry")
    name = function.get("name")
    if not isinstance(name, str):
        raise FormatError(f"Error: {where}: 'name' must be a string", "bad_name")
    arguments = function.get("arguments", "{}")
    if isinstance(arguments, Mapping):
        try:
            arguments = json.dumps(arguments, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise FormatError(
                f"Error: {where} ({name}): arguments are not JSON: {exc}", "invalid_json"
            ) from None
    if not isinstance(arguments, str):
        raise FormatError(f"Error: {where} ({name}): 'arguments' must be a JSON object text", "bad_entry")
    return name, arguments if arguments.strip() else "{}"


@dataclass(frozen=True, slots=True)
class Feedback:
    """The environment's answer to one structured step."""

    messages: tuple[dict[str, Any], ...]
    """OpenAI-format messages to append after the assistant's: one ``tool`` message per call (its
    ``tool_call_id`` echoed; content is the result, plus the hint in augmented mode), then ``user``
    messages (the next user turn, notices, a format error)."""
    verdict: StepCode
    """The step's code: FORMAT_ERROR, TOOL_ERROR, TOOL_OK, or TURN_PASS / TURN_FAIL when the turn ended."""
    turn_passed: bool | None
    """Whether the turn passed, when this step ended it (None otherwise)."""
    done: bool
    """The episode is over."""
    score: EpisodeScore
    """Rewards so far (final when ``done``): progress, format and tool rewards, per-turn verdicts."""
    result: StepResult
    """The environment's full record of the step (per-call outcomes, errors)."""


class ToolSession:
    """One BFCL episode, driven with OpenAI-style messages (see the module docstring)."""

    def __init__(self, episode: Episode) -> None:
        self.episode = episode
        opening = episode.start()
        style = episode.config.prompt_style
        system = _RESOURCEFUL_SYSTEM if style is PromptStyle.RESOURCEFUL else _BASIC_SYSTEM
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": system}]
        """The conversation so far (the caller's assistant turns included)."""
        self.messages.extend({"role": m.role, "content": m.content} for m in opening[1:])

    @classmethod
    def open(cls, env: BfclEnvironment, task_id: str, config: EpisodeConfig | None = None) -> ToolSession:
        """A session on a fresh episode of ``task_id`` (``config``: feedback mode, step budget...)."""
        return cls(env.make_episode(task_id, config))

    @property
    def tools(self) -> list[dict[str, Any]]:
        """The functions callable now, as OpenAI tools (missed functions appear when revealed)."""
        return [openai_tool(doc) for doc in self.episode.visible_tools()]

    @property
    def done(self) -> bool:
        return self.episode.done

    def score(self) -> EpisodeScore:
        """Rewards so far."""
        return self.episode.score()

    def step(self, *, tool_calls: Sequence[Any] | None = None, content: str | None = None) -> Feedback:
        """One assistant turn: ``tool_calls`` (OpenAI shape) to call tools, or ``content`` alone to
        answer the user (which ends the turn and judges it)."""
        try:
            parsed: ParsedReply | FormatError = parse_structured_reply(content, tool_calls)
        except FormatError as exc:
            parsed = exc
        result = self.episode.step_parsed(parsed)
        assistant: dict[str, Any] = {"role": "assistant", "content": content}
        ids = _call_ids(tool_calls)
        if tool_calls:
            assistant["tool_calls"] = list(tool_calls)
        replies = self._observation(result, ids)
        self.messages.append(assistant)
        self.messages.extend(replies)
        return Feedback(
            messages=tuple(replies),
            verdict=result.code,
            turn_passed=result.code is StepCode.TURN_PASS if result.turn_ended else None,
            done=result.done,
            score=self.episode.score(),
            result=result,
        )

    @staticmethod
    def _observation(result: StepResult, ids: Sequence[str]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for position, outcome in enumerate(result.calls):
            text = outcome.result if outcome.hint is None else f"{outcome.result}\nHint: {outcome.hint}"
            call_id = ids[position] if position < len(ids) else f"call_{position}"
            out.append({"role": "tool", "tool_call_id": call_id, "content": text})
        for message in result.observation:
            if message.role == "tool":
                continue  # the text protocol's combined feedback: replaced by the per-call messages above
            out.append({"role": message.role, "content": _structured_text(message, result)})
        return out


def _call_ids(tool_calls: Sequence[Any] | None) -> list[str]:
    ids = []
    for position, call in enumerate(tool_calls or ()):
        call_id = call.get("id") if isinstance(call, Mapping) else None
        ids.append(call_id if isinstance(call_id, str) else f"call_{position}")
    return ids


def _structured_text(message: Message, result: StepResult) -> str:
    """A user message, with the text protocol's format-error advice replaced by a structured one."""
    if result.error is None:
        return message.content
    text_advice = protocol.format_error_message(result.error)
    advice = (
        f"Format error: {result.error}\nReply with tool calls, or with a message and no tool calls to answer."
    )
    return message.content.replace(text_advice, advice)
