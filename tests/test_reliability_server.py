"""envtune's SGLang-protocol server under hostile input: the review's attacks, each answered with a
clear 4xx while the process and its other clients carry on (docs: reviews/reliability.md D1-D3,
D6-D9, D14-D16). Every case talks real HTTP to a server on 127.0.0.1 over the tiny model.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch
from envtune.agents.engine import EngineError, GenerateRequest, SamplingParams
from envtune.runtime.cli.serve import read_api_key
from envtune.runtime.engines.embedded import EmbeddedEngine
from envtune.runtime.engines.settings import EmbeddedEngineConfig, ServerLimits
from envtune.runtime.engines.sglang_server import SGLangProtocolServer


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[EmbeddedEngine]:
    engine = EmbeddedEngine(tiny_model_dir, EmbeddedEngineConfig(max_lora_rank=64))
    yield engine
    asyncio.run(engine.close())


@pytest.fixture
async def server(engine: EmbeddedEngine) -> AsyncIterator[SGLangProtocolServer]:
    server = SGLangProtocolServer(engine)
    await server.start()
    yield server
    await server.close()


async def post(url: str, body: bytes | str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """POST a raw body; (status, parsed JSON or text)."""
    data = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url, data=data, headers={"Content-Type": "application/json", **(headers or {})}
        ) as response,
    ):
        text = await response.text()
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, text


async def assert_still_serving(server: SGLangProtocolServer) -> None:
    body = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2, "temperature": 0}}
    status, answer = await post(server.url + "/generate", json.dumps(body))
    assert status == 200 and len(answer["output_ids"]) == 2
    async with aiohttp.ClientSession() as session, session.get(server.url + "/health") as response:
        assert response.status == 200


def greedy_ids(engine: EmbeddedEngine, adapter: str | None = None) -> tuple[int, ...]:
    request = GenerateRequest(
        (5, 9, 17, 33), SamplingParams(max_new_tokens=8, temperature=0.0), adapter=adapter
    )
    return tuple(asyncio.run(engine.generate(request))[0].token_ids)


def tuner_layers(engine: EmbeddedEngine) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(m, BaseTunerLayer) for m in engine._base.modules())


def save_adapter(folder: Path, tiny_model_dir: Path, rank: int = 4, seed: int = 0) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    model.save_pretrained(folder)
    return folder


# --- D1, D6, D7, D14: bodies ----------------------------------------------------------------------


async def test_huge_text_is_refused_before_tokenizing_and_tokenizing_is_off_the_loop(
    server: SGLangProtocolServer, engine: EmbeddedEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[str] = []
    encode = engine.tokenizer.encode

    def spy(text: str, *args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(engine.tokenizer, "encode", spy)
    cap = engine.max_context * server.limits.max_chars_per_token
    too_long = {"text": "lorem ipsum " * (cap // 12 + 1), "sampling_params": {"max_new_tokens": 1}}
    status, answer = await post(server.url + "/generate", json.dumps(too_long))
    assert status == 400 and "characters" in answer["error"] and threads == []  # never tokenized
    ok = {"text": "Move report.pdf", "sampling_params": {"max_new_tokens": 1}}
    status, _ = await post(server.url + "/generate", json.dumps(ok))
    assert status == 200 and threads and threading.main_thread().name not in threads
    # A body over the limit (the review's 40 MB text was under the old 64 MB one) is a 413.
    status, _ = await post(server.url + "/generate", b'{"text": "' + b"a" * (17 << 20) + b'"}')
    assert status == 413
    await assert_still_serving(server)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ('{"input_ids": [1, 2], "sampling_params": {"n": 2048}}', "at most 256"),
        ('{"input_ids": [1, 2], "sampling_params": {"n": 1000000000000}}', "at most 256"),
        (json.dumps({"input_ids": [[1, 2]] * 300}), "at most 256"),
        (json.dumps({"text": ["hi"] * 300}), "at most 256"),
        ('{"input_ids": [1, 2], "sampling_params": {"temperature": NaN}}', "temperature must be a finite"),
        ('{"input_ids": [1, 2], "sampling_params": {"temperature": Infinity}}', "finite"),
        ('{"input_ids": [1, 2], "sampling_params": {"top_p": NaN}}', "top_p"),
        ('{"input_ids": [1, 2], "sampling_params": {"sampling_seed": 1' + "0" * 30 + "}}", "sampling_seed"),
        ('{"input_ids": [1, 2], "sampling_params": {"sampling_seed": -1}}', "sampling_seed"),
        (
            '{"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1' + "0" * 5000 + "}}",
            "not valid JSON",
        ),
        ('{"input_ids": ' + "[" * 200_000 + "]" * 200_000 + "}", "nested too deeply"),
        ('{"input_ids": [1], "image_data": ' + "[" * 900 + "1" + "]" * 900 + "}", ""),
        ('{"text": "\\ud800 lone surrogate"}', "not valid Unicode"),
        ('{"input_ids": [1, 2, 99999999]}', "outside the vocabulary"),
        ('{"input_ids": [1, 2], "sampling_params": {"regex": "("}}', "invalid"),
    ],
)
async def test_malformed_and_heavy_bodies_are_400_not_500_or_503(
    server: SGLangProtocolServer, body: str, needle: str
) -> None:
    status, answer = await post(server.url + "/generate", body)
    assert status == 400, answer
    message = json.dumps(answer)
    assert needle in message and "Traceback" not in message and len(message) < 2000


async def test_unknown_charset_is_400(server: SGLangProtocolServer) -> None:
    status, answer = await post(
        server.url + "/generate",
        '{"input_ids": [1, 2]}',
        {"Content-Type": "application/json; charset=no-such-codec"},
    )
    assert status == 400 and "charset" in answer["error"]
    await assert_still_serving(server)


async def test_a_tiny_temperature_is_greedy_not_a_failed_prefill(server: SGLangProtocolServer) -> None:
    answers = []
    for temperature in ("1e-45", "0"):
        body = '{"input_ids": [4, 8, 15], "sampling_params": {"max_new_tokens": 4, "temperature": %s}}'
        status, answer = await post(server.url + "/generate", body % temperature)
        assert status == 200, answer
        answers.append(answer["output_ids"])
    assert answers[0] == answers[1]


# --- D8: abandoned requests ------------------------------------------------------------------------


async def test_abandoned_non_streaming_request_stops_generating(
    server: SGLangProtocolServer, engine: EmbeddedEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine, "eos_token_ids", frozenset())  # nothing may end it early but the limit
    wanted = 20_000
    body = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": wanted, "temperature": 1.0}}
    before = engine.statistics().tokens_generated
    async with aiohttp.ClientSession() as session:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.0):
                async with session.post(server.url + "/generate", json=body) as response:
                    await response.read()
    # The client left: its job must leave the running batch long before it could have finished.
    for _ in range(600):
        stats = engine.statistics()
        if stats.active_rows == 0 and stats.pending_jobs == 0 and stats.tokens_generated > before:
            break
        await asyncio.sleep(0.05)
    generated = engine.statistics().tokens_generated - before
    assert engine.statistics().active_rows == 0 and 0 < generated < wanted


# --- D9: slow clients and connection limits -------------------------------------------------------


async def test_slowloris_and_trickled_bodies_are_cut_and_health_stays_reachable(
    engine: EmbeddedEngine,
) -> None:
    limits = ServerLimits(max_connections=8, idle_timeout_s=1.0, body_timeout_s=1.0)
    server = SGLangProtocolServer(engine, limits=limits)
    await server.start()
    loop = asyncio.get_running_loop()
    sockets: list[socket.socket] = []
    try:
        # Twenty slowloris connections (more than the limit): partial headers, never finished.
        for _ in range(20):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            await loop.sock_connect(sock, (server.host, server.port))
            await loop.sock_sendall(sock, b"POST /generate HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            sockets.append(sock)
        await asyncio.sleep(0.2)
        assert server.guard.statistics().open_connections <= limits.max_connections
        # A real client still gets in (an idle connection makes room for it).
        async with aiohttp.ClientSession() as session, session.get(server.url + "/health") as response:
            assert response.status == 200
        # Each slow connection is closed: by eviction, or by the idle timeout.
        for sock in sockets:
            async with asyncio.timeout(10):
                while True:
                    try:
                        chunk = await loop.sock_recv(sock, 1024)
                    except ConnectionError:
                        break
                    if not chunk:
                        break
        stats = server.guard.statistics()
        assert stats.evicted_idle + stats.timed_out >= 20 - limits.max_connections
        # A body trickled slower than body_timeout_s gets 408.
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{"
        )
        await writer.drain()
        async with asyncio.timeout(10):
            status_line = await reader.readline()
        assert b" 408 " in status_line
        writer.close()
        await assert_still_serving(server)
    finally:
        for sock in sockets:
            sock.close()
        await server.close()


async def test_many_concurrent_clients_are_all_served(server: SGLangProtocolServer) -> None:
    body = json.dumps({"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 1, "temperature": 0}})
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> int:
            async with session.post(
                server.url + "/generate", data=body, headers={"Content-Type": "application/json"}
            ) as response:
                await response.read()
                return response.status

        statuses = await asyncio.gather(*(one() for _ in range(200)))
    assert statuses == [200] * 200


# --- D2, D3, D15: adapters and control endpoints ---------------------------------------------------


async def test_huge_lora_rank_is_refused_before_anything_is_allocated(
    server: SGLangProtocolServer, engine: EmbeddedEngine, tmp_path: Path
) -> None:
    folder = tmp_path / "huge"
    folder.mkdir()
    config = {"peft_type": "LORA", "r": 4_000_000, "lora_alpha": 8, "target_modules": ["q_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps({**config, "task_type": "CAUSAL_LM"}))
    status, answer = await post(
        server.url + "/load_lora_adapter", json.dumps({"lora_name": "huge", "lora_path": str(folder)})
    )
    assert status == 400 and "max_lora_rank" in answer["error_message"]
    assert engine.adapters() == {} and tuner_layers(engine) == 0


def test_failed_adapter_load_leaves_the_engine_unchanged(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file, save_file

    engine = EmbeddedEngine(tiny_model_dir)
    try:
        base = greedy_ids(engine)
        # The review's case: an adapter whose last tensor has the wrong shape.
        corrupt = save_adapter(tmp_path / "corrupt", tiny_model_dir)
        tensors = load_file(corrupt / "adapter_model.safetensors")
        tensors[sorted(tensors)[-1]] = torch.zeros(3, 3)
        save_file(tensors, corrupt / "adapter_model.safetensors")
        with pytest.raises(EngineError, match="shape"):
            asyncio.run(engine.load_adapter("corrupt", str(corrupt), version=1))
        assert greedy_ids(engine) == base and tuner_layers(engine) == 0 and engine.adapters() == {}
        # A load that passes the checks but fails inside peft, after it injected its layers:
        # undone, with no adapter loaded before and with one loaded.
        import peft.peft_model

        good = save_adapter(tmp_path / "good", tiny_model_dir, seed=1)

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("disk read error half way")

        with monkeypatch.context() as patch:
            patch.setattr(peft.peft_model, "set_peft_model_state_dict", broken)
            with pytest.raises(EngineError, match="half way"):
                asyncio.run(engine.load_adapter("first", str(good), version=1))
        assert greedy_ids(engine) == base and tuner_layers(engine) == 0
        asyncio.run(engine.load_adapter("tuned", str(good), version=2))
        tuned = greedy_ids(engine, "tuned")
        layers = tuner_layers(engine)
        other = save_adapter(tmp_path / "other", tiny_model_dir, seed=2)
        with monkeypatch.context() as patch:
            patch.setattr(peft.peft_model, "set_peft_model_state_dict", broken)
            with pytest.raises(EngineError, match="half way"):
                asyncio.run(engine.load_adapter("second", str(other), version=3))
        assert engine.adapters() == {"tuned": 2} and tuner_layers(engine) == layers
        assert greedy_ids(engine, "tuned") == tuned and greedy_ids(engine) == base
        asyncio.run(engine.unload_adapter("tuned"))
        assert greedy_ids(engine) == base and tuner_layers(engine) == 0
    finally:
        asyncio.run(engine.close())


@pytest.mark.parametrize(
    ("path", "body", "content_type", "headers", "status"),
    [
        ("/load_lora_adapter", '{"lora_name": "x", "lora_path": "/tmp"}', "text/plain", {}, 415),
        ("/load_lora_adapter", "lora_name=x&lora_path=/tmp", "application/x-www-form-urlencoded", {}, 415),
        ("/update_weights_from_disk", '{"model_path": "/tmp"}', "text/plain", {}, 415),
        ("/generate", '{"input_ids": [1]}', "text/plain", {}, 415),
        ("/generate", '{"input_ids": [1]}', "application/json", {"Origin": "http://evil.example"}, 403),
        ("/flush_cache", "", "application/json", {"Sec-Fetch-Site": "cross-site"}, 403),
        (
            "/load_lora_adapter",
            '{"lora_name": "x", "lora_path": "someuser/some-adapter"}',
            "application/json",
            {},
            400,
        ),
        (
            "/load_lora_adapter",
            '{"lora_name": "x", "lora_path": "../../../../etc"}',
            "application/json",
            {},
            400,
        ),
        ("/load_lora_adapter", '{"lora_name": "x", "lora_path": "/etc/passwd"}', "application/json", {}, 400),
        ("/load_lora_adapter", '{"lora_name": "x", "lora_path": "\\ud800"}', "application/json", {}, 400),
        ("/update_weights_from_disk", '{"model_path": "Qwen/Qwen2.5-0.5B"}', "application/json", {}, 400),
    ],
)
async def test_control_endpoints_take_json_local_folders_and_no_cross_site_requests(
    server: SGLangProtocolServer,
    engine: EmbeddedEngine,
    path: str,
    body: str,
    content_type: str,
    headers: dict[str, str],
    status: int,
) -> None:
    got, answer = await post(server.url + path, body, {"Content-Type": content_type, **headers})
    assert got == status, answer
    assert engine.adapters() == {}


async def test_api_and_admin_keys(
    engine: EmbeddedEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = SGLangProtocolServer(engine, api_key="user-key", admin_api_key="admin-key")
    await server.start()
    generate = json.dumps({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1}})
    try:
        for auth, expected in [
            (None, 401),
            ("Bearer user-ke", 401),
            ("bearer user-key", 401),
            ("Bearer user-key", 200),
        ]:
            status, _ = await post(
                server.url + "/generate", generate, {"Authorization": auth} if auth else {}
            )
            assert status == expected, auth
        # The user key does not open the control endpoints once an admin key is set.
        status, _ = await post(server.url + "/flush_cache", "", {"Authorization": "Bearer user-key"})
        assert status == 401
        status, _ = await post(server.url + "/flush_cache", "", {"Authorization": "Bearer admin-key"})
        assert status == 200
        async with aiohttp.ClientSession() as session, session.get(server.url + "/health") as response:
            assert response.status == 200  # probes stay open, as in SGLang
    finally:
        await server.close()
    # envtune-serve reads keys from the environment or a file, never from its command line.
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    monkeypatch.delenv("NO_SUCH_VAR_X", raising=False)
    assert read_api_key("NO_SUCH_VAR_X", str(key_file)) == "from-file"
    monkeypatch.setenv("NO_SUCH_VAR_X", "from-env")
    assert read_api_key("NO_SUCH_VAR_X", str(key_file)) == "from-env"
    assert read_api_key("", "") is None
