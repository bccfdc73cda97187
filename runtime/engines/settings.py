"""Settings of the engine backends, declared once and importable without torch or aiohttp.

The run, eval and serve configs embed these records as their ``engine`` sub-sections, so describing
or validating a config never loads a backend.
"""

from __future__ import annotations

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


@dataclass(frozen=True, slots=True)
class SGLangClientConfig:
    """Where the SGLang servers are and how hard to try."""

    urls: tuple[str, ...] = ()
    """Base URLs of the replicas (or of one router), e.g. ``["http://127.0.0.1:30000"]``."""
    api_key: str | None = None
    """Sent as ``Authorization: Bearer KEY`` when set (SGLang's ``--api-key``)."""
    max_connections: int = 512
    """Pool size over all replicas (``TCPConnector(limit=...)``)."""
    request_timeout_s: float = 900.0
    """Whole-request timeout for ``/generate`` (long generations at high load are slow)."""
    connect_timeout_s: float = 10.0
    """TCP connect timeout."""
    control_timeout_s: float = 600.0
    """Timeout of weight-sync calls (loading weights can take a while)."""
    max_retries: int = 5
    """Retries after the first attempt on 5xx, timeouts and dropped connections."""
    backoff_initial_s: float = 0.2
    """First retry delay; doubles each retry (with jitter) up to ``backoff_max_s``."""
    backoff_max_s: float = 10.0
    """Cap on one retry delay."""
    unhealthy_cooldown_s: float = 5.0
    """A replica that failed is avoided for this long (when another one is healthy)."""
    affinity_capacity: int = 65536
    """Affinity keys remembered (least recently used are forgotten)."""

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
