"""OpenAI-compatible ``/v1/models`` and ``/v1/chat/completions`` over a token-in/token-out engine.

So OpenAI clients, agent frameworks and eval harnesses can talk to ``envtune-serve`` (SGLang serves
both APIs; envtune's server spoke only the native one). ``add_openai_routes(app, engine, tokenizer)``
mounts the routes on any aiohttp application; the engine is anything with envtune's ``Engine``
``generate`` (``generate_stream``, ``adapters()`` and ``max_context`` are used when present).

How a request is served:

- the messages (and ``tools``) are rendered with the model's own chat template
  (``apply_chat_template(messages, tools=...)``) and tokenized once; the prompt length is checked
  against the context before anything is generated;
- one ``GenerateRequest`` with ``n`` samples; ``stop`` strings are matched on the decoded text as
  tokens arrive and a choice that matched stops there (the engine job is cancelled once every
  choice has stopped);
- the output goes through ``parse_tool_calls`` (Qwen2.5's ``<tool_call>{json}</tool_call>`` blocks):
  parsed calls become ``tool_calls`` (``finish_reason`` ``tool_calls``), the text outside the blocks
  the ``content``. Output that does not parse stays ``content``, whole: nothing is lost or guessed;
- ``tool_choice`` ``required`` or a named function constrains decoding with a grammar (xgrammar)
  that admits only tool-call blocks of the offered functions with arguments that follow their
  JSON Schemas, so a forced call is well formed even from a weak model; ``response_format``
  ``json_object``/``json_schema`` constrains the reply to JSON the same way;
- streaming sends OpenAI's ``chat.completion.chunk`` events: the role, content deltas (held back
  while they could still turn into a tool-call tag or a stop string, so streamed content always
  equals the non-streamed content), each tool call as one delta when its choice ends, a last chunk
  with ``finish_reason``, the usage chunk when ``stream_options.include_usage``, then
  ``data: [DONE]``.

Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400
``invalid_request_error`` (with the offending ``param``), 401 without the API key, 404 for an unknown
model or route, 413 for a body over the limit, 503/500 when the engine fails.

Left out: ``/v1/completions``, embeddings, ``top_logprobs`` > 0, penalties and ``logit_bias`` (refused
with a 400 when not at their defaults), streaming tool-call arguments piecewise (each call arrives
whole, which OpenAI's protocol allows), image and audio content.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web
from envtune.agents.engine import (
    Completion,
    Constraint,
    ConstraintKind,
    Engine,
    EngineError,
    FinishReason,
    GenerateRequest,
    SamplingParams,
)
from envtune.runtime.engines.openai_protocol import (
    MAX_FORCED_CALLS,
    TOOL_CALL_OPEN,
    ChatRequest,
    OpenAIError,
    ParsedOutput,
    engine_failure,
    forced_tool_grammar,
    invalid,
    parse_chat_request,
    parse_tool_calls,
)

log = structlog.get_logger(__name__)

# --- serving -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpenAIServingConfig:
    """Limits and names of the OpenAI-compatible routes."""

    served_model_name: str
    """The model id ``/v1/models`` lists and requests must name (loaded adapters are listed too)."""
    max_body_bytes: int = 4 * 1024 * 1024
    """Largest request body (413 above)."""
    max_n: int = 16
    """Most choices per request."""
    max_tokens_limit: int | None = None
    """Cap on ``max_tokens`` (None: only the context bounds it)."""
    default_max_tokens: int | None = None
    """``max_tokens`` when the request gives none (None: what the context leaves)."""
    max_context: int | None = None
    """Prompt + completion limit; None takes the engine's ``max_context``."""
    api_key: str | None = None
    """When set, requests need ``Authorization: Bearer <api_key>``."""


@dataclass(frozen=True, slots=True)
class _Token:
    """A sampled token of one choice (the embedded engine's ``TokenEvent`` has the same fields)."""

    index: int
    token_id: int
    logprob: float
    completion: Completion | None = None


@dataclass(slots=True)
class _Choice:
    """One choice being generated (mutable, owned by one request handler)."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    """The reply's text so far (final once finished: cut at a stop string, stop token left out)."""
    window_start: int = 0
    """Incremental decoding: first token of the window being decoded."""
    window_read: int = 0
    """Incremental decoding: tokens whose text is already in ``text``."""
    finished: bool = False
    finish: str | None = None
    role_sent: bool = False
    """Streaming: the opening ``role`` delta went out."""
    sent: str = ""
    """Streaming: the content sent so far (always a prefix of the final content)."""
    sent_tokens: int = 0
    """Streaming: tokens whose logprobs went out."""


def _hold_back(text: str, markers: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a marker."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:size]):
                longest = size
                break
    return longest


class OpenAIChatRoutes:
    """The handlers behind ``add_openai_routes`` (one per mounted app)."""

    def __init__(self, engine: Engine, tokenizer: Any, config: OpenAIServingConfig) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "the tokenizer has no chat template: /v1/chat/completions cannot render messages"
            )
        self.engine = engine
        self.tokenizer = tokenizer
        self.config = config
        self.created = int(time.time())
        self._stop_ids = self._eos_ids()

    def _eos_ids(self) -> tuple[int, ...]:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is None:
            return ()
        return tuple(eos) if isinstance(eos, list | tuple) else (int(eos),)

    # --- plumbing ---------------------------------------------------------------------------------

    def _adapters(self) -> dict[str, int]:
        adapters: Callable[[], Mapping[str, int]] | None = getattr(self.engine, "adapters", None)
        return dict(adapters()) if adapters is not None else {}

    def _check_auth(self, request: web.Request) -> None:
        key = self.config.api_key
        if key and request.headers.get("Authorization", "") != f"Bearer {key}":
            raise OpenAIError(
                401, "Incorrect API key provided.", type="invalid_request_error", code="invalid_api_key"
            )

    async def _read_json(self, request: web.Request) -> Any:
        limit = self.config.max_body_bytes
        too_large = OpenAIError(
            413,
            f"the request body exceeds {limit} bytes",
            type="invalid_request_error",
            code="request_too_large",
        )
        if request.content_length is not None and request.content_length > limit:
            raise too_large
        body = bytearray()
        async for chunk in request.content.iter_chunked(64 * 1024):
            body += chunk
            if len(body) > limit:
                raise too_large
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise OpenAIError(400, f"the request body is not valid JSON: {exc}") from None

    def _render(self, chat: ChatRequest) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(
                chat.messages, tools=chat.tools, tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # jinja raises its own types (TemplateError, TypeError...)
            raise OpenAIError(
                400, f"the chat template could not render the messages: {exc}", param="messages"
            ) from None
        # The template wrote every special token it wants; never add BOS/EOS on top.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _constraint(self, chat: ChatRequest) -> Constraint | None:
        if chat.response_format is not None:
            if chat.response_format["type"] == "json_object":
                return Constraint(ConstraintKind.JSON_SCHEMA, json.dumps({"type": "object"}))
            schema = chat.response_format["json_schema"].get("schema", {})
            return Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(schema))
        if chat.tool_choice in ("none", "auto"):
            return None
        tools = chat.tools or []
        if isinstance(chat.tool_choice, dict):
            name = chat.tool_choice["function"]["name"]
            tools = [t for t in tools if t["function"]["name"] == name]
            max_calls = 1
        else:
            max_calls = MAX_FORCED_CALLS
        try:
            grammar = forced_tool_grammar(tools, max_calls=max_calls)
        except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar refuses the schema
            raise OpenAIError(
                400, f"a tool's parameters are not a usable JSON Schema: {exc}", param="tools"
            ) from None
        return Constraint(ConstraintKind.EBNF, grammar)

    def _generate_request(self, chat: ChatRequest) -> tuple[GenerateRequest, int]:
        adapters = self._adapters()
        if chat.model != self.config.served_model_name and chat.model not in adapters:
            raise OpenAIError(
                404, f"The model '{chat.model}' does not exist", param="model", code="model_not_found"
            )
        if chat.n > self.config.max_n:
            invalid(f"'n' must be <= {self.config.max_n}, got {chat.n}", "n")
        prompt = self._render(chat)
        context = self.config.max_context or getattr(self.engine, "max_context", None) or (1 << 30)
        room = context - len(prompt)
        max_tokens = chat.max_tokens
        if max_tokens is None:
            max_tokens = min(room, self.config.default_max_tokens or room)
        limit = self.config.max_tokens_limit
        if limit is not None and max_tokens > limit:
            invalid(f"'max_tokens' must be <= {limit}, got {max_tokens}", "max_tokens")
        if max_tokens < 1 or len(prompt) + max_tokens > context:
            invalid(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{len(prompt) + max(max_tokens, 0)} tokens ({len(prompt)} in the messages, "
                f"{max(max_tokens, 0)} in the completion). Please reduce the length of the messages or "
                "completion.",
                "messages",
                "context_length_exceeded",
            )
        sampling = SamplingParams(
            max_new_tokens=max_tokens,
            temperature=chat.temperature,
            top_p=chat.top_p,
            top_k=chat.top_k,
            stop_token_ids=self._stop_ids,
            n=chat.n,
            seed=chat.seed,
        )
        request = GenerateRequest(
            prompt_ids=tuple(prompt),
            sampling=sampling,
            constraint=self._constraint(chat),
            adapter=chat.model if chat.model in adapters else None,
        )
        return request, len(prompt)

    async def _tokens(self, request: GenerateRequest) -> AsyncGenerator[_Token, None]:
        """Every sampled token, per choice, as the engine produces it (all at once without streaming)."""
        stream = getattr(self.engine, "generate_stream", None)
        if stream is not None:
            async with contextlib.aclosing(stream(request)) as events:
                async for event in events:
                    yield _Token(event.index, event.token_id, event.logprob, event.completion)
            return
        for index, completion in enumerate(await self.engine.generate(request)):
            last = len(completion.token_ids) - 1
            for i, (token, logprob) in enumerate(zip(completion.token_ids, completion.logprobs, strict=True)):
                yield _Token(index, token, logprob, completion if i == last else None)

    def _advance(self, choice: _Choice, token: _Token, chat: ChatRequest) -> None:
        """Record a token; decide whether the choice ended (engine finish or a stop string)."""
        choice.token_ids.append(token.token_id)
        choice.logprobs.append(token.logprob)
        completion = token.completion
        previous = len(choice.text)
        if completion is not None:
            ids = choice.token_ids
            if completion.finish_reason is FinishReason.STOP and ids[-1] in self._all_stop_ids():
                ids = ids[:-1]  # the matched stop token is not text
            choice.text = self.tokenizer.decode(ids, skip_special_tokens=True)  # once, exact
        elif chat.stream or chat.stop:
            self._detokenize(choice)  # text as it grows: only streaming and stop strings need it
        if chat.stop:
            start = max(0, previous - max(map(len, chat.stop)))
            hits = [pos for s in chat.stop if (pos := choice.text.find(s, start)) >= 0]
            if hits:
                choice.text = choice.text[: min(hits)]
                choice.finished, choice.finish = True, "stop"
                return
        if completion is not None:
            choice.finished = True
            match completion.finish_reason:
                case FinishReason.LENGTH:
                    choice.finish = "length"
                case FinishReason.STOP:
                    choice.finish = "stop"
                case _:
                    raise EngineError("generation aborted", retryable=True)

    def _detokenize(self, choice: _Choice) -> None:
        """Extend ``choice.text`` by decoding a short window of the newest tokens, not the whole reply
        (that cost grows with the square of the length; ``benchmarks/openai_stream_decode.py`` measures
        both on a 2048-token reply).

        The window starts at the last token boundary where the text was complete; byte-level BPE
        decodes a window exactly as it decodes the same tokens inside the whole, and a window that
        ends inside a multi-byte character (``\ufffd``) waits for its next token.
        """
        ids = choice.token_ids
        window = self.tokenizer.decode(ids[choice.window_start :], skip_special_tokens=True)
        if window.endswith("\ufffd"):
            return
        settled = self.tokenizer.decode(
            ids[choice.window_start : choice.window_read], skip_special_tokens=True
        )
        if not window.startswith(settled):  # not byte-level BPE after all: decode it all
            choice.text = self.tokenizer.decode(ids, skip_special_tokens=True)
        else:
            choice.text += window[len(settled) :]
        choice.window_start, choice.window_read = choice.window_read, len(ids)

    def _all_stop_ids(self) -> frozenset[int]:
        return frozenset(self._stop_ids) | self.engine_stop_ids()

    def engine_stop_ids(self) -> frozenset[int]:
        """The engine's own EOS ids (the embedded engine stops on its generation config's EOS too)."""
        return getattr(self.engine, "eos_token_ids", frozenset())

    @staticmethod
    def _parses_tools(chat: ChatRequest) -> bool:
        return chat.tools is not None and chat.tool_choice != "none"

    def _outcome(self, choice: _Choice, chat: ChatRequest) -> tuple[ParsedOutput, str]:
        """The parsed message and the finish reason of a finished choice."""
        if not self._parses_tools(chat):
            return ParsedOutput(content=choice.text, tool_calls=()), choice.finish or "stop"
        parsed = parse_tool_calls(choice.text)
        finish = choice.finish or "stop"
        if parsed.tool_calls and finish != "length":
            # OpenAI ends a call it forced by name with "stop", any other call with "tool_calls".
            finish = "stop" if isinstance(chat.tool_choice, dict) else "tool_calls"
        return parsed, finish

    @staticmethod
    def _tool_calls_json(parsed: ParsedOutput) -> list[dict[str, Any]]:
        return [
            {
                "id": f"call_{secrets.token_hex(12)}",
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call in parsed.tool_calls
        ]

    def _logprobs_json(self, token_ids: Sequence[int], logprobs: Sequence[float]) -> dict[str, Any]:
        content = []
        for token, logprob in zip(token_ids, logprobs, strict=True):
            text = self.tokenizer.decode([token], skip_special_tokens=False)
            content.append(
                {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8")), "top_logprobs": []}
            )
        return {"content": content}

    # --- handlers -----------------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        """``GET /v1/models``: the served model and every loaded adapter (its parent is the model)."""
        try:
            self._check_auth(request)
        except OpenAIError as exc:
            return exc.response()
        return web.json_response({"object": "list", "data": self._model_cards()})

    async def model(self, request: web.Request) -> web.Response:
        """``GET /v1/models/{model}``."""
        try:
            self._check_auth(request)
            wanted = request.match_info["model"]
            for card in self._model_cards():
                if card["id"] == wanted:
                    return web.json_response(card)
            raise OpenAIError(
                404, f"The model '{wanted}' does not exist", param="model", code="model_not_found"
            )
        except OpenAIError as exc:
            return exc.response()

    def _model_cards(self) -> list[dict[str, Any]]:
        served = self.config.served_model_name
        cards = [
            {
                "id": served,
                "object": "model",
                "created": self.created,
                "owned_by": "envtune",
                "root": served,
                "parent": None,
            }
        ]
        for name in sorted(self._adapters()):
            cards.append(
                {
                    "id": name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "envtune",
                    "root": name,
                    "parent": served,
                }
            )
        return cards

    async def not_found(self, request: web.Request) -> web.Response:
        """Any other ``/v1/...`` path: OpenAI's 404 shape instead of aiohttp's plain text."""
        return OpenAIError(
            404, f"Unknown request URL: {request.method} {request.path}", code="unknown_url"
        ).response()

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/chat/completions``."""
        try:
            self._check_auth(request)
            chat = parse_chat_request(await self._read_json(request))
            engine_request, prompt_tokens = self._generate_request(chat)
        except OpenAIError as exc:
            return exc.response()
        completion_id = f"chatcmpl-{secrets.token_hex(12)}"
        if chat.stream:
            return await self._stream(request, chat, engine_request, prompt_tokens, completion_id)
        choices = [_Choice(i) for i in range(chat.n)]
        try:
            await self._run(engine_request, chat, choices)
        except EngineError as exc:
            return engine_failure(exc).response()
        body_choices = []
        for choice in choices:
            parsed, finish = self._outcome(choice, chat)
            message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
            if parsed.tool_calls:
                message["tool_calls"] = self._tool_calls_json(parsed)
            body_choices.append(
                {
                    "index": choice.index,
                    "message": message,
                    "logprobs": self._logprobs_json(choice.token_ids, choice.logprobs)
                    if chat.logprobs
                    else None,
                    "finish_reason": finish,
                }
            )
        completion_tokens = sum(len(c.token_ids) for c in choices)
        return web.json_response(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": chat.model,
                "system_fingerprint": self._fingerprint(),
                "choices": body_choices,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            }
        )

    def _fingerprint(self) -> str:
        return f"envtune-v{getattr(self.engine, 'policy_version', 0)}"

    async def _run(
        self,
        engine_request: GenerateRequest,
        chat: ChatRequest,
        choices: list[_Choice],
        on_token: Callable[[_Choice], Any] | None = None,
    ) -> None:
        """Feed the engine's tokens to the choices until every choice has finished."""
        open_choices = len(choices)
        async with contextlib.aclosing(self._tokens(engine_request)) as tokens:
            async for token in tokens:
                choice = choices[token.index]
                if choice.finished:
                    continue  # stopped on a stop string; the engine is still sampling its siblings
                self._advance(choice, token, chat)
                if on_token is not None:
                    await on_token(choice)
                if choice.finished:
                    open_choices -= 1
                    if not open_choices:
                        break  # leaving the generator cancels the engine job

    async def _stream(
        self,
        request: web.Request,
        chat: ChatRequest,
        engine_request: GenerateRequest,
        prompt_tokens: int,
        completion_id: str,
    ) -> web.StreamResponse:
        created = int(time.time())
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        parses_tools = self._parses_tools(chat)
        markers = (*chat.stop, *((TOOL_CALL_OPEN,) if parses_tools else ()))

        async def send(payload: dict[str, Any]) -> None:
            # Headers go out with the first event, so an engine that refuses the request at once
            # still gets a proper error status instead of a 200 stream.
            if not response.prepared:
                await response.prepare(request)
            await response.write(b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n")

        def chunk(choice: _Choice, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            logprobs = None
            if chat.logprobs and (delta.get("content") or finish is not None):
                logprobs = self._logprobs_json(
                    choice.token_ids[choice.sent_tokens :], choice.logprobs[choice.sent_tokens :]
                )
                choice.sent_tokens = len(choice.token_ids)
            return {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": chat.model,
                "system_fingerprint": self._fingerprint(),
                "choices": [
                    {"index": choice.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
                ],
            }

        async def open_choice(choice: _Choice) -> None:
            if not choice.role_sent:
                choice.role_sent = True
                await send(chunk(choice, {"role": "assistant", "content": ""}))

        async def on_token(choice: _Choice) -> None:
            await open_choice(choice)
            if choice.finished:
                return  # the rest goes out with the parsed outcome
            safe = _safe_content(choice.text, markers, strip=parses_tools)
            if len(safe) > len(choice.sent):
                delta = safe[len(choice.sent) :]
                choice.sent = safe
                await send(chunk(choice, {"content": delta}))

        choices = [_Choice(i) for i in range(chat.n)]
        try:
            await self._run(engine_request, chat, choices, on_token)
        except EngineError as exc:
            failure = engine_failure(exc)
            if not response.prepared:
                return failure.response()
            await send(failure.to_json())
        else:
            for choice in choices:
                await open_choice(choice)
                parsed, finish = self._outcome(choice, chat)
                content = parsed.content or ""
                if not content.startswith(choice.sent):
                    # The hold-back rules make this impossible; logged loudly rather than sent twice.
                    log.error("openai_stream_content_diverged", sent=choice.sent[:80], content=content[:80])
                elif len(content) > len(choice.sent):
                    await send(chunk(choice, {"content": content[len(choice.sent) :]}))
                for position, call in enumerate(self._tool_calls_json(parsed)):
                    await send(chunk(choice, {"tool_calls": [{"index": position, **call}]}))
                await send(chunk(choice, {}, finish))
            if chat.include_usage:
                completion_tokens = sum(len(c.token_ids) for c in choices)
                await send(
                    {
                        "id": completion_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": chat.model,
                        "system_fingerprint": self._fingerprint(),
                        "choices": [],
                        "usage": {
                            "prompt_tokens": prompt_tokens,
                            "completion_tokens": completion_tokens,
                            "total_tokens": prompt_tokens + completion_tokens,
                        },
                    }
                )
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _safe_content(text: str, markers: Sequence[str], *, strip: bool) -> str:
    """The part of the content so far that the final content is sure to start with.

    Without a trailing piece that may still become a tool-call tag or a stop string, or a
    half-decoded character; when tool calls are parsed, only the text before the first tag, without
    surrounding whitespace (the final content is stripped then).
    """
    cut = text.find(TOOL_CALL_OPEN) if TOOL_CALL_OPEN in markers else -1
    visible = text if cut < 0 else text[:cut]
    visible = visible[: len(visible) - _hold_back(visible, markers)].rstrip("\ufffd")
    return visible.strip() if strip else visible


def add_openai_routes(
    app: web.Application,
    engine: Engine,
    tokenizer: Any,
    *,
    served_model_name: str,
    config: OpenAIServingConfig | None = None,
) -> OpenAIChatRoutes:
    """Mount ``/v1/models``, ``/v1/models/{model}``, ``/v1/chat/completions`` (and OpenAI-shaped 404s
    for other ``/v1/`` paths) on ``app``; returns the handler object."""
    config = config or OpenAIServingConfig(served_model_name=served_model_name)
    if config.served_model_name != served_model_name:
        raise ValueError("served_model_name and config.served_model_name differ")
    routes = OpenAIChatRoutes(engine, tokenizer, config)
    app.add_routes(
        [
            web.get("/v1/models", routes.models),
            web.get("/v1/models/{model}", routes.model),
            web.post("/v1/chat/completions", routes.chat_completions),
            web.route("*", "/v1/{tail:.*}", routes.not_found),
        ]
    )
    return routes
