"""The OpenAI-compatible endpoint over real HTTP, judged by the official ``openai`` client.

Two engines: the embedded engine with the tiny model (random weights: plain chat, sampling,
streaming, and tool calls forced by ``tool_choice``, which a grammar makes deterministic in shape),
and a scripted engine double that "samples" given Qwen-format replies, so the parser, streaming of
tool calls, stop strings and engine failures are checked on exactly known output.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from envtune.agents.engine import (
    Completion,
    ConstraintKind,
    EngineError,
    FinishReason,
    GenerateRequest,
    SamplingParams,
)
from envtune.runtime.engines.embedded import EmbeddedEngine
from envtune.runtime.engines.openai_api import OpenAIServingConfig, add_openai_routes
from envtune.runtime.engines.openai_protocol import OpenAIError, parse_chat_request, parse_tool_calls
from envtune.runtime.engines.settings import EmbeddedEngineConfig

MODEL = "tiny"
CD_TOOL = {
    "type": "function",
    "function": {
        "name": "cd",
        "description": "Change the working directory.",
        "parameters": {
            "type": "object",
            "properties": {"folder": {"type": "string", "enum": ["docs", "src", "tests"]}},
            "required": ["folder"],
            "additionalProperties": False,
        },
    },
}
LS_TOOL = {
    "type": "function",
    "function": {
        "name": "ls",
        "description": "List files.",
        "parameters": {
            "type": "object",
            "properties": {"all": {"type": "boolean"}},
            "required": ["all"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[EmbeddedEngine]:
    engine = EmbeddedEngine(tiny_model_dir, EmbeddedEngineConfig())
    yield engine
    asyncio.run(engine.close())


@contextlib.asynccontextmanager
async def serve(engine: Any, tokenizer: Any, **config: Any) -> AsyncIterator[str]:
    """An aiohttp app with only the OpenAI routes; yields the ``/v1`` base URL."""
    app = web.Application()
    add_openai_routes(
        app, engine, tokenizer, served_model_name=MODEL, config=OpenAIServingConfig(MODEL, **config)
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()


def client(base_url: str, api_key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)


# --- a scripted engine double -------------------------------------------------------------------


@dataclass(frozen=True)
class _Event:
    index: int
    token_id: int
    logprob: float
    completion: Completion | None = None


@dataclass
class ScriptedEngine:
    """Replies with given texts (choice i gets ``replies[i % len]``), token by token, ending on EOS."""

    tokenizer: Any
    replies: Sequence[str]
    fail: EngineError | None = None
    requests: list[GenerateRequest] = field(default_factory=list)
    streams_closed_early: int = 0
    max_context: int = 32768

    def _ids(self, index: int, request: GenerateRequest) -> tuple[list[int], FinishReason]:
        ids = list(
            self.tokenizer(self.replies[index % len(self.replies)], add_special_tokens=False)["input_ids"]
        )
        ids.append(self.tokenizer.eos_token_id)
        if len(ids) > request.sampling.max_new_tokens:
            return ids[: request.sampling.max_new_tokens], FinishReason.LENGTH
        return ids, FinishReason.STOP

    async def generate(self, request: GenerateRequest) -> list[Completion]:
        self.requests.append(request)
        if self.fail is not None:
            raise self.fail
        out = []
        for index in range(request.sampling.n):
            ids, finish = self._ids(index, request)
            out.append(Completion(tuple(ids), tuple(-0.5 for _ in ids), finish, 0, len(request.prompt_ids)))
        return out

    async def generate_stream(self, request: GenerateRequest) -> AsyncIterator[_Event]:
        completions = await self.generate(request)
        done = False
        try:
            for index, completion in enumerate(completions):
                last = len(completion.token_ids) - 1
                for i, token in enumerate(completion.token_ids):
                    await asyncio.sleep(0)
                    yield _Event(index, token, -0.5, completion if i == last else None)
            done = True
        finally:
            if not done:
                self.streams_closed_early += 1

    async def close(self) -> None:
        return None


# --- the parser, on Qwen2.5-format text -----------------------------------------------------------


def test_parser_reads_qwen_tool_calls() -> None:
    text = (
        "I will look first.\n<tool_call>\n"
        '{"name": "ls", "arguments": {"all": true}}\n</tool_call>\n<tool_call>\n'
        '{"name": "cd", "arguments": {"folder": "docs", "nested": {"a": [1, 2.5, null]}}}\n</tool_call>'
    )
    parsed = parse_tool_calls(text)
    assert parsed.content == "I will look first."
    assert [c.name for c in parsed.tool_calls] == ["ls", "cd"]
    assert json.loads(parsed.tool_calls[0].arguments) == {"all": True}
    assert json.loads(parsed.tool_calls[1].arguments) == {"folder": "docs", "nested": {"a": [1, 2.5, None]}}


def test_parser_accepts_parameters_alias_and_no_content() -> None:
    parsed = parse_tool_calls('<tool_call>{"name": "cd", "parameters": {"folder": "src"}}</tool_call>')
    assert parsed.content is None
    assert parsed.tool_calls[0].name == "cd" and json.loads(parsed.tool_calls[0].arguments) == {
        "folder": "src"
    }


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>\n{"name": "cd", "arguments": {"folder": "docs"}\n</tool_call>',  # invalid JSON
        '<tool_call>\n{"name": "cd", "arguments": {"folder": "docs"}}\n',  # never closed
        '<tool_call>["cd"]</tool_call>',  # not an object
        '<tool_call>{"name": "cd", "arguments": "docs"}</tool_call>',  # arguments not an object
        '<tool_call>{"name": "cd", "arguments": {}, "id": 3}</tool_call>',  # unknown key
        '<tool_call>{"name": "", "arguments": {}}</tool_call>',  # empty name
        'ok <tool_call>{"name": "cd", "arguments": {}}</tool_call> then </tool_call>',  # stray close tag
    ],
)
def test_parser_keeps_unparsable_output_as_content(text: str) -> None:
    parsed = parse_tool_calls(text)
    assert parsed.tool_calls == ()
    assert parsed.content == text.strip()


def test_parser_without_tags_is_plain_content() -> None:
    assert parse_tool_calls("  just text \n") == parse_tool_calls("just text")
    assert parse_tool_calls("just text").content == "just text"
    assert parse_tool_calls("   ").content is None


# --- the tiny model's template ------------------------------------------------------------------


def test_template_renders_plain_chats_as_chatml(tokenizer: Any) -> None:
    """Without tools the template is plain ChatML (tool results folded Qwen2.5-style): what envtune's
    own episodes and trajectories were built with before the template learned function calling."""
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "<think>t</think><answer>a</answer>"},
        {"role": "tool", "content": "r1"},
        {"role": "tool", "content": "r2"},
        {"role": "user", "content": "u2"},
    ]
    chatml = (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nu<|im_end|>\n"
        "<|im_start|>assistant\n<think>t</think><answer>a</answer><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nr1\n</tool_response>\n<tool_response>\nr2\n</tool_response>"
        "<|im_end|>\n<|im_start|>user\nu2<|im_end|>\n"
    )
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False) == chatml
    with_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert with_prompt == chatml + "<|im_start|>assistant\n"


def test_tool_template_renders_tools_and_calls_in_qwen_format(tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "go to docs"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "cd", "arguments": {"folder": "docs"}}}],
        },
        {"role": "tool", "content": '{"cwd": "docs"}'},
    ]
    text = tokenizer.apply_chat_template(
        messages, tools=[CD_TOOL], tokenize=False, add_generation_prompt=True
    )
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert "\n<tools>\n" + json.dumps(CD_TOOL) + "\n</tools>" in text
    assert text.count("<|im_start|>system") == 1  # the caller's system text is folded in, not repeated
    block = (
        '<|im_start|>assistant\n<tool_call>\n{"name": "cd", "arguments": {"folder": "docs"}}\n'
        "</tool_call><|im_end|>"
    )
    assert block in text
    # What the template writes for a call is what the parser reads back.
    reply = block.removeprefix("<|im_start|>assistant\n").removesuffix("<|im_end|>")
    parsed = parse_tool_calls(reply)
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [("cd", {"folder": "docs"})]
    assert text.endswith(
        '<tool_response>\n{"cwd": "docs"}\n</tool_response><|im_end|>\n<|im_start|>assistant\n'
    )


# --- the embedded engine over HTTP ------------------------------------------------------------------


async def test_models_lists_the_served_model(engine: EmbeddedEngine, tokenizer: Any) -> None:
    async with serve(engine, tokenizer) as url:
        models = await client(url).models.list()
        assert [m.id for m in models.data] == [MODEL]
        assert (await client(url).models.retrieve(MODEL)).id == MODEL
        with pytest.raises(openai.NotFoundError):
            await client(url).models.retrieve("other")


async def test_plain_chat_is_the_engines_greedy_continuation(engine: EmbeddedEngine, tokenizer: Any) -> None:
    messages = [{"role": "system", "content": "You help."}, {"role": "user", "content": "List my files."}]
    async with serve(engine, tokenizer) as url:
        reply = await client(url).chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=12,
            temperature=0,  # type: ignore[arg-type]
        )
    prompt = tokenizer(
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )["input_ids"]
    (direct,) = await engine.generate(
        GenerateRequest(tuple(prompt), SamplingParams(max_new_tokens=12, temperature=0.0))
    )
    ids = list(direct.token_ids)
    if direct.finish_reason is FinishReason.STOP:
        ids = ids[:-1]
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == tokenizer.decode(ids, skip_special_tokens=True)
    assert choice.finish_reason == ("length" if direct.finish_reason is FinishReason.LENGTH else "stop")
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.completion_tokens == len(direct.token_ids)
    assert reply.usage.total_tokens == len(prompt) + len(direct.token_ids)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")


async def test_n_choices_with_a_seed_are_reproducible(engine: EmbeddedEngine, tokenizer: Any) -> None:
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello"}],
        "n": 3,
        "max_tokens": 6,
        "temperature": 1.0,
        "top_p": 0.9,
        "seed": 7,
        "logprobs": True,
    }
    async with serve(engine, tokenizer) as url:
        first = await client(url).chat.completions.create(**kwargs)
        second = await client(url).chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    assert first.usage is not None
    counted = 0
    for choice in first.choices:
        assert choice.logprobs is not None and choice.logprobs.content is not None
        assert all(entry.logprob <= 0 for entry in choice.logprobs.content)
        counted += len(choice.logprobs.content)
    assert first.usage.completion_tokens == counted


async def test_streaming_matches_the_plain_response(engine: EmbeddedEngine, tokenizer: Any) -> None:
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Summarise the report."}],
        "max_tokens": 16,
        "temperature": 0,
    }
    async with serve(engine, tokenizer) as url:
        plain = await client(url).chat.completions.create(**kwargs)
        stream = await client(url).chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
        # The raw wire format ends with OpenAI's sentinel.
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{url}/chat/completions", json={**kwargs, "stream": True}) as response,
        ):
            assert response.headers["Content-Type"].startswith("text/event-stream")
            raw = (await response.read()).decode()
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    events = [line for line in raw.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert all(event.startswith("data: ") for event in events)


async def test_forced_named_tool_call_follows_the_schema(engine: EmbeddedEngine, tokenizer: Any) -> None:
    async with serve(engine, tokenizer) as url:
        for seed in (1, 2, 3):
            reply = await client(url).chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "go to the docs folder"}],
                tools=[CD_TOOL, LS_TOOL],  # type: ignore[list-item]
                tool_choice={"type": "function", "function": {"name": "cd"}},
                max_tokens=64,
                seed=seed,
            )
            choice = reply.choices[0]
            assert choice.finish_reason == "stop"  # OpenAI's finish for a call forced by name
            (call,) = choice.message.tool_calls or []
            assert call.type == "function" and call.id.startswith("call_")
            assert call.function.name == "cd"
            assert json.loads(call.function.arguments)["folder"] in ("docs", "src", "tests")


async def test_required_tool_choice_makes_calls(engine: EmbeddedEngine, tokenizer: Any) -> None:
    async with serve(engine, tokenizer) as url:
        reply = await client(url).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "look around"}],
            tools=[CD_TOOL, LS_TOOL],  # type: ignore[list-item]
            tool_choice="required",
            max_tokens=200,
            seed=5,
        )
        stream = await client(url).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "look around"}],
            tools=[CD_TOOL, LS_TOOL],  # type: ignore[list-item]
            tool_choice="required",
            max_tokens=200,
            seed=5,
            stream=True,
        )
        chunks = [chunk async for chunk in stream]
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert calls and all(c.function.name in ("cd", "ls") for c in calls)
    for call in calls:
        arguments = json.loads(call.function.arguments)
        assert arguments in ({"all": True}, {"all": False}) or arguments["folder"] in ("docs", "src", "tests")
    streamed = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or []) if c.choices]
    assert [(t.function.name, t.function.arguments) for t in streamed if t.function] == [
        (c.function.name, c.function.arguments) for c in calls
    ]
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]


async def test_a_conversation_with_tool_results_is_served(engine: EmbeddedEngine, tokenizer: Any) -> None:
    messages = [
        {"role": "user", "content": "go to docs"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "cd", "arguments": '{"folder": "docs"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"cwd": "docs"}'},
    ]
    async with serve(engine, tokenizer) as url:
        reply = await client(url).chat.completions.create(
            model=MODEL,
            messages=messages,
            tools=[CD_TOOL],
            max_tokens=4,
            temperature=0,  # type: ignore[arg-type,list-item]
        )
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert reply.usage is not None and reply.usage.prompt_tokens > 100  # the tool listing is in the prompt


# --- exact output through the scripted engine -----------------------------------------------------------

QWEN_REPLY = 'Let me check.\n<tool_call>\n{"name": "ls", "arguments": {"all": true}}\n</tool_call>'


async def test_auto_tool_call_is_parsed_and_streamed(tokenizer: Any) -> None:
    engine = ScriptedEngine(tokenizer, [QWEN_REPLY])
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "what is here?"}],
        "tools": [CD_TOOL, LS_TOOL],
    }
    async with serve(engine, tokenizer) as url:
        plain = await client(url).chat.completions.create(**kwargs)
        stream = await client(url).chat.completions.create(**kwargs, stream=True)
        chunks = [chunk async for chunk in stream]
    choice = plain.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "ls" and json.loads(call.function.arguments) == {"all": True}
    assert engine.requests[0].constraint is None  # auto: the model decides, no grammar
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert content == "Let me check."
    assert not any("<tool" in (c.choices[0].delta.content or "") for c in chunks)
    (streamed,) = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert streamed.index == 0 and streamed.function is not None
    assert (streamed.function.name, streamed.function.arguments) == ("ls", call.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_tool_choice_none_leaves_the_text_alone(tokenizer: Any) -> None:
    engine = ScriptedEngine(tokenizer, [QWEN_REPLY])
    async with serve(engine, tokenizer) as url:
        reply = await client(url).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            tools=[LS_TOOL],
            tool_choice="none",  # type: ignore[list-item]
        )
    assert reply.choices[0].message.content == QWEN_REPLY
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason == "stop"


async def test_stop_strings_cut_the_output_and_the_generation(tokenizer: Any) -> None:
    text = "alpha beta STOPHERE gamma delta epsilon zeta eta theta"
    engine = ScriptedEngine(tokenizer, [text])
    full = len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "x"}],
        "stop": ["STOPHERE"],
    }
    async with serve(engine, tokenizer) as url:
        plain = await client(url).chat.completions.create(**kwargs)
        stream = await client(url).chat.completions.create(**kwargs, stream=True)
        chunks = [chunk async for chunk in stream]
    assert plain.choices[0].message.content == "alpha beta "
    assert plain.choices[0].finish_reason == "stop"
    assert plain.usage is not None and plain.usage.completion_tokens < full
    pieces = [c.choices[0].delta.content or "" for c in chunks]
    assert "".join(pieces) == "alpha beta "
    assert not any("STOP" in piece for piece in pieces)  # a partial stop string is held back
    assert engine.streams_closed_early == 2  # the engine was told to stop both times


async def test_length_finish_and_usage(tokenizer: Any) -> None:
    engine = ScriptedEngine(tokenizer, ["one two three four five six seven eight nine ten"])
    async with serve(engine, tokenizer) as url:
        reply = await client(url).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "count"}], max_tokens=3, n=2
        )
    assert [c.finish_reason for c in reply.choices] == ["length", "length"]
    assert reply.usage is not None and reply.usage.completion_tokens == 6
    assert engine.requests[-1].sampling.n == 2 and engine.requests[-1].sampling.max_new_tokens == 3


# --- errors --------------------------------------------------------------------------------------------


async def _error(url: str, exc_type: type[openai.APIStatusError], **kwargs: Any) -> openai.APIStatusError:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], **kwargs}
    with pytest.raises(exc_type) as caught:
        await client(url).chat.completions.create(**body)
    assert set(caught.value.body) == {"message", "type", "param", "code"}  # type: ignore[arg-type]
    return caught.value


async def test_errors_have_openais_shape_and_status(tokenizer: Any) -> None:
    engine = ScriptedEngine(tokenizer, ["ok"])
    async with serve(engine, tokenizer, max_n=4, max_context=256) as url:
        error = await _error(url, openai.NotFoundError, model="gpt-4")
        assert (error.code, error.param) == ("model_not_found", "model")
        error = await _error(url, openai.BadRequestError, temperature=3.5)
        assert (error.type, error.param) == ("invalid_request_error", "temperature")
        error = await _error(url, openai.BadRequestError, n=5)
        assert error.param == "n"
        error = await _error(url, openai.BadRequestError, max_tokens=10_000)
        assert error.code == "context_length_exceeded"
        error = await _error(url, openai.BadRequestError, extra_body={"frobnicate": 1})
        assert error.param == "frobnicate"
        error = await _error(url, openai.BadRequestError, presence_penalty=0.5)
        assert error.param == "presence_penalty"
        error = await _error(
            url,
            openai.BadRequestError,
            tools=[CD_TOOL],
            tool_choice={"type": "function", "function": {"name": "rm"}},
        )
        assert error.param == "tool_choice"
        error = await _error(
            url,
            openai.BadRequestError,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}],
        )
        assert error.param == "messages[0]"
        error = await _error(url, openai.BadRequestError, messages=[])
        assert error.param == "messages"
        error = await _error(url, openai.BadRequestError, stop=["a", "b", "c", "d", "e"])
        assert error.param == "stop"
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{url}/chat/completions", data=b"{not json") as response:
                assert response.status == 400
                assert (await response.json())["error"]["type"] == "invalid_request_error"
            async with session.post(f"{url}/chat/completions", data=b"x" * (5 * 1024 * 1024)) as response:
                assert response.status == 413
                assert (await response.json())["error"]["code"] == "request_too_large"
            async with session.get(f"{url}/completions") as response:
                assert response.status == 404
                assert set((await response.json())["error"]) == {"message", "type", "param", "code"}
    assert engine.requests == []  # nothing refused ever reached the engine


async def test_api_key_and_engine_failures(tokenizer: Any) -> None:
    engine = ScriptedEngine(tokenizer, ["ok"], fail=EngineError("worker busy", retryable=True))
    async with serve(engine, tokenizer, api_key="sekrit") as url:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client(url, "wrong").chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}]
            )
        assert caught.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            await client(url, "wrong").models.list()
        assert engine.requests == []
        with pytest.raises(openai.InternalServerError) as failed:
            await client(url, "sekrit").chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}]
            )
        assert failed.value.status_code == 503 and failed.value.type == "server_error"
        with pytest.raises(openai.InternalServerError):  # a stream that fails at once gets the status too
            await client(url, "sekrit").chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True
            )


def test_request_validation_without_a_server() -> None:
    chat = parse_chat_request(
        {
            "model": "m",
            "messages": [
                {
                    "role": "developer",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                }
            ],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "object"}},
            },
            "max_completion_tokens": 5,
            "stop": "END",
        }
    )
    assert chat.messages == [{"role": "system", "content": "ab"}]
    assert chat.max_tokens == 5 and chat.stop == ("END",) and chat.tool_choice == "none"
    assert chat.response_format is not None and chat.response_format["type"] == "json_schema"
    for bad, param in [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages[0]"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, "top_logprobs"),
        (
            {
                "model": "m",
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function", "function": {"name": "a b"}}],
            },
            "tools[0]",
        ),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "tool_choice": "required"},
            "tool_choice",
        ),
        (
            {
                "model": "m",
                "messages": [
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [{"type": "function", "function": {"name": "cd", "arguments": "{"}}],
                    }
                ],
            },
            "messages[0].tool_calls[0]",
        ),
    ]:
        with pytest.raises(OpenAIError) as caught:
            parse_chat_request(bad)
        assert caught.value.status == 400 and caught.value.param == param, bad


async def test_response_format_and_forced_tools_become_constraints(tokenizer: Any) -> None:
    engine = ScriptedEngine(tokenizer, ['{"a": 1}'])
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    async with serve(engine, tokenizer) as url:
        reply = await client(url).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
        )
        await client(url).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], response_format={"type": "json_object"}
        )
        await client(url).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "x"}],
            tools=[CD_TOOL],
            tool_choice="required",  # type: ignore[list-item]
        )
    assert json.loads(reply.choices[0].message.content or "") == {"a": 1}
    first, second, third = (r.constraint for r in engine.requests)
    assert (
        first is not None and first.kind is ConstraintKind.JSON_SCHEMA and json.loads(first.grammar) == schema
    )
    assert second is not None and json.loads(second.grammar) == {"type": "object"}
    assert third is not None and third.kind is ConstraintKind.EBNF and '"<tool_call>\\n' in third.grammar


async def test_streamed_text_equals_the_whole_decode(tokenizer: Any) -> None:
    """Incremental decoding (a window of new tokens) gives exactly the text a whole decode gives,
    through multi-byte characters split across tokens and protocol tokens."""
    text = "Grüße aus Köln: 日本語のテキスト 🚀🚀 <think>ok</think> ça va? \n\t done — ✓"
    engine = ScriptedEngine(tokenizer, [text])
    kwargs: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
    async with serve(engine, tokenizer) as url:
        plain = await client(url).chat.completions.create(**kwargs)
        stream = await client(url).chat.completions.create(**kwargs, stream=True)
        pieces = [c.choices[0].delta.content or "" async for c in stream]
    assert plain.choices[0].message.content == tokenizer.decode(
        tokenizer(text, add_special_tokens=False)["input_ids"], skip_special_tokens=True
    )
    assert "".join(pieces) == plain.choices[0].message.content
    assert len([p for p in pieces if p]) > 10  # it really streamed piece by piece
    assert not any("\ufffd" in p for p in pieces)


def test_decode_benchmark_smoke() -> None:
    """The benchmark's two arms agree on the text (a short run)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "openai_stream_decode.py"
    done = subprocess.run(
        [sys.executable, str(script), "--tokens", "96", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["same_text"] is True and result["tokens"] == 96


async def test_mounts_beside_the_sglang_native_api(engine: EmbeddedEngine, tokenizer: Any) -> None:
    """How envtune-serve will serve both: the routes added to SGLangProtocolServer's app before start."""
    from envtune.runtime.engines.sglang_server import SGLangProtocolServer

    server = SGLangProtocolServer(engine, served_model_name=MODEL)
    add_openai_routes(server.app, engine, tokenizer, served_model_name=MODEL)
    url = await server.start()
    try:
        reply = await client(f"{url}/v1").chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0
        )
        assert reply.usage is not None and reply.usage.completion_tokens <= 3
        async with aiohttp.ClientSession() as session, session.get(f"{url}/health") as response:
            assert response.status == 200  # the native API is still there
    finally:
        await server.close()
