"""The asyncio runtime: actors, rollout, engines, curriculum scheduler, CLI.

Public names are exported lazily (PEP 562): ``envtune.agents`` imports
``envtune.runtime.engines.base``, and an eager import of the rollout actor here would import
``envtune.agents`` back while it is still initialising.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "Actor": "actors",
    "Mailbox": "actors",
    "MailboxClosed": "actors",
    "MailboxFull": "actors",
    "Stop": "actors",
    "STOP_ORDER": "supervisor",
    "Supervisor": "supervisor",
    "GroupsDiscarded": "rollout",
    "PolicyUpdated": "rollout",
    "RetryingEngine": "rollout",
    "RetryPolicy": "rollout",
    "RolloutActor": "rollout",
    "RolloutConfig": "rollout",
    "StalenessGate": "rollout",
    "TaskSpec": "rollout",
    "TrajectoryGroup": "rollout",
    "MetricsRecord": "metrics",
    "MetricsRecorder": "metrics",
    "LatencyModel": "fake_engine",
    "LatencyModelEngine": "fake_engine",
    "configure_logging": "logs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'envtune.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(f"envtune.runtime.{module}"), name)
