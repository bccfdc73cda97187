"""Test and benchmark stand-ins: an engine with a latency model, and a virtual-clock event loop.

``LatencyModelEngine`` implements the ``Engine`` protocol without a model: each call sleeps
``fixed_s + per_token_s * new_tokens`` on the event loop and returns the tokens a ``reply_fn``
scripts. It is infinitely parallel (any number of calls overlap), which is what makes "ideal
throughput" well defined in ``benchmarks/runtime_throughput.py``. It is NOT an inference engine
and never ships in a training run.

``VirtualClockLoop`` is an asyncio loop whose clock only moves when the loop would otherwise
sleep: timers fire in order, instantly, so tests of timeouts, backoff and latency need no real
sleeps. With ``charge_cpu=True`` the clock also advances by the loop thread's own CPU time, so a
run behaves as on a dedicated core where the only waiting is the modelled engine latency (the
runtime's overhead still delays everything, exactly as much as it costs).

Both live here because they are the two halves of one stand-in: the latency model's sleeps are
what the virtual clock skips.
"""

from __future__ import annotations

import asyncio
import selectors
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from envtune.agents.engine import Completion, EngineError, FinishReason, GenerateRequest

T = TypeVar("T")

ReplyFn = Callable[[GenerateRequest], tuple[int, ...]]
"""Scripts the engine: the token ids of the completion for a request."""

FaultFn = Callable[[GenerateRequest, int], EngineError | None]
"""Fault injection: given the request and the engine's call index, an error to raise (or None)."""


@dataclass(frozen=True, slots=True)
class LatencyModel:
    """Latency of one engine call: a fixed part plus a part per generated token."""

    fixed_s: float = 0.05
    """Queueing, scheduling and prefill, per call."""
    per_token_s: float = 0.002
    """Decode time per generated token."""

    def __post_init__(self) -> None:
        if self.fixed_s < 0 or self.per_token_s < 0:
            raise ValueError(f"latencies must be >= 0, got {self.fixed_s}, {self.per_token_s}")

    def seconds(self, new_tokens: int) -> float:
        """Modelled wall time of a call that generates ``new_tokens``."""
        return self.fixed_s + self.per_token_s * new_tokens


@dataclass(frozen=True, slots=True)
class LatencyEngineStatistics:
    """A snapshot of a ``LatencyModelEngine``."""

    calls: int
    """``generate`` calls started."""
    generated_tokens: int
    """Tokens returned, over all completions."""
    in_flight: int
    """Calls sleeping now."""
    peak_in_flight: int
    """Most calls ever sleeping at once."""
    modeled_s: float
    """Sum of the modelled latencies of all calls."""
    errors: int
    """Injected errors raised."""


class LatencyModelEngine:
    """An ``Engine`` stand-in: sleeps per the latency model, returns scripted tokens."""

    def __init__(
        self,
        latency: LatencyModel,
        reply_fn: ReplyFn,
        *,
        policy_version: int = 0,
        logprob: float = -1.0,
        fault_fn: FaultFn | None = None,
    ) -> None:
        self.latency = latency
        self._reply_fn = reply_fn
        self._fault_fn = fault_fn
        self._logprob = logprob
        self.policy_version = policy_version
        """Version stamped on completions (a weight-sync stand-in sets it)."""
        self._calls = 0
        self._tokens = 0
        self._in_flight = 0
        self._peak = 0
        self._modeled = 0.0
        self._errors = 0
        self._closed = False

    async def generate(self, request: GenerateRequest) -> Sequence[Completion]:
        if self._closed:
            raise EngineError("engine is closed", retryable=False)
        index = self._calls
        self._calls += 1
        if self._fault_fn is not None and (error := self._fault_fn(request, index)) is not None:
            self._errors += 1
            raise error
        n = request.sampling.n
        replies = [self._reply_fn(request) for _ in range(n)]
        longest = max(len(r) for r in replies)
        delay = self.latency.fixed_s + self.latency.per_token_s * longest
        self._modeled += delay
        self._in_flight += 1
        if self._in_flight > self._peak:
            self._peak = self._in_flight
        try:
            await asyncio.sleep(delay)
        finally:
            self._in_flight -= 1
        version = self.policy_version
        prompt_tokens = len(request.prompt_ids)
        out = []
        for ids in replies:
            self._tokens += len(ids)
            out.append(
                Completion(
                    token_ids=ids,
                    logprobs=(self._logprob,) * len(ids),
                    finish_reason=FinishReason.STOP,
                    policy_version=version,
                    prompt_tokens=prompt_tokens,
                )
            )
        return out

    async def close(self) -> None:
        self._closed = True

    def statistics(self) -> LatencyEngineStatistics:
        return LatencyEngineStatistics(
            calls=self._calls,
            generated_tokens=self._tokens,
            in_flight=self._in_flight,
            peak_in_flight=self._peak,
            modeled_s=self._modeled,
            errors=self._errors,
        )


class VirtualClockDeadlock(RuntimeError):
    """The virtual loop had no timer to jump to and nothing arrived: every task is waiting forever."""


class _JumpingSelector(selectors.DefaultSelector):
    """Polls real file descriptors without blocking; a would-be sleep advances the virtual clock."""

    def __init__(self, advance: Callable[[float], None], idle_limit_s: float) -> None:
        super().__init__()
        self._advance = advance
        self._idle_limit_s = idle_limit_s

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            # No timer pending: only a thread or real I/O can wake us; wait a bounded real time.
            events = super().select(self._idle_limit_s)
            if not events:
                raise VirtualClockDeadlock(f"no timer pending and nothing happened for {self._idle_limit_s}s")
            return events
        events = super().select(0)
        if not events and timeout > 0:
            self._advance(timeout)
        return events


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop on a virtual clock (see the module docstring); single-threaded use only."""

    def __init__(self, *, charge_cpu: bool = False, idle_limit_s: float = 30.0) -> None:
        self._idle_s = 0.0
        self._charge_cpu = charge_cpu
        self._cpu0 = time.thread_time()
        super().__init__(selector=_JumpingSelector(self._advance, idle_limit_s))

    def _advance(self, seconds: float) -> None:
        self._idle_s += seconds

    def time(self) -> float:
        if self._charge_cpu:
            return self._idle_s + (time.thread_time() - self._cpu0)
        return self._idle_s


def run_virtual(main: Coroutine[Any, Any, T], *, charge_cpu: bool = False) -> T:
    """Run ``main`` to completion on a fresh ``VirtualClockLoop``."""
    with asyncio.Runner(loop_factory=lambda: VirtualClockLoop(charge_cpu=charge_cpu)) as runner:
        return runner.run(main)
