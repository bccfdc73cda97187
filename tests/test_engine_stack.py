"""The engine stack of ``engine.kind = "launch"`` and the SGLang client's router contract.

- Launch: ``open_engines`` starts one worker per GPU group from the configured interpreter (a
  wrapper standing in for ``.venv-sglang/bin/python`` that runs ``sglang_standin_worker.py`` for
  ``-m sglang.launch_server``), hands the client every worker's URL and the launch's admin key
  (the stand-in answers 401 to a control call without it), and a worker that dies ends a watched
  run: ``run_watched`` sets the stop event, lets the work finish, then raises ``WorkerDied``.
- The router contract, against recording HTTP servers: generation goes to the router with the
  episode's key in ``X-SMG-Routing-Key`` (the body's ``routing_key`` kept), control calls go to
  every worker with the admin key, none to the router.

The real router in front of real workers is ``test_sglang_router.py``.
"""

from __future__ import annotations

import asyncio
import socket
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from envtune.agents.engine import GenerateRequest, SamplingParams
from envtune.runtime.cli.engine_stack import open_engines, run_watched
from envtune.runtime.engines.settings import RouterSettings, SGLangClientConfig, SGLangLaunchSettings
from envtune.runtime.engines.sglang_client import ROUTING_KEY_HEADER, SGLangClient
from envtune.runtime.engines.sglang_launcher import WorkerDied
from envtune.runtime.recipe.config import ConfigError, EngineConfig, ModelConfig, load_config

STANDIN = Path(__file__).resolve().parent / "sglang_standin_worker.py"


def fake_sglang_python(folder: Path) -> str:
    """An executable standing in for SGLang's interpreter: ``-m sglang.launch_server ARGS`` runs the
    stand-in worker with ARGS (the launcher's real command line); anything else runs as Python."""
    path = folder / "python"
    path.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "-m" ] && [ "$2" = "sglang.launch_server" ]; then\n'
        f'  shift 2; exec "{sys.executable}" "{STANDIN}" "$@"\n'
        "fi\n"
        f'exec "{sys.executable}" "$@"\n'
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def free_block(n: int) -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n < 65000 and all(_free(base + k) for k in range(n)):
            return base
    raise RuntimeError("no free port block")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def launch_engine(tmp_path: Path, **settings: Any) -> EngineConfig:
    fields: dict[str, Any] = {
        "python": fake_sglang_python(tmp_path),
        "gpus": ("0", "1", "2", "3"),
        "tp_size": 2,
        "base_port": free_block(2),
        "health_timeout_s": 60.0,
        "shutdown_timeout_s": 5.0,
    }
    fields.update(settings)
    return EngineConfig(kind="launch", launch=SGLangLaunchSettings(**fields))


async def test_launch_gives_the_client_every_worker_and_the_admin_key(tmp_path: Path) -> None:
    model = ModelConfig(path=str(tmp_path))  # the stand-in never reads it
    engine = launch_engine(tmp_path)
    async with open_engines(model, engine, log_dir=tmp_path / "run") as engines:
        base = engine.launch.base_port
        assert engines.client.config.urls == (f"http://127.0.0.1:{base}", f"http://127.0.0.1:{base + 1}")
        assert engines.client.config.router_url == ""
        assert engines.watch is not None and "2 launched SGLang worker(s)" in engines.description
        # Every worker got the load, each with the admin key (the stand-in refuses it without).
        await engines.client.load_adapter("policy-v1", str(tmp_path / "v1"), version=1)
        assert engines.client.policy_version == 1
        for k in range(2):
            log_file = tmp_path / "run" / f"sglang-worker-{k}.log"
            assert log_file.exists() and log_file.stat().st_mode & 0o077 == 0
    # Closed: the workers are gone.
    async with SGLangClient(SGLangClientConfig(urls=engines.client.config.urls, max_retries=0)) as client:
        assert not any((await client.health()).values())


async def test_a_dying_worker_stops_a_watched_run_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STANDIN_STARTUP_S", "0")
    monkeypatch.setenv("STANDIN_EXIT_AFTER_S", "1.5")
    engine = launch_engine(tmp_path, gpus=("0",), tp_size=1)
    stop = asyncio.Event()
    finished: list[str] = []

    async def work() -> str:
        await stop.wait()  # what train() does on stop: finish in order (checkpoint, report)
        finished.append("checkpoint")
        return "done"

    async with open_engines(ModelConfig(path=str(tmp_path)), engine, log_dir=tmp_path) as engines:
        with pytest.raises(WorkerDied, match=r"sglang-worker-0 .* exited with code 3"):
            await asyncio.wait_for(run_watched(engines, work(), stop), timeout=60)
    assert stop.is_set() and finished == ["checkpoint"]


def test_router_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"router\.enabled needs"):
        load_config(None, ["engine.router.enabled=true"])  # the embedded engine has no workers
    with pytest.raises(ConfigError, match="pick one"):
        load_config(
            None,
            [
                "model.path=/m", "engine.kind=sglang", "engine.sglang.urls=http://a:1",
                "engine.router.enabled=true", "engine.sglang.router_url=http://r:2",
            ],
        )  # fmt: skip
    with pytest.raises(ConfigError, match="--dp-size"):
        load_config(None, ["engine.launch.extra_args=--dp-size,2"])
    config = load_config(
        None, ["model.path=/m", "engine.kind=launch", "engine.launch.gpus=0,1", "engine.router.enabled=true"]
    )
    assert config.engine.router == RouterSettings(enabled=True)
    assert config.engine.launch.urls() == ["http://127.0.0.1:30000", "http://127.0.0.1:30001"]


# --- the router contract ---------------------------------------------------------------------------


class Recorder:
    """An HTTP server that records requests and answers like an SGLang server (one token)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], Any]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else None
        self.requests.append((request.path, dict(request.headers), body))
        if request.path == "/generate":
            meta = {
                "id": "x", "finish_reason": {"type": "length", "length": 1}, "prompt_tokens": 3,
                "completion_tokens": 1, "cached_tokens": 0, "output_token_logprobs": [[-0.5, 7, None]],
            }  # fmt: skip
            return web.json_response({"text": "", "output_ids": [7], "meta_info": meta})
        return web.json_response({"success": True, "error_message": "", "loaded_adapters": []})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def recorders() -> AsyncIterator[list[Recorder]]:
    servers = [Recorder() for _ in range(3)]  # the router, two workers
    for server in servers:
        await server.start()
    yield servers
    for server in servers:
        await server.close()


async def test_generation_goes_to_the_router_with_the_key_and_control_to_every_worker(
    recorders: list[Recorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    router, *workers = recorders
    monkeypatch.setenv("ENVTUNE_ADMIN_API_KEY", "from-the-environment")
    config = SGLangClientConfig(urls=tuple(w.url for w in workers), router_url=router.url, api_key="user-key")
    async with SGLangClient(config, admin_api_key="admin-secret") as client:
        for key in ("episode-1", "episode-2", None):
            request = GenerateRequest((1, 2, 3), SamplingParams(max_new_tokens=1), affinity_key=key)
            [completion] = await client.generate(request)
            assert completion.token_ids == (7,)
        await client.load_adapter("policy-v3", "/shared/adapters/v3", version=3)
        await client.unload_adapter("policy-v3")
        await client.flush_cache()
    generated = router.requests
    assert [path for path, _, _ in generated] == ["/generate"] * 3
    assert [h.get(ROUTING_KEY_HEADER) for _, h, _ in generated] == ["episode-1", "episode-2", None]
    assert [b.get("routing_key") for _, _, b in generated] == ["episode-1", "episode-2", None]
    assert all(h["Authorization"] == "Bearer user-key" for _, h, _ in generated)
    for worker in workers:
        assert [path for path, _, _ in worker.requests] == [
            "/load_lora_adapter", "/unload_lora_adapter", "/flush_cache",
        ]  # fmt: skip
        assert all(h["Authorization"] == "Bearer admin-secret" for _, h, _ in worker.requests)
        assert all(ROUTING_KEY_HEADER not in h for _, h, _ in worker.requests)
        assert worker.requests[0][2] == {
            "lora_name": "policy-v3", "lora_path": "/shared/adapters/v3", "pinned": False,
        }  # fmt: skip


async def test_without_a_router_generation_is_balanced_and_the_key_comes_from_the_environment(
    recorders: list[Recorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, *workers = recorders
    monkeypatch.setenv("ENVTUNE_ADMIN_API_KEY", "from-the-environment")
    async with SGLangClient(SGLangClientConfig(urls=tuple(w.url for w in workers))) as client:
        request = GenerateRequest((1, 2, 3), SamplingParams(max_new_tokens=1), affinity_key="episode-1")
        for _ in range(3):
            await client.generate(request)
        await client.load_adapter("policy-v1", "/a/v1", version=1)
    sticky = [w for w in workers if any(p == "/generate" for p, _, _ in w.requests)]
    assert len(sticky) == 1  # the client's own affinity: one worker per episode
    assert all(ROUTING_KEY_HEADER not in h for w in workers for _, h, _ in w.requests)
    for worker in workers:
        controls = [h for p, h, _ in worker.requests if p == "/load_lora_adapter"]
        assert [h["Authorization"] for h in controls] == ["Bearer from-the-environment"]

