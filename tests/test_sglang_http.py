"""SGLang client <-> SGLang-protocol server over real HTTP, judged by SGLang's own contract decoder.

The judge is ``sglang/api/v1/api_types.py`` from the sglang==0.5.23 wheel, downloaded by
``make setup`` into ``.cache/sglang/``. Every ``/generate`` body the client sends and every response
the server returns goes through it; the server must refuse (HTTP 400) what it refuses.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import pytest
import torch
from aiohttp import web
from envtune.agents.engine import (
    Constraint,
    ConstraintKind,
    Engine,
    EngineError,
    FinishReason,
    GenerateRequest,
    SamplingParams,
    WeightSync,
)
from envtune.runtime.engines.embedded import EmbeddedEngine
from envtune.runtime.engines.settings import EmbeddedEngineConfig, SGLangClientConfig
from envtune.runtime.engines.sglang_client import SGLangClient
from envtune.runtime.engines.sglang_protocol import ContractError, parse_generate
from envtune.runtime.engines.sglang_server import SGLangProtocolServer
from envtune.runtime.engines.tiny_model import default_tiny_model_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parent.parent
CONTRACT = REPO / ".cache" / "sglang" / "api_types.py"
TOOL_NAMES = ("cd", "ls")


def _load_contract() -> ModuleType:
    if not CONTRACT.is_file():
        pytest.fail(
            f"SGLang's contract decoder {CONTRACT} is missing: run `make setup` (it downloads the "
            "sglang==0.5.23 wheel and extracts sglang/api/v1/api_types.py)"
        )
    spec = importlib.util.spec_from_file_location("sglang_api_types", CONTRACT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("sglang_api_types", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def contract() -> ModuleType:
    return _load_contract()


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[EmbeddedEngine]:
    engine = EmbeddedEngine(tiny_model_dir, EmbeddedEngineConfig())
    yield engine
    asyncio.run(engine.close())


@pytest.fixture(scope="module")
def prompt(engine: EmbeddedEngine) -> tuple[int, ...]:
    messages = [{"role": "user", "content": "Move report.pdf into the archive folder."}]
    return tuple(engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])


class Judge:
    """Test-only server middleware: runs SGLang's decoder on each /generate request and response."""

    def __init__(self, contract: ModuleType) -> None:
        self.contract = contract
        self.requests: list[Any] = []
        self.request_errors: list[str] = []
        self.responses = 0
        self.response_errors: list[str] = []

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == "/generate":
            body = await request.json()
            self.requests.append(body)
            try:
                self.contract.GenerateRequest.from_json_value(body)
            except self.contract.JsonContractError as exc:
                self.request_errors.append(str(exc))
        response = await handler(request)
        if request.path == "/generate" and isinstance(response, web.Response) and response.status == 200:
            payload = json.loads(response.body)
            for item in payload if isinstance(payload, list) else [payload]:
                try:
                    decoded = self.contract.GenerateResponse.from_json_value(item)
                    assert decoded.meta_info is not None
                    assert len(decoded.meta_info.output_token_logprobs or []) in (0, len(decoded.output_ids))
                    self.responses += 1
                except (self.contract.JsonContractError, AssertionError) as exc:
                    self.response_errors.append(f"{exc!r}: {item}")
        return response


async def start_server(engine: EmbeddedEngine, judge: Judge, **kwargs: Any) -> SGLangProtocolServer:
    server = SGLangProtocolServer(engine, **kwargs)
    server.app.middlewares.append(judge.middleware)
    await server.start("127.0.0.1", 0)
    return server


@pytest.fixture
async def served(
    engine: EmbeddedEngine, contract: ModuleType
) -> AsyncIterator[tuple[SGLangProtocolServer, Judge]]:
    judge = Judge(contract)
    server = await start_server(engine, judge)
    yield server, judge
    await server.close()
    # Every request the client sent and every response the server returned passed the judge.
    assert judge.request_errors == []
    assert judge.response_errors == []


def client_for(*urls: str, **kwargs: Any) -> SGLangClient:
    defaults: dict[str, Any] = {"backoff_initial_s": 0.01, "backoff_max_s": 0.05, "unhealthy_cooldown_s": 0.5}
    defaults.update(kwargs)
    return SGLangClient(SGLangClientConfig(urls=urls, **defaults))


# --- generation over HTTP ------------------------------------------------------------------------


async def test_client_and_embedded_engine_agree_over_http(
    served: tuple[SGLangProtocolServer, Judge], engine: EmbeddedEngine, prompt: tuple[int, ...]
) -> None:
    server, judge = served
    request = GenerateRequest(
        prompt, SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.95, seed=21, n=3)
    )
    async with client_for(server.url) as client:
        assert isinstance(client, Engine) and isinstance(client, WeightSync)
        remote = await client.generate(request)
    direct = await engine.generate(request)
    assert len(remote) == 3
    for over_http, in_process in zip(remote, direct, strict=True):
        assert over_http.token_ids == in_process.token_ids
        assert over_http.finish_reason is in_process.finish_reason
        assert over_http.policy_version == in_process.policy_version == 0
        assert max(abs(a - b) for a, b in zip(over_http.logprobs, in_process.logprobs, strict=True)) < 1e-4
        # ... and both agree with one full-sequence forward pass over prompt + sampled tokens.
        ids = torch.tensor([list(prompt) + list(over_http.token_ids)])
        with torch.no_grad():
            logits = engine._base(ids).logits[0, len(prompt) - 1 : -1] / 0.8
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(over_http.token_ids)[:, None])[:, 0]
        assert torch.max(torch.abs(expected - torch.tensor(over_http.logprobs))) < 1e-4
    body = judge.requests[0]
    assert body["input_ids"] == list(prompt) and body["return_logprob"] is True
    assert body["logprob_start_len"] == -1
    assert body["sampling_params"] == {
        "max_new_tokens": 16, "temperature": 0.8, "top_p": 0.95, "top_k": -1, "n": 3, "sampling_seed": 21
    }  # fmt: skip
    assert judge.responses == 3


async def test_a_cancelled_generate_is_aborted_on_the_server(
    engine: EmbeddedEngine, prompt: tuple[int, ...], contract: ModuleType
) -> None:
    """Issue 10 (7): the caller gives up (a group aged out): SGLang's /abort_request stops the decode."""
    judge = Judge(contract)
    aborts: list[Any] = []

    @web.middleware
    async def record_aborts(request: web.Request, handler: Any) -> web.StreamResponse:
        body = await request.json() if request.path == "/abort_request" else {}
        if isinstance(body.get("rid"), str):  # what the client sends: SGLang's decoder accepts it
            contract.AbortRequest.from_json_value(body)
            aborts.append(body)
        response: web.StreamResponse = await handler(request)
        return response

    server = SGLangProtocolServer(engine)
    server.app.middlewares.extend([judge.middleware, record_aborts])
    await server.start("127.0.0.1", 0)
    try:
        before = engine.statistics().tokens_generated
        long = GenerateRequest(prompt, SamplingParams(max_new_tokens=4000, temperature=1.0, seed=3))
        async with client_for(server.url) as client:
            generation = asyncio.create_task(client.generate(long))
            while not server._running:  # the server is decoding it
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            generation.cancel()
            with pytest.raises(asyncio.CancelledError):
                await generation
            while server._running:
                await asyncio.sleep(0.01)
            assert client.statistics().aborts == 1
        assert judge.request_errors == []
        assert [body["rid"] for body in aborts] == [judge.requests[-1]["rid"]]
        generated = engine.statistics().tokens_generated - before
        assert generated < 4000  # the decode stopped early (the job was dropped, not finished)
        # The endpoint itself: an empty rid is ignored as SGLang does; a bad body is refused.
        async with aiohttp.ClientSession() as session:
            async with session.post(server.url + "/abort_request", json={}) as response:
                assert response.status == 200
            async with session.post(server.url + "/abort_request", json={"rid": 7}) as response:
                assert response.status == 400
    finally:
        await server.close()


async def test_constrained_tool_calls_over_http_name_visible_tools(
    served: tuple[SGLangProtocolServer, Judge], engine: EmbeddedEngine, prompt: tuple[int, ...]
) -> None:
    server, judge = served
    schema = {
        "type": "object",
        "properties": {
            "name": {"enum": list(TOOL_NAMES)},
            "arguments": {"type": "object", "properties": {}, "additionalProperties": False},
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }
    tag = {
        "type": "structural_tag",
        "format": {
            "type": "tag",
            "begin": "<tool_call>",
            "content": {"type": "json_schema", "json_schema": schema},
            "end": "</tool_call>",
        },
    }
    request = GenerateRequest(
        prompt,
        SamplingParams(max_new_tokens=128, temperature=1.0, seed=4, n=6),
        Constraint(ConstraintKind.STRUCTURAL_TAG, json.dumps(tag)),
    )
    async with client_for(server.url) as client:
        completions = await client.generate(request)
    assert judge.requests[0]["sampling_params"]["structural_tag"] == json.dumps(tag)
    finished = [c for c in completions if c.finish_reason is FinishReason.STOP]
    assert finished
    for completion in finished:
        text = engine.tokenizer.decode(completion.token_ids[:-1])
        match = re.fullmatch(r"<tool_call>(.*)</tool_call>", text, re.DOTALL)
        assert match, text
        assert json.loads(match.group(1))["name"] in TOOL_NAMES


async def test_episode_turns_reuse_the_servers_kv_cache(
    served: tuple[SGLangProtocolServer, Judge], prompt: tuple[int, ...]
) -> None:
    server, judge = served
    sampling = SamplingParams(max_new_tokens=6, temperature=1.0, seed=8)
    async with client_for(server.url) as client:
        first = (await client.generate(GenerateRequest(prompt, sampling, affinity_key="ep-7")))[0]
        follow_up = prompt + first.token_ids + (5, 6, 7)
        second = (await client.generate(GenerateRequest(follow_up, sampling, affinity_key="ep-7")))[0]
    assert judge.requests[-1]["routing_key"] == "ep-7"
    assert second.cached_tokens == len(prompt) + len(first.token_ids) - 1


async def test_streaming_sends_contract_events_and_done(
    served: tuple[SGLangProtocolServer, Judge], contract: ModuleType, prompt: tuple[int, ...]
) -> None:
    server, _ = served
    body = {
        "input_ids": list(prompt),
        "sampling_params": {"max_new_tokens": 6, "temperature": 1.0, "sampling_seed": 2},
        "return_logprob": True,
        "stream": True,
    }
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + "/generate", json=body) as response:
            assert response.status == 200
            raw = (await response.read()).decode()
        body["stream"] = False
        async with session.post(server.url + "/generate", json=body) as response:
            final = await response.json()
    events = [chunk.removeprefix("data: ") for chunk in raw.split("\n\n") if chunk]
    assert events[-1] == "[DONE]"
    decoded = [contract.GenerateResponse.from_json_value(json.loads(event)) for event in events[:-1]]
    assert [len(item.output_ids) for item in decoded] == list(range(1, len(decoded) + 1))
    assert all(item.meta_info.finish_reason is None for item in decoded[:-1])
    assert decoded[-1].output_ids == final["output_ids"]
    assert decoded[-1].meta_info.finish_reason is not None


async def test_batch_and_text_inputs(
    served: tuple[SGLangProtocolServer, Judge], prompt: tuple[int, ...]
) -> None:
    server, _ = served
    body = {
        "input_ids": [list(prompt), list(prompt[:5])],
        "sampling_params": {"max_new_tokens": 3, "temperature": 0, "n": 2},
        "return_logprob": True,
    }
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + "/generate", json=body) as response:
            items = await response.json()
        async with session.post(server.url + "/generate", json={"text": "hello", "sampling_params": {}}) as r:
            single = await r.json()
    assert [item["index"] for item in items] == [0, 1, 2, 3]
    assert items[0]["output_ids"] == items[1]["output_ids"]  # greedy: both samples agree
    assert isinstance(single, dict) and single["meta_info"]["completion_tokens"] == len(single["output_ids"])


# --- the contract: the server refuses what SGLang's decoder refuses -----------------------------

BAD_BODIES = [
    {"input_ids": [1, 2], "sampling_params": {"temprature": 0.5}},  # misspelled parameter
    {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 4, "best_of": 2}},  # unknown key
    {"input_ids": "1 2 3"},  # wrong type
    {"input_ids": [1, 2], "return_logprob": "yes"},
    {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": "10"}},
    {"input_ids": [1, 2], "sampling_params": {"n": 1.5}},
    {"input_ids": [1, 2], "stream": 1},
    {"input_ids": [1, 2], "sampling_params": [{"top_k": True}]},
    {"input_ids": [1, 2], "sampling_params": {"json_schema": {"type": "object"}}},
    {"input_ids": [1, 2], "lora_path": 3},
    {"input_ids": [1, 2], "sampling_params": {"stop_token_ids": ["2"]}},
    [1, 2, 3],
]


async def test_server_rejects_what_the_decoder_rejects(
    served: tuple[SGLangProtocolServer, Judge], contract: ModuleType
) -> None:
    server, judge = served
    async with aiohttp.ClientSession() as session:
        for body in BAD_BODIES:
            with pytest.raises(contract.JsonContractError) as decoder:
                contract.GenerateRequest.from_json_value(body)
            async with session.post(server.url + "/generate", json=body) as response:
                assert response.status == 400, body
                error = (await response.json())["error"]
            assert isinstance(error, str) and error
            if "unknown field" in str(decoder.value):
                assert error == str(decoder.value)  # same wording as SGLang
    judge.request_errors.clear()  # these were meant to be bad


async def test_server_rejects_what_it_cannot_honour(served: tuple[SGLangProtocolServer, Judge]) -> None:
    server, _ = served
    bodies = [
        {"input_ids": [1, 2], "sampling_params": {"regex": "a", "ebnf": 'root ::= "a"'}},
        {"input_ids": [1, 2], "sampling_params": {"stop": ["\n"]}},
        {"input_ids": [1, 2], "sampling_params": {"frequency_penalty": 0.5}},
        {"input_ids": [1, 2], "top_logprobs_num": 5, "return_logprob": True},
        {"input_ids": [1, 2], "sampling_params": {"ebnf": "root ::= "}},
        {"input_ids": [1, 2], "lora_path": "not-loaded"},
        {"input_ids": [1, 10**7]},
        {"sampling_params": {}},
    ]
    async with aiohttp.ClientSession() as session:
        for body in bodies:
            async with session.post(server.url + "/generate", json=body) as response:
                assert response.status == 400, body
                assert (await response.json())["error"]


@pytest.mark.parametrize("kind", list(ConstraintKind))
def test_client_bodies_pass_the_decoder_for_every_constraint_kind(
    contract: ModuleType, kind: ConstraintKind
) -> None:
    request = GenerateRequest(
        (1, 2, 3),
        SamplingParams(max_new_tokens=4, temperature=0.0, stop_token_ids=(2,), seed=1, n=2),
        Constraint(kind, "x"),
        adapter="policy-v3",
        affinity_key="episode-1",
    )
    body = SGLangClient.request_body(request)
    decoded = contract.GenerateRequest.from_json_value(body)
    assert getattr(decoded.sampling_params, kind.value) == "x"
    assert decoded.lora_path == "policy-v3" and decoded.routing_key == "episode-1"


sampling_keys = st.sampled_from(
    ["max_new_tokens", "temperature", "top_p", "top_k", "n", "sampling_seed", "stop_token_ids", "ebnf",
     "json_schema", "regex", "structural_tag", "ignore_eos", "min_p", "temprature", "maxNewTokens", "seed"]
)  # fmt: skip
json_values = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 300), st.floats(-1, 2, allow_nan=False), st.text(max_size=4),
    st.lists(st.integers(0, 50), max_size=3), st.lists(st.text(max_size=2), max_size=2),
)  # fmt: skip
top_keys = st.sampled_from(["input_ids", "return_logprob", "stream", "lora_path", "rid", "logprob_start_len"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sampling=st.dictionaries(sampling_keys, json_values, max_size=4),
    top=st.dictionaries(top_keys, json_values, max_size=3),
)
def test_validation_is_at_least_as_strict_as_the_decoder(
    contract: ModuleType, sampling: dict[str, Any], top: dict[str, Any]
) -> None:
    body = {"input_ids": [1, 2, 3], **top, "sampling_params": sampling}
    try:
        contract.GenerateRequest.from_json_value(body)
        decoder_ok = True
    except contract.JsonContractError:
        decoder_ok = False
    try:
        parse_generate(body, lambda text: [1])
        server_ok = True
    except ContractError:
        server_ok = False
    if not decoder_ok:
        assert not server_ok, body


# --- retries, balancing, affinity ----------------------------------------------------------------


async def _fake_server(handler: Any) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def test_retries_5xx_and_dropped_connections_but_not_4xx(
    served: tuple[SGLangProtocolServer, Judge], prompt: tuple[int, ...]
) -> None:
    server, _ = served
    calls: list[str] = []
    script = ["503", "503", "ok", "drop", "ok", "400"]

    async def flaky(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        action = script[len(calls)] if len(calls) < len(script) else "ok"
        calls.append(action)
        if action == "503":
            return web.json_response({"error": {"message": "overloaded"}}, status=503)
        if action == "drop":
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=200)
        if action == "400":
            return web.json_response({"error": "bad thing"}, status=400)
        async with (
            aiohttp.ClientSession() as session,
            session.post(server.url + "/generate", json=body) as up,
        ):
            return web.json_response(await up.json(), status=up.status)

    runner, url = await _fake_server(flaky)
    request = GenerateRequest(prompt, SamplingParams(max_new_tokens=4, temperature=0))
    try:
        async with client_for(url) as client:
            first = await client.generate(request)
            assert calls == ["503", "503", "ok"] and client.statistics().retries == 2
            second = await client.generate(request)
            assert calls[3:] == ["drop", "ok"] and client.statistics().retries == 3
            assert first[0].token_ids == second[0].token_ids
            with pytest.raises(EngineError, match="bad thing") as info:
                await client.generate(request)
            assert info.value.retryable is False
            assert len(calls) == 6  # the 4xx was not retried
    finally:
        await runner.cleanup()

    async def always_down(request: web.Request) -> web.Response:
        return web.Response(status=500)  # an answer, badly: counted (a 502 is an outage, ridden out)

    runner, url = await _fake_server(always_down)
    try:
        async with client_for(url, max_retries=2) as client:
            with pytest.raises(EngineError, match="after 3 attempts") as info:
                await client.generate(request)
            assert info.value.retryable is True
    finally:
        await runner.cleanup()


async def test_least_outstanding_balancing_and_episode_affinity(
    engine: EmbeddedEngine, contract: ModuleType, prompt: tuple[int, ...]
) -> None:
    judges = [Judge(contract) for _ in range(3)]
    servers = [await start_server(engine, judge) for judge in judges]
    sampling = SamplingParams(max_new_tokens=3, temperature=0)
    try:
        async with client_for(*(s.url for s in servers)) as client:
            # Six concurrent requests: each replica gets two (least outstanding, ties rotated).
            await asyncio.gather(*(client.generate(GenerateRequest(prompt, sampling)) for _ in range(6)))
            assert [len(j.requests) for j in judges] == [2, 2, 2]
            # Four episodes, three turns each: every turn of an episode lands on the same replica.
            for judge in judges:
                judge.requests.clear()
            for turn in range(3):
                await asyncio.gather(
                    *(
                        client.generate(
                            GenerateRequest(
                                prompt + (turn,) * (turn + 1), sampling, affinity_key=f"episode-{e}"
                            )
                        )
                        for e in range(4)
                    )
                )
            per_episode = [client._affinity[f"episode-{e}"] for e in range(4)]
            assert len({id(ep) for ep in per_episode}) == 3  # spread over all replicas
            for judge, server in zip(judges, servers, strict=True):
                expected = sum(ep.url == server.url for ep in per_episode) * 3
                assert len(judge.requests) == expected
            # A replica that goes away: its episodes move to a live one and still succeed.
            dead = per_episode[0]
            await next(s for s in servers if s.url == dead.url).close()
            health = await client.health()
            assert health[dead.url] is False and sum(health.values()) == 2
            done = await client.generate(GenerateRequest(prompt, sampling, affinity_key="episode-0"))
            assert done[0].finish_reason is FinishReason.LENGTH
            assert client._affinity["episode-0"].url != dead.url
    finally:
        for server in servers:
            await server.close()
    for judge in judges:
        assert judge.request_errors == [] and judge.response_errors == []


# --- weights, info, auth --------------------------------------------------------------------------


async def test_lora_weight_sync_over_http(
    contract: ModuleType, prompt: tuple[int, ...], tmp_path: Path, tiny_model_dir: Path
) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tiny = tiny_model_dir
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    model.save_pretrained(tmp_path / "adapter")
    judge = Judge(contract)
    async with await EmbeddedEngine.open(tiny) as engine:
        server = await start_server(engine, judge)
        try:
            async with client_for(server.url) as client:
                await client.load_adapter("policy-v7", str(tmp_path / "adapter"), version=7)
                # SGLang's API carries no version: the client stamps completions from its own map,
                # the server numbers adapters in load order.
                assert engine.adapters() == {"policy-v7": 1}
                sampling = SamplingParams(max_new_tokens=5, temperature=1.0, seed=3)
                tuned = await client.generate(GenerateRequest(prompt, sampling, adapter="policy-v7"))
                direct = await engine.generate(GenerateRequest(prompt, sampling, adapter="policy-v7"))
                assert tuned[0].policy_version == 7 and tuned[0].token_ids == direct[0].token_ids
                assert judge.requests[-1]["lora_path"] == "policy-v7"
                with pytest.raises(EngineError) as info:
                    await client.load_adapter("policy-v8", str(tmp_path / "missing"), version=8)
                assert info.value.retryable is False
                await client.unload_adapter("policy-v7")
                with pytest.raises(EngineError, match="not loaded"):
                    await client.generate(GenerateRequest(prompt, sampling, adapter="policy-v7"))
                await client.update_weights_from_disk(str(tiny), version=9)
                base = await client.generate(GenerateRequest(prompt, sampling))
                assert base[0].policy_version == 9
                await client.flush_cache()
                async with aiohttp.ClientSession() as session:
                    async with session.get(server.url + "/model_info") as response:
                        info_body = await response.json()
                    contract.GetModelInfoResponse.from_json_value(info_body)
                    assert info_body["weight_version"] == "9"
                    async with session.get(server.url + "/server_info") as response:
                        contract.GetServerInfoResponse.from_json_value(await response.json())
                    async with session.get(server.url + "/health_generate") as response:
                        assert response.status == 200
        finally:
            await server.close()
    assert judge.request_errors == [] and judge.response_errors == []


async def test_api_key(engine: EmbeddedEngine, contract: ModuleType, prompt: tuple[int, ...]) -> None:
    server = await start_server(engine, Judge(contract), api_key="sekret")
    request = GenerateRequest(prompt, SamplingParams(max_new_tokens=2))
    try:
        async with client_for(server.url) as anonymous:
            with pytest.raises(EngineError, match="401") as info:
                await anonymous.generate(request)
            assert info.value.retryable is False
            assert (await anonymous.health()) == {server.url: True}  # health stays open
        async with client_for(server.url, api_key="sekret") as client:
            assert len((await client.generate(request))[0].token_ids) == 2
    finally:
        await server.close()


def test_envtune_serve_console_script(tmp_path: Path) -> None:
    """Smoke run of the real entry point: start, answer SGLang's /generate and OpenAI's
    /v1/chat/completions (the official client, tools offered) on one port, each API's own 401 shape
    without the key, stop on SIGTERM."""
    import openai

    script = Path(sys.executable).parent / "envtune-serve"
    command = (
        [str(script)] if script.exists() else [sys.executable, "-m", "envtune.runtime.cli.serve"]
    )
    process = subprocess.Popen(
        [*command, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={
            **os.environ,
            "ENVTUNE_TINY_MODEL_DIR": str(default_tiny_model_dir()),
            "ENVTUNE_API_KEY": "sekret",
        },
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"listening on (http://\S+)", line)
        assert match, line
        url = match.group(1)

        key = {"Authorization": "Bearer sekret"}

        async def ask() -> dict[str, Any]:
            async with aiohttp.ClientSession() as session:
                body = {
                    "input_ids": [1, 2, 3],
                    "sampling_params": {"max_new_tokens": 2},
                    "return_logprob": True,
                }
                async with session.post(url + "/generate", json=body) as response:
                    assert response.status == 401 and await response.json() == {"error": "Unauthorized"}
                async with session.post(url + "/v1/chat/completions", json={}) as response:
                    error = (await response.json())["error"]
                    assert response.status == 401 and error["code"] == "invalid_api_key"
                async with session.get(url + "/model_info", headers=key) as response:
                    assert (await response.json())["tool_call_parser"] == "qwen25"
                async with session.post(url + "/generate", json=body, headers=key) as response:
                    assert response.status == 200
                    return await response.json()

        answer = asyncio.run(ask())
        assert len(answer["output_ids"]) == len(answer["meta_info"]["output_token_logprobs"]) == 2
        chat = openai.OpenAI(base_url=f"{url}/v1", api_key="sekret", max_retries=0, timeout=120)
        assert [m.id for m in chat.models.list().data] == ["tiny"]
        tool = {
            "type": "function",
            "function": {"name": "ls", "parameters": {"type": "object", "properties": {}}},
        }
        reply = chat.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "list the files"}],
            tools=[tool],  # type: ignore[list-item]
            tool_choice="required",  # a grammar forces a well-formed call even from a random model
            max_tokens=64,
            temperature=0,
        )
        (call,) = reply.choices[0].message.tool_calls or []
        assert call.function.name == "ls" and reply.choices[0].finish_reason == "tool_calls"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
