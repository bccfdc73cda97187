"""τ²'s simulated user: an OpenAI-compatible chat endpoint, or a script (tests, conformance).

The user simulator sees the conversation from the user's side, as tau2 builds it: a system message
(tau2's simulation guidelines, then ``<scenario>`` with the task's user instructions), the agent's
messages as ``user`` turns, its own earlier messages as ``assistant`` turns, and — in telecom, where
the user operates a phone — its own tool calls and their results. It answers with text, or with tool
calls on its own tools. Ending the conversation is a token in the text: ``###STOP###``,
``###TRANSFER###`` or ``###OUT-OF-SCOPE###``.

``OpenAIUserSimulator`` posts to ``{base_url}/chat/completions`` with the standard library (any
OpenAI-compatible server: SGLang, vLLM, ``envtune-serve``, a hosted API). It blocks: an asyncio runner
calls τ² episode steps in a worker thread (see ``environments/suites.py``).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from envtune.environments.endpoint import EndpointConfig as EndpointConfig
from envtune.environments.types import ToolCall

STOP_TOKENS: tuple[str, ...] = ("###STOP###", "###TRANSFER###", "###OUT-OF-SCOPE###")
MAX_USER_REPLY_CHARS = 64 * 1024


class UserSimulatorError(RuntimeError):
    """The user simulator could not produce a reply (endpoint down, malformed answer)."""


@dataclass(frozen=True, slots=True)
class UserReply:
    """One message of the simulated user: text for the agent, or tool calls on the user's tools."""

    text: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()

    def __post_init__(self) -> None:
        if (self.text is None) == (not self.tool_calls):
            raise ValueError("a user reply has either text or tool calls, not both or neither")

    @property
    def is_stop(self) -> bool:
        return self.text is not None and any(token in self.text for token in STOP_TOKENS)


class UserSimulator(Protocol):
    """Produces the user's next message from the user's view of the conversation."""

    @property
    def description(self) -> str:
        """Shown in evaluation output (which endpoint, model and temperature played the user)."""
        ...

    def reply(
        self, history: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]
    ) -> UserReply: ...


def system_prompt(guidelines: str, instructions: str) -> str:
    """tau2's user-simulator system prompt: its guidelines, then the scenario."""
    return f"{guidelines}\n\n<scenario>\n{instructions}\n</scenario>".strip()


@dataclass
class ScriptedUser:
    """Replies from a list, in order; ``###STOP###`` once it runs out (tests and conformance)."""

    script: Sequence[UserReply]
    position: int = 0
    seen: list[list[Mapping[str, Any]]] = field(default_factory=list)

    @property
    def description(self) -> str:
        return f"scripted ({len(self.script)} messages)"

    def reply(self, history: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]) -> UserReply:
        self.seen.append([dict(m) for m in history])
        if self.position >= len(self.script):
            return UserReply(text="###STOP###")
        item = self.script[self.position]
        self.position += 1
        return item


def chat_completion(
    config: EndpointConfig, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] = ()
) -> Mapping[str, Any]:
    """POST one chat completion; returns the first choice's message."""
    body: dict[str, Any] = {
        "model": config.model,
        "messages": list(messages),
        "temperature": config.temperature,
        "max_tokens": config.max_tokens,
    }
    if tools:
        body["tools"] = [dict(tool) for tool in tools]
    headers = {"Content-Type": "application/json"}
    if config.api_key_env:
        token = os.environ.get(config.api_key_env)
        if not token:
            raise UserSimulatorError(f"environment variable {config.api_key_env} is not set")
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        config.base_url.rstrip("/") + "/chat/completions", data=json.dumps(body).encode(), headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=config.timeout_s) as response:
            payload = json.loads(response.read(8 * 1024 * 1024))
    except (urllib.error.URLError, TimeoutError, OSError, ValueError) as exc:
        raise UserSimulatorError(f"{config.base_url}: {exc}") from None
    try:
        return payload["choices"][0]["message"]
    except (KeyError, IndexError, TypeError):
        raise UserSimulatorError(f"{config.base_url}: no choices in the reply") from None


def parse_message(message: Mapping[str, Any]) -> UserReply:
    """An OpenAI assistant message as a user reply (tool calls win over text, as tau2 requires one kind)."""
    calls = []
    for raw in message.get("tool_calls") or ():
        function = raw.get("function") or {}
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except json.JSONDecodeError as exc:
            raise UserSimulatorError(f"user tool call with invalid JSON arguments: {exc}") from None
        if not isinstance(arguments, dict) or not isinstance(function.get("name"), str):
            raise UserSimulatorError("user tool call without a name or with non-object arguments")
        calls.append(ToolCall(function["name"], arguments))
    if calls:
        return UserReply(tool_calls=tuple(calls))
    text = message.get("content")
    if not isinstance(text, str) or not text.strip():
        raise UserSimulatorError("the user simulator returned neither text nor tool calls")
    return UserReply(text=text[:MAX_USER_REPLY_CHARS])


@dataclass(frozen=True, slots=True)
class OpenAIUserSimulator:
    """The user played by a model behind an OpenAI-compatible endpoint."""

    config: EndpointConfig

    @property
    def description(self) -> str:
        return f"{self.config.model} at {self.config.base_url} (temperature {self.config.temperature})"

    def reply(self, history: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]) -> UserReply:
        return parse_message(chat_completion(self.config, history, tools))
