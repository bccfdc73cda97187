"""envtune's side of the τ² tool worker: ``worker_main.py`` in the OOD extra environment.

A ``WorkerProcess`` (deadlines, restarts, session replay; see ``environments/worker_process.py``) whose
script is tau2's worker and whose Python is the OOD extra environment's (``make setup-ood``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from envtune.environments.worker_process import (
    DEFAULT_TIMEOUT_S,
    WorkerError,
    WorkerLost,
    WorkerProcess,
    WorkerUnavailable,
)

WORKER_SCRIPT = Path(__file__).with_name("worker_main.py")
PYTHON_ENV = "ENVTUNE_OOD_PYTHON"
"""Environment variable naming the OOD extra environment's Python (default ``.cache/ood-venv``)."""

__all__ = ["PYTHON_ENV", "Tau2Worker", "WorkerError", "WorkerLost", "WorkerUnavailable", "default_python"]


def default_python() -> Path:
    configured = os.environ.get(PYTHON_ENV)
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[2] / ".cache" / "ood-venv" / "bin" / "python"


class Tau2Worker(WorkerProcess):
    """The τ² worker process."""

    def __init__(self, python: Path | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        super().__init__(
            Path(python) if python is not None else default_python(),
            WORKER_SCRIPT,
            timeout_s=timeout_s,
            missing_hint=(
                f"the τ² suites need the OOD extra environment; run `make setup-ood` or set {PYTHON_ENV}"
            ),
        )

    def open_session(self, session: str, domain: str, task_id: str) -> Any:  # type: ignore[override]
        return super().open_session(session, domain=domain, task_id=task_id)

    def call(  # type: ignore[override]
        self,
        session: str,
        name: str,
        arguments: dict[str, Any],
        *,
        requestor: str,
        call_id: str,
        sync: bool = True,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Run a tool call through tau2 (``sync=False``: as its evaluator replays gold actions)."""
        return super().call(
            session,
            timeout_s=timeout_s,
            name=name,
            arguments=arguments,
            requestor=requestor,
            call_id=call_id,
            sync=sync,
        )
