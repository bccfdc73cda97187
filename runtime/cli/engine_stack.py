"""Opening the engines an entry point samples from: one place for ``envtune-run`` and ``envtune-eval``.

``open_engines`` resolves the model folder (building the tiny local model when none is named) and
starts, per ``engine.kind``: the embedded engine behind envtune's SGLang-protocol server on
127.0.0.1 with the SGLang client talking to it over real HTTP (so the CPU default exercises the same
client a GPU run uses); or a client to running SGLang servers; or a launched
``python -m sglang.launch_server`` with LoRA enabled. Whatever it started it closes.

Left out: what runs on the engines (the recipe).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from envtune.optim.config import LoraSettings
from envtune.runtime.recipe.config import EngineConfig, ModelConfig

if TYPE_CHECKING:
    from envtune.runtime.engines.sglang_client import SGLangClient

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class EngineStack:
    """What a run samples from and publishes adapters to."""

    client: SGLangClient
    """The ``Engine`` episodes sample from and the ``WeightSync`` target of the adapter publisher."""
    model_path: Path
    """The policy model's folder (tokenizer and base weights)."""
    description: str
    """For logs: where tokens come from."""


async def resolve_model_path(model: ModelConfig) -> Path:
    """``model.path``, or the tiny local model (built on first use) when it is empty."""
    if model.path:
        path = Path(model.path)
        if not path.is_dir():
            raise FileNotFoundError(f"model.path {path} is not a folder (a Hugging Face model folder)")
        return path
    from envtune.runtime.engines.tiny_model import build_tiny_model, default_tiny_model_dir

    folder = Path(model.tiny_model_dir) if model.tiny_model_dir else default_tiny_model_dir()
    return await asyncio.to_thread(build_tiny_model, folder, seed=model.tiny_seed)


def model_vocab_size(model_path: Path) -> int | None:
    """The model's vocabulary size from its ``config.json`` (bounds the token ids a server may return)."""
    import json

    try:
        value = json.loads((model_path / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def sglang_launch_command(model_path: str, engine: EngineConfig, lora: LoraSettings) -> list[str]:
    """``python -m sglang.launch_server`` with LoRA enabled for the learner's adapters."""
    extra = list(engine.launch.extra_args)
    command = [
        sys.executable,
        "-m",
        "sglang.launch_server",
        "--model-path",
        model_path,
        "--host",
        "127.0.0.1",
        "--port",
        str(engine.launch.port),
        "--enable-lora",
        "--max-lora-rank",
        str(lora.rank),
        "--lora-target-modules",
        *lora.target_modules,
    ]
    if "--mem-fraction-static" not in extra:
        # The learner trains on the same GPU: leave it room (SGLang's default takes ~90%).
        command += ["--mem-fraction-static", "0.5"]
    return command + extra


async def _wait_healthy(url: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(
                    f"sglang.launch_server exited with code {process.returncode} before it was healthy"
                )
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(f"{url}/health") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(2.0)
    raise TimeoutError(f"SGLang at {url} not healthy after {timeout_s:.0f} s")


@contextlib.asynccontextmanager
async def open_engines(
    model: ModelConfig, engine: EngineConfig, lora: LoraSettings | None = None
) -> AsyncIterator[EngineStack]:
    """Start (or connect to) the engines of ``engine``; closes what it started.

    ``lora`` shapes a launched server's LoRA slots (the learner's adapter); defaults otherwise.
    """
    from envtune.runtime.engines.sglang_client import SGLangClient

    model_path = await resolve_model_path(model)
    vocab_size = model_vocab_size(model_path)
    if engine.kind == "embedded":
        from envtune.runtime.engines.embedded import EmbeddedEngine
        from envtune.runtime.engines.sglang_server import SGLangProtocolServer

        embedded = await EmbeddedEngine.open(model_path, engine.embedded)
        try:
            server = SGLangProtocolServer(embedded)
            url = await server.start("127.0.0.1", 0)
            try:
                async with SGLangClient(replace(engine.sglang, urls=(url,)), vocab_size=vocab_size) as client:
                    yield EngineStack(client, model_path, f"embedded engine at {url}")
            finally:
                await server.close()
        finally:
            await embedded.close()
    elif engine.kind == "sglang":
        urls = engine.sglang.urls
        async with SGLangClient(engine.sglang, vocab_size=vocab_size) as client:
            # Servers still starting are waited for; none at all is one clear error, not a run
            # that drops every episode.
            await client.wait_ready()
            yield EngineStack(client, model_path, f"SGLang at {', '.join(urls)}")
    else:
        command = sglang_launch_command(str(model_path), engine, lora or LoraSettings())
        log.info("sglang_launching", command=" ".join(command))
        process = subprocess.Popen(command)
        url = f"http://127.0.0.1:{engine.launch.port}"
        try:
            await _wait_healthy(url, process, engine.launch.timeout_s)
            async with SGLangClient(replace(engine.sglang, urls=(url,)), vocab_size=vocab_size) as client:
                yield EngineStack(client, model_path, f"launched SGLang at {url}")
        finally:
            process.terminate()
            try:
                await asyncio.to_thread(process.wait, 60)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait)
