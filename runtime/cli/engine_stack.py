"""Opening the engines an entry point samples from: one place for ``envtune-run`` and ``envtune-eval``.

``open_engines`` resolves the model folder (building the tiny local model when none is named) and
starts, per ``engine.kind``: the embedded engine behind envtune's SGLang-protocol server on
127.0.0.1 with the SGLang client talking to it over real HTTP (so the CPU default exercises the same
client a GPU run uses); or a client to running SGLang servers; or SGLang workers launched from
SGLang's own environment, one per GPU or tensor-parallel group, with the learner's LoRA flags and a
fresh admin key (``runtime/engines/sglang_launcher.py``). With ``engine.router.enabled`` SGLang's
router goes in front of the workers for generation (control calls still reach each worker). Whatever
it started it closes; ``run_watched`` ends a run in order when a launched process dies.

Left out: what runs on the engines (the recipe).
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import structlog
from envtune.optim.config import LoraSettings
from envtune.runtime.engines.sglang_launcher import (
    RouterConfig,
    SGLangLaunchConfig,
    SGLangRouter,
    SGLangWorkers,
    WorkerDied,
)
from envtune.runtime.recipe.config import EngineConfig, ModelConfig

if TYPE_CHECKING:
    from envtune.runtime.engines.sglang_client import SGLangClient

log = structlog.get_logger(__name__)

T = TypeVar("T")

WATCH_INTERVAL_S = 1.0
"""How often launched processes are checked for life."""


@dataclass(frozen=True, slots=True)
class EngineStack:
    """What a run samples from and publishes adapters to."""

    client: SGLangClient
    """The ``Engine`` episodes sample from and the ``WeightSync`` target of the adapter publisher."""
    model_path: Path
    """The policy model's folder (tokenizer and base weights)."""
    description: str
    """For logs: where tokens come from."""
    watch: Callable[[], Awaitable[None]] | None = None
    """Returns never; raises ``WorkerDied`` when a launched worker or the router exits. Run it in the
    run's TaskGroup (``run_watched``). None when nothing was launched."""


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


def _watcher(
    workers: SGLangWorkers | None, router: SGLangRouter | None
) -> Callable[[], Awaitable[None]] | None:
    if workers is None and router is None:
        return None

    async def watch() -> None:
        while True:
            if workers is not None:
                workers.check()
            if router is not None:
                router.check()
            await asyncio.sleep(WATCH_INTERVAL_S)

    return watch


def model_vocab_size(model_path: Path) -> int | None:
    """The model's vocabulary size from its ``config.json`` (bounds the token ids a server may return)."""
    import json

    try:
        value = json.loads((model_path / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None



def _log_dir() -> Path:
    """Where launched processes log when the caller named no folder (kept: logs explain failures)."""
    return Path(tempfile.mkdtemp(prefix="envtune-sglang-"))


@contextlib.asynccontextmanager
async def _router(
    engine: EngineConfig, worker_urls: Sequence[str], log_dir: Path | None
) -> AsyncIterator[SGLangRouter | None]:
    """SGLang's router in front of ``worker_urls`` when ``engine.router.enabled`` (else None)."""
    if not engine.router.enabled:
        yield None
        return
    log_dir = log_dir or _log_dir()
    python = engine.router.python or engine.launch.python
    config = RouterConfig(engine.router, python, tuple(worker_urls), log_dir=str(log_dir))
    log.info("sglang_router_launching", workers=list(worker_urls), port=engine.router.port)
    async with SGLangRouter(config) as router:
        yield router


@contextlib.asynccontextmanager
async def open_engines(
    model: ModelConfig, engine: EngineConfig, lora: LoraSettings | None = None, *, log_dir: Path | None = None
) -> AsyncIterator[EngineStack]:
    """Start (or connect to) the engines of ``engine``; closes what it started.

    ``lora`` shapes launched workers' LoRA slots (the learner's adapter); defaults otherwise.
    ``log_dir`` receives launched workers' and the router's logs (a new temporary folder if None).
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
        async with _router(engine, urls, log_dir) as router:
            settings = replace(engine.sglang, router_url=router.url) if router else engine.sglang
            async with SGLangClient(settings, vocab_size=vocab_size) as client:
                # Servers still starting are waited for; none at all is one clear error, not a run
                # that drops every episode.
                await client.wait_ready()
                where = f" behind the router at {settings.router_url}" if settings.router_url else ""
                description = f"SGLang at {', '.join(urls)}{where}"
                yield EngineStack(client, model_path, description, _watcher(None, router))
    else:
        log_dir = log_dir or _log_dir()
        lora = lora or LoraSettings()
        launch = SGLangLaunchConfig(
            engine.launch, str(model_path), lora.rank, lora.target_modules, log_dir=str(log_dir)
        )
        log.info("sglang_workers_launching", gpus=launch.gpu_groups(), urls=launch.urls(), logs=str(log_dir))
        async with SGLangWorkers(launch) as workers, _router(engine, workers.urls, log_dir) as router:
            urls = tuple(workers.urls)
            settings = replace(engine.sglang, urls=urls, router_url=router.url if router else "")
            async with SGLangClient(
                settings, admin_api_key=workers.admin_api_key, vocab_size=vocab_size
            ) as client:
                where = f" behind the router at {router.url}" if router else ""
                yield EngineStack(
                    client,
                    model_path,
                    f"{len(urls)} launched SGLang worker(s) at {', '.join(urls)}{where}",
                    _watcher(workers, router),
                )


async def run_watched(engines: EngineStack, work: Coroutine[Any, Any, T], stop: asyncio.Event) -> T:
    """Run ``work`` (the training) while the engines' ``watch`` runs in the same TaskGroup.

    When a launched worker or the router dies, ``stop`` is set, so the run ends in order (no new
    episodes, a checkpoint, the report), and ``WorkerDied`` is raised once ``work`` has returned.
    """
    if engines.watch is None:
        return await work
    watch = engines.watch
    died: list[WorkerDied] = []

    async def watcher() -> None:
        try:
            await watch()
        except WorkerDied as exc:
            log.error("sglang_process_died", error=str(exc), hint="stopping the run with a checkpoint")
            died.append(exc)
            stop.set()

    async with asyncio.TaskGroup() as group:
        task = group.create_task(watcher())
        result = await work
        task.cancel()
    if died:
        raise died[0]
    return result
