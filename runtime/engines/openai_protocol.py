"""The OpenAI chat-completions contract: request validation, OpenAI's error shape, the tool-call parser.

``parse_chat_request`` turns a decoded ``/v1/chat/completions`` body into a ``ChatRequest`` or raises
``OpenAIError`` (HTTP 400 with the offending ``param``), so the server never guesses: unknown keys,
wrong types, out-of-range sampling values, malformed messages or tools, a ``tool_choice`` naming a
function that was not offered, and what the engine cannot honour (penalties, ``logit_bias``,
``top_logprobs`` > 0, non-text content) are refused by name. ``parse_tool_calls`` reads Qwen2.5's
``<tool_call>{json}</tool_call>`` blocks out of a reply; ``forced_tool_grammar`` is the grammar that
makes ``tool_choice`` ``required``/named hold.

Left out: serving (``openai_api.py``), anything model-specific beyond Qwen2.5's tool-call format.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from aiohttp import web
from envtune.agents.engine import EngineError

TOOL_CALL_OPEN = "<tool_call>"
"""Opens one call in Qwen2.5's format."""
TOOL_CALL_CLOSE = "</tool_call>"
"""Closes it."""
MAX_TOOL_CALL_CHARS = 64 * 1024
"""Largest body of one ``<tool_call>`` block the parser decodes; a longer one stays content."""
MAX_STOP_SEQUENCES = 4
"""OpenAI's limit on ``stop`` strings."""
MAX_FORCED_CALLS = 8
"""Most calls a ``tool_choice: required`` grammar admits in one reply."""
_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""OpenAI's rule for function names."""
_TOOL_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_IGNORED_KEYS = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls", "modalities"})
"""Accepted and ignored: they change nothing a single local model could do differently."""
_KNOWN_KEYS = frozenset(
    {
        "model",
        "messages",
        "tools",
        "tool_choice",
        "temperature",
        "top_p",
        "top_k",
        "n",
        "max_tokens",
        "max_completion_tokens",
        "stop",
        "seed",
        "stream",
        "stream_options",
        "logprobs",
        "top_logprobs",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "response_format",
        *_IGNORED_KEYS,
    }
)


# --- errors --------------------------------------------------------------------------------------


class OpenAIError(Exception):
    """A request the endpoint refuses; rendered as OpenAI's error object with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # OpenAI's field name
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def to_json(self) -> dict[str, Any]:
        """``{"error": {...}}`` as OpenAI sends it."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return web.json_response(self.to_json(), status=self.status)


def invalid(message: str, param: str | None = None, code: str | None = None) -> NoReturn:
    raise OpenAIError(400, message, param=param, code=code)


def engine_failure(exc: EngineError) -> OpenAIError:
    if exc.retryable:
        return OpenAIError(503, f"the engine could not serve the request: {exc}", type="server_error")
    return OpenAIError(400, f"the engine refused the request: {exc}")


# --- the tool-call parser --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ParsedToolCall:
    """One call the model wrote."""

    name: str
    """The function name."""
    arguments: str
    """The arguments as a JSON object text (what OpenAI's ``function.arguments`` carries)."""


@dataclass(frozen=True, slots=True)
class ParsedOutput:
    """A model reply split into content and tool calls."""

    content: str | None
    """Text outside the tool-call blocks, stripped (None when empty)."""
    tool_calls: tuple[ParsedToolCall, ...]
    """The calls, in order (empty when the reply made none or did not parse)."""


def _parse_call(body: str) -> ParsedToolCall | None:
    if len(body) > MAX_TOOL_CALL_CHARS:
        return None
    try:
        decoded = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(decoded, dict):
        return None
    name = decoded.get("name")
    # Qwen writes "arguments"; some fine-tunes write "parameters" for the same thing.
    arguments = decoded.get("arguments", decoded.get("parameters", {}))
    if not isinstance(name, str) or not name or not isinstance(arguments, dict):
        return None
    if set(decoded) - {"name", "arguments", "parameters"}:
        return None
    return ParsedToolCall(name=name, arguments=json.dumps(arguments, ensure_ascii=False))


def parse_tool_calls(text: str) -> ParsedOutput:
    """Split Qwen2.5-format output: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``
    blocks become calls, the rest content. If any block is not a JSON object with a string ``name``
    and an object ``arguments`` (or a tag is left open), the whole text is content and there are no
    calls: a half-parsed reply would silently drop what the model wrote.
    """
    blocks = list(_TOOL_BLOCK.finditer(text))
    remainder = _TOOL_BLOCK.sub("", text)
    if not blocks or TOOL_CALL_OPEN in remainder or TOOL_CALL_CLOSE in remainder:
        return ParsedOutput(content=text.strip() or None, tool_calls=())
    calls = []
    for block in blocks:
        call = _parse_call(block.group(1).strip())
        if call is None:
            return ParsedOutput(content=text.strip() or None, tool_calls=())
        calls.append(call)
    return ParsedOutput(content=remainder.strip() or None, tool_calls=tuple(calls))


# --- request parsing -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A validated ``/v1/chat/completions`` request."""

    model: str
    """The requested model id (the served name or a loaded adapter's name)."""
    messages: list[dict[str, Any]]
    """Messages as the chat template takes them (tool-call arguments decoded to dicts)."""
    tools: list[dict[str, Any]] | None
    """OpenAI tool objects, or None."""
    tool_choice: str | dict[str, Any]
    """``none``, ``auto``, ``required`` or ``{"type": "function", "function": {"name": ...}}``."""
    temperature: float
    """Sampling temperature (0 = greedy)."""
    top_p: float
    """Nucleus mass."""
    top_k: int
    """-1 disables (an SGLang/vLLM extension)."""
    n: int
    """Choices to sample."""
    max_tokens: int | None
    """Cap on each choice's tokens (None: what the context leaves)."""
    stop: tuple[str, ...]
    """Stop strings (not included in the output)."""
    seed: int | None
    """Sampling seed."""
    stream: bool
    """Server-sent events instead of one JSON body."""
    include_usage: bool
    """Streaming only: send a usage chunk before ``[DONE]``."""
    logprobs: bool
    """Return each sampled token's logprob."""
    response_format: dict[str, Any] | None
    """``{"type": "json_object"}`` or ``{"type": "json_schema", ...}`` (``text`` is None)."""


def _expect(cond: bool, message: str, param: str | None) -> None:
    if not cond:
        invalid(message, param)


def _number(body: Mapping[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    _expect(isinstance(value, int | float) and not isinstance(value, bool), f"'{key}' must be a number", key)
    _expect(low <= value <= high, f"'{key}' must be in [{low}, {high}], got {value}", key)
    return float(value)


def _integer(body: Mapping[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    _expect(isinstance(value, int) and not isinstance(value, bool), f"'{key}' must be an integer", key)
    return int(value)


def _content_text(content: Any, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    _expect(isinstance(content, list), f"{where}.content must be a string or a list of parts", where)
    parts = []
    for index, part in enumerate(content):
        _expect(isinstance(part, dict), f"{where}.content[{index}] must be an object", where)
        kind = part.get("type")
        if kind != "text":
            invalid(f"{where}.content[{index}]: only text parts are supported, got {kind!r}", where)
        _expect(isinstance(part.get("text"), str), f"{where}.content[{index}].text must be a string", where)
        parts.append(part["text"])
    return "".join(parts)


def _decode_arguments(arguments: Any, where: str) -> dict[str, Any]:
    if isinstance(arguments, dict):
        return arguments
    _expect(isinstance(arguments, str), f"{where}.function.arguments must be a JSON string", where)
    try:
        decoded = json.loads(arguments)
    except ValueError:
        invalid(f"{where}.function.arguments is not valid JSON", where)
    _expect(isinstance(decoded, dict), f"{where}.function.arguments must encode a JSON object", where)
    return decoded


def _message(raw: Any, index: int) -> dict[str, Any]:
    where = f"messages[{index}]"
    _expect(isinstance(raw, dict), f"{where} must be an object", where)
    role = raw.get("role")
    if role == "developer":  # OpenAI's newer name for the system role
        role = "system"
    _expect(
        role in ("system", "user", "assistant", "tool"),
        f"{where}.role must be system, developer, user, assistant or tool, got {role!r}",
        where,
    )
    content = _content_text(raw.get("content"), where)
    message: dict[str, Any] = {"role": role, "content": content}
    if role == "assistant" and raw.get("tool_calls"):
        calls = raw["tool_calls"]
        _expect(isinstance(calls, list), f"{where}.tool_calls must be a list", where)
        rendered = []
        for j, call in enumerate(calls):
            at = f"{where}.tool_calls[{j}]"
            _expect(
                isinstance(call, dict) and isinstance(call.get("function"), dict), f"{at} is malformed", at
            )
            name = call["function"].get("name")
            _expect(isinstance(name, str) and bool(name), f"{at}.function.name must be a string", at)
            rendered.append(
                {
                    "id": call.get("id"),
                    "type": "function",
                    "function": {
                        "name": name,
                        "arguments": _decode_arguments(call["function"].get("arguments"), at),
                    },
                }
            )
        message["tool_calls"] = rendered
    elif content is None:
        invalid(f"{where}.content is required for a {role} message", where)
    if role == "tool":
        if raw.get("tool_call_id") is not None:
            message["tool_call_id"] = raw["tool_call_id"]
    elif message["content"] is None:
        message["content"] = ""
    return message


def _tools(raw: Any) -> list[dict[str, Any]] | None:
    if raw is None:
        return None
    _expect(isinstance(raw, list), "'tools' must be a list", "tools")
    _expect(len(raw) <= 128, "'tools' holds more than 128 functions", "tools")
    tools: list[dict[str, Any]] = []
    for index, tool in enumerate(raw):
        where = f"tools[{index}]"
        _expect(
            isinstance(tool, dict) and tool.get("type") == "function",
            f"{where}.type must be 'function'",
            where,
        )
        function = tool.get("function")
        _expect(isinstance(function, dict), f"{where}.function must be an object", where)
        name = function.get("name")
        _expect(
            isinstance(name, str) and bool(_FUNCTION_NAME.match(name)),
            f"{where}.function.name must match [A-Za-z0-9_-]{{1,64}}, got {name!r}",
            where,
        )
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        _expect(
            isinstance(parameters, dict), f"{where}.function.parameters must be a JSON Schema object", where
        )
        entry: dict[str, Any] = {"name": name, "parameters": parameters}
        if function.get("description") is not None:
            _expect(
                isinstance(function["description"], str),
                f"{where}.function.description must be a string",
                where,
            )
            entry["description"] = function["description"]
        tools.append({"type": "function", "function": entry})
    names = [t["function"]["name"] for t in tools]
    _expect(len(set(names)) == len(names), "'tools' names a function twice", "tools")
    return tools or None


def _tool_choice(raw: Any, tools: list[dict[str, Any]] | None) -> str | dict[str, Any]:
    if raw is None:
        return "auto" if tools else "none"
    if isinstance(raw, str):
        _expect(
            raw in ("none", "auto", "required"),
            f"'tool_choice' {raw!r} is not none, auto or required",
            "tool_choice",
        )
        if raw == "required":
            _expect(tools is not None, "'tool_choice' required needs 'tools'", "tool_choice")
        return raw
    _expect(
        isinstance(raw, dict) and raw.get("type") == "function" and isinstance(raw.get("function"), dict),
        '\'tool_choice\' must be a string or {"type": "function", "function": {"name": ...}}',
        "tool_choice",
    )
    name = raw["function"].get("name")
    offered = {t["function"]["name"] for t in tools or ()}
    _expect(name in offered, f"'tool_choice' names {name!r}, which is not among 'tools'", "tool_choice")
    return {"type": "function", "function": {"name": name}}


def _top_p(body: Mapping[str, Any]) -> float:
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    _expect(top_p > 0, "'top_p' must be in (0, 1]", "top_p")
    return top_p


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate a decoded request body; raises ``OpenAIError`` (400) naming the bad parameter."""
    _expect(isinstance(body, dict), "the request body must be a JSON object", None)
    unknown = sorted(set(body) - _KNOWN_KEYS)
    if unknown:
        invalid(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
    model = body.get("model")
    _expect(isinstance(model, str) and bool(model), "'model' is required (a string)", "model")
    raw_messages = body.get("messages")
    _expect(
        isinstance(raw_messages, list) and bool(raw_messages),
        "'messages' must be a non-empty list",
        "messages",
    )
    messages = [_message(m, i) for i, m in enumerate(raw_messages)]
    tools = _tools(body.get("tools"))
    tool_choice = _tool_choice(body.get("tool_choice"), tools)
    n = _integer(body, "n")
    n = 1 if n is None else n
    _expect(n >= 1, f"'n' must be >= 1, got {n}", "n")
    max_tokens = _integer(body, "max_completion_tokens")
    param = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, param = _integer(body, "max_tokens"), "max_tokens"
    if max_tokens is not None:
        _expect(max_tokens >= 1, f"'{param}' must be >= 1, got {max_tokens}", param)
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    else:
        _expect(
            isinstance(stop, list) and all(isinstance(s, str) for s in stop),
            "'stop' must be a string or a list of strings",
            "stop",
        )
        stops = tuple(stop)
    _expect(
        len(stops) <= MAX_STOP_SEQUENCES, f"'stop' holds more than {MAX_STOP_SEQUENCES} sequences", "stop"
    )
    _expect(all(stops), "'stop' sequences must not be empty", "stop")
    for key in ("presence_penalty", "frequency_penalty"):
        if _number(body, key, 0.0, -2.0, 2.0) != 0.0:
            invalid(f"'{key}' is not supported by this server (only 0)", key)
    if body.get("logit_bias"):
        invalid("'logit_bias' is not supported by this server", "logit_bias")
    logprobs = body.get("logprobs") or False
    _expect(isinstance(logprobs, bool), "'logprobs' must be a boolean", "logprobs")
    top_logprobs = _integer(body, "top_logprobs")
    if top_logprobs:
        invalid(
            "'top_logprobs' > 0 is not supported: the engine returns the sampled token's logprob only",
            "top_logprobs",
        )
    stream = body.get("stream") or False
    _expect(isinstance(stream, bool), "'stream' must be a boolean", "stream")
    options = body.get("stream_options") or {}
    _expect(isinstance(options, dict), "'stream_options' must be an object", "stream_options")
    include_usage = options.get("include_usage") or False
    _expect(
        isinstance(include_usage, bool), "'stream_options.include_usage' must be a boolean", "stream_options"
    )
    response_format = body.get("response_format")
    if response_format is not None:
        _expect(isinstance(response_format, dict), "'response_format' must be an object", "response_format")
        kind = response_format.get("type")
        _expect(
            kind in ("text", "json_object", "json_schema"),
            f"'response_format.type' {kind!r} is unknown",
            "response_format",
        )
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            _expect(
                isinstance(spec, dict) and isinstance(spec.get("schema", {}), dict),
                "'response_format.json_schema.schema' must be a JSON Schema object",
                "response_format",
            )
        if kind == "text":
            response_format = None
    if response_format is not None and tool_choice not in ("none", "auto"):
        invalid("'response_format' and a forced 'tool_choice' cannot be combined", "response_format")
    top_k = _integer(body, "top_k")
    return ChatRequest(
        model=model,
        messages=messages,
        tools=tools,
        tool_choice=tool_choice,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_top_p(body),
        top_k=-1 if top_k is None or top_k <= 0 else top_k,
        n=n,
        max_tokens=max_tokens,
        stop=stops,
        seed=_integer(body, "seed"),
        stream=stream,
        include_usage=include_usage,
        logprobs=logprobs,
        response_format=response_format,
    )


# --- grammars ----------------------------------------------------------------------------------------


def _call_schema(tool: Mapping[str, Any]) -> dict[str, Any]:
    function = tool["function"]
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": function["parameters"]},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def forced_tool_grammar(tools: Sequence[Mapping[str, Any]], *, max_calls: int) -> str:
    """EBNF admitting 1..``max_calls`` Qwen-format tool-call blocks of ``tools``, each call's
    ``arguments`` following its JSON Schema (xgrammar's conversion; one spacing, fixed key order,
    so a constrained model cannot pad forever)."""
    import xgrammar

    cases = [_call_schema(tool) for tool in tools]
    schema = cases[0] if len(cases) == 1 else {"anyOf": cases}
    call = xgrammar.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)

    def lit(text: str) -> Any:
        return xgrammar.Grammar.from_ebnf(f"root ::= {json.dumps(text)}")

    block = xgrammar.Grammar.concat(lit(TOOL_CALL_OPEN + "\n"), call, lit("\n" + TOOL_CALL_CLOSE))
    blocks = block
    for _ in range(max_calls - 1):
        blocks = xgrammar.Grammar.union(block, xgrammar.Grammar.concat(block, lit("\n"), blocks))
    return str(blocks)


