"""``SGLangClient`` against servers that misbehave: every bad response is refused (retried, failed
over, then a clear ``EngineError``), never let into a ``Completion``; adapter loads are all or
nothing; an outage is ridden out by weight sync; an engine that is gone trips the circuit breaker
(reviews/reliability.md D10-D13). All servers are scripted aiohttp apps or raw sockets on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest
from aiohttp import web
from envtune.agents.engine import EngineError, EngineUnavailable, GenerateRequest, SamplingParams
from envtune.runtime.engines.settings import SGLangClientConfig, check_server_url
from envtune.runtime.engines.sglang_client import MalformedResponse, SGLangClient
from hypothesis import event, given, settings
from hypothesis import strategies as st

VOCAB = 100
PROMPT = (1, 2, 3)


def item(ids: list[Any], logprobs: list[Any] | None = None, **meta: Any) -> dict[str, Any]:
    """A /generate response item (SGLang's shape); ``logprobs`` default to -0.5 each."""
    logprobs = [-0.5] * len(ids) if logprobs is None else logprobs
    return {
        "text": "",
        "output_ids": ids,
        "meta_info": {
            "id": "r",
            "finish_reason": {"type": "length", "length": len(ids)},
            "prompt_tokens": 3,
            "completion_tokens": len(ids),
            "cached_tokens": 0,
            "weight_version": "0",
            "output_token_logprobs": [[lp, tok, None] for lp, tok in zip(logprobs, ids, strict=False)],
            **meta,
        },
    }


GOOD = item([5, 6])


class Scripted:
    """An aiohttp server whose handler is swapped by the test; counts requests per path."""

    def __init__(self) -> None:
        self.handler: Callable[[web.Request], Any] = self.ok
        self.calls: list[str] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def ok(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(GOOD)

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        self.calls.append(request.path)
        response: web.StreamResponse = await self.handler(request)
        return response

    async def start(self, port: int = 0) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.dispatch)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port, reuse_address=True)
        await site.start()
        self.port = int(self.runner.addresses[0][1])
        return self.url

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest.fixture
async def scripted() -> AsyncIterator[Scripted]:
    server = Scripted()
    await server.start()
    yield server
    await server.stop()


def client_for(*urls: str, **kwargs: Any) -> SGLangClient:
    settings: dict[str, Any] = {
        "backoff_initial_s": 0.01,
        "backoff_max_s": 0.05,
        "unhealthy_cooldown_s": 0.2,
        "max_retries": 2,
        "request_timeout_s": 5.0,
    }
    settings.update(kwargs)
    return SGLangClient(SGLangClientConfig(urls=urls, **settings), vocab_size=VOCAB)


def raw(body: bytes, content_type: str = "application/json") -> Callable[[web.Request], Any]:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=content_type)

    return handler


BAD_RESPONSES: dict[str, bytes] = {
    "nan logprob": json.dumps(item([5], [math.nan])).encode(),
    "positive logprob": json.dumps(item([5], [5.0])).encode(),
    "integer logprob past a float": json.dumps(item([5], [-(10**400)])).encode(),
    "null logprob": json.dumps(item([5], [None])).encode(),
    "string logprob": json.dumps(item([5], ["-0.5"])).encode(),
    "bool logprob": json.dumps(item([5], [False])).encode(),
    "float id": json.dumps(item([11.7], [-0.1])).encode(),
    "negative id": json.dumps(item([-7])).encode(),
    "huge id": json.dumps(item([10**12])).encode(),
    "id past the vocabulary": json.dumps(item([VOCAB])).encode(),
    "no tokens": json.dumps(item([])).encode(),
    "short logprobs": json.dumps(item([5, 6], [-0.5])).encode(),
    "scalar entry": json.dumps(
        {**GOOD, "meta_info": {**GOOD["meta_info"], "output_token_logprobs": [-0.5, -0.5]}}
    ).encode(),
    "short entry": json.dumps(
        {**GOOD, "meta_info": {**GOOD["meta_info"], "output_token_logprobs": [[-0.5], [-0.5]]}}
    ).encode(),
    "mismatched ids": json.dumps(
        {**GOOD, "meta_info": {**GOOD["meta_info"], "output_token_logprobs": [[-0.5, 9], [-0.5, 6]]}}
    ).encode(),
    "cached_tokens many": json.dumps(item([5], cached_tokens="many")).encode(),
    "not utf-8": b'{"text": "\xff\xfe"}',
    "html": b"<html>oops</html>",
    "empty": b"",
    "null": b"null",
    "truncated": json.dumps(GOOD).encode()[:40],
}


@pytest.mark.parametrize("case", sorted(BAD_RESPONSES))
async def test_bad_responses_never_become_completions(scripted: Scripted, case: str) -> None:
    scripted.handler = raw(BAD_RESPONSES[case])
    async with client_for(scripted.url) as client:
        with pytest.raises(EngineError, match="malformed") as info:
            await client.generate(GenerateRequest(PROMPT, SamplingParams(max_new_tokens=2)))
        assert info.value.retryable is True  # retried, then given up: a clear error, never data
        assert client.statistics().malformed_responses == 3 and len(scripted.calls) == 3


@pytest.mark.parametrize(
    "items",
    [
        [{**GOOD, "index": 0}, {**GOOD, "index": 0}],  # duplicate index
        [{**GOOD, "index": 0}, {**GOOD, "index": "1"}],  # mixed index types
        [{**GOOD, "index": 0}, GOOD],  # index on some items only
        [{**GOOD, "index": 0}, {**GOOD, "index": 2}],  # not 0..n-1
        [GOOD],  # one completion for n=2
    ],
)
async def test_group_responses_must_be_a_permutation(scripted: Scripted, items: list[Any]) -> None:
    scripted.handler = raw(json.dumps(items).encode())
    async with client_for(scripted.url) as client:
        with pytest.raises(EngineError, match="malformed"):
            await client.generate(GenerateRequest(PROMPT, SamplingParams(max_new_tokens=2, n=2)))


# Response items in SGLang's shape, each field now and then wrong in a way some check looks at.
good_ids = st.integers(0, VOCAB - 1)
bad_ids = st.sampled_from([-1, VOCAB, True, 5.0, 2**70, None])
good_logprobs = st.one_of(st.floats(-50, 0), st.floats(0, 1e-4), st.just(-0.0), st.integers(-3, 0))
bad_logprobs = st.sampled_from([2e-4, 1, 1e308, True, None, "-0.5", [], -(10**400)])
good_counts = st.one_of(st.none(), st.integers(0, 10))
bad_counts = st.sampled_from([-1, True, "many", 2.0])


def mostly(draw: st.DrawFn, good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> Any:
    return draw(bad) if draw(st.integers(0, 15)) == 0 else draw(good)


@st.composite
def response_items(draw: st.DrawFn, index: Any) -> dict[str, Any]:
    ids = [mostly(draw, good_ids, bad_ids) for _ in range(draw(st.integers(0, 5)))]
    shape = draw(st.sampled_from([3] * 8 + [2, 4]))  # SGLang writes triples
    entries = [
        [mostly(draw, good_logprobs, bad_logprobs), mostly(draw, st.just(token), bad_ids), None][:shape]
        for token in ids
    ]
    if draw(st.integers(0, 15)) == 0:
        entries = entries[: draw(st.integers(0, len(entries)))]
    meta: dict[str, Any] = {
        "output_token_logprobs": entries,
        "finish_reason": mostly(
            draw,
            st.sampled_from([{"type": "stop"}, {"type": "length"}]),
            st.sampled_from([{"type": 3}, None, "x"]),
        ),
        "weight_version": draw(st.sampled_from(["0", "1", "x", 0, None])),
    }
    for key in ("prompt_tokens", "cached_tokens"):
        if draw(st.booleans()):
            meta[key] = mostly(draw, good_counts, bad_counts)
    item: dict[str, Any] = {"text": "t", "output_ids": ids, "meta_info": meta}
    if index is not None:
        item["index"] = index
    return item


@st.composite
def responses(draw: st.DrawFn) -> tuple[int, Any]:
    n = draw(st.integers(1, 3))
    indices = draw(st.sampled_from(["none", "permutation", "permutation", "odd"]))
    count = draw(st.sampled_from([n] * 6 + [n + 1, max(1, n - 1)]))
    if indices == "none":
        items = [draw(response_items(None)) for _ in range(count)]
    elif indices == "permutation":
        order = draw(st.permutations(list(range(count))))
        items = [draw(response_items(i)) for i in order]
    else:
        items = [
            draw(response_items(draw(st.sampled_from([0, 1, -1, "1", None, True])))) for _ in range(count)
        ]
    return n, items[0] if len(items) == 1 and draw(st.booleans()) else items


@settings(max_examples=1500, deadline=None)
@given(responses())
def test_the_typed_fast_path_accepts_what_the_field_checks_accept_and_nothing_else(
    response: tuple[int, Any],
) -> None:
    n, payload = response
    client = SGLangClient(SGLangClientConfig(urls=("http://127.0.0.1:9",)), vocab_size=VOCAB)
    request = GenerateRequest(PROMPT, SamplingParams(max_new_tokens=8, n=n))
    body = json.dumps(payload).encode()
    fast = client._decode_completions(body, request)
    try:
        slow = repr(client._completions(msgspec.json.decode(body), request))
    except MalformedResponse:  # what the field checks raise for a body that decodes
        slow = None
    event(f"fast {fast is not None}, slow {slow is not None}")
    if fast is not None:  # None: the caller runs the field checks, which decide
        assert repr(fast) == slow  # repr: -0.0 and 0.0 differ


def test_the_fast_path_takes_sglangs_own_shape() -> None:
    client = SGLangClient(SGLangClientConfig(urls=("http://127.0.0.1:9",)), vocab_size=VOCAB)
    group = [{**item([7], [5e-5], prompt_tokens=None), "index": 1}, {**item([5, 6], [-0.0, -1]), "index": 0}]
    request = GenerateRequest(PROMPT, SamplingParams(max_new_tokens=2, n=2))
    fast = client._decode_completions(json.dumps(group).encode(), request)
    assert fast is not None and repr(fast) == repr(client._completions(group, request))
    assert [(c.token_ids, c.logprobs, c.prompt_tokens) for c in fast] == [
        ((5, 6), (-0.0, -1.0), 3),
        ((7,), (0.0,), 3),
    ]
    # Pairs are SGLang's shape too; an id echoed as 5.0 is not, but the field checks take it (5.0 == 5).
    single = GenerateRequest(PROMPT, SamplingParams(max_new_tokens=2))
    for entries, fast_path in (([[-0.5, 5], [-0.5, 6]], True), ([[-0.5, 5.0, None], [-0.5, 6, None]], False)):
        response = {**GOOD, "meta_info": {**GOOD["meta_info"], "output_token_logprobs": entries}}
        fast = client._decode_completions(json.dumps(response).encode(), single)
        assert (fast is not None) is fast_path
        assert client._completions(response, single)[0].token_ids == (5, 6)


async def test_a_malformed_answer_is_retried_and_failed_over(scripted: Scripted) -> None:
    answers = [BAD_RESPONSES["nan logprob"], json.dumps(GOOD).encode()]

    async def flaky(request: web.Request) -> web.Response:
        return web.Response(body=answers.pop(0) if answers else json.dumps(GOOD).encode())

    scripted.handler = flaky
    healthy = Scripted()
    await healthy.start()
    broken = Scripted()
    broken.handler = raw(BAD_RESPONSES["huge id"])
    await broken.start()
    try:
        async with client_for(scripted.url) as client:
            [completion] = await client.generate(GenerateRequest(PROMPT, SamplingParams(max_new_tokens=2)))
            assert completion.token_ids == (5, 6) and completion.logprobs == (-0.5, -0.5)
            assert client.statistics().malformed_responses == 1 and client.statistics().retries == 1
        async with client_for(broken.url, healthy.url) as client:
            for _ in range(4):
                [completion] = await client.generate(
                    GenerateRequest(PROMPT, SamplingParams(max_new_tokens=2))
                )
                assert completion.token_ids == (5, 6)
    finally:
        await healthy.stop()
        await broken.stop()


async def test_weight_version_from_nowhere_is_not_taken(scripted: Scripted) -> None:
    scripted.handler = raw(json.dumps(item([5], weight_version="999999")).encode())
    async with client_for(scripted.url) as client:
        [completion] = await client.generate(GenerateRequest(PROMPT, SamplingParams(max_new_tokens=1)))
    assert completion.policy_version == 0


async def test_oversized_bodies_are_not_read_whole(scripted: Scripted) -> None:
    big = json.dumps({**GOOD, "text": "x" * 1_000_000}).encode()

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()  # no Content-Length: the limit must hold while reading
        await response.prepare(request)
        for start in range(0, len(big), 65536):
            await response.write(big[start : start + 65536])
        await response.write_eof()
        return response

    for handler in (raw(big), chunked):
        scripted.handler = handler
        async with client_for(scripted.url, max_response_bytes=64 * 1024) as client:
            with pytest.raises(EngineError, match="max_response_bytes"):
                await client.generate(GenerateRequest(PROMPT, SamplingParams(max_new_tokens=2)))


async def test_broken_http_is_retried_not_leaked() -> None:
    answers = [b"HTTP/1.1 200 OK\r\nContent-Length: nonsense\r\n\r\n", b"NOT HTTP AT ALL\r\n\r\n"]
    seen = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal seen
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answers[seen % len(answers)])
        seen += 1
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with client_for(url, max_retries=3) as client:
            with pytest.raises(EngineError) as info:
                await client.generate(GenerateRequest(PROMPT, SamplingParams(max_new_tokens=2)))
            assert info.value.retryable is True and seen == 4  # every attempt used, none leaked
    finally:
        server.close()
        await server.wait_closed()


# --- D13: all-or-nothing adapter loads -------------------------------------------------------------


async def test_adapter_load_over_replicas_is_all_or_nothing() -> None:
    loaded: list[dict[str, str]] = [{}, {}]
    refuse = [False, True]
    servers = [Scripted(), Scripted()]

    def control(index: int) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.Response:
            body = await request.json()
            name = body.get("lora_name")
            if request.path == "/load_lora_adapter":
                if refuse[index]:
                    return web.json_response({"success": False, "error_message": "no room"}, status=400)
                if name in loaded[index]:
                    message = f"adapter {name!r} is already loaded"
                    return web.json_response({"success": False, "error_message": message}, status=400)
                loaded[index][name] = body["lora_path"]
            elif request.path == "/unload_lora_adapter":
                loaded[index].pop(name, None)
            return web.json_response({"success": True, "error_message": None})

        return handler

    for index, server in enumerate(servers):
        server.handler = control(index)
        await server.start()
    try:
        async with client_for(*(s.url for s in servers)) as client:
            with pytest.raises(EngineError, match="no room"):
                await client.load_adapter("policy-v1", "/a/v1", version=1)
            assert loaded == [{}, {}]  # the replica that took it gave it back
            # A leftover (an undo that failed earlier) does not block the next attempt.
            refuse[1] = False
            loaded[0]["policy-v1"] = "/stale"
            await client.load_adapter("policy-v1", "/a/v1", version=1)
            assert loaded == [{"policy-v1": "/a/v1"}, {"policy-v1": "/a/v1"}]
    finally:
        for server in servers:
            await server.stop()


# --- D10: outages are ridden out -------------------------------------------------------------------


async def test_weight_sync_rides_out_a_restart_and_lost_adapters_are_reloaded() -> None:
    loaded: set[str] = set()

    async def engine(request: web.Request) -> web.Response:
        body = await request.json()
        if request.path == "/load_lora_adapter":
            loaded.add(body["lora_name"])
            return web.json_response({"success": True})
        if request.path == "/unload_lora_adapter":
            loaded.discard(body["lora_name"])
            return web.json_response({"success": True})
        adapter = body.get("lora_path")
        if adapter is not None and adapter not in loaded:
            return web.json_response({"error": {"message": f"adapter {adapter!r} is not loaded"}}, status=400)
        return web.json_response(GOOD)

    server = Scripted()
    server.handler = engine
    url = await server.start()
    async with client_for(url, outage_timeout_s=30.0, max_retries=1) as client:
        await client.load_adapter("policy-v1", "/runs/a/v1", version=1)
        # The server goes away for 1.5 s; a publish made meanwhile waits for it.
        await server.stop()
        loaded.clear()  # a restarted server has lost every adapter

        async def restart_later() -> None:
            await asyncio.sleep(1.5)
            await server.start(server.port)

        async with asyncio.TaskGroup() as group:
            group.create_task(restart_later())
            await client.load_adapter("policy-v2", "/runs/a/v2", version=2)
        assert loaded == {"policy-v2"}
        # A request for the adapter the restart lost loads it again, once, and succeeds.
        request = GenerateRequest(PROMPT, SamplingParams(max_new_tokens=2), adapter="policy-v1")
        results = await asyncio.gather(*(client.generate(request) for _ in range(5)))
        assert all(r[0].policy_version == 1 for r in results)
        assert loaded == {"policy-v1", "policy-v2"} and client.statistics().adapter_reloads == 1
        assert server.calls.count("/load_lora_adapter") == 3
        # An adapter this client never loaded is not invented: the 400 stays a 400.
        with pytest.raises(EngineError, match="not loaded") as info:
            await client.generate(GenerateRequest(PROMPT, SamplingParams(max_new_tokens=2), adapter="other"))
        assert info.value.retryable is False
    await server.stop()


# --- D11: an engine that is gone ---------------------------------------------------------------------


async def test_circuit_breaker_fails_fast_once_nothing_answers() -> None:
    server = Scripted()
    url = await server.start()
    await server.stop()  # nothing listens there any more
    async with client_for(url, outage_timeout_s=0.5, max_retries=1) as client:
        request = GenerateRequest(PROMPT, SamplingParams(max_new_tokens=2))
        errors: list[EngineError] = []
        loop = asyncio.get_running_loop()
        started = loop.time()
        while not isinstance(errors[-1:] and errors[-1], EngineUnavailable):
            assert loop.time() - started < 30
            try:
                await client.generate(request)
            except EngineError as exc:
                errors.append(exc)
        # Nothing answers at all: a generate waits the outage out instead of giving up (and its
        # episode being dropped), until the breaker says the engine is gone.
        assert len(errors) == 1
        assert "outage_timeout_s" in str(errors[-1]) and client.statistics().unavailable
        # From now on every call fails at once, without touching the network.
        before = client.statistics().endpoints[0].failures
        with pytest.raises(EngineUnavailable):
            await client.load_adapter("policy-v1", "/x", version=1)
        assert client.statistics().endpoints[0].failures == before
    async with client_for(url) as client:
        with pytest.raises(EngineUnavailable, match="start it"):
            await client.wait_ready(timeout_s=0.3)


@pytest.mark.parametrize(
    "url", ["not a url", "http://", "ftp://host:1", "http://host:99999", "localhost:30000"]
)
def test_server_urls_are_checked_when_the_config_is_read(url: str) -> None:
    with pytest.raises(ValueError, match="URL"):
        check_server_url(url)
    with pytest.raises(ValueError):
        SGLangClientConfig(urls=(url,))
