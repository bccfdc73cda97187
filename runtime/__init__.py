"""The generic asyncio actor runtime: standard library and structlog only.

Actors with bounded mailboxes and a supervisor that stops them in a written order; the rollout actor
(GRPO groups, the staleness gate, drop accounting) and its boundary records; the synchronous
reference loop; runtime metrics; adapter publishing (weight sync); logging set-up. Sub-packages hold
what is not generic: ``engines`` (inference backends), ``recipe`` (Environment Tuning), ``cli``
(entry points) and ``testing`` (test doubles).
"""

from envtune.runtime.actors import Actor, ActorStatistics, Mailbox, MailboxClosed, MailboxFull, Stop
from envtune.runtime.logs import configure_logging
from envtune.runtime.metrics import MetricsRecord, MetricsRecorder, RateMeter
from envtune.runtime.records import (
    DropReason,
    GroupsDiscarded,
    IteratorTaskSource,
    PolicyUpdated,
    TaskSource,
    TaskSpec,
    TrajectoryGroup,
    is_stale,
)
from envtune.runtime.reference import SynchronousResult, run_synchronous_batches
from envtune.runtime.rollout import RolloutActor, RolloutConfig, RolloutStatistics, StalenessGate
from envtune.runtime.supervisor import STOP_ORDER, Supervisor
from envtune.runtime.weight_sync import AdapterPublisher, PublishedAdapter, WeightSyncError, adapter_name

__all__ = [
    "STOP_ORDER",
    "Actor",
    "ActorStatistics",
    "AdapterPublisher",
    "DropReason",
    "GroupsDiscarded",
    "IteratorTaskSource",
    "Mailbox",
    "MailboxClosed",
    "MailboxFull",
    "MetricsRecord",
    "MetricsRecorder",
    "PolicyUpdated",
    "PublishedAdapter",
    "RateMeter",
    "RolloutActor",
    "RolloutConfig",
    "RolloutStatistics",
    "StalenessGate",
    "Stop",
    "Supervisor",
    "SynchronousResult",
    "TaskSource",
    "TaskSpec",
    "TrajectoryGroup",
    "WeightSyncError",
    "adapter_name",
    "configure_logging",
    "is_stale",
    "run_synchronous_batches",
]
