"""SGLang's real router (``sglang-router``, Rust binary) in front of two ``envtune-serve`` workers.

Checks the header contract envtune's client relies on behind a router: requests carrying the same
``X-SMG-Routing-Key`` land on one worker (the ``manual`` policy), and a round-robin router, fed
the same requests, spreads them (so stickiness is the header's doing, not an accident of two
idle workers). Which worker served a request is read from each worker's ``/server_info``
token counter. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from envtune.runtime.engines.sglang_launcher import (
    RouterConfig,
    SGLangRouter,
    _spawn,
    _terminate,
    _wait_healthy,
)

pytest.importorskip("sglang_router", reason="sglang-router (a dev dependency) is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def two_workers(tmp_path: Path) -> AsyncIterator[list[str]]:
    from envtune.runtime.engines.tiny_model import build_tiny_model, default_tiny_model_dir

    model = build_tiny_model(default_tiny_model_dir())
    processes = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        for k in range(2):
            port = free_port()
            argv = [
                sys.executable, "-m", "envtune.runtime.cli.serve",
                "--model", str(model), "--port", str(port), "--set", "engine.max_batch_rows=4",
            ]  # fmt: skip
            processes.append(
                _spawn(f"envtune-serve-{k}", f"http://127.0.0.1:{port}", argv, env, tmp_path / f"w{k}.log")
            )
        await _wait_healthy(processes, 180.0)
        yield [p.url for p in processes]
    finally:
        await _terminate(processes, 10.0)


async def tokens_generated(session: aiohttp.ClientSession, urls: list[str]) -> list[int]:
    counts = []
    for url in urls:
        async with session.get(f"{url}/server_info") as r:
            counts.append((await r.json())["internal_states"][0]["tokens_generated"])
    return counts


async def served_by(session: aiohttp.ClientSession, router: str, workers: list[str], key: str | None) -> int:
    """Send one /generate through the router; return the index of the worker that generated it."""
    before = await tokens_generated(session, workers)
    body = {"input_ids": [5, 6, 7, 8], "sampling_params": {"max_new_tokens": 2, "temperature": 0}}
    headers = {"X-SMG-Routing-Key": key} if key is not None else {}
    async with session.post(f"{router}/generate", json=body, headers=headers) as r:
        assert r.status == 200, await r.text()
        await r.json()
    after = await tokens_generated(session, workers)
    moved = [k for k in range(len(workers)) if after[k] > before[k]]
    assert len(moved) == 1, (before, after)
    return moved[0]


async def test_routing_key_header_pins_requests_to_one_worker(two_workers: list[str], tmp_path: Path) -> None:
    sticky = RouterConfig(
        python=sys.executable, worker_urls=tuple(two_workers), port=free_port(), log_dir=str(tmp_path)
    )
    async with SGLangRouter(sticky) as router, aiohttp.ClientSession() as session:
        for key in ("episode-a", "episode-b", "episode-c", "episode-d"):
            seen = {await served_by(session, router.url, two_workers, key) for _ in range(4)}
            assert len(seen) == 1, (key, seen)
        router.check()
    spread = RouterConfig(
        python=sys.executable, worker_urls=tuple(two_workers), port=free_port(), policy="round_robin",
        log_dir=str(tmp_path),
    )  # fmt: skip
    async with SGLangRouter(spread) as router, aiohttp.ClientSession() as session:
        seen = {await served_by(session, router.url, two_workers, "episode-a") for _ in range(4)}
        assert seen == {0, 1}
