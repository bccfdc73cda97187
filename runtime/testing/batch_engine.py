"""A bounded-batch engine model: what an SGLang server's throughput looks like, without a model.

Unlike ``LatencyModelEngine`` (infinitely parallel), this engine has a running batch of at most
``max_running`` requests; the rest wait in a FIFO queue, as in SGLang's scheduler with
``max_running_requests`` (or a KV cache that holds that many). Every running request decodes one
token per decode step, and a step takes ``step_s(a) = step_base_s + step_per_request_s * a`` for a
running batch of ``a``: a bigger batch yields more tokens per second but each request runs slower,
which is the trade-off a rollout discipline plays against. Admitting requests costs a prefill stall
of ``prefill_s_per_token`` per uncached prompt token, during which no request decodes (SGLang's
prefill-first scheduling); ``stall`` adds any other pause (a weight load).

Time is fluid: between events every running request advances ``dt / step_s(a)`` tokens (processor
sharing); an arrival joins at once if a slot is free. Run it on ``VirtualClockLoop`` to simulate
hours of serving in seconds. The engine's scheduler is a coroutine (``run``) its owner starts in a
TaskGroup; ``generate`` queues a request and waits for its turn.

What a request costs is the caller's: ``shape_fn(request) -> (uncached prompt tokens, reply
tokens)``. Statistics: busy time, time-weighted running batch, tokens, and the busy time that
overlapped a caller-marked interval (``mark``), e.g. a learner step.

Not an inference engine; never part of a training run.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from envtune.agents.engine import Completion, EngineError, FinishReason, GenerateRequest

ShapeFn = Callable[[GenerateRequest], tuple[int, int]]
"""``(uncached prompt tokens, reply tokens)`` of a request."""

_FILL = tuple(range(1000, 1000 + 65536))
"""Token ids handed back (a slice per reply; never decoded)."""


@dataclass(frozen=True, slots=True)
class BatchLatency:
    """Per-step decode latency against the running batch, prefill cost, and the batch bound."""

    max_running: int = 128
    """Most requests decoding at once (SGLang ``max_running_requests`` / what the KV cache holds)."""
    step_base_s: float = 0.012
    """One decode step with a single running request (memory-bound weights read)."""
    step_per_request_s: float = 0.00015
    """What each further running request adds to a decode step (attention over its KV)."""
    prefill_s_per_token: float = 0.00004
    """Prefill time per uncached prompt token (stalls decoding while it runs)."""

    def __post_init__(self) -> None:
        if self.max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {self.max_running}")
        if min(self.step_base_s, self.step_per_request_s, self.prefill_s_per_token) < 0:
            raise ValueError("latencies must be >= 0")
        if self.step_base_s + self.step_per_request_s <= 0:
            raise ValueError("a decode step must take some time")

    def step_s(self, running: int) -> float:
        """Seconds of one decode step with ``running`` requests in the batch."""
        return self.step_base_s + self.step_per_request_s * running

    def tokens_per_s(self, running: int) -> float:
        """Decode throughput of a full step at ``running`` requests."""
        return running / self.step_s(running)


@dataclass(frozen=True, slots=True)
class BatchEngineStatistics:
    """A snapshot of a ``BatchedEngineModel``."""

    calls: int
    generated_tokens: int
    prefill_tokens: int
    busy_s: float
    """Time with at least one request running or a stall in progress."""
    batch_token_s: float
    """Integral of the running batch over time (divide by elapsed time for the mean batch)."""
    marked_busy_s: float
    """Busy time that fell inside intervals marked with ``mark(True)``."""
    stalled_s: float
    """Time spent in prefill and other stalls."""
    queued: int
    running: int


@dataclass(slots=True, eq=False)
class _Job:
    finish_at: float
    """Work-clock value at which the reply is complete."""
    tokens: int
    future: asyncio.Future[int]


class BatchedEngineModel:
    """An ``Engine`` whose throughput follows ``BatchLatency`` (see the module docstring)."""

    def __init__(self, latency: BatchLatency, shape_fn: ShapeFn, *, policy_version: int = 0) -> None:
        self.latency = latency
        self._shape_fn = shape_fn
        self.policy_version = policy_version
        self._queue: deque[tuple[int, int, asyncio.Future[int]]] = deque()
        self._running: list[tuple[float, int, _Job]] = []
        self._order = itertools.count()
        self._work = 0.0  # decode steps every running request has advanced by (the fluid clock)
        self._pending_stall = 0.0
        self._wake: asyncio.Event | None = None
        self._marked = False
        self._calls = 0
        self._tokens = 0
        self._prefill = 0
        self._busy = 0.0
        self._batch_token = 0.0
        self._marked_busy = 0.0
        self._stalled = 0.0
        self._closed = False

    # --- the Engine protocol -------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> Sequence[Completion]:
        if self._closed:
            raise EngineError("engine is closed", retryable=False)
        if request.sampling.n != 1:
            raise EngineError("the engine model serves n=1 requests", retryable=False)
        prefill, tokens = self._shape_fn(request)
        tokens = max(1, min(tokens, request.sampling.max_new_tokens))
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._calls += 1
        self._queue.append((prefill, tokens, future))
        self._notify()
        await future
        ids = _FILL[:tokens]
        return [
            Completion(ids, (-1.0,) * tokens, FinishReason.STOP, self.policy_version, prefill)
        ]

    async def close(self) -> None:
        self._closed = True
        self._notify()

    # --- control -----------------------------------------------------------------------------------

    def stall(self, seconds: float) -> None:
        """Pause decoding for ``seconds`` (a weight load, a cache flush)."""
        self._pending_stall += seconds
        self._notify()

    def mark(self, on: bool) -> None:
        """Start or end a marked interval (busy time inside it is counted as ``marked_busy_s``)."""
        self._marked = on

    def statistics(self) -> BatchEngineStatistics:
        return BatchEngineStatistics(
            calls=self._calls,
            generated_tokens=self._tokens,
            prefill_tokens=self._prefill,
            busy_s=self._busy,
            batch_token_s=self._batch_token,
            marked_busy_s=self._marked_busy,
            stalled_s=self._stalled,
            queued=len(self._queue),
            running=len(self._running),
        )

    # --- the scheduler -----------------------------------------------------------------------------

    def _notify(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _admit(self) -> None:
        while self._queue and len(self._running) < self.latency.max_running:
            prefill, tokens, future = self._queue.popleft()
            if future.cancelled():
                continue
            self._pending_stall += prefill * self.latency.prefill_s_per_token
            self._prefill += prefill
            job = _Job(self._work + tokens, tokens, future)
            heapq.heappush(self._running, (job.finish_at, next(self._order), job))

    def _complete(self) -> None:
        while self._running and self._running[0][0] <= self._work + 1e-6:  # a millionth of a token
            _, _, job = heapq.heappop(self._running)
            self._tokens += job.tokens
            if not job.future.done():
                job.future.set_result(job.tokens)

    def _advance(self, dt: float) -> None:
        """``dt`` seconds pass: stalls first, then fluid decoding of the running batch."""
        if dt <= 0:
            return
        busy = bool(self._running) or self._pending_stall > 0
        stall = min(dt, self._pending_stall)
        self._pending_stall -= stall
        self._stalled += stall
        decode = dt - stall
        running = len(self._running)
        if running and decode > 0:
            self._work += decode / self.latency.step_s(running)
            self._batch_token += running * decode
        if busy:
            spent = stall + (decode if running else 0.0)
            self._busy += spent
            if self._marked:
                self._marked_busy += spent

    def _next_event_in(self) -> float | None:
        """Seconds until the next stall ends or the next request completes (None: nothing to do)."""
        if self._pending_stall > 0:
            return self._pending_stall
        if not self._running:
            return None
        steps = max(0.0, self._running[0][0] - self._work)
        return steps * self.latency.step_s(len(self._running))

    async def run(self) -> None:
        """The scheduler loop; runs until cancelled (or the engine is closed)."""
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        last = loop.time()
        while not self._closed:
            self._admit()
            wait = self._next_event_in()
            self._wake.clear()
            timed_out = False
            if wait is None:
                await self._wake.wait()
            elif wait > 0:
                try:
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
                except TimeoutError:
                    timed_out = True
            now = loop.time()
            # A timeout means the event is due, even when the clock's float resolution at a large
            # time value rounds the wait away.
            self._advance(max(now - last, wait) if timed_out and wait is not None else now - last)
            last = now
            self._complete()
        for _, _, job in self._running:
            job.future.cancel()
        for _, _, future in self._queue:
            future.cancel()
