"""A fault-injecting HTTP proxy for an SGLang-protocol server: the engine faults of a long run, on demand.

``FaultProxy`` listens on 127.0.0.1 and forwards every request to an upstream server (envtune's
``SGLangProtocolServer`` in the tests), except that a seeded fraction of ``/generate`` requests get
one fault instead of the upstream's answer:

- ``http_500``: HTTP 500 with an error body (also 502/503 through ``status``);
- ``stall``: no answer for ``stall_s`` (set it past the client's timeout), then a 504;
- ``reset``: the upstream's status line, headers and half the body, then the connection is aborted;
- ``malformed_json``: HTTP 200 with a body that is not JSON;
- ``truncated_json``: HTTP 200 with the first half of the upstream's JSON (a well-formed HTTP message);
- ``wrong_length_logprobs``: the upstream's answer with one logprob entry removed;
- ``nan_logprob``: the upstream's answer with a logprob replaced by NaN;
- ``bad_token``: the upstream's answer with an output token id outside the vocabulary.

``outage(seconds)`` stops listening (open connections are cut) and listens again on the same port
later: a stop/restart of the engine as its clients see it. ``statistics()`` counts requests and
faults by kind. Nothing here is on a production path; the module exists so the same faults drive
the tests and ``benchmarks/faults.py``.
"""

from __future__ import annotations

import asyncio
import enum
import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web


class Fault(enum.StrEnum):
    """One way a ``/generate`` answer goes wrong."""

    HTTP_500 = "http_500"
    STALL = "stall"
    RESET = "reset"
    MALFORMED_JSON = "malformed_json"
    TRUNCATED_JSON = "truncated_json"
    WRONG_LENGTH_LOGPROBS = "wrong_length_logprobs"
    NAN_LOGPROB = "nan_logprob"
    BAD_TOKEN = "bad_token"


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """Which faults, how often, how long a stall lasts."""

    rate: float = 0.1
    """Fraction of ``/generate`` requests that get a fault."""
    faults: tuple[Fault, ...] = tuple(Fault)
    """Faults drawn from, uniformly."""
    stall_s: float = 3.0
    """How long a stalled request hangs (longer than the client's request timeout)."""
    seed: int = 0
    """Seed of the draws (which requests, which faults)."""
    bad_token_id: int = 1 << 40
    """The id ``bad_token`` puts into an answer."""

    def __post_init__(self) -> None:
        if not 0 <= self.rate <= 1 or not self.faults or self.stall_s < 0:
            raise ValueError("rate in [0, 1], at least one fault, stall_s >= 0")


@dataclass(frozen=True, slots=True)
class ProxyStatistics:
    """What the proxy did."""

    requests: int
    """Requests received (all paths)."""
    generate_requests: int
    """``/generate`` requests received."""
    faults: dict[str, int]
    """Faults injected, by kind."""
    outages: int
    """Stop/restart cycles."""


class FaultProxy:
    """Forwards to ``upstream``, injecting the faults of ``plan`` (see the module docstring)."""

    def __init__(self, upstream: str, plan: FaultPlan | None = None) -> None:
        self.upstream = upstream.rstrip("/")
        self.plan = plan or FaultPlan()
        self.enabled = True
        """Faults are injected only while True (forwarding goes on either way)."""
        self._rng = random.Random(self.plan.seed)
        self._faults: Counter[str] = Counter()
        self._requests = 0
        self._generate = 0
        self._outages = 0
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> str:
        """Listen (port 0: any free port); returns the proxy's URL."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)
            )
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, "127.0.0.1", port or self.port, reuse_address=True)
        await self._site.start()
        self.port = int(self._runner.addresses[0][1])
        return self.url

    async def stop_listening(self) -> None:
        """Close the port and cut every open connection at once (the engine "dies": no request in
        flight gets an answer, as opposed to a graceful shutdown)."""
        if self._runner is not None:
            if self._site is not None:
                await self._site.stop()
            server = self._runner.server
            for handler in list(server.connections if server is not None else ()):
                if handler.transport is not None:
                    handler.transport.abort()
            await self._runner.cleanup()
            self._runner = None

    async def outage(self, seconds: float) -> None:
        """Be unreachable for ``seconds``, then listen on the same port again."""
        self._outages += 1
        await self.stop_listening()
        await asyncio.sleep(seconds)
        await self.start(self.port)

    async def close(self) -> None:
        await self.stop_listening()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> FaultProxy:
        if self._runner is None:
            await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def statistics(self) -> ProxyStatistics:
        return ProxyStatistics(
            requests=self._requests,
            generate_requests=self._generate,
            faults=dict(self._faults),
            outages=self._outages,
        )

    # --- forwarding ---------------------------------------------------------------------------

    def _draw(self, path: str) -> Fault | None:
        if path != "/generate" or not self.enabled or self._rng.random() >= self.plan.rate:
            return None
        return self._rng.choice(self.plan.faults)

    async def _forward(self, request: web.Request, body: bytes) -> tuple[int, bytes, str]:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "authorization")}
        async with self._session.request(
            request.method, self.upstream + request.path_qs, data=body or None, headers=headers
        ) as response:
            return response.status, await response.read(), response.content_type

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self._requests += 1
        self._generate += request.path == "/generate"
        fault = self._draw(request.path)
        body = await request.read()
        if fault is not None:
            self._faults[str(fault)] += 1
        if fault is Fault.HTTP_500:
            return web.json_response({"error": {"message": "injected fault"}}, status=500)
        if fault is Fault.STALL:
            await asyncio.sleep(self.plan.stall_s)
            return web.Response(status=504)
        if fault is Fault.MALFORMED_JSON:
            return web.Response(body=b"{this is not json", content_type="application/json")
        try:
            status, payload, content_type = await self._forward(request, body)
        except (aiohttp.ClientConnectionError, TimeoutError):
            # What a router answers while the engine behind it is down or restarting.
            return web.json_response({"error": {"message": "upstream unavailable"}}, status=502)
        if fault is None or status != 200:
            return web.Response(status=status, body=payload, content_type=content_type)
        if fault is Fault.TRUNCATED_JSON:
            return web.Response(body=payload[: len(payload) // 2], content_type="application/json")
        if fault is Fault.RESET:
            response = web.StreamResponse(status=200)
            response.content_type = "application/json"
            response.content_length = len(payload)
            await response.prepare(request)
            await response.write(payload[: len(payload) // 2])
            assert request.transport is not None
            request.transport.abort()
            return response
        mangled = _mangle(json.loads(payload), fault, self.plan.bad_token_id)
        return web.Response(body=json.dumps(mangled).encode(), content_type="application/json")


def _items(payload: Any) -> Sequence[dict[str, Any]]:
    return payload if isinstance(payload, list) else [payload]


def _mangle(payload: Any, fault: Fault, bad_token_id: int) -> Any:
    """``payload`` (a /generate answer) with one item's logprobs or ids broken per ``fault``."""
    item = _items(payload)[0]
    entries = item["meta_info"]["output_token_logprobs"]
    if fault is Fault.WRONG_LENGTH_LOGPROBS:
        del entries[-1]
    elif fault is Fault.NAN_LOGPROB:
        entries[0][0] = float("nan")
    elif fault is Fault.BAD_TOKEN:
        item["output_ids"][0] = bad_token_id
        entries[0][1] = bad_token_id
    return payload
