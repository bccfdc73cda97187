"""SGLang native-API client: token ids in, sampled ids and their logprobs out, over HTTP.

It speaks SGLang's own ``/generate`` (``input_ids``, ``sampling_params``, ``return_logprob``,
``logprob_start_len: -1``, ``lora_path``) with field names exactly as SGLang 0.5.23 defines them
(SGLang's ``GenerateReqInput``), so no text round trip ever re-tokenizes a trajectory. ``n`` samples
come from one request: the server prefills the prompt once for the whole GRPO group.

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

Every response is checked before it becomes a ``Completion``: token ids are integers in the
vocabulary, logprobs finite numbers <= 0 matching the ids one to one, ``index`` a permutation, counts
integers, the body within ``max_response_bytes``. A response that fails the checks (or cannot be
decoded, or breaks HTTP) is a failed attempt: retried, on another replica when there is one. Bad data
never reaches a trajectory. SGLang's own shape is checked as it is decoded (typed msgspec records:
the per-token checks run in C and leave no object per token for the garbage collector to count);
any other body goes through the same checks field by field in Python, which then decide.

Outages. A circuit breaker watches every attempt: once nothing has answered for
``outage_timeout_s`` while attempts kept failing, the engine is declared gone and every call raises
``EngineUnavailable`` at once (the run stops with that one error instead of dropping episodes one
warning at a time). Weight-sync calls retry until then, so an engine restart is ridden out; a
restarted server has lost its adapters, so a request refused with "not loaded" for an adapter this
client loaded loads it again on that replica and is retried. An adapter load over several replicas
is all or nothing. Repeated warnings are throttled (a count per interval).

Aborts: every ``/generate`` carries a fresh ``rid``; when the caller cancels ``generate`` (the rollout
dropping a group that aged out), the client sends SGLang's ``POST /abort_request {"rid": ...}`` to
every replica (an unknown rid is a no-op there), so the server stops decoding for a caller that left.

Behind SGLang's router (``config.router_url``): generation goes to the router, the affinity key in
the ``X-SMG-Routing-Key`` header (what the router's ``manual`` policy pins a worker by; the body's
``routing_key`` stays, as the worker's own hint), while control calls (adapter loads and unloads,
weight updates, cache flushes) go to every worker in ``urls`` directly: the router does not forward
them. Control calls carry the workers' admin key (SGLang's ``--admin-api-key``) when there is one.

Left out: streaming (the runtime never needs partial outputs), a load balancer of its own beyond
spreading requests over the URLs it is given (SGLang's router does that at scale).
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import json
import math
import os
import random
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Annotated, Any, TypeVar

import aiohttp
import msgspec
import structlog
from envtune.agents.engine import (
    Completion,
    EngineError,
    EngineUnavailable,
    FinishReason,
    GenerateRequest,
)
from envtune.runtime.engines.settings import SGLangClientConfig
from envtune.runtime.logs import LogThrottle

T = TypeVar("T")

LOGPROB_TOLERANCE = 1e-4
"""A logprob may exceed 0 by this much (float rounding in a server's kernels) and is then read as 0;
anything larger is not a log-probability."""
MAX_TOKEN_ID = (1 << 31) - 1
"""Largest token id taken when the vocabulary size is not known."""
_GATEWAY_STATUSES = frozenset({408, 502, 503, 504})
"""Statuses that say the engine is not there (a router or proxy in front of a restarting engine)."""
_PARSE_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, LookupError, RecursionError)
"""What decoding and checking a response body may raise: a malformed response, retried."""

log = structlog.get_logger(__name__)

ROUTING_KEY_HEADER = "X-SMG-Routing-Key"
"""The header SGLang's router reads a request's routing key from (its ``manual`` and
``consistent_hashing`` policies pin a key to one worker)."""
_JSON_HEADERS: Mapping[str, str] = MappingProxyType({"Content-Type": "application/json"})


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
    malformed_responses: int
    """Responses refused by the checks (each a failed attempt)."""
    adapter_reloads: int
    """Adapters loaded again into a replica that had lost them (a restart)."""
    unavailable: bool
    """The circuit breaker has tripped: every call fails at once."""
    aborts: int = 0
    """Requests aborted (``/abort_request`` sent) because their caller cancelled them."""


class _Endpoint:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.outstanding = 0
        self.served = 0
        self.failures = 0
        self.unhealthy_until = 0.0


class _Retryable(Exception):
    """One attempt failed in a way another attempt may fix.

    ``outage``: nothing answered (no connection, a timeout, a gateway's 502/503/504): the engine may
    be gone or restarting. Otherwise a server answered, badly (a 500, a malformed body): this
    request's problem, not the engine's.
    """

    def __init__(self, message: str, *, outage: bool) -> None:
        super().__init__(message)
        self.outage = outage


class _Refused(EngineError):
    """A replica answered a 4xx: not retried, but the caller may repair and ask again."""

    def __init__(self, message: str, endpoint: _Endpoint) -> None:
        super().__init__(message, retryable=False)
        self.endpoint = endpoint


class MalformedResponse(ValueError):
    """A response that is not what SGLang's contract promises (checked before anything is used)."""


def _known_charset(charset: str) -> bool:
    try:
        codecs.lookup(charset)
    except LookupError:
        return False
    return True


def _check_int(value: Any, what: str, low: int = 0, high: int | None = None) -> int:
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < low
        or (high is not None and value > high)
    ):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise MalformedResponse(f"{what} is {str(value)[:40]!r}, not an integer {bound}")
    return value


def _isfinite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _check_logprob(value: Any) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not _isfinite(value):
        raise MalformedResponse(f"logprob {str(value)[:40]!r} is not a finite number")
    if value > LOGPROB_TOLERANCE:
        raise MalformedResponse(f"logprob {value} is positive")
    return min(float(value), 0.0)


# The typed fast path of the response checks. msgspec decodes a body straight into these types and
# checks, in C, what ``_check_int`` and ``_check_logprob`` check in Python per token (ints and not
# bools, >= 0; floats, finite, <= LOGPROB_TOLERANCE: JSON has no NaN and msgspec refuses a number
# that overflows to infinity). A body that does not fit them exactly is not judged here: it goes
# through the field-by-field checks, which accept or refuse it with their own message, so both paths
# accept exactly the same responses and produce the same completions.
_Count = Annotated[int, msgspec.Meta(ge=0)]
_Logprob = Annotated[float, msgspec.Meta(ge=-sys.float_info.max, le=LOGPROB_TOLERANCE)]


class _Entry(msgspec.Struct, array_like=True, gc=False):
    """One ``[logprob, token_id, ...]`` entry of ``output_token_logprobs`` (SGLang writes the token's
    text third; what follows the id is skipped unread, as the field checks ignore it). Untracked by
    the garbage collector: a response's hundreds of entries do not bring the next collection closer,
    as many tuples would."""

    logprob: _Logprob
    token_id: _Count


class _MetaInfo(msgspec.Struct):
    """The fields of a response item's ``meta_info`` the client reads (the rest is skipped)."""

    output_token_logprobs: list[_Entry]
    finish_reason: Any = None
    prompt_tokens: _Count | None = None
    cached_tokens: _Count | None = None
    weight_version: Any = None


class _Item(msgspec.Struct):
    """One completion of a ``/generate`` response (``text`` and other fields skipped unread)."""

    output_ids: list[_Count]
    meta_info: _MetaInfo
    index: _Count | msgspec.UnsetType = msgspec.UNSET


_RESPONSE_DECODER = msgspec.json.Decoder(_Item | list[_Item])
_ENCODER = msgspec.json.Encoder()
_FINISH_REASONS = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH}


class SGLangClient:
    """An ``Engine`` and ``WeightSync`` backed by SGLang servers over HTTP."""

    def __init__(
        self, config: SGLangClientConfig, *, vocab_size: int | None = None, admin_api_key: str | None = None
    ) -> None:
        """``vocab_size`` (the model's) bounds the token ids a response may hold. ``admin_api_key``:
        the workers' admin key (launched workers); else the one in the environment variable
        ``config.admin_api_key_env``, if set."""
        if not config.urls:
            raise ValueError("the SGLang client needs at least one URL")
        self.config = config
        self.vocab_size = vocab_size
        self._endpoints = [_Endpoint(url) for url in config.urls]
        self._router = _Endpoint(config.router_url) if config.router_url else None
        env_key = os.environ.get(config.admin_api_key_env) if config.admin_api_key_env else None
        self._admin_api_key = admin_api_key or env_key or None
        self._affinity: collections.OrderedDict[str, _Endpoint] = collections.OrderedDict()
        self._session: aiohttp.ClientSession | None = None
        self._adapter_versions: dict[str, int] = {}
        self._adapter_paths: dict[str, str] = {}
        self._reload_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._reloaded_at: dict[tuple[str, str], float] = {}
        self._base_version = 0
        self._version_high = 0
        self._retries = 0
        self._malformed = 0
        self._reloads = 0
        self._aborts = 0
        self._failing_since: float | None = None
        self._last_answer = -math.inf
        self._unavailable: EngineUnavailable | None = None
        self._throttle = LogThrottle()
        self._rng = random.Random()
        self._tie_break = 0

    # --- session ------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        key = self.config.api_key
        if not key and self.config.api_key_env:
            key = os.environ.get(self.config.api_key_env) or None
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _control_headers(self) -> dict[str, str] | None:
        """The admin key on control calls (it replaces the API key there, as SGLang expects)."""
        return {"Authorization": f"Bearer {self._admin_api_key}"} if self._admin_api_key else None

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
            malformed_responses=self._malformed,
            adapter_reloads=self._reloads,
            unavailable=self._unavailable is not None,
            aborts=self._aborts,
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

    async def _read_body(self, response: aiohttp.ClientResponse) -> bytes:
        limit = self.config.max_response_bytes
        if response.content_length is not None and response.content_length > limit:
            raise _Retryable(
                f"response of {response.content_length} bytes is over max_response_bytes ({limit})",
                outage=False,
            )
        if response.content_length is not None and "Content-Encoding" not in response.headers:
            # Exactly that many bytes, within the limit: one read, not a loop of chunk awaits. A
            # compressed body may inflate past its length: counted as it is read, below.
            return await response.read()
        chunks, size = [], 0
        async for chunk in response.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size > limit:
                raise _Retryable(f"response body is over max_response_bytes ({limit})", outage=False)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _attempt(
        self,
        endpoint: _Endpoint,
        method: str,
        path: str,
        body: bytes | None,
        timeout: aiohttp.ClientTimeout,
        parse: Callable[[Any], T],
        headers: dict[str, str] | None = None,
        decode: Callable[[bytes], T | None] | None = None,
    ) -> T:
        """One attempt; ``body`` is JSON already encoded (once per call, not per attempt).

        A UTF-8 body goes to ``decode`` first when given (a typed decoder: the result, or None when
        the body does not fit its types); otherwise, or on None, it is decoded as any JSON and handed
        to ``parse``."""
        session = self._get_session()
        where = f"{endpoint.url}{path}"
        if body is not None:
            headers = {**_JSON_HEADERS, **headers} if headers else dict(_JSON_HEADERS)
        try:
            async with session.request(
                method, endpoint.url + path, data=body, timeout=timeout, headers=headers
            ) as response:
                raw = await self._read_body(response)
                status = response.status
                charset = response.charset or "utf-8"
        except aiohttp.InvalidURL as exc:
            raise EngineUnavailable(f"{where} is not a valid URL: {exc}") from None
        except (aiohttp.ClientError, TimeoutError, UnicodeError, LookupError, ValueError) as exc:
            # Connection errors, broken HTTP (ClientResponseError), bodies cut short, timeouts.
            # A response cut short or broken HTTP came from something that was there.
            outage = isinstance(exc, aiohttp.ClientConnectionError | TimeoutError) and not isinstance(
                exc, aiohttp.ClientPayloadError
            )
            message = f"{type(exc).__name__} talking to {where}: {str(exc)[:300]}"
            raise _Retryable(message, outage=outage) from exc
        if status >= 500 or status in (408, 429):
            message = f"HTTP {status} from {where}: {raw[:300].decode('utf-8', 'replace')}"
            raise _Retryable(message, outage=status in _GATEWAY_STATUSES)
        if status >= 400:
            text = raw.decode(charset, "replace") if _known_charset(charset) else raw.decode("latin-1")
            try:
                payload: Any = json.loads(text)
            except ValueError:
                payload = text
            message = self._error_message(payload, text[:300])
            raise _Refused(f"HTTP {status} from {where}: {message}", endpoint)
        try:
            utf8 = charset == "utf-8" or (_known_charset(charset) and codecs.lookup(charset).name == "utf-8")
            if decode is not None and utf8 and raw:
                decoded = decode(raw)
                if decoded is not None:
                    return decoded
            try:
                # One parse (msgspec: a 10k-id body costs ~1/8 of the json module's time); msgspec
                # checks UTF-8 itself, other charsets go through the json module.
                if utf8:
                    payload = msgspec.json.decode(raw) if raw else None
                else:
                    payload = json.loads(raw.decode(charset)) if raw else None
            except ValueError:
                # Control endpoints may answer plain text (SGLang's /flush_cache does).
                payload = raw.decode(charset)
            return parse(payload)
        except _PARSE_ERRORS as exc:
            # Undecodable, not JSON, or not what the contract promises: another attempt may do better.
            self._malformed += 1
            raise _Retryable(f"malformed response from {where}: {str(exc)[:300]}", outage=False) from exc

    def _note_alive(self) -> None:
        self._failing_since = None
        self._last_answer = asyncio.get_running_loop().time()

    def _note_failure(self, error: str) -> None:
        """Trip the breaker once nothing has answered for ``outage_timeout_s`` (see the module docstring)."""
        now = asyncio.get_running_loop().time()
        if self._failing_since is None:
            self._failing_since = now
        elif now - self._failing_since >= self.config.outage_timeout_s and self._unavailable is None:
            self._unavailable = EngineUnavailable(
                f"no SGLang server at {', '.join(ep.url for ep in self._endpoints)} answered for "
                f"{now - self._failing_since:.0f} s (engine.sglang.outage_timeout_s = "
                f"{self.config.outage_timeout_s:g}); last error: {error[:300]}"
            )
            log.error("sglang_engine_unavailable", error=str(self._unavailable))

    async def _call(
        self,
        path: str,
        body: Any,
        *,
        method: str = "POST",
        affinity_key: str | None = None,
        endpoint: _Endpoint | None = None,
        timeout_s: float | None = None,
        parse: Callable[[Any], Any] = lambda payload: payload,
        until_outage: bool = False,
        headers: dict[str, str] | None = None,
        decode: Callable[[bytes], Any] | None = None,
    ) -> Any:
        """One call with retries; ``endpoint`` pins it (weight sync goes to every replica).

        ``body``: a JSON value, encoded here once for every attempt, or ``bytes`` already encoded.
        ``parse`` and ``decode``: see ``_attempt``.

        A call gives up after ``max_retries`` failed retries. An attempt that failed while nothing
        answered any call at all (an outage: the engine restarting) does not count: the call waits
        until the engine is back or the circuit breaker declares it gone. ``until_outage`` calls
        (weight sync) retry until the breaker decides, whatever the failures.
        """
        if self._unavailable is not None:
            raise self._unavailable
        timeout = aiohttp.ClientTimeout(
            total=timeout_s or self.config.request_timeout_s, sock_connect=self.config.connect_timeout_s
        )
        loop = asyncio.get_running_loop()
        encoded = body if body is None or isinstance(body, bytes) else _ENCODER.encode(body)
        failed: _Endpoint | None = None
        last_error = ""
        attempt = 0
        counted = 0
        while True:
            target = endpoint or self._pick(affinity_key, avoid=failed)
            target.outstanding += 1
            sent = loop.time()
            try:
                payload = await self._attempt(target, method, path, encoded, timeout, parse, headers, decode)
            except _Retryable as exc:
                last_error = str(exc)
                self._mark_failed(target)
                if exc.outage:
                    self._note_failure(last_error)
                else:
                    self._note_alive()
                # Only failures while the engine was answering others use up the retries.
                counted += not exc.outage or self._last_answer >= sent
                failed = target
                if (held := self._throttle.allow("attempt_failed")) is not None:
                    log.warning(
                        "sglang_attempt_failed",
                        url=target.url,
                        path=path,
                        attempt=attempt,
                        error=last_error,
                        similar_warnings_held_back=held,
                    )
            except _Refused:
                target.failures += 1
                self._note_alive()  # a 4xx is an answer: the server is there
                raise
            else:
                target.served += 1
                self._note_alive()
                return payload
            finally:
                target.outstanding -= 1
            if self._unavailable is not None:
                raise self._unavailable
            if counted > self.config.max_retries and not until_outage:
                break
            attempt += 1
            self._retries += 1
            delay = min(self.config.backoff_max_s, self.config.backoff_initial_s * 2 ** min(attempt - 1, 30))
            await asyncio.sleep(delay * (0.5 + 0.5 * self._rng.random()))
        raise EngineError(f"{path} failed after {attempt + 1} attempts: {last_error}", retryable=True)

    async def wait_ready(self, timeout_s: float | None = None) -> None:
        """Wait until some replica answers ``/health`` (a start against servers still coming up);
        ``EngineUnavailable`` with what to do after ``timeout_s`` (default ``outage_timeout_s``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.config.outage_timeout_s if timeout_s is None else timeout_s)
        while True:
            health = await self.health()
            if any(health.values()):
                return
            if loop.time() >= deadline:
                raise EngineUnavailable(
                    f"no SGLang server answers /health at {', '.join(health)}: start it, or fix "
                    "engine.sglang.urls (--sglang)"
                )
            if (held := self._throttle.allow("waiting")) is not None:
                log.info("sglang_waiting_for_servers", urls=list(health), held_back=held)
            await asyncio.sleep(min(1.0, max(0.0, deadline - loop.time())))

    # --- generation -------------------------------------------------------------------------------

    @staticmethod
    def request_body(request: GenerateRequest, rid: str | None = None) -> dict[str, Any]:
        """The ``/generate`` JSON body for a request (exactly SGLang's field names)."""
        return SGLangClient._body(request, rid, list(request.prompt_ids))

    @staticmethod
    def encode_request(request: GenerateRequest, rid: str | None = None) -> bytes:
        """``request_body`` as the bytes sent: JSON, written straight from the prompt tuple."""
        return _ENCODER.encode(SGLangClient._body(request, rid, request.prompt_ids))

    @staticmethod
    def _body(request: GenerateRequest, rid: str | None, input_ids: Sequence[int]) -> dict[str, Any]:
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
            "input_ids": input_ids,
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
        if rid is not None:
            body["rid"] = rid
        return body

    def _version_for(self, adapter: str | None, weight_version: Any) -> int:
        if adapter is not None:
            known = self._adapter_versions.get(adapter)
            if known is not None:
                return known
        # The server's own number only when it is one this client could have published: a version
        # from nowhere must not mislabel the behaviour policy of a trajectory.
        if (
            isinstance(weight_version, str)
            and weight_version.isascii()
            and weight_version.isdigit()
            and int(weight_version) <= self._version_high
        ):
            return int(weight_version)
        return self._base_version

    def _reason(self, finish: Any) -> FinishReason:
        """The finish reason of an item's ``meta_info.finish_reason`` (an abort is logged)."""
        kind = finish.get("type") if isinstance(finish, dict) else None
        reason = _FINISH_REASONS.get(kind if isinstance(kind, str) else "", FinishReason.ABORT)
        if reason is FinishReason.ABORT and (held := self._throttle.allow("aborted")) is not None:
            log.warning("sglang_generation_aborted", finish_reason=str(finish)[:200], held_back=held)
        return reason

    def _completion(self, item: Any, request: GenerateRequest) -> Completion:
        """One response item, checked field by field (``MalformedResponse`` on the first problem)."""
        if not isinstance(item, dict) or not isinstance(item.get("meta_info"), dict):
            raise MalformedResponse(f"response item is not an object with meta_info: {str(item)[:200]}")
        meta = item["meta_info"]
        output_ids = item.get("output_ids")
        entries = meta.get("output_token_logprobs")
        if not isinstance(output_ids, list) or not isinstance(entries, list):
            raise MalformedResponse("response lacks output_ids or output_token_logprobs")
        if len(entries) != len(output_ids):
            raise MalformedResponse(f"{len(output_ids)} output_ids but {len(entries)} logprobs")
        if not output_ids:
            raise MalformedResponse("response has no output tokens")
        high = self.vocab_size - 1 if self.vocab_size is not None else MAX_TOKEN_ID
        token_ids, logprobs = [], []
        for token, entry in zip(output_ids, entries, strict=True):
            token_ids.append(_check_int(token, "output token id", 0, high))
            if not isinstance(entry, list | tuple) or len(entry) < 2:
                raise MalformedResponse(f"logprob entry {str(entry)[:60]} is not [logprob, token_id, ...]")
            if entry[1] != token or isinstance(entry[1], bool):
                raise MalformedResponse("output_token_logprobs do not match output_ids")
            logprobs.append(_check_logprob(entry[0]))
        reason = self._reason(meta.get("finish_reason") or {})
        prompt_tokens = meta.get("prompt_tokens")
        cached_tokens = meta.get("cached_tokens")
        return Completion(
            token_ids=tuple(token_ids),
            logprobs=tuple(logprobs),
            finish_reason=reason,
            policy_version=self._version_for(request.adapter, meta.get("weight_version")),
            prompt_tokens=len(request.prompt_ids)
            if prompt_tokens is None
            else _check_int(prompt_tokens, "prompt_tokens"),
            cached_tokens=0 if cached_tokens is None else _check_int(cached_tokens, "cached_tokens"),
        )

    def _completions(self, payload: Any, request: GenerateRequest) -> list[Completion]:
        """The ``n`` completions of a ``/generate`` response, in index order, all checked."""
        n = request.sampling.n
        items = payload if isinstance(payload, list) else [payload]
        if len(items) != n:
            raise MalformedResponse(f"{len(items)} completions for n={n}")
        indexed = [isinstance(item, dict) and "index" in item for item in items]
        if any(indexed):
            indices = [item.get("index") if isinstance(item, dict) else None for item in items]
            if not all(indexed) or sorted(_check_int(i, "index") for i in indices) != list(range(n)):
                raise MalformedResponse(f"response indices {str(indices)[:100]} are not 0..{n - 1}")
            items = sorted(items, key=lambda item: item["index"])
        return [self._completion(item, request) for item in items]

    def _decode_completions(self, raw: bytes, request: GenerateRequest) -> list[Completion] | None:
        """``_completions`` of a UTF-8 body, the fast way: decoded into typed records (most checks
        done by the decoder, in C), the rest checked a list at a time. None when the body fails any
        of it: the caller then runs the field-by-field checks, which give the reason (or accept a
        shape this path does not take, such as ``[logprob, id]`` pairs)."""
        try:
            decoded = _RESPONSE_DECODER.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        items = decoded if isinstance(decoded, list) else [decoded]
        n = request.sampling.n
        if len(items) != n:
            return None
        if any(item.index is not msgspec.UNSET for item in items):
            by_index = {item.index: item for item in items}
            if sorted(i for i in by_index if isinstance(i, int)) != list(range(n)):
                return None
            items = [by_index[i] for i in range(n)]
        high = self.vocab_size - 1 if self.vocab_size is not None else MAX_TOKEN_ID
        checked: list[tuple[_Item, tuple[int, ...], tuple[float, ...]]] = []
        for item in items:  # every item checked before any completion is made (and logged)
            ids, entries = item.output_ids, item.meta_info.output_token_logprobs
            if not ids or len(entries) != len(ids) or max(ids) > high:
                return None
            if [entry.token_id for entry in entries] != ids:
                return None
            logprobs = tuple([entry.logprob for entry in entries])
            if max(logprobs) > 0.0:  # within LOGPROB_TOLERANCE of 0: read as 0, as _check_logprob does
                logprobs = tuple([min(value, 0.0) for value in logprobs])
            checked.append((item, tuple(ids), logprobs))
        return [
            Completion(
                token_ids=token_ids,
                logprobs=logprobs,
                finish_reason=self._reason(item.meta_info.finish_reason or {}),
                policy_version=self._version_for(request.adapter, item.meta_info.weight_version),
                prompt_tokens=len(request.prompt_ids)
                if item.meta_info.prompt_tokens is None
                else item.meta_info.prompt_tokens,
                cached_tokens=item.meta_info.cached_tokens or 0,
            )
            for item, token_ids, logprobs in checked
        ]

    async def generate(self, request: GenerateRequest) -> Sequence[Completion]:
        """``request.sampling.n`` completions from one ``/generate`` call (aborted on cancellation)."""
        rid = os.urandom(16).hex()  # a random id as uuid4().hex is, for a fifth of its cost
        body = self.encode_request(request, rid)
        key = request.affinity_key
        # Behind the router: it picks the worker, by the key in the header (None: the client picks).
        headers = {ROUTING_KEY_HEADER: key} if key is not None and self._router is not None else None
        for repaired in (False, True):
            try:
                completions: list[Completion] = await self._call(
                    "/generate",
                    body,
                    affinity_key=key,
                    parse=lambda payload: self._completions(payload, request),
                    decode=lambda raw: self._decode_completions(raw, request),
                    endpoint=self._router,
                    headers=headers,
                )
                return completions
            except asyncio.CancelledError:
                await self.abort(rid)
                raise
            except _Refused as exc:
                path = self._adapter_paths.get(request.adapter or "")
                if repaired or path is None or "not loaded" not in str(exc):
                    raise EngineError(str(exc), retryable=False) from None
                # The replica lost an adapter this client loaded (it restarted): load it again
                # (behind the router, which replica answered is unknown: every worker).
                seen = asyncio.get_running_loop().time()
                replicas = [exc.endpoint] if self._router is None else self._endpoints
                for replica in replicas:
                    await self._reload_adapter(replica, request.adapter or "", path, seen)
        raise AssertionError("unreachable")

    async def abort(self, rid: str) -> None:
        """SGLang's ``/abort_request`` for ``rid`` on every replica: one attempt each, bounded by the
        connect timeout, failures logged (the request may have finished or its replica be down)."""
        timeout = aiohttp.ClientTimeout(total=self.config.connect_timeout_s)

        async def one(endpoint: _Endpoint) -> None:
            try:
                body = msgspec.json.encode({"rid": rid})
                await self._attempt(endpoint, "POST", "/abort_request", body, timeout, lambda p: p)
            except (_Retryable, _Refused, EngineError) as exc:
                log.warning("sglang_abort_failed", url=endpoint.url, rid=rid, error=str(exc))

        self._aborts += 1
        async with asyncio.TaskGroup() as group:
            for endpoint in self._endpoints:
                group.create_task(one(endpoint))

    async def _reload_adapter(self, endpoint: _Endpoint, name: str, path: str, seen: float) -> None:
        """Load ``name`` into ``endpoint`` again, unless another request did since ``seen``."""
        key = (endpoint.url, name)
        lock = self._reload_locks.setdefault(key, asyncio.Lock())
        async with lock:  # one reload per replica and adapter, however many requests noticed
            if self._reloaded_at.get(key, -math.inf) >= seen:
                return
            try:
                await self._call(
                    "/load_lora_adapter",
                    {"lora_name": name, "lora_path": path, "pinned": False},
                    endpoint=endpoint,
                    timeout_s=self.config.control_timeout_s,
                    until_outage=True,
                    headers=self._control_headers(),
                )
            except _Refused as exc:
                if "already loaded" not in str(exc):
                    raise EngineError(f"reloading adapter {name!r} failed: {exc}", retryable=False) from None
            else:
                self._reloads += 1
                log.info("sglang_adapter_reloaded", url=endpoint.url, name=name)
            self._reloaded_at[key] = asyncio.get_running_loop().time()

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

    async def _each_replica(self, fn: Callable[[_Endpoint], Any]) -> list[Any]:
        """``fn(endpoint)`` on every replica at once, each to its end (one failing does not cancel
        the others); results in replica order, a failure as its ``EngineError``."""

        async def one(endpoint: _Endpoint) -> Any:
            try:
                return await fn(endpoint)
            except EngineError as exc:
                return exc

        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(ep)) for ep in self._endpoints]
        return [task.result() for task in tasks]

    async def _control(self, endpoint: _Endpoint, path: str, body: Any) -> Any:
        """A weight-sync call: retried until the circuit breaker gives up (rides out a restart)."""
        return await self._call(
            path,
            body,
            endpoint=endpoint,
            timeout_s=self.config.control_timeout_s,
            until_outage=True,
            headers=self._control_headers(),
        )

    async def _on_every_replica(self, path: str, body: Any) -> list[Any]:
        results = await self._each_replica(lambda ep: self._control(ep, path, body))
        for result in results:
            if isinstance(result, EngineError):
                raise result
        return results

    @property
    def policy_version(self) -> int:
        """The highest version published so far (base weights or any adapter, unloaded ones too)."""
        return self._version_high

    async def load_adapter(self, name: str, path: str, *, version: int) -> None:
        """``/load_lora_adapter`` on every replica, all or nothing: when one refuses, the replicas
        that took it unload it again. SGLang's API carries no version, so the client keeps the
        name -> version map that completions are stamped from."""
        body = {"lora_name": name, "lora_path": str(path), "pinned": False}

        async def load(endpoint: _Endpoint) -> None:
            try:
                await self._control(endpoint, "/load_lora_adapter", body)
            except _Refused as exc:
                if "already loaded" not in str(exc):
                    raise
                # Left behind by an earlier attempt whose undo failed: replace it, the path may differ.
                await self._control(endpoint, "/unload_lora_adapter", {"lora_name": name})
                await self._control(endpoint, "/load_lora_adapter", body)

        results = await self._each_replica(load)
        failures = [r for r in results if isinstance(r, EngineError)]
        if failures:
            for endpoint, result in zip(self._endpoints, results, strict=True):
                if not isinstance(result, EngineError):
                    await self._unload_quietly(endpoint, name)
            raise failures[0]
        self._adapter_versions[name] = version
        self._adapter_paths[name] = str(path)
        self._version_high = max(self._version_high, version)

    async def _unload_quietly(self, endpoint: _Endpoint, name: str) -> None:
        try:
            await self._call(
                "/unload_lora_adapter",
                {"lora_name": name},
                endpoint=endpoint,
                timeout_s=self.config.control_timeout_s,
            )
        except EngineError as exc:
            log.warning("sglang_adapter_undo_failed", url=endpoint.url, name=name, error=str(exc)[:300])

    async def unload_adapter(self, name: str) -> None:
        """``/unload_lora_adapter`` on every replica (forgotten here even if one refuses)."""
        self._adapter_versions.pop(name, None)
        self._adapter_paths.pop(name, None)
        for key in [key for key in self._reload_locks if key[1] == name]:
            del self._reload_locks[key]
            self._reloaded_at.pop(key, None)

        async def unload(endpoint: _Endpoint) -> None:
            try:
                await self._control(endpoint, "/unload_lora_adapter", {"lora_name": name})
            except _Refused as exc:
                if "not loaded" not in str(exc):  # a restarted replica has nothing to unload
                    raise

        for result in await self._each_replica(unload):
            if isinstance(result, EngineError):
                raise result

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
