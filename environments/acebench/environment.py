"""The ACEBench agent suite over a user-supplied checkout: tasks, the scenario worker, episodes.

``AceBenchEnvironment(root)`` reads the checkout's data and layout (``data.py``), starts the scenario
worker (``worker_main.py``, envtune's own Python by default, the checkout on its ``PYTHONPATH`` and as
its working folder) and builds ``AceEpisode``s. Multi-turn tasks need a user simulator: an
``EndpointConfig`` (OpenAI-compatible), a ``UserSimulator``, or a factory per task.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from envtune.environments.acebench.data import AceTask, load_layout, load_tasks
from envtune.environments.acebench.episode import AceEpisode, AceEpisodeConfig
from envtune.environments.suite_api import SuiteTask
from envtune.environments.tau2.user import EndpointConfig, OpenAIUserSimulator, UserSimulator
from envtune.environments.worker_process import WorkerProcess

SUITE = "acebench-agent"
WORKER_SCRIPT = Path(__file__).with_name("worker_main.py")


class AceBenchEnvironment:
    def __init__(
        self,
        root: Path,
        *,
        language: str = "en",
        user: UserSimulator | Callable[[AceTask], UserSimulator] | EndpointConfig | None = None,
        python: Path | None = None,
        config: AceEpisodeConfig | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.suite = SUITE
        self.root = Path(root).resolve()
        self.language = language
        self.layout = load_layout(self.root, language)
        self.task_map: Mapping[str, AceTask] = load_tasks(self.root, language)
        missing = {c for t in self.task_map.values() for c in t.involved_classes} - {
            c for modules in self.layout.modules.values() for c in modules
        }
        if missing:
            raise ValueError(f"the checkout maps no module for classes {sorted(missing)}")
        self.config = config or AceEpisodeConfig()
        self._user = (extra or {}).get("acebench_user_factory") or user
        self.worker = WorkerProcess(
            Path(python) if python is not None else Path(sys.executable),
            WORKER_SCRIPT,
            env={"PYTHONPATH": str(self.root)},
            cwd=self.root,
        )
        self._sessions = itertools.count()

    def tasks(self) -> tuple[SuiteTask, ...]:
        return tuple(SuiteTask(id=t.id, category=t.category) for t in self.task_map.values())

    def open_session(self, session: str, task: AceTask) -> None:
        self.worker.open_session(
            session,
            modules=dict(self.layout.modules[task.category]),
            involved_classes=list(task.involved_classes),
            initial_config=task.initial_config_json(),
            saved_attributes={k: list(v) for k, v in self.layout.saved_attributes.items()},
        )

    def user_for(self, task: AceTask) -> UserSimulator | None:
        if task.category != "agent_multi_turn":
            return None
        user = self._user
        if user is None:
            return None
        if isinstance(user, EndpointConfig):
            return OpenAIUserSimulator(user)
        if hasattr(user, "reply"):
            return user  # type: ignore[return-value]
        return user(task)

    def make_episode(
        self, task_id: str, config: AceEpisodeConfig | None = None, *, user: UserSimulator | None = None
    ) -> AceEpisode:
        try:
            task = self.task_map[task_id]
        except KeyError:
            raise KeyError(f"unknown task id {task_id!r} in {self.suite}") from None
        session = f"{task_id}:{next(self._sessions)}"
        return AceEpisode(self, task, config or self.config, session, user or self.user_for(task))

    def close(self) -> None:
        self.worker.close()
