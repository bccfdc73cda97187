"""Settings of the engine backends, declared once and importable without torch or aiohttp.

The run, eval and serve configs embed these records as their ``engine`` sub-sections, so describing
or validating a config never loads a backend.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class EmbeddedEngineConfig:
    """How the embedded engine loads and batches (the model folder is given to ``open``)."""

    device: str | None = None
    """``cpu``, ``cuda``, ``cuda:1``...; None picks CUDA when available."""
    max_batch_rows: int = 16
    """Rows (sampled continuations) decoded together; a single job with more rows still runs alone."""
    batch_window_s: float = 0.002
    """How long an idle worker waits after the first arrival to gather a batch."""
    grammar_cache_size: int = 256
    """Compiled grammars kept (LRU, keyed by kind and text)."""
    prefix_cache_tokens: int = 131_072
    """Tokens of per-episode KV kept for reuse (0 disables): a request with an ``affinity_key``
    whose prompt shares a prefix with a kept prompt + completion of that key prefills only the rest.
    Memory: 2 KiB a token for the tiny model (256 MiB at the default), ~24 KiB for a 0.5B Qwen2."""
    torch_threads: int | None = 1
    """Intra-op threads of the engine's worker thread (OpenMP settings are per thread, so the rest of
    the process keeps its own); ``none`` keeps torch's default. 1 is fastest for small models on few,
    shared cores, where OpenMP barriers between threads dominate."""
    max_lora_rank: int = 256
    """Largest LoRA rank an adapter may have (SGLang's ``--max-lora-rank``): an adapter config is
    checked against it before anything is allocated, so a hostile ``r`` cannot exhaust memory."""

    def __post_init__(self) -> None:
        if self.max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be >= 1, got {self.max_batch_rows}")
        if self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What one client may ask of envtune's HTTP server, so no request or connection can take the
    process down or starve the others (request sizes, slow clients, connection counts)."""

    max_body_bytes: int = 16 * 1024 * 1024
    """Largest request body (HTTP 413 above it). 16 MiB holds a batch of 64 prompts of 32k ids."""
    max_chars_per_token: int = 16
    """A ``text`` prompt longer than the model context times this many characters is refused
    before it is tokenized (a token is rarely longer), so a huge text never reaches the tokenizer."""
    max_samples_per_request: int = 256
    """Most sequences one ``/generate`` may ask for: prompts times ``n``."""
    max_queued_requests: int = 4096
    """Requests waiting for the engine beyond which new ones get HTTP 503 (retry later)."""
    max_connections: int = 1024
    """Open connections at most (and never more than the process's file limit allows); at the
    limit a new connection replaces the longest-idle one that has no request in progress."""
    idle_timeout_s: float = 30.0
    """A connection that has no request in progress for this long is closed: slow or stalled
    headers (slowloris) included, not only idle keep-alive connections."""
    body_timeout_s: float = 60.0
    """Reading a request body may take at most this long (a body trickled byte by byte is cut)."""

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_chars_per_token", "max_samples_per_request"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queued_requests < 1 or self.max_connections < 8:
            raise ValueError("max_queued_requests must be >= 1 and max_connections >= 8")
        if not (self.idle_timeout_s > 0 and self.body_timeout_s > 0):
            raise ValueError("idle_timeout_s and body_timeout_s must be > 0")


@dataclass(frozen=True, slots=True)
class SGLangClientConfig:
    """Where the SGLang servers are and how hard to try."""

    urls: tuple[str, ...] = ()
    """Base URLs of the workers (replicas), e.g. ``["http://127.0.0.1:30000"]``: generation is balanced
    over them unless ``router_url`` is set; adapter loads and other control calls go to each."""
    router_url: str = ""
    """An SGLang router in front of ``urls`` (``sglang_router.launch_router``): generation goes there
    with the episode's affinity key as ``X-SMG-Routing-Key``; control calls never do (the router does
    not forward them). Empty: no router, or the one ``engine.router`` starts."""
    api_key: str | None = None
    """Sent as ``Authorization: Bearer KEY`` when set (SGLang's ``--api-key``). Prefer
    ``api_key_env``: a key given here is copied into the run folder's ``config.toml``."""
    api_key_env: str = "ENVTUNE_API_KEY"
    """Environment variable read for the key when ``api_key`` is unset (empty: none)."""
    admin_api_key_env: str = "ENVTUNE_ADMIN_API_KEY"
    """Environment variable holding the workers' admin key (SGLang's ``--admin-api-key``, needed on
    control calls once set), for workers started outside envtune; workers envtune launches get a
    fresh key each run."""
    max_connections: int = 512
    """Pool size over all replicas (``TCPConnector(limit=...)``)."""
    request_timeout_s: float = 900.0
    """Whole-request timeout for ``/generate`` (long generations at high load are slow)."""
    connect_timeout_s: float = 10.0
    """TCP connect timeout."""
    control_timeout_s: float = 600.0
    """Timeout of weight-sync calls (loading weights can take a while)."""
    max_retries: int = 5
    """Retries after the first attempt on 5xx, timeouts, dropped connections and malformed answers.
    While nothing answers at all (an outage) a request keeps waiting, up to ``outage_timeout_s``."""
    backoff_initial_s: float = 0.2
    """First retry delay; doubles each retry (with jitter) up to ``backoff_max_s``."""
    backoff_max_s: float = 10.0
    """Cap on one retry delay."""
    unhealthy_cooldown_s: float = 5.0
    """A replica that failed is avoided for this long (when another one is healthy)."""
    affinity_capacity: int = 65536
    """Affinity keys remembered (least recently used are forgotten)."""
    outage_timeout_s: float = 90.0
    """Circuit breaker: when no replica has answered for this long while requests kept failing, the
    engine is declared gone and every call fails at once with ``EngineUnavailable`` (a run then
    stops with one clear error). Weight-sync calls retry until then, so an engine restart shorter
    than this (typically 20-30 s) is ridden out; the adapters a restarted server lost are loaded
    again on first use. Also how long a start waits for the servers to come up."""
    max_response_bytes: int = 256 * 1024 * 1024
    """Largest response body read (a bigger one is a failed attempt, never read whole)."""

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if not self.outage_timeout_s > 0:
            raise ValueError(f"outage_timeout_s must be > 0, got {self.outage_timeout_s}")
        if self.max_response_bytes < 1024:
            raise ValueError(f"max_response_bytes must be >= 1024, got {self.max_response_bytes}")
        for url in (*self.urls, *([self.router_url] if self.router_url else [])):
            check_server_url(url)


def check_server_url(url: str) -> None:
    """``ValueError`` unless ``url`` is an ``http(s)://host[:port]`` base URL (checked when the config
    is read: a typo must stop the run at once, not drop every episode)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"server URL {url!r} is not an http:// or https:// URL with a host")
    try:
        parsed.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        raise ValueError(f"server URL {url!r} has an invalid port: {exc}") from None


_LAUNCHER_OWNED = ("--admin-api-key", "--api-key", "--port", "--host", "--dp-size", "--dp", "--config")
"""``launch_server`` flags the launcher sets itself (``--dp-size`` > 1 breaks dynamic LoRA loading)."""


@dataclass(frozen=True, slots=True)
class SGLangLaunchSettings:
    """SGLang workers envtune starts on this host (``engine.kind = "launch"``): one
    ``sglang.launch_server`` per GPU or tensor-parallel group, from SGLang's own environment
    (``make sglang-env``), with the LoRA flags of the learner's adapter and an admin key
    (``runtime/engines/sglang_launcher.py``)."""

    python: str = ".venv-sglang/bin/python"
    """The interpreter of SGLang's environment (never envtune's: their torch pins differ)."""
    gpus: tuple[str, ...] = ("0",)
    """CUDA device ids the workers use, split into groups of ``tp_size``, one worker per group."""
    tp_size: int = 1
    """GPUs per worker (SGLang's ``--tp-size``)."""
    host: str = "127.0.0.1"
    """Interface the workers listen on (``0.0.0.0`` when the learner runs on another host)."""
    base_port: int = 30000
    """Worker k listens on ``base_port + k``."""
    max_loras_per_batch: int = 4
    """``--max-loras-per-batch``: adapters in one running batch. Staleness-bounded training keeps a
    few policy versions in flight at once; base-model requests count as one."""
    max_loaded_loras: int | None = None
    """``--max-loaded-loras`` (``none``: SGLang's default)."""
    mem_fraction_static: float | None = None
    """``--mem-fraction-static`` (``none``: SGLang's default, ~0.85-0.9 of the GPU); lower it when the
    learner shares the workers' GPUs."""
    extra_args: tuple[str, ...] = ()
    """More ``launch_server`` flags, appended last (not the ones the launcher owns: ``--port``,
    ``--host``, ``--dp-size``, the keys, ``--config``)."""
    health_timeout_s: float = 1200.0
    """Longest wait for every worker's ``/health`` (a 7B model with CUDA graphs takes minutes)."""
    shutdown_timeout_s: float = 60.0
    """Grace period between SIGTERM and SIGKILL at the end."""

    def __post_init__(self) -> None:
        if self.tp_size < 1 or not self.gpus or len(self.gpus) % self.tp_size:
            raise ValueError(
                f"{len(self.gpus)} GPU(s) do not split into tensor-parallel groups of {self.tp_size}"
            )
        if len(set(self.gpus)) != len(self.gpus):
            raise ValueError(f"GPU ids repeat: {self.gpus}")
        if self.max_loras_per_batch < 1:
            raise ValueError("max_loras_per_batch must be >= 1")
        if self.max_loaded_loras is not None and self.max_loaded_loras < self.max_loras_per_batch:
            raise ValueError("max_loaded_loras must be >= max_loras_per_batch")
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static < 1:
            raise ValueError(f"mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}")
        if not 0 < self.base_port < 65536 - len(self.gpus):
            raise ValueError(f"base_port {self.base_port} out of range")
        clash = sorted(set(_LAUNCHER_OWNED) & {a.split("=", 1)[0] for a in self.extra_args})
        if clash:
            raise ValueError(
                f"extra_args may not set {clash}: the launcher owns them (--dp-size breaks LoRA loading)"
            )
        if not (self.health_timeout_s > 0 and self.shutdown_timeout_s >= 0):
            raise ValueError("health_timeout_s must be > 0 and shutdown_timeout_s >= 0")

    def gpu_groups(self) -> list[tuple[str, ...]]:
        """The device ids of each worker, in order."""
        return [self.gpus[i : i + self.tp_size] for i in range(0, len(self.gpus), self.tp_size)]

    def urls(self) -> list[str]:
        """Each worker's base URL."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return [f"http://{host}:{self.base_port + k}" for k in range(len(self.gpu_groups()))]


RouterPolicy = Literal["manual", "consistent_hashing", "cache_aware", "round_robin", "random", "power_of_two"]


@dataclass(frozen=True, slots=True)
class RouterSettings:
    """SGLang's router (the ``sglang-router`` package) in front of the workers, for generation only:
    the client sends each episode's affinity key as ``X-SMG-Routing-Key`` and its adapter loads to
    every worker directly (the router does not forward control calls)."""

    enabled: bool = False
    """Start the router (``engine.kind`` ``launch``, or ``sglang`` in front of ``engine.sglang.urls``);
    off: the client balances over the workers itself, with the same episode affinity."""
    python: str = ""
    """An interpreter with ``sglang-router`` installed; empty = ``engine.launch.python``."""
    host: str = "127.0.0.1"
    """Interface the router listens on."""
    port: int = 30080
    """Its port."""
    policy: RouterPolicy = "manual"
    """``manual`` pins each routing key to one worker (sticky, also when workers are added);
    ``consistent_hashing`` needs a newer router than sglang-router 0.3.2."""
    assignment_mode: Literal["min_load", "min_group", "random"] = "min_load"
    """Where ``manual`` sends a key it has not seen yet."""
    metrics_port: int = 29000
    """The router's Prometheus port (``--prometheus-port``; sglang-router's default): it refuses to
    start when the port is taken, so two routers on one host need two."""
    extra_args: tuple[str, ...] = ()
    """More ``sglang_router.launch_router`` flags."""
    health_timeout_s: float = 120.0
    """Longest wait for the router's ``/health``."""

    def __post_init__(self) -> None:
        if not (0 < self.port < 65536 and 0 < self.metrics_port < 65536):
            raise ValueError(f"port {self.port} or metrics_port {self.metrics_port} out of range")
        if not self.health_timeout_s > 0:
            raise ValueError("health_timeout_s must be > 0")

