"""Runtime metrics: periodic snapshots of the rollout actor and the trajectory queue.

``MetricsRecorder`` is an actor that samples every ``interval_s`` (and once more when stopped)
and turns the counters into rates: episodes/s, tokens/s, queue depth, in-flight count, the
staleness histogram and drops per reason. Each ``MetricsRecord`` is handed to ``on_record`` so the
entry point can append it to its ``metrics.jsonl`` (and is logged at debug level): metrics are
records kept apart from logs.

Left out: learner metrics (the learner reports its own) and any file writing.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import structlog
from envtune.runtime.actors import Actor, MailboxStatistics
from envtune.runtime.records import DropReason
from envtune.runtime.rollout import RolloutActor, RolloutStatistics

log = structlog.get_logger(__name__)


class RateMeter:
    """Episodes/s and tokens/s of a rollout between two readings (each reader keeps its own meter)."""

    def __init__(self) -> None:
        self._last: RolloutStatistics | None = None
        self._last_t = 0.0

    def rates(self, stats: RolloutStatistics, now: float) -> tuple[float, float]:
        """(episodes/s, tokens/s) of completed episodes since the previous reading; 0 at the first.

        A zero-length interval has no rate: its counts roll into the next reading's interval.
        """
        previous, dt = self._last, now - self._last_t
        if previous is None:
            self._last, self._last_t = stats, now
            return 0.0, 0.0
        if dt <= 0:
            return 0.0, 0.0
        completed = stats.episodes_completed - previous.episodes_completed
        tokens = stats.generated_tokens - previous.generated_tokens
        self._last, self._last_t = stats, now
        return completed / dt, tokens / dt


@dataclass(frozen=True, slots=True)
class SampleNow:
    """Ask the recorder for a record right away (e.g. at a learner step)."""

    label: str = ""
    """Free-form tag copied into the record."""


@dataclass(frozen=True, slots=True)
class MetricsRecord:
    """One snapshot of the runtime; rates are over the interval since the previous record."""

    time_s: float
    """Seconds since the recorder started (event-loop clock)."""
    interval_s: float
    """Length of the interval the rates cover."""
    episodes_per_s: float
    """Completed (emitted) episodes per second over the interval."""
    tokens_per_s: float
    """Model-sampled tokens of completed episodes per second over the interval."""
    episodes_started: int
    """Cumulative episodes started."""
    episodes_completed: int
    """Cumulative episodes completed."""
    episodes_dropped: int
    """Cumulative episodes dropped."""
    dropped_by_reason: Mapping[DropReason, int]
    """Cumulative drops per reason (``dropped/<reason>``)."""
    in_flight: int
    """Episodes started and not yet completed or dropped."""
    queue_depth: int
    """Groups waiting in the trajectory queue."""
    queue_capacity: int
    """The trajectory queue's bound (0 when no queue is watched)."""
    policy_version: int
    """Policy version the rollout believes the engine serves."""
    staleness: Mapping[int, int]
    """Cumulative histogram of emitted groups by staleness at emission."""
    label: str = ""
    """Tag of an on-demand sample (``SampleNow.label``), empty for periodic ones."""

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (mapping keys as strings) for ``metrics.jsonl``."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["dropped_by_reason"] = {str(k): v for k, v in self.dropped_by_reason.items()}
        out["staleness"] = {str(k): v for k, v in self.staleness.items()}
        return out


class MetricsRecorder(Actor[SampleNow]):
    """Samples a rollout actor (and optionally the trajectory queue) on a period."""

    accepts = (SampleNow,)

    def __init__(
        self,
        rollout: RolloutActor,
        queue: Callable[[], MailboxStatistics] | None = None,
        *,
        interval_s: float = 10.0,
        on_record: Callable[[MetricsRecord], None] | None = None,
        keep_last: int = 1024,
        name: str = "metrics",
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        super().__init__(name, mailbox_size=8)
        self._rollout = rollout
        self._queue = queue
        self.interval_s = interval_s
        self._on_record = on_record
        self._records: collections.deque[MetricsRecord] = collections.deque(maxlen=keep_last)
        self._t0: float | None = None
        self._last_t = 0.0
        self._meter = RateMeter()

    def records(self) -> tuple[MetricsRecord, ...]:
        """The most recent records, oldest first (at most ``keep_last``)."""
        return tuple(self._records)

    def sample(self, label: str = "") -> MetricsRecord:
        """Take a record now, emit it as a log event and hand it to ``on_record``."""
        now = asyncio.get_running_loop().time()
        if self._t0 is None:
            self._t0 = self._last_t = now
        stats = self._rollout.statistics()
        dt = now - self._last_t
        episodes_per_s, tokens_per_s = self._meter.rates(stats, now)
        if dt > 0:
            self._last_t = now
        queue = self._queue() if self._queue is not None else None
        record = MetricsRecord(
            time_s=now - self._t0,
            interval_s=dt,
            episodes_per_s=episodes_per_s,
            tokens_per_s=tokens_per_s,
            episodes_started=stats.episodes_started,
            episodes_completed=stats.episodes_completed,
            episodes_dropped=stats.episodes_dropped,
            dropped_by_reason=stats.dropped_by_reason,
            in_flight=stats.in_flight,
            queue_depth=queue.depth if queue else 0,
            queue_capacity=queue.capacity if queue else 0,
            policy_version=stats.policy_version,
            staleness=stats.staleness_at_emission,
            label=label,
        )
        self._records.append(record)
        log.debug("runtime.metrics", **record.as_dict())
        if self._on_record is not None:
            self._on_record(record)
        return record

    async def run(self) -> None:
        self.sample("start")
        async with asyncio.TaskGroup() as group:
            ticker = group.create_task(self._tick(), name=f"{self.name}:tick")
            try:
                await super().run()
            finally:
                ticker.cancel()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.sample()

    async def handle(self, message: SampleNow) -> None:
        match message:
            case SampleNow(label=label):
                self.sample(label)
            case _:
                raise TypeError(f"{self.name}: unexpected message {message!r}")

    async def on_stop(self, reason: str) -> None:
        self.sample("final")
