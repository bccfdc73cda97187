"""The BFCL V4 web-search suites (Base and No-Snippet): multi-hop questions answered by searching.

Every episode gets its own ``WebSearchTools`` over the environment's ``SearchBackend`` (shared; the
backends hold no per-episode state) with snippets shown or hidden by variant. Without a configured
backend the environment answers offline from ``annotation_recording``: pages envtune writes from BFCL's
per-hop answer annotations (see ``search_backends.py``), which makes every task solvable offline and
says nothing about a model's skill on the live web.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping

from envtune.environments.bfcl_v4 import prompts
from envtune.environments.bfcl_v4.data import (
    WEB_SEARCH_CLASS,
    WEB_SEARCH_VARIANTS,
    AgenticTask,
    class_docs,
    web_search_tasks,
)
from envtune.environments.bfcl_v4.episode import AgenticEpisode
from envtune.environments.bfcl_v4.search_backends import (
    RecordedBackend,
    SearchBackend,
    WebRecording,
    annotation_recording,
)
from envtune.environments.bfcl_v4.web_search import WebSearchTools
from envtune.environments.episode import EVAL_MAX_STEPS_PER_TURN, EpisodeConfig
from envtune.environments.suite_api import SuiteTask
from envtune.environments.toolbox import ToolBox
from envtune.environments.types import FeedbackMode

DEFAULT_CONFIG = EpisodeConfig(feedback=FeedbackMode.STANDARD, max_steps_per_turn=EVAL_MAX_STEPS_PER_TURN)


def suite_name(variant: str) -> str:
    return "bfcl-v4-web-search" + ("" if variant == "base" else "-" + variant.replace("_", "-"))


@functools.cache
def offline_recording() -> WebRecording:
    """The annotation corpus over all 100 tasks (both variants share the questions)."""
    tasks = web_search_tasks("base")
    return annotation_recording((task.id, task.sources) for task in tasks.values())


class WebSearchEnvironment:
    """Episodes of one web-search variant (``base`` or ``no_snippet``)."""

    def __init__(
        self,
        variant: str,
        *,
        backend: SearchBackend | None = None,
        failure_rate: float = 0.0,
        seed: int = 0,
        task_map: Mapping[str, AgenticTask] | None = None,
    ) -> None:
        if variant not in WEB_SEARCH_VARIANTS:
            raise ValueError(f"unknown web-search variant {variant!r}; expected one of {WEB_SEARCH_VARIANTS}")
        if not 0.0 <= failure_rate <= 1.0:
            raise ValueError(f"failure_rate must be in [0, 1], got {failure_rate}")
        self.variant = variant
        self.suite = suite_name(variant)
        self.backend = backend or RecordedBackend(offline_recording())
        self.failure_rate = failure_rate
        self.seed = seed
        self.task_map: Mapping[str, AgenticTask] = (
            task_map if task_map is not None else web_search_tasks(variant)
        )
        self._docs = class_docs(WEB_SEARCH_CLASS)

    def tasks(self) -> tuple[SuiteTask, ...]:
        return tuple(SuiteTask(id=t.id, category=t.category) for t in self.task_map.values())

    def make_episode(self, task_id: str, config: EpisodeConfig | None = None) -> AgenticEpisode:
        try:
            task = self.task_map[task_id]
        except KeyError:
            raise KeyError(f"unknown task id {task_id!r} in {self.suite}") from None
        # Failures are drawn per episode from (seed, task): the same run gives the same failures.
        episode_seed = int.from_bytes(
            hashlib.sha256(f"{self.seed}:{task_id}".encode()).digest()[:8], "little"
        )
        tools = WebSearchTools(
            self.backend,
            show_snippet=self.variant == "base",
            failure_rate=self.failure_rate,
            seed=episode_seed,
        )
        return AgenticEpisode(
            task, self.suite, ToolBox(tools, self._docs), prompts.ANSWER_FORMAT, config or DEFAULT_CONFIG
        )

    def close(self) -> None:
        """Write the recording when the backend records (nothing else to release)."""
        save = getattr(self.backend, "save", None)
        if callable(save):
            save()
