"""SGLang native-API client: token ids in, sampled ids and their logprobs out, over HTTP.

It speaks SGLang's own ``/generate`` (``input_ids``, ``sampling_params``, ``return_logprob``,
``logprob_start_len: -1``, ``lora_path``) with field names exactly as SGLang 0.5.23 defines them
(see ``shared/sglang.md``), so no text round trip ever re-tokenizes a trajectory. ``n`` samples come
from one request: the server prefills the prompt once for the whole GRPO group.

Over several endpoints (data-parallel replicas) it balances by least outstanding requests and keeps
episode affinity: requests with the same ``affinity_key`` go to the replica that served the key
before, so its prefix cache is reused (until that replica fails). One ``aiohttp.ClientSession`` with
a bounded ``TCPConnector`` pools connections (one client per event loop). 5xx, 408 and 429 answers,
timeouts and dropped connections are retried with exponential backoff (on another replica when there
is one); any other 4xx is never retried and raises ``EngineError(retryable=False)`` with the
server's message. The episode's ``affinity_key`` also travels as SGLang's ``routing_key``.

Versions: a completion's ``policy_version`` is the version of the adapter it named (``policy-v{N}``
-> N, or the version given to ``load_adapter``), else the server's ``meta_info.weight_version`` when
it is an integer, else the base version this client last set with ``update_weights_from_disk``.

Left out: streaming (the runtime never needs partial outputs), a load balancer of its own beyond
spreading requests over the URLs it is given (SGLang's router does that at scale).
"""

from __future__ import annotations

import asyncio
import collections
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec
import structlog
from envtune.agents.engine import (
    Completion,
    EngineError,
    FinishReason,
    GenerateRequest,
)
from envtune.runtime.engines.settings import SGLangClientConfig

log = structlog.get_logger(__name__)

_JSON_HEADERS = {"Content-Type": "application/json"}


@dataclass(frozen=True, slots=True)
class EndpointStatistics:
    """Load on one replica as this client sees it."""

    url: str
    """Base URL."""
    outstanding: int
    """Requests in flight now."""
    served: int
    """Requests answered successfully."""
    failures: int
    """Attempts that failed (retried or not)."""
    healthy: bool
    """False while in its cooldown after a failure."""


@dataclass(frozen=True, slots=True)
class ClientStatistics:
    """Snapshot of the client's load and retry counts."""

    endpoints: tuple[EndpointStatistics, ...]
    """Per replica."""
    retries: int
    """Retries done since start."""
    affinity_keys: int
    """Affinity keys remembered."""


class _Endpoint:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.outstanding = 0
        self.served = 0
        self.failures = 0
        self.unhealthy_until = 0.0


class _Retryable(Exception):
    """One attempt failed in a way another attempt may fix."""


class SGLangClient:
    """An ``Engine`` and ``WeightSync`` backed by SGLang servers over HTTP."""

    def __init__(self, config: SGLangClientConfig) -> None:
        if not config.urls:
            raise ValueError("the SGLang client needs at least one URL")
        self.config = config
        self._endpoints = [_Endpoint(url) for url in config.urls]
        self._affinity: collections.OrderedDict[str, _Endpoint] = collections.OrderedDict()
        self._session: aiohttp.ClientSession | None = None
        self._adapter_versions: dict[str, int] = {}
        self._base_version = 0
        self._version_high = 0
        self._retries = 0
        self._rng = random.Random()
        self._tie_break = 0

    # --- session ------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.config.max_connections, limit_per_host=0)
            self._session = aiohttp.ClientSession(connector=connector, headers=self._headers())
        return self._session

    async def close(self) -> None:
        """Close the connection pool."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> SGLangClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- balancing ------------------------------------------------------------------------------

    def _pick(self, affinity_key: str | None, avoid: _Endpoint | None) -> _Endpoint:
        now = asyncio.get_running_loop().time()
        healthy = [ep for ep in self._endpoints if ep.unhealthy_until <= now and ep is not avoid]
        candidates = healthy or [ep for ep in self._endpoints if ep is not avoid] or self._endpoints
        if affinity_key is not None:
            sticky = self._affinity.get(affinity_key)
            if sticky is not None and sticky in candidates:
                self._affinity.move_to_end(affinity_key)
                return sticky
        low = min(ep.outstanding for ep in candidates)
        tied = [ep for ep in candidates if ep.outstanding == low]
        self._tie_break += 1
        chosen = tied[self._tie_break % len(tied)]
        if affinity_key is not None:
            self._affinity[affinity_key] = chosen
            self._affinity.move_to_end(affinity_key)
            while len(self._affinity) > self.config.affinity_capacity:
                self._affinity.popitem(last=False)
        return chosen

    def _mark_failed(self, endpoint: _Endpoint) -> None:
        endpoint.failures += 1
        endpoint.unhealthy_until = asyncio.get_running_loop().time() + self.config.unhealthy_cooldown_s

    def statistics(self) -> ClientStatistics:
        """Per-replica load, retries and affinity-map size."""
        now = asyncio.get_running_loop().time()
        return ClientStatistics(
            endpoints=tuple(
                EndpointStatistics(ep.url, ep.outstanding, ep.served, ep.failures, ep.unhealthy_until <= now)
                for ep in self._endpoints
            ),
            retries=self._retries,
            affinity_keys=len(self._affinity),
        )

    # --- HTTP with retries ----------------------------------------------------------------------

    @staticmethod
    def _error_message(payload: Any, fallback: str) -> str:
        if isinstance(payload, dict):
            error = payload.get("error", payload.get("error_message", payload.get("message")))
            if isinstance(error, dict):
                error = error.get("message", error)
            if error:
                return str(error)
        return fallback

    async def _attempt(
        self, endpoint: _Endpoint, method: str, path: str, body: bytes | None, timeout: aiohttp.ClientTimeout
    ) -> Any:
        session = self._get_session()
        headers = _JSON_HEADERS if body is not None else None
        try:
            async with session.request(
                method, endpoint.url + path, data=body, headers=headers, timeout=timeout
            ) as response:
                # One read, one parse (msgspec: a 10k-id body costs ~1/8 of the json module's time).
                raw = await response.read()
                text = raw.decode("utf-8", "replace") if response.status >= 400 else ""
                try:
                    payload: Any = msgspec.json.decode(raw) if raw else None
                except ValueError:
                    payload = text or raw.decode("utf-8", "replace")
                if response.status >= 500 or response.status in (408, 429):
                    raise _Retryable(f"HTTP {response.status} from {endpoint.url}{path}: {text[:300]}")
                if response.status >= 400:
                    raise EngineError(
                        f"HTTP {response.status} from {endpoint.url}{path}: "
                        + self._error_message(payload, text),
                        retryable=False,
                    )
                return payload
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
            raise _Retryable(f"{type(exc).__name__} talking to {endpoint.url}{path}: {exc}") from exc

    async def _call(
        self,
        path: str,
        body: Any,
        *,
        method: str = "POST",
        affinity_key: str | None = None,
        endpoint: _Endpoint | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        """One call with retries; ``endpoint`` pins it (weight sync goes to every replica)."""
        timeout = aiohttp.ClientTimeout(
            total=timeout_s or self.config.request_timeout_s, sock_connect=self.config.connect_timeout_s
        )
        encoded = msgspec.json.encode(body) if body is not None else None  # once, for every attempt
        failed: _Endpoint | None = None
        last_error = ""
        for attempt in range(self.config.max_retries + 1):
            target = endpoint or self._pick(affinity_key, avoid=failed)
            target.outstanding += 1
            try:
                payload = await self._attempt(target, method, path, encoded, timeout)
            except _Retryable as exc:
                last_error = str(exc)
                self._mark_failed(target)
                failed = target
                log.warning(
                    "sglang_attempt_failed", url=target.url, path=path, attempt=attempt, error=last_error
                )
            except EngineError:
                target.failures += 1
                raise
            else:
                target.served += 1
                return payload
            finally:
                target.outstanding -= 1
            if attempt < self.config.max_retries:
                self._retries += 1
                delay = min(self.config.backoff_max_s, self.config.backoff_initial_s * 2**attempt)
                await asyncio.sleep(delay * (0.5 + 0.5 * self._rng.random()))
        raise EngineError(
            f"{path} failed after {self.config.max_retries + 1} attempts: {last_error}", retryable=True
        )

    # --- generation -------------------------------------------------------------------------------

    @staticmethod
    def request_body(request: GenerateRequest) -> dict[str, Any]:
        """The ``/generate`` JSON body for a request (exactly SGLang's field names)."""
        sampling = request.sampling
        params: dict[str, Any] = {
            "max_new_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k,
            "n": sampling.n,
        }
        if sampling.stop_token_ids:
            params["stop_token_ids"] = list(sampling.stop_token_ids)
        if sampling.seed is not None:
            params["sampling_seed"] = sampling.seed
        if request.constraint is not None:
            params[request.constraint.kind.value] = request.constraint.grammar
        body: dict[str, Any] = {
            "input_ids": list(request.prompt_ids),
            "sampling_params": params,
            "return_logprob": True,
            "logprob_start_len": -1,
            "stream": False,
        }
        if request.adapter is not None:
            body["lora_path"] = request.adapter
        if request.affinity_key is not None:
            # SGLang's routing-key schedule hint; envtune's server keys its per-episode KV cache on it.
            body["routing_key"] = request.affinity_key
        return body

    def _version_for(self, adapter: str | None, meta: dict[str, Any]) -> int:
        if adapter is not None:
            known = self._adapter_versions.get(adapter)
            if known is not None:
                return known
        weight_version = meta.get("weight_version")
        if isinstance(weight_version, str) and weight_version.isdigit():
            return int(weight_version)
        return self._base_version

    def _completion(self, item: Any, request: GenerateRequest) -> Completion:
        if not isinstance(item, dict) or not isinstance(item.get("meta_info"), dict):
            raise EngineError(f"malformed /generate response item: {str(item)[:300]}", retryable=False)
        meta = item["meta_info"]
        output_ids = item.get("output_ids")
        entries = meta.get("output_token_logprobs")
        if not isinstance(output_ids, list) or not isinstance(entries, list):
            raise EngineError("/generate response lacks output_ids or output_token_logprobs", retryable=False)
        if len(entries) != len(output_ids) or any(
            entry[1] != token for entry, token in zip(entries, output_ids, strict=False)
        ):
            raise EngineError("output_token_logprobs do not match output_ids", retryable=False)
        finish = meta.get("finish_reason") or {}
        kind = finish.get("type") if isinstance(finish, dict) else None
        reason = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH}.get(
            kind or "", FinishReason.ABORT
        )
        if reason is FinishReason.ABORT:
            log.warning("sglang_generation_aborted", finish_reason=finish)
        return Completion(
            token_ids=tuple(int(token) for token in output_ids),
            logprobs=tuple(float(entry[0]) if entry[0] is not None else 0.0 for entry in entries),
            finish_reason=reason,
            policy_version=self._version_for(request.adapter, meta),
            prompt_tokens=int(meta.get("prompt_tokens", len(request.prompt_ids))),
            cached_tokens=int(meta.get("cached_tokens", 0)),
        )

    async def generate(self, request: GenerateRequest) -> Sequence[Completion]:
        """``request.sampling.n`` completions from one ``/generate`` call."""
        payload = await self._call("/generate", self.request_body(request), affinity_key=request.affinity_key)
        items = payload if isinstance(payload, list) else [payload]
        if len(items) != request.sampling.n:
            raise EngineError(
                f"/generate returned {len(items)} completions for n={request.sampling.n}", retryable=False
            )
        if all(isinstance(item, dict) and "index" in item for item in items):
            items = sorted(items, key=lambda item: item["index"])
        return [self._completion(item, request) for item in items]

    # --- health and weight sync ------------------------------------------------------------------

    async def health(self) -> dict[str, bool]:
        """``GET /health`` on every replica (one attempt each); marks failing ones unhealthy."""
        timeout = aiohttp.ClientTimeout(total=self.config.connect_timeout_s)

        async def probe(endpoint: _Endpoint) -> bool:
            try:
                async with self._get_session().get(endpoint.url + "/health", timeout=timeout) as response:
                    ok = response.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if ok:
                endpoint.unhealthy_until = 0.0
            else:
                self._mark_failed(endpoint)
            return ok

        async with asyncio.TaskGroup() as group:
            tasks = {ep.url: group.create_task(probe(ep)) for ep in self._endpoints}
        return {url: task.result() for url, task in tasks.items()}

    async def _on_every_replica(self, path: str, body: Any, method: str = "POST") -> list[Any]:
        errors: list[EngineError] = []
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(
                        self._call(
                            path, body, method=method, endpoint=ep, timeout_s=self.config.control_timeout_s
                        )
                    )
                    for ep in self._endpoints
                ]
        except* EngineError as group_error:
            errors.extend(group_error.exceptions)  # type: ignore[arg-type]
        if errors:
            raise errors[0]
        return [task.result() for task in tasks]

    @property
    def policy_version(self) -> int:
        """The highest version published so far (base weights or any adapter, unloaded ones too)."""
        return self._version_high

    async def load_adapter(self, name: str, path: str, *, version: int) -> None:
        """``/load_lora_adapter`` on every replica. SGLang's API carries no version, so the client
        keeps the name -> version map that completions are stamped from."""
        await self._on_every_replica(
            "/load_lora_adapter", {"lora_name": name, "lora_path": str(path), "pinned": False}
        )
        self._adapter_versions[name] = version
        self._version_high = max(self._version_high, version)

    async def unload_adapter(self, name: str) -> None:
        """``/unload_lora_adapter`` on every replica."""
        await self._on_every_replica("/unload_lora_adapter", {"lora_name": name})
        self._adapter_versions.pop(name, None)

    async def update_weights_from_disk(self, path: str, *, version: int) -> None:
        """``/update_weights_from_disk`` on every replica (SGLang's ``weight_version`` = ``version``)."""
        await self._on_every_replica(
            "/update_weights_from_disk",
            {"model_path": str(path), "weight_version": str(version), "flush_cache": True},
        )
        self._base_version = version
        self._version_high = max(self._version_high, version)

    async def flush_cache(self) -> None:
        """``POST /flush_cache`` on every replica."""
        await self._on_every_replica("/flush_cache", None)
