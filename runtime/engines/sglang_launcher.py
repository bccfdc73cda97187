"""Start SGLang workers (and optionally SGLang's router) from SGLang's own environment, and stop them.

SGLang pins its own torch, transformers and xgrammar (sglang 0.5.23: torch 2.14.1, transformers
5.19.0, xgrammar 0.2.7), so it lives in a separate virtual environment (``make sglang-env``:
``.venv-sglang``) and is started as a subprocess of *that* interpreter, never imported here.

One worker per GPU or tensor-parallel group: ``SGLangWorkers`` splits ``gpus`` into groups of
``tp_size`` and starts ``python -m sglang.launch_server`` once per group, with
``CUDA_VISIBLE_DEVICES`` set to the group, on consecutive ports. SGLang 0.5.23 refuses dynamic LoRA
loading with ``--dp-size`` > 1, hence separate servers rather than SGLang's in-server data
parallelism. Each worker gets the LoRA flags the learner's adapters need (``--enable-lora``,
``--max-lora-rank``, ``--lora-target-modules``, ``--max-loras-per-batch``).

The admin API key (SGLang's ``--admin-api-key``: required on ``/load_lora_adapter``, weight updates
and the other control endpoints once set, while ``/generate`` stays open) never appears on a
command line, where ``ps`` would show it: it goes in a YAML file (mode 0600) passed with SGLang's
``--config``. SGLang 0.5.23 still prints its server arguments, key included, in its start-up log,
so each worker's log file is created 0600 too.

Lifecycle: every process starts in its own session (so its children, SGLang's scheduler and
detokenizer, can be signalled as a group); ``start`` waits until every ``/health`` answers 200
within ``health_timeout_s``, and fails at once, with the tail of its log, when a worker exits
first; ``watch`` raises ``WorkerDied`` when one exits later; ``close`` sends SIGTERM to each group,
waits ``shutdown_timeout_s``, then SIGKILLs what is left.

``SGLangRouter`` starts ``python -m sglang_router.launch_router`` (the ``sglang-router`` package)
in front of the workers with the ``manual`` policy: a request's ``X-SMG-Routing-Key`` header pins
it to one worker (prefix-cache affinity per episode). The router does not forward control calls
(``/load_lora_adapter`` and friends): those go to each worker's URL directly.

Deliberately left out: starting workers on other hosts (use ``srun``/k8s and pass their URLs), and
restarting dead workers (a run stops instead: it cannot know what a dead worker had loaded).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

LOG_TAIL_BYTES = 4000
"""How much of a dead worker's log an error quotes."""


class LaunchError(RuntimeError):
    """A worker or the router could not be started (exited, never healthy, port taken)."""


class WorkerDied(RuntimeError):
    """A worker that was healthy has exited; the run cannot go on without it."""


@dataclass(frozen=True, slots=True)
class SGLangLaunchConfig:
    """How to start the SGLang workers of one host (the run config's ``engine.launch`` section)."""

    python: str
    """The interpreter of SGLang's environment, e.g. ``.venv-sglang/bin/python``."""
    model_path: str
    """The base model folder, as the learner loads it."""
    lora_rank: int
    """``--max-lora-rank``: the learner's LoRA rank."""
    lora_target_modules: tuple[str, ...]
    """``--lora-target-modules``: the learner's LoRA targets."""
    gpus: tuple[str, ...] = ("0",)
    """CUDA device ids to serve on; split into groups of ``tp_size``, one worker per group."""
    tp_size: int = 1
    """GPUs per worker (SGLang's ``--tp-size``)."""
    host: str = "127.0.0.1"
    """Interface the workers listen on (0.0.0.0 when the learner runs on another host)."""
    base_port: int = 30000
    """Worker k listens on ``base_port + k``."""
    max_loras_per_batch: int = 4
    """``--max-loras-per-batch``: adapters in one running batch. Staleness-bounded training keeps a
    few policy versions in flight at once; base-model requests count as one."""
    max_loaded_loras: int | None = None
    """``--max-loaded-loras`` (None: SGLang's default)."""
    mem_fraction_static: float | None = None
    """``--mem-fraction-static`` (None: SGLang's default; lower it when the learner shares the GPU)."""
    admin_api_key: str | None = field(default=None, repr=False)
    """The key for control endpoints; None generates one per launch (``SGLangWorkers.admin_api_key``)."""
    extra_args: tuple[str, ...] = ()
    """More ``launch_server`` flags, appended last."""
    entry: tuple[str, ...] = ("-m", "sglang.launch_server")
    """What the interpreter runs (tests substitute a stand-in worker script)."""
    log_dir: str = "."
    """Where ``sglang-worker-{k}.log`` files go (the run folder)."""
    health_timeout_s: float = 1200.0
    """Longest wait for every worker's ``/health`` (a 7B model with CUDA graphs takes minutes)."""
    shutdown_timeout_s: float = 60.0
    """Grace period between SIGTERM and SIGKILL."""

    def __post_init__(self) -> None:
        if self.tp_size < 1 or not self.gpus or len(self.gpus) % self.tp_size:
            raise ValueError(
                f"{len(self.gpus)} GPU(s) do not split into tensor-parallel groups of {self.tp_size}"
            )
        if len(set(self.gpus)) != len(self.gpus):
            raise ValueError(f"GPU ids repeat: {self.gpus}")
        if self.lora_rank < 1 or not self.lora_target_modules:
            raise ValueError("lora_rank must be >= 1 and lora_target_modules non-empty")
        if self.max_loras_per_batch < 1:
            raise ValueError("max_loras_per_batch must be >= 1")
        if not 0 < self.base_port < 65536 - len(self.gpus):
            raise ValueError(f"base_port {self.base_port} out of range")
        reserved = {"--admin-api-key", "--api-key", "--port", "--host", "--dp-size", "--dp", "--config"}
        clash = sorted(reserved & {a.split("=", 1)[0] for a in self.extra_args})
        if clash:
            raise ValueError(
                f"extra_args may not set {clash}: the launcher owns them (--dp-size breaks LoRA loading)"
            )

    def gpu_groups(self) -> list[tuple[str, ...]]:
        """The device ids of each worker, in order."""
        return [self.gpus[i : i + self.tp_size] for i in range(0, len(self.gpus), self.tp_size)]

    def urls(self) -> list[str]:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return [f"http://{host}:{self.base_port + k}" for k in range(len(self.gpu_groups()))]


def worker_command(config: SGLangLaunchConfig, index: int, config_file: str) -> list[str]:
    """The argv of worker ``index`` (its environment sets ``CUDA_VISIBLE_DEVICES``)."""
    command = [
        config.python,
        *config.entry,
        "--model-path",
        config.model_path,
        "--host",
        config.host,
        "--port",
        str(config.base_port + index),
        "--tp-size",
        str(config.tp_size),
        "--enable-lora",
        "--max-lora-rank",
        str(config.lora_rank),
        "--lora-target-modules",
        *config.lora_target_modules,
        "--max-loras-per-batch",
        str(config.max_loras_per_batch),
    ]
    if config.max_loaded_loras is not None:
        command += ["--max-loaded-loras", str(config.max_loaded_loras)]
    if config.mem_fraction_static is not None:
        command += ["--mem-fraction-static", str(config.mem_fraction_static)]
    return [*command, "--config", config_file, *config.extra_args]


def worker_environment(config: SGLangLaunchConfig, index: int, base: Mapping[str, str]) -> dict[str, str]:
    """``base`` with this worker's GPUs and without envtune's virtualenv leaking into SGLang's."""
    env = {k: v for k, v in base.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["CUDA_VISIBLE_DEVICES"] = ",".join(config.gpu_groups()[index])
    return env


# --- processes ----------------------------------------------------------------------------------------


@dataclass
class _Process:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - LOG_TAIL_BYTES))
                return f.read().decode("utf-8", "replace")
        except OSError as exc:
            return f"<log unreadable: {exc}>"

    def died(self) -> str:
        return (
            f"{self.name} ({self.url}) exited with code {self.process.returncode}; "
            f"last lines of {self.log_path}:\n{self.log_tail()}"
        )


def _open_private(path: Path) -> int:
    """A new file only its owner can read (logs may hold the admin key)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1" if host in ("0.0.0.0", "") else host, port))
        except OSError:
            return False
    return True


def _spawn(name: str, url: str, argv: list[str], env: Mapping[str, str], log_path: Path) -> _Process:
    fd = _open_private(log_path)
    try:
        # Own session: SIGTERM/SIGKILL reach the worker's children too (os.killpg).
        process = subprocess.Popen(
            argv,
            env=dict(env),
            stdout=fd,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        os.close(fd)
    log.info("sglang_process_started", name=name, url=url, pid=process.pid, log=str(log_path))
    return _Process(name, url, process, log_path)


async def _wait_healthy(processes: Sequence[_Process], timeout_s: float) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout_s
    pending = list(processes)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while pending:
            for p in list(pending):
                if p.process.poll() is not None:
                    raise LaunchError(f"{p.died()}\n(before it was healthy)")
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                    async with session.get(f"{p.url}/health") as response:
                        if response.status == 200:
                            pending.remove(p)
                            log.info("sglang_process_healthy", name=p.name, url=p.url)
            if not pending:
                return
            if time.monotonic() >= deadline:
                names = ", ".join(f"{p.name} ({p.url})" for p in pending)
                raise LaunchError(f"not healthy after {timeout_s:.0f} s: {names}; see {pending[0].log_path}")
            await asyncio.sleep(0.5)


async def _terminate(processes: Sequence[_Process], timeout_s: float) -> None:
    """SIGTERM every process group, wait, SIGKILL the stragglers; never raises."""
    for p in processes:
        if p.process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for p in processes:
        while p.process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if p.process.poll() is None:
            log.warning("sglang_process_killed", name=p.name, pid=p.process.pid)
        # The leader may be gone while its children linger: the group gets SIGKILL either way.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.process.pid, signal.SIGKILL)
        await asyncio.to_thread(p.process.wait)


class SGLangWorkers:
    """The SGLang workers of one host: ``async with SGLangWorkers(config) as workers: workers.urls``."""

    def __init__(self, config: SGLangLaunchConfig) -> None:
        self.config = config
        self.admin_api_key = config.admin_api_key or secrets.token_urlsafe(32)
        self._processes: list[_Process] = []
        self._secrets_dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def urls(self) -> list[str]:
        """Each worker's base URL (control calls go to each of these, never through a router)."""
        return [p.url for p in self._processes]

    @property
    def pids(self) -> list[int]:
        return [p.process.pid for p in self._processes]

    async def start(self) -> list[str]:
        """Start every worker and wait until all are healthy; on failure, stop them all and raise."""
        cfg = self.config
        urls = cfg.urls()
        taken = [u for k, u in enumerate(urls) if not _port_free(cfg.host, cfg.base_port + k)]
        if taken:
            raise LaunchError(f"ports already in use: {', '.join(taken)} (another server? change base_port)")
        log_dir = Path(cfg.log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        self._secrets_dir = tempfile.TemporaryDirectory(prefix="envtune-sglang-")
        key_file = Path(self._secrets_dir.name) / "admin.yaml"
        fd = _open_private(key_file)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"admin_api_key: {json.dumps(self.admin_api_key)}\n")  # a JSON string is valid YAML
        try:
            for k, url in enumerate(urls):
                self._processes.append(
                    _spawn(
                        f"sglang-worker-{k}",
                        url,
                        worker_command(cfg, k, str(key_file)),
                        worker_environment(cfg, k, os.environ),
                        log_dir / f"sglang-worker-{k}.log",
                    )
                )
            await _wait_healthy(self._processes, cfg.health_timeout_s)
        except BaseException:
            await self.close()
            raise
        return self.urls

    def check(self) -> None:
        """Raise ``WorkerDied`` if any worker has exited."""
        for p in self._processes:
            if p.process.poll() is not None:
                raise WorkerDied(p.died())

    async def watch(self, interval_s: float = 1.0) -> None:
        """Return never; raise ``WorkerDied`` when a worker exits (run it in the run's TaskGroup)."""
        while True:
            self.check()
            await asyncio.sleep(interval_s)

    async def close(self) -> None:
        """Stop every worker (SIGTERM, grace period, SIGKILL). Idempotent."""
        processes, self._processes = self._processes, []
        await _terminate(processes, self.config.shutdown_timeout_s)
        if self._secrets_dir is not None:
            self._secrets_dir.cleanup()
            self._secrets_dir = None

    async def __aenter__(self) -> SGLangWorkers:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


# --- the router -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """SGLang's router in front of the workers (the run config's ``engine.router`` section)."""

    python: str
    """An interpreter with ``sglang-router`` installed (``.venv-sglang/bin/python``)."""
    worker_urls: tuple[str, ...]
    """The workers behind it."""
    host: str = "127.0.0.1"
    port: int = 30080
    policy: str = "manual"
    """``manual`` pins each ``X-SMG-Routing-Key`` to one worker (sticky, survives added workers);
    requests without the header are spread (``assignment_mode``)."""
    assignment_mode: str = "min_load"
    """Where ``manual`` sends a key it has not seen: ``min_load`` | ``min_group`` | ``random``."""
    extra_args: tuple[str, ...] = ()
    log_dir: str = "."
    health_timeout_s: float = 120.0
    shutdown_timeout_s: float = 20.0

    def __post_init__(self) -> None:
        if not self.worker_urls:
            raise ValueError("the router needs at least one worker URL")
        if self.policy not in ("manual", "cache_aware", "round_robin", "random", "power_of_two"):
            raise ValueError(f"unknown router policy {self.policy!r}")


def router_command(config: RouterConfig) -> list[str]:
    return [
        config.python,
        "-m",
        "sglang_router.launch_router",
        "--host",
        config.host,
        "--port",
        str(config.port),
        "--policy",
        config.policy,
        "--assignment-mode",
        config.assignment_mode,
        "--worker-urls",
        *config.worker_urls,
        *config.extra_args,
    ]


class SGLangRouter:
    """``async with SGLangRouter(config) as router: router.url`` (requests only; no control calls)."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self._process: _Process | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "") else self.config.host
        return f"http://{host}:{self.config.port}"

    async def start(self) -> str:
        cfg = self.config
        if not _port_free(cfg.host, cfg.port):
            raise LaunchError(f"port {cfg.port} already in use")
        Path(cfg.log_dir).mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
        self._process = _spawn(
            "sglang-router", self.url, router_command(cfg), env, Path(cfg.log_dir) / "sglang-router.log"
        )
        try:
            await _wait_healthy([self._process], cfg.health_timeout_s)
        except BaseException:
            await self.close()
            raise
        return self.url

    def check(self) -> None:
        if self._process is not None and self._process.process.poll() is not None:
            raise WorkerDied(self._process.died())

    async def close(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            await _terminate([process], self.config.shutdown_timeout_s)

    async def __aenter__(self) -> SGLangRouter:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
