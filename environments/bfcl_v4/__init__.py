"""BFCL V4 agentic suites: memory (key-value, vector, recursive summary) and web search.

Data from the pinned ``bfcl-eval==2026.3.23`` wheel (``environments/assets.py``); tools implemented by
envtune with BFCL's semantics; verdicts by BFCL's final-answer rule. Public names:
"""

from envtune.environments.bfcl_v4.answer_check import AnswerVerdict, check_answer, standardize
from envtune.environments.bfcl_v4.data import (
    MEMORY_BACKENDS,
    MEMORY_SCENARIOS,
    WEB_SEARCH_VARIANTS,
    AgenticTask,
    memory_tasks,
    web_search_tasks,
)
from envtune.environments.bfcl_v4.episode import AgenticEpisode
from envtune.environments.bfcl_v4.memory_env import MemoryEnvironment
from envtune.environments.bfcl_v4.web_search_env import WebSearchEnvironment

__all__ = [
    "MEMORY_BACKENDS",
    "MEMORY_SCENARIOS",
    "WEB_SEARCH_VARIANTS",
    "AgenticEpisode",
    "AgenticTask",
    "AnswerVerdict",
    "MemoryEnvironment",
    "WebSearchEnvironment",
    "check_answer",
    "memory_tasks",
    "standardize",
    "web_search_tasks",
]
