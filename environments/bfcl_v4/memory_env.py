"""The BFCL V4 memory suites: prerequisite conversations fill a memory, questions are asked on it.

BFCL runs, per backend and scenario, the scenario's prerequisite conversations in order, each one
starting from the memory the previous one left (snapshot files under its result folder), then asks
every question of the scenario on the final memory. ``MemoryEnvironment`` keeps those snapshots in
memory instead of files: a prerequisite episode loads its predecessor's snapshot and stores its own
when it ends; a question loads the scenario's final snapshot. The order is the runner's job (each
task lists ``depends_on``); asking for an episode too early raises ``DependencyError`` rather than
starting from an empty memory as BFCL does with a warning.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from typing import Any

from envtune.environments.bfcl_v4 import prompts
from envtune.environments.bfcl_v4.data import BACKEND_CLASSES, AgenticTask, class_docs, memory_tasks
from envtune.environments.bfcl_v4.embeddings import Embedder, HashingEmbedder
from envtune.environments.bfcl_v4.episode import AgenticEpisode
from envtune.environments.bfcl_v4.memory_kv import KeyValueMemory
from envtune.environments.bfcl_v4.memory_rec_sum import RecursiveSummaryMemory
from envtune.environments.bfcl_v4.memory_vector import VectorMemory
from envtune.environments.episode import EVAL_MAX_STEPS_PER_TURN, EpisodeConfig
from envtune.environments.suite_api import DependencyError, SuiteTask
from envtune.environments.toolbox import ToolBox
from envtune.environments.types import FeedbackMode

MemoryBackend = KeyValueMemory | VectorMemory | RecursiveSummaryMemory

DEFAULT_CONFIG = EpisodeConfig(feedback=FeedbackMode.STANDARD, max_steps_per_turn=EVAL_MAX_STEPS_PER_TURN)
"""Evaluation condition: BFCL's plain results and its per-turn step budget."""


def suite_name(backend: str) -> str:
    return "bfcl-v4-memory-" + backend.replace("_", "-")


class MemoryEnvironment:
    """Episodes of one memory backend (``kv``, ``vector`` or ``rec_sum``) over the five scenarios."""

    def __init__(
        self,
        backend: str,
        *,
        embedder: Embedder | None = None,
        task_map: Mapping[str, AgenticTask] | None = None,
    ) -> None:
        if backend not in BACKEND_CLASSES:
            raise ValueError(f"unknown memory backend {backend!r}; expected one of {tuple(BACKEND_CLASSES)}")
        self.backend = backend
        self.suite = suite_name(backend)
        self.embedder = embedder or HashingEmbedder()
        self.task_map: Mapping[str, AgenticTask] = task_map if task_map is not None else memory_tasks(backend)
        self._docs = class_docs(BACKEND_CLASSES[backend])
        self._lock = threading.Lock()
        self._snapshots: dict[str, str] = {}  # scenario -> JSON of the latest memory
        self._completed: set[str] = set()

    def tasks(self) -> tuple[SuiteTask, ...]:
        return tuple(
            SuiteTask(id=t.id, category=t.category, scored=t.scored, depends_on=t.depends_on)
            for t in self.task_map.values()
        )

    def snapshot(self, scenario: str) -> dict[str, Any] | None:
        """The latest memory of a scenario (a copy), or None before its first conversation ended."""
        with self._lock:
            text = self._snapshots.get(scenario)
        return json.loads(text) if text is not None else None

    def completed(self, task_id: str) -> bool:
        with self._lock:
            return task_id in self._completed

    def make_episode(self, task_id: str, config: EpisodeConfig | None = None) -> AgenticEpisode:
        try:
            task = self.task_map[task_id]
        except KeyError:
            raise KeyError(f"unknown task id {task_id!r} in {self.suite}") from None
        assert task.scenario is not None
        with self._lock:
            missing = [dep for dep in task.depends_on if dep not in self._completed]
            text = self._snapshots.get(task.scenario) if task.depends_on else None
        if missing:
            raise DependencyError(
                f"{task_id} needs {len(missing)} prerequisite conversation(s) to run first, starting with "
                f"{missing[0]}"
            )
        memory = self._new_backend()
        if text is not None:
            memory._load(json.loads(text))
        context = prompts.memory_instruction(self.backend, task.scenario, memory._context_dump())
        if task.scored:
            context = f"{context}\n\n{prompts.ANSWER_FORMAT}"
        on_finish = None if task.scored else (lambda: self._commit(task, memory))
        return AgenticEpisode(
            task, self.suite, ToolBox(memory, self._docs), context, config or DEFAULT_CONFIG, on_finish
        )

    def close(self) -> None:
        with self._lock:
            self._snapshots.clear()
            self._completed.clear()

    def _new_backend(self) -> MemoryBackend:
        if self.backend == "kv":
            return KeyValueMemory()
        if self.backend == "vector":
            return VectorMemory(self.embedder)
        return RecursiveSummaryMemory()

    def _commit(self, task: AgenticTask, memory: MemoryBackend) -> None:
        assert task.scenario is not None
        text = json.dumps(memory._export())
        with self._lock:
            self._snapshots[task.scenario] = text
            self._completed.add(task.id)
