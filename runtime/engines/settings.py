"""Settings of the engine backends, declared once and importable without torch or aiohttp.

The run, eval and serve configs embed these records as their ``engine`` sub-sections, so describing
or validating a config never loads a backend.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass


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
    """Base URLs of the replicas (or of one router), e.g. ``["http://127.0.0.1:30000"]``."""
    api_key: str | None = None
    """Sent as ``Authorization: Bearer KEY`` when set (SGLang's ``--api-key``). Prefer
    ``api_key_env``: a key given here is copied into the run folder's ``config.toml``."""
    api_key_env: str = "ENVTUNE_API_KEY"
    """Environment variable read for the key when ``api_key`` is unset (empty: none)."""
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
        for url in self.urls:
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
